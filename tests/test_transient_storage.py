"""Storage faults that pass: errors of a store that is briefly unreachable, throttling or renewing credentials
are retried (bounded exponential backoff with jitter) wherever run data crosses the network, and raised as a
retryable :class:`TransientStorageError` once the retries are spent; only proven damage (and a missing or
forbidden file) is a :class:`DataError`. End to end: a run reading shards from, and writing checkpoints to,
moto's S3 server through a proxy that resets every connection for 20 s in the middle of the run ends with the
accuracy matrix of a run without the outage."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from helpers import ResettingProxy, run_in_process, tiny_overrides
from inflora_ray import storage
from inflora_ray.data import DataError, build_benchmark
from inflora_ray.data.sample import write_imagenet_r
from inflora_ray.data.shard_writer import prepare_shards
from inflora_ray.presets import load_config
from inflora_ray.ray_train.errors import fatal_errors_recorded, read_fatal
from inflora_ray.ray_train.worker import FATAL_AT_SETUP, FATAL_WHILE_TRAINING
from inflora_ray.rundir import RunDir
from inflora_ray.storage import RetryPolicy, TransientStorageError, is_transient

REPO = Path(__file__).resolve().parents[1]
# What pyarrow's S3 client raised when the review's proxy reset its connections.
RESET = ("When reading information for key 'shards/train/task-000/part-00000.parquet' in bucket 'b': AWS Error "
         "NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Failure when receiving data from the peer; "
         "Details: Recv failure: Connection reset by peer")
FAST = {"INFLORA_STORAGE_RETRIES": "4", "INFLORA_STORAGE_RETRY_BASE_SECONDS": "0.001",
        "INFLORA_STORAGE_RETRY_CAP_SECONDS": "0.002"}


@contextmanager
def retry_events():
    """The fields of every ``storage_retry`` event logged inside the block."""
    events: list[dict] = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "storage_retry":
                events.append(dict(record._inflora_fields))

    logger, handler = logging.getLogger("inflora_ray.storage"), Grab(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def fast_retries(monkeypatch):
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------------------------------------------ classifier
S3 = "s3://b/shards/train/task-000/part-00000.parquet"
CASES = [
    # (error, path, transient?)
    (OSError(RESET), S3, True),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached"), S3, True),
    (OSError("When uploading part: AWS Error SLOW_DOWN during UploadPart operation: Please reduce your request rate."),
     S3, True),
    (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Unable to parse ExceptionName: "
             "SlowDown"), S3, True),
    (OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation"), S3, True),
    (OSError("AWS Error UNKNOWN (HTTP status 400) during HeadObject operation: ExpiredToken: The provided token "
             "has expired."), S3, True),
    (OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted)"), "gs://b/x", True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "/nfs/x", True),
    (TimeoutError("timed out"), "/nfs/x", True),
    (OSError(errno.ESTALE, "Stale file handle"), "/nfs/x", True),
    (OSError("an error the classifier does not know"), S3, True),  # on a store: most likely the network
    (TransientStorageError("spent"), "/x", True),
    # permanent: missing, forbidden, wrong credentials, full disks, damage, anything not an OSError
    (FileNotFoundError(errno.ENOENT, "Path does not exist 'b/shards/x.parquet'"), S3, False),
    (FileNotFoundError(errno.ENOENT, "No such file"), "/data/x", False),
    (PermissionError(errno.EACCES, "Permission denied"), "/data/x", False),
    (OSError("When reading information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
             "operation: No response body."), S3, False),
    (OSError("AWS Error UNKNOWN (HTTP status 400) during CreateBucket operation: InvalidBucketName"), S3, False),
    (OSError("AWS Error INVALID_ACCESS_KEY_ID during GetObject operation"), S3, False),
    (OSError(errno.ENOSPC, "No space left on device"), "/data/x", False),
    (OSError(errno.EFBIG, "File too large"), "/data/x", False),
    (OSError("Could not read page: CRC checksum verification failed"), "/data/x", False),
    (OSError("an error the classifier does not know"), "/data/x", False),
    (OSError("an error the classifier does not know"), "file:///data/x", False),
    (pa.ArrowInvalid("Parquet magic bytes not found in footer"), S3, False),
    (ValueError("not JSON"), S3, False),
]


@pytest.mark.parametrize("error,path,transient", CASES, ids=[f"{i}-{type(c[0]).__name__}" for i, c in
                                                              enumerate(CASES)])
def test_transient_classifier(error, path, transient):
    assert is_transient(error, path) is transient


def test_transient_error_is_retryable_by_the_workers(tmp_path):
    """A TransientStorageError is an OSError that none of the worker's fatal kinds catches, and is never written
    to the fatal marker, even by a block that lists OSError as fatal; a DataError still is."""
    error = TransientStorageError("cannot read s3://b/x: ...")
    assert isinstance(error, OSError) and not isinstance(error, (ValueError, DataError))
    assert not isinstance(error, FATAL_AT_SETUP) and not isinstance(error, FATAL_WHILE_TRAINING)
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(TransientStorageError):
        with fatal_errors_recorded(run, FATAL_WHILE_TRAINING + (OSError,), phase="training"):
            raise error
    assert read_fatal(run) is None
    with pytest.raises(DataError):
        with fatal_errors_recorded(run, FATAL_WHILE_TRAINING, phase="training"):
            raise DataError("shard file x is damaged")
    assert read_fatal(run)["type"] == "DataError"


# ------------------------------------------------------------------------------------------------ retry policy
def test_transient_retries_are_bounded_then_raise_the_retryable_type(fast_retries, monkeypatch):
    calls = []

    def always_reset():
        calls.append(time.monotonic())
        raise OSError(RESET)

    secret = "s3://b/x.json?X-Amz-Signature=abcdef0123"
    with retry_events() as events, pytest.raises(TransientStorageError) as info:
        storage.retrying("read", secret, always_reset)
    assert len(calls) == 4  # INFLORA_STORAGE_RETRIES
    assert [e["attempt"] for e in events] == [2, 3, 4] and {e["attempts"] for e in events} == {4}
    assert all(e["path"] == "s3://b/x.json?X-Amz-Signature=***" and "Connection reset" in e["error"] for e in events)
    assert "abcdef0123" not in str(info.value) and "cannot read s3://b/x.json" in str(info.value)
    assert "failed 4 time(s)" in str(info.value) and isinstance(info.value.__cause__, OSError)

    # The time bound: at most INFLORA_STORAGE_RETRY_MAX_SECONDS of waiting, whatever the attempts allow.
    for k, v in {"INFLORA_STORAGE_RETRIES": "1000", "INFLORA_STORAGE_RETRY_BASE_SECONDS": "0.02",
                 "INFLORA_STORAGE_RETRY_CAP_SECONDS": "0.1", "INFLORA_STORAGE_RETRY_MAX_SECONDS": "0.3"}.items():
        monkeypatch.setenv(k, v)
    calls.clear()
    with pytest.raises(TransientStorageError):
        storage.retrying("read", secret, always_reset)
    assert 3 <= len(calls) < 20 and calls[-1] - calls[0] < 0.3 + 0.5  # slack: a busy machine oversleeps

    # A permanent error is raised at once, as it came; a call that recovers returns its value.
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "Path does not exist")

    with pytest.raises(FileNotFoundError):
        storage.retrying("read", secret, missing)
    assert len(calls) == 1
    flaky = iter([OSError(RESET), OSError(RESET), "ok"])

    def recovers():
        item = next(flaky)
        if isinstance(item, Exception):
            raise item
        return item

    assert storage.retrying("read", secret, recovers) == "ok"


def test_transient_default_window_rides_out_30_seconds(monkeypatch):
    """With the defaults, the waits between the attempts add up to at least 30 s even when every jitter draw
    is the shortest, and to at most RETRY_MAX_SECONDS; a bad setting is refused, naming its variable."""
    for var in storage.RETRY_ENV.values():
        monkeypatch.delenv(var, raising=False)
    policy = RetryPolicy.from_env()
    assert policy == RetryPolicy()
    monkeypatch.setattr(storage.random, "uniform", lambda a, b: a)
    shortest = sum(policy.delay(k) for k in range(1, policy.attempts))
    monkeypatch.setattr(storage.random, "uniform", lambda a, b: b)
    longest = sum(policy.delay(k) for k in range(1, policy.attempts))
    assert shortest >= 30 and min(longest, policy.max_seconds) >= 30 and policy.max_seconds <= 120
    monkeypatch.setenv("INFLORA_STORAGE_RETRIES", "0")
    with pytest.raises(ValueError, match="INFLORA_STORAGE_RETRIES='0'"):
        RetryPolicy.from_env()


# ----------------------------------------------------------------------------- a store that fails a few times
class Budget:
    """How many more calls fail (of the methods named in ``only``, or of all), and with what."""

    def __init__(self, failures: int, error: Exception, only: frozenset = frozenset()):
        self.left, self.error, self.only, self.calls = failures, error, only, 0

    def spend(self, method: str):
        self.calls += 1
        if self.left != 0 and (not self.only or method in self.only):
            self.left -= 1
            raise self.error


class FlakyHandle:
    """A pyarrow input file whose reads fail while the budget lasts."""

    def __init__(self, handle, budget: Budget):
        self._h, self._budget = handle, budget

    def read_at(self, n, pos):
        self._budget.spend("read_at")
        return self._h.read_at(n, pos)

    def __getattr__(self, name):
        return getattr(self._h, name)


class FlakyFS:
    """A pyarrow filesystem whose calls (and reads of opened files) fail while the budget lasts."""

    def __init__(self, fs, budget: Budget):
        self._fs, self._budget = fs, budget

    def open_input_file(self, path):
        self._budget.spend("open_input_file")
        return FlakyHandle(self._fs.open_input_file(path), self._budget)

    def __getattr__(self, name):
        method = getattr(self._fs, name)

        def call(*a, **kw):
            self._budget.spend(name)
            return method(*a, **kw)
        return call


PLAIN_FILESYSTEM = storage.filesystem


def flaky(monkeypatch, failures: int, error: Exception | None = None, only=()) -> Budget:
    """From now on, every storage call of this process goes through a FlakyFS whose first ``failures`` calls
    (of the methods in ``only``, or of all) fail (-1: every call) with ``error`` (default: a connection reset)."""
    budget = Budget(failures, error or OSError(RESET), frozenset(only))

    def filesystem(path):
        fs, p = PLAIN_FILESYSTEM(path)
        return FlakyFS(fs, budget), p

    monkeypatch.setattr(storage, "filesystem", filesystem)
    return budget


def test_transient_storage_functions_retry(tmp_path, monkeypatch, fast_retries):
    """read/write/exists/list/digest/delete ride out a few transient failures (each retry logged) and leave no
    temporary file; a permanent error is raised at once."""
    path = str(tmp_path / "d" / "a.json")
    with retry_events() as events:
        flaky(monkeypatch, 2)
        storage.write_json(path, {"a": 1})
        flaky(monkeypatch, 2)
        assert storage.read_json(path) == {"a": 1}
        flaky(monkeypatch, 2)
        assert storage.exists(path)
        flaky(monkeypatch, 2)
        assert storage.list_names(str(tmp_path / "d")) == ["a.json"]
        flaky(monkeypatch, 2)
        assert storage.file_digest(path) == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        flaky(monkeypatch, 2)
        storage.delete(path)
    # write: a failed attempt's clean-up spends one failure too
    assert [e["operation"] for e in events] == ["write"] + ["read"] * 2 + ["look up"] * 2 + ["list"] * 2 + \
        ["read"] * 2 + ["delete"] * 2
    assert [e["attempt"] for e in events[1:3]] == [2, 3] and all(e["path"].endswith("a.json") or
                                                                 e["path"].endswith("d") for e in events)
    assert os.listdir(tmp_path / "d") == []
    budget = flaky(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"\[Errno 28\] cannot write"):
        storage.write_bytes(path, b"x")
    assert budget.calls == 2 and os.listdir(tmp_path / "d") == []  # create_dir, the clean-up's delete: no retry
    flaky(monkeypatch, -1)  # never recovers
    with pytest.raises(TransientStorageError, match="cannot write"):
        storage.write_bytes(path, b"x")
    assert os.listdir(tmp_path / "d") == []


# ------------------------------------------------------------------------------------------------ shard reader
@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transient-shards")
    out = tmp / "shards"
    prepare_shards("imagenet-r", str(write_imagenet_r(tmp / "imagenet-r")), str(out), rows_per_group=4,
                   num_tasks=3)
    return out


def _bench(shards):
    return build_benchmark(load_config("imagenet-r-5", tiny_overrides(**{
        "data.num_tasks": 3, "data.shards": str(shards)})).data, 16)


def _all_rows(source) -> list[bytes]:
    return [data for _, data, _ in source.read_rows(range(len(source)))]


def test_transient_shard_reads_are_retried_and_damage_is_not(local_shards, tmp_path, monkeypatch, fast_retries):
    """Opening a shard file, reading its footer and its row groups ride out transient errors; when they never
    stop, a TransientStorageError (not a DataError) is raised; damage found while decoding, a missing file and
    a refused permission are DataErrors at once, with no retry."""
    clean = _all_rows(_bench(local_shards).train)
    bench = _bench(local_shards)  # manifest read before the store turns flaky
    with retry_events() as events:
        budget = flaky(monkeypatch, 3)
        assert _all_rows(bench.train) == clean
    assert budget.calls > 3 and [e["operation"] for e in events] == ["open"] * 3 and "shards" in events[0]["path"]
    with retry_events() as events:
        flaky(monkeypatch, 3, only={"read_at"})  # the footer's and the row groups' reads
        assert _all_rows(_bench(local_shards).train) == clean
    assert [e["operation"] for e in events] == ["read"] * 3

    bench = _bench(local_shards)
    flaky(monkeypatch, -1)
    with pytest.raises(TransientStorageError, match=r"cannot (open|read) \S+part-\d+\.parquet"):
        bench.train.load(0)

    damaged = tmp_path / "damaged"
    shutil.copytree(local_shards, damaged)
    monkeypatch.setattr(storage, "filesystem", PLAIN_FILESYSTEM)
    part = damaged / "train" / "task-000" / "part-00000.parquet"
    image = _bench(damaged).train.encoded(0)[0]
    data = bytearray(part.read_bytes())
    data[data.index(image[len(image) // 2:])] ^= 0xFF  # same size: only the page checksum tells
    part.write_bytes(bytes(data))
    bench = _bench(damaged)
    with retry_events() as events:
        budget = flaky(monkeypatch, 0)
        with pytest.raises(DataError, match=r"part-00000.parquet is damaged \(row group 0: .*CRC"):
            bench.train.load(0)
        assert events == []
        (damaged / bench.test.paths[0]).unlink()
        with pytest.raises(DataError, match=r"shard file missing or unreadable: \S+part-00000.parquet"):
            bench.test.load(0)
        with pytest.raises(DataError, match=r"do not match the manifest \(test/\S+ missing\)"):
            _bench(damaged)  # the driver's look at every file
        flaky(monkeypatch, -1, PermissionError(errno.EACCES, "Permission denied"))
        with pytest.raises(DataError, match="shard file missing or unreadable: .*Permission denied"):
            bench.train.load(len(bench.train) - 1)  # in a file not opened yet
    assert events == []


# ------------------------------------------------------------------------------------------------ end to end
BUCKET = "transient"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with a bucket; the AWS variables that reach it directly."""
    from inflora_ray.tools.processes import RehearsalError, tool
    from inflora_ray.tools.rehearsal import create_bucket, s3_env, start_object_store

    try:
        tool("moto_server")
    except RehearsalError:
        pytest.skip("moto_server not installed next to this Python (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("moto")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    svc, endpoint = start_object_store(root, base)
    try:
        create_bucket(endpoint, BUCKET)
        yield {"endpoint": endpoint, "env": s3_env(endpoint), "base": base}
    finally:
        left = svc.stop()
        assert not left, f"moto's processes {left} outlived it"


def _direct(s3) -> pafs.S3FileSystem:
    from inflora_ray.tools.rehearsal import ACCESS_KEY, REGION, SECRET_KEY

    return pafs.S3FileSystem(endpoint_override=s3["endpoint"].split("://", 1)[1], scheme="http", region=REGION,
                             access_key=ACCESS_KEY, secret_key=SECRET_KEY)


OVERRIDES = tiny_overrides(**{"data.num_tasks": 3, "data.batch_size": 4, "data.loader_workers": 0,
                              "run.use_gpu": "false", "run.max_failures": 0, "tracking.enabled": "false"})


@pytest.mark.ray
@pytest.mark.slow
def test_transient_outage_mid_run_is_ridden_out_with_the_same_matrix(ray_session, s3, tmp_path, monkeypatch):
    """`inflora-run` (on the session's Ray, 1 worker of 1 CPU, run.max_failures 0) reads shards from
    and writes its run folder and Ray Train's checkpoints to moto's S3 server through a proxy. After task 0's
    checkpoint was uploaded, the proxy resets every connection for 20 s from the worker's next shard read: the
    worker's retries ride the outage out, and the run ends with the accuracy matrix of the same run without
    it (trained in process, reading the same shards directly)."""
    shards = f"s3://{BUCKET}/shards"
    src = write_imagenet_r(tmp_path / "imagenet-r")
    env_direct = {**s3["base"], **s3["env"]}
    p = subprocess.run([sys.executable, "-m", "inflora_ray.data", "prepare", "imagenet-r", "--source", str(src),
                        "--out", shards, "--num-tasks", "3", "--rows-per-group", "4"], env=env_direct,
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]

    host, port = s3["endpoint"].split("://", 1)[1].split(":")
    fs = _direct(s3)
    runs = f"{BUCKET}/runs/outage"

    def no_report_under_way() -> bool:
        """Task 0's checkpoint is uploaded, and Ray Train's controller has written its own record of every
        checkpoint uploaded (it writes it once per checkpoint, with no retry: an outage then ends the run,
        whatever run.max_failures says; see docs/clusters.md)."""
        try:
            record = fs.open_input_file(f"{runs}/checkpoint_manager_snapshot.json").read().decode()
            names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(runs))]
        except OSError:
            return False
        uploaded = [n for n in names if n.startswith("checkpoint_task")]
        return "checkpoint_task000" in uploaded and all(n in record for n in uploaded)

    # The worker's first shard read once that holds: the worker is inside a task (staging a block) and needs
    # the store before its next report.
    proxy = ResettingProxy((host, int(port)), seconds=20, trigger=f" /{BUCKET}/shards/".encode(), ready=no_report_under_way)
    from inflora_ray.tools.rehearsal import s3_env
    store = s3_env(proxy.endpoint)
    # A driver joining the session's Ray as a job whose runtime environment gives its workers the store's
    # variables (as `ray job submit --runtime-env-json '{"env_vars": ...}'` does on a cluster).
    argv = ["--config", "imagenet-r-5", *OVERRIDES, f"data.shards={shards}", "--storage-path",
            f"s3://{BUCKET}/runs", "--name", "outage", "--num-workers", "1", "--cpus-per-worker", "1"]
    driver = (f"import logging, sys, ray\n"
              f"ray.init(address={ray_session.get_runtime_context().gcs_address!r}, log_to_driver=False, "
              f"logging_level=logging.WARNING, runtime_env={{'env_vars': {store!r}}})\n"
              f"from inflora_ray.run import main\n"
              f"sys.exit(main({argv!r}))\n")
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-c", driver], env={**s3["base"], **store}, capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    finally:
        proxy.close()
    elapsed = time.monotonic() - start
    assert run.returncode == 0, run.stderr[-6000:]
    assert proxy.started_at is not None, "the outage never started"
    assert proxy.resets > 0, "no connection was made during the outage"
    assert time.monotonic() - proxy.started_at >= 20, "the run ended before the outage did"

    metrics = json.loads(fs.open_input_file(f"{runs}/results/metrics.json").read())
    logs = "".join(fs.open_input_file(i.path).read().decode()
                   for i in fs.get_file_info(pafs.FileSelector(f"{runs}/logs")))
    retries = [line for line in logs.splitlines() if "event=storage_retry" in line]
    assert any(f"path={shards}/" in line for line in retries), logs[-3000:]

    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    cfg = load_config("imagenet-r-5", OVERRIDES + [f"data.shards={shards}", f"run.storage_path={tmp_path}",
                                                   "run.cpus_per_worker=1"])
    assert metrics["accuracy_matrix"] == run_in_process(cfg)["accuracy_matrix"]
    print(f"outage run: {elapsed:.0f} s, {proxy.resets} connections reset, the workers' retries:",
          *sorted({line.split(" path=")[1].split(" ")[0] for line in retries}))
