"""Credentials written into a storage path, a dataset URI or a checkpoint path (``s3://KEY:SECRET@bucket/...``,
``gs://...?access_token=...``) are used, and stored, logged and printed nowhere: not in the run's files
(config.yaml, record.json, checkpoints, logs), not in a sweep's records, not in MLflow's params and tags, not
on the console, not in what Ray Train keeps of its workers' config. A stored config read back (``--resume``,
``--start-from``) has them redacted: the setting must be given again, and a redacted value is refused, never
used as a path. The end-to-end test trains on moto's S3 server with credentials in both URIs."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from helpers import tiny_overrides
from inflora_ray import storage
from inflora_ray.preflight import PreflightError, check_credentials
from inflora_ray.presets import load_config
from inflora_ray.redact import redact_text, remember_secrets
from inflora_ray.tracking.store import credential_values, redact_config, restore_credentials
from test_transient_storage import BUCKET, s3  # noqa: F401  (moto's S3 server, module-scoped fixture)

REPO = Path(__file__).resolve().parents[1]
SECRET = "Wr0ngHorse-Battery-9321"  # appears nowhere but in the URIs under test
TOKEN = "ya29.Tok3n-Staple-5518"
KEY = "inflora-key"  # an access key id: shown (like a user name), its secret never


def _hidden(text: str) -> bool:
    return SECRET not in text and TOKEN not in text


# ---------------------------------------------------------------------------------------------- the config
def test_redact_config_covers_storage_data_and_tracking():
    cfg = load_config("imagenet-r-5", [f"data.shards=s3://{KEY}:{SECRET}@bkt/shards",
                                       f"run.storage_path=gs://bkt/runs?access_token={TOKEN}",
                                       f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5000"])
    stored = redact_config(cfg)
    assert stored.data.shards == f"s3://{KEY}:***@bkt/shards"
    assert stored.run.storage_path == "gs://bkt/runs?access_token=***"
    assert stored.tracking.uri == "http://alice:***@127.0.0.1:5000"
    assert _hidden(stored.to_yaml()) and _hidden(json.dumps(stored.to_dict()))
    # What a stored config is given back from (a sweep's final runs: its best config, stored redacted).
    assert credential_values(restore_credentials(stored, cfg)) == credential_values(cfg)
    other = load_config("imagenet-r-5", ["data.shards=s3://other:pw@bkt/else"])
    assert restore_credentials(stored, other).data.shards == stored.data.shards  # not its value: left redacted


# a stored config's redacted setting -> the setting the message asks for again
REDACTED_TABLE = {
    "storage path (--start-from)": ("run.storage_path", f"s3://{KEY}:***@bkt/runs", "--storage-path URI"),
    "shards (--resume)": ("data.shards", f"s3://{KEY}:***@bkt/shards", "data.shards=URI"),
    "shards with a token": ("data.shards", "gs://bkt/shards?access_token=***", "data.shards=URI"),
}


@pytest.mark.parametrize("case", list(REDACTED_TABLE))
def test_redacted_setting_is_refused_and_given_again(case):
    key, redacted, again = REDACTED_TABLE[case]
    base = ["data.shards=s3://bkt/plain"] if key != "data.shards" else []
    with pytest.raises(PreflightError) as e:
        check_credentials(load_config("imagenet-r-5", base + [f"{key}={redacted}"]))
    assert f"{key}={redacted!r}: give it again with {again}" in str(e.value)
    real = redacted.replace("***", SECRET)
    check_credentials(load_config("imagenet-r-5", base + [f"{key}={real}"]))  # given again: accepted


def test_resume_command_shows_what_to_give_again_without_the_secret(tmp_path):
    from inflora_ray.ray_train.launch import resume_command
    from inflora_ray.rundir import RunDir

    cfg = load_config("imagenet-r-5", [f"data.shards=s3://{KEY}:{SECRET}@bkt/shards"])
    assert resume_command(cfg, RunDir(f"s3://{KEY}:{SECRET}@bkt/runs/r")) == (
        f"python -m inflora_ray.run --resume r run.storage_path=s3://{KEY}:***@bkt/runs "
        f"data.shards=s3://{KEY}:***@bkt/shards (with the credentials in place of ***)")
    plain = load_config("quickstart", [])
    assert resume_command(plain, RunDir(str(tmp_path / "r"))) == (
        f"python -m inflora_ray.run --resume r run.storage_path={tmp_path}")


def test_remembered_secrets_leave_no_message_or_log_line():
    """A store's error quoting the secret without its URI (pyarrow names 'KEY:SECRET@bucket' as a bucket), or
    percent-decoded, is redacted once the URI was in use."""
    remember_secrets(f"s3://{KEY}:{SECRET.replace('-', '%2D')}@bkt/x", f"gs://b/x?access_token={TOKEN}", None, "/p")
    text = f"bucket '{KEY}:{SECRET}@bkt' not found; token {TOKEN} expired; {SECRET.replace('-', '%2D')}"
    assert _hidden(redact_text(text)) and KEY in redact_text(text)


def test_s3_uri_keys_reach_the_endpoint_store_not_the_path(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, inside = storage.filesystem(f"s3://{KEY}:{SECRET}@bkt/runs/x")
    assert inside == "bkt/runs/x" and isinstance(fs, pafs.S3FileSystem)
    path, ray_fs = storage.ray_storage(f"s3://{KEY}:{SECRET}@bkt/runs")
    assert path == "bkt/runs" and ray_fs is not None  # what Ray shows and records: the path without them


@pytest.mark.ray
def test_worker_config_holds_no_credential_and_workers_get_them_back(ray_session, tmp_path):
    """Ray Train keeps train_loop_config in its state (the dashboard) and export files: it holds the redacted
    values; each worker reads the real ones back from the object store."""
    from inflora_ray.ray_train.launch import RunOptions, worker_config
    from inflora_ray.ray_train.worker import with_private_inputs
    from inflora_ray.rundir import RunDir

    cfg = load_config("imagenet-r-5", [f"data.shards=s3://{KEY}:{SECRET}@bkt/shards",
                                       f"run.storage_path=s3://{KEY}:{SECRET}@bkt/runs",
                                       f"tracking.uri=http://alice:{SECRET}@127.0.0.1:5000"])
    run = RunDir(f"s3://{KEY}:{SECRET}@bkt/runs/r")
    start = f"gs://bkt/runs/q/checkpoint_task000?access_token={TOKEN}"
    loop = worker_config(cfg, run, RunOptions(start_from=start))
    assert _hidden(json.dumps({k: v for k, v in loop.items() if k != "private"}, default=str))
    assert loop["private"] is not None
    real = with_private_inputs(loop)
    assert real["run_dir"] == run.path and real["start_from"] == start
    assert real["config"]["data"]["shards"] == cfg.data.shards
    assert real["config"]["run"]["storage_path"] == cfg.run.storage_path
    assert "***" in real["config"]["tracking"]["uri"]  # the workers never track
    plain = worker_config(load_config("quickstart", []), RunDir(str(tmp_path / "r")), RunOptions())
    assert plain["private"] is None and with_private_inputs(plain) is plain


def test_sweep_refuses_credentials_in_its_storage_path(tmp_path):
    """Ray Tune pickles its storage settings into the sweep's folder (tuner.pkl): refused before anything."""
    from inflora_ray.ray_tune.search_space import read_space
    from inflora_ray.ray_tune.sweep import SweepOptions, run_sweep

    space = read_space(str(REPO / "tune_spaces" / "lr.yaml"))
    cfg = load_config("quickstart", [f"run.storage_path=s3://{KEY}:{SECRET}@bkt/sweeps", *tiny_overrides()])
    with pytest.raises(PreflightError, match="cannot carry credentials") as e:
        run_sweep(cfg, space, SweepOptions(name="s", num_samples=1))
    assert _hidden(str(e.value)) and f"s3://{KEY}:***@bkt/sweeps" in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- end to end
def _objects(fs: pafs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {i.path: fs.open_input_file(i.path).read() for i in infos if i.type == pafs.FileType.File}


def _driver(ray_session, env: dict, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``inflora-run argv`` as a driver joining the session's Ray as a job whose runtime env gives its
    workers the S3 endpoint (as ``ray job submit --runtime-env-json`` does on a cluster); no AWS keys anywhere
    but in the URIs."""
    store = {k: v for k, v in env.items() if k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                                   "AWS_EC2_METADATA_DISABLED")}
    script = (f"import logging, sys, ray\n"
              f"ray.init(address={ray_session.get_runtime_context().gcs_address!r}, log_to_driver=False, "
              f"logging_level=logging.WARNING, runtime_env={{'env_vars': {store!r}}})\n"
              f"from inflora_ray.run import main\nsys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.mark.ray
@pytest.mark.slow
def test_credentials_in_storage_and_shard_uris_are_used_and_stored_nowhere(ray_session, s3, mlflow_server,  # noqa: F811
                                                                            tmp_path, monkeypatch, capfd):
    """Shards prepared to, read from, and a run stored on moto's S3 with the keys in the URIs only. Stopped
    after task 0, resumed without the shards' URI (refused: data.shards named), branched without the storage
    path (refused: run.storage_path named), resumed with it (finishes). No object in the bucket, no MLflow
    param or tag, nothing printed holds the secret."""
    from inflora_ray.data.__main__ import main as data_main
    from inflora_ray.data.sample import write_imagenet_r
    from inflora_ray.run import main as run_main

    env = {k: v for k, v in {**s3["base"], **s3["env"]}.items() if k not in ("AWS_ACCESS_KEY_ID",
                                                                           "AWS_SECRET_ACCESS_KEY")}
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    shards, runs = f"s3://{KEY}:{SECRET}@{BUCKET}/cred/shards", f"s3://{KEY}:{SECRET}@{BUCKET}/cred/runs"
    printed = []

    src = write_imagenet_r(tmp_path / "imagenet-r")
    assert data_main(["prepare", "imagenet-r", "--source", str(src), "--out", shards, "--num-tasks", "2",
                      "--rows-per-group", "4"]) == 0
    printed.append(capfd.readouterr())
    overrides = tiny_overrides(**{"data.num_tasks": 2, "data.batch_size": 4, "data.loader_workers": 0,
                                  "run.max_failures": 0, "run.use_gpu": "false"})
    common = ["--storage-path", runs, "--tracking-uri", mlflow_server, "--num-workers", "1",
              "--cpus-per-worker", "1"]
    first = _driver(ray_session, env, ["--config", "imagenet-r-5", *overrides, f"data.shards={shards}", *common,
                                       "--name", "cred", "--stop-after-task", "0"], tmp_path)
    printed.append(first)
    assert first.returncode == 0, first.stderr[-4000:]

    fs = storage.filesystem(runs)[0]
    before = _objects(fs, f"{BUCKET}/cred/runs")
    refusals = {  # a stored config's redacted value, not given again -> the setting the message names
        "data.shards": ["--resume", "cred", *common],
        "run.storage_path": ["--start-from", f"{runs}/cred/checkpoint_task000", f"data.shards={shards}",
                             "--name", "branch", "--no-tracking"],
    }
    for setting, argv in refusals.items():
        start = time.monotonic()
        code = run_main(argv)
        out = capfd.readouterr()
        printed.append(out)
        assert code == 2, out.err[-3000:]
        assert f"{setting}=" in out.err and "give it again" in out.err, out.err[-3000:]
        assert time.monotonic() - start < 30
    assert _objects(fs, f"{BUCKET}/cred/runs").keys() == before.keys()  # nothing written by a refusal
    assert not (tmp_path / "***").exists() and not any("***" in p.name for p in tmp_path.rglob("*"))

    resumed = _driver(ray_session, env, ["--resume", "cred", *common, f"data.shards={shards}"], tmp_path)
    printed.append(resumed)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    stored = _objects(fs, f"{BUCKET}/cred")
    metrics = json.loads(stored[f"{BUCKET}/cred/runs/cred/results/metrics.json"])
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["status"] == "finished"
    config = stored[f"{BUCKET}/cred/runs/cred/results/config.yaml"].decode()
    assert f"s3://{KEY}:***@{BUCKET}/cred/shards" in config
    assert any("/checkpoint_task000/" in p for p in stored)
    leaked = [p for p, data in stored.items() if SECRET.encode() in data]
    assert not leaked, leaked
    for p in printed:  # what the data CLI and each run printed (stdout and stderr)
        text = p.stdout + p.stderr if isinstance(p, subprocess.CompletedProcess) else p.out + p.err
        assert _hidden(text), text[-3000:]
    local = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not local, local

    client = MlflowClient(mlflow_server)
    experiment = load_config("imagenet-r-5", [*overrides, "data.shards=s3://b/s"]).experiment.name
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], "tags.run_name = 'cred'")
    assert run.data.params["data.shards"] == f"s3://{KEY}:***@{BUCKET}/cred/shards"
    assert _hidden(json.dumps([run.data.params, run.data.tags]))
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "state.pt" for p in files), files
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
