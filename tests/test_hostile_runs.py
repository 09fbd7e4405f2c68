"""Hostile or broken inputs around a run: names that would escape the storage path, two runs in one folder,
settings that would silently change on resume. Each row: the input -> the message, the exit code, and proof
that nothing was written outside the expected place. The Ctrl-C test runs a real driver process (and, on the
same run, checks the driver's scan of the dataset and checkpoint pruning on Ray)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import run_in_process, tiny_overrides
from inflora_ray.config import ConfigError
from inflora_ray.ray_train.launch import RunContext, RunOptions, run_experiment
from inflora_ray.presets import load_config
from inflora_ray.rundir import RunClaimed, RunDir, claim_folder


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class _Done:
    """What a CLI call left: its exit code and what it printed on stderr."""

    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``inflora_ray.run`` / ``inflora_ray.tune`` main() in this process, in folder ``cwd``."""
    import importlib

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def call(module: str, args: list[str], cwd: Path) -> _Done:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = importlib.import_module(module).main(args)
        return _Done(code, capsys.readouterr().err)
    return call


# input -> (module, arguments, message fragment); every row must exit 2 before any compute.
HOSTILE_CLI = {
    "run name with ..": ("inflora_ray.run", ["--name", "../../escaped"], "cannot name a folder"),
    "run name '..'": ("inflora_ray.run", ["--name", ".."], "cannot name a folder"),
    "run name with a slash": ("inflora_ray.run", ["run.name=a/b"], "cannot name a folder"),
    "derived name from experiment.name": ("inflora_ray.run", ["experiment.name=../../escaped"],
                                          "made from experiment.name"),
    "hidden run name": ("inflora_ray.run", ["--name", ".hidden"], "cannot name a folder"),
    "resume a name with ..": ("inflora_ray.run", ["--resume", ".."], "cannot name a folder"),
    "resume a path that is no run": ("inflora_ray.run", ["--resume", "../../escaped"], "no run found"),
    "duplicate seeds": ("inflora_ray.run", ["--seeds", "0,0"], "given twice"),
    "sweep name with ..": ("inflora_ray.tune", ["--space", "SPACE", "--name", "../../escaped"],
                           "cannot name a folder"),
    "infinite learning rate": ("inflora_ray.run", ["train.lr=.inf"], "train.lr: must be a finite number"),
    "runaway --num-samples": ("inflora_ray.tune", ["--space", "SPACE", "--num-samples", "100000000"],
                              "would start 100000000 trials (100000000 sample(s) x grid no grid)"),
    "runaway grid": ("inflora_ray.tune", ["--space", "GRID"], "would start 100000000 trials (1 sample(s) x grid "
                                                              "100 x 100 x 100 x 100)"),
}
# Four grid parameters of 100 values each: 10^8 points.
GRID = "params:\n" + "".join(f"  {key}: {{grid: [{', '.join(str(v) for v in values)}]}}\n" for key, values in [
    ("train.lr", [round(1e-4 * (i + 1), 6) for i in range(100)]), ("method.lamb", [round(0.5 + 0.004 * i, 4)
                                                                                    for i in range(100)]),
    ("train.weight_decay", [round(1e-5 * i, 6) for i in range(100)]), ("experiment.log_every_steps",
                                                                       list(range(1, 101)))])


@pytest.mark.parametrize("what", sorted(HOSTILE_CLI))
def test_hostile_cli_input_is_refused_before_anything_is_written(what, tmp_path, cli):
    module, args, fragment = HOSTILE_CLI[what]
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    space = Path(__file__).resolve().parent.parent / "tune_spaces" / "lr.yaml"
    (tmp_path / "grid.yaml").write_text(GRID)
    args = [str(space) if a == "SPACE" else str(tmp_path / "grid.yaml") if a == "GRID" else a for a in args]
    before = _files(tmp_path)
    proc = cli(module, [*args, "--storage-path", str(work / "runs"), "--no-tracking" if module.endswith("run")
                        else "tracking.enabled=false", *tiny_overrides()], cwd=work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    new = _files(tmp_path) - before
    assert all(n.startswith(os.path.join("work", "deep", "runs")) for n in new), new  # nothing escaped
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "work" / "escaped").exists()


def test_symlink_planted_in_the_storage_path_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "runs" / "evil")
    with pytest.raises(ConfigError, match="outside the storage path"):
        RunDir.of(str(tmp_path / "runs"), "evil")


def _claim(path: str, results, start) -> None:
    start.wait(30)
    try:
        claim_folder(path, "run")
        results.put("won")
    except RunClaimed:
        results.put("lost")


@pytest.mark.parametrize("uri", [False, True], ids=["file system", "object-store claims"])
def test_two_runs_racing_for_one_name_one_wins(tmp_path, uri):
    """Eight processes claim the same run folder at once: exactly one gets it (mkdir on a file system; claim
    objects through pyarrow's file:// filesystem, the same code path as s3:// and gs://)."""
    path = f"file://{tmp_path}/runs/same" if uri else str(tmp_path / "runs" / "same")
    (tmp_path / "runs").mkdir()
    ctx = multiprocessing.get_context("fork")  # forked: no re-import, so the eight start together
    results, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim, args=(path, results, start)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes.count("won") == 1, outcomes
    with pytest.raises(RunClaimed, match="already exists"):
        claim_folder(path, "run")


def _stored_run(tmp_path: Path, name: str = "stored") -> Path:
    cfg = load_config("quickstart", tiny_overrides())
    results = tmp_path / "runs" / name / "results"
    results.mkdir(parents=True)
    (results / "config.yaml").write_text(cfg.with_values({"run.name": name}).to_yaml())
    return results


@pytest.mark.parametrize("overrides,fragment", [
    (["train.lr=0.05"], "train.lr: 0.001 -> 0.05"),
    (["method.lamb=0.5", "train.epochs=3"], "method.lamb: 0.95 -> 0.5; train.epochs: 1 -> 3"),
    (["data.class_order_seed=7"], "data.class_order_seed: None -> 7"),
])
def test_resume_with_settings_that_alter_results_is_refused(tmp_path, overrides, fragment, cli):
    results = _stored_run(tmp_path)
    stored = (results / "config.yaml").read_text()
    base = ["--resume", "stored", "--storage-path", str(tmp_path / "runs"), "--no-tracking"]
    proc = cli("inflora_ray.run", [*base, *overrides], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would change settings that alter results" in proc.stderr and "--allow-config-change" in proc.stderr
    assert fragment.split(":")[0] in proc.stderr, proc.stderr[-2000:]
    assert (results / "config.yaml").read_text() == stored and not (results / "config_history.json").exists()


def _link_results(run: Path, outside: Path) -> None:
    os.rename(run / "results", outside / "results")
    os.symlink(outside / "results", run / "results")


def _link_checkpoint(run: Path, outside: Path) -> None:
    (outside / "checkpoint_task002").mkdir()
    (outside / "checkpoint_task002" / "state.pt").write_bytes(b"precious")
    os.symlink(outside / "checkpoint_task002", run / "checkpoint_task002")


def _fifo(run: Path, outside: Path) -> None:
    os.mkfifo(run / "results" / "task_000.json")


@pytest.mark.parametrize("plant, entry", [
    (_link_results, "results is a symbolic link"), (_link_checkpoint, "checkpoint_task002 is a symbolic link"),
    (_fifo, "task_000.json is not a regular file")], ids=["results/ linked out", "checkpoint linked out", "fifo"])
def test_a_resume_into_a_run_folder_with_a_planted_link_is_refused(tmp_path, cli, plant, entry):
    """Writes and reads of a run stay inside its folder: a symbolic link (or a fifo) planted below it is
    refused before anything is written or started; what it points to is untouched."""
    _stored_run(tmp_path)
    run, outside = tmp_path / "runs" / "stored", tmp_path / "outside"
    outside.mkdir()
    plant(run, outside)
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    proc = cli("inflora_ray.run", ["--resume", "stored", "--storage-path", str(tmp_path / "runs"), "--no-tracking"],
               cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert entry in proc.stderr and "only inside its folder" in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before


def test_placement_changes_on_resume_are_free(tmp_path):
    from inflora_ray.ray_train.resume import result_changes

    results = _stored_run(tmp_path)
    stored = yaml.safe_load((results / "config.yaml").read_text())
    cfg = load_config("quickstart", tiny_overrides(**{"run.num_workers": 2, "data.loader_workers": 2,
                                                      "tracking.enabled": "false"}))
    assert result_changes(stored, cfg) == {}
    assert set(result_changes(stored, cfg.with_values({"train.lr": 0.01}))) == {"train.lr"}


def test_allowed_config_change_is_recorded(tmp_path):
    from inflora_ray.ray_train.resume import check_config_change, record_config_change

    results = _stored_run(tmp_path)
    stored = yaml.safe_load((results / "config.yaml").read_text())
    requested = load_config("quickstart", tiny_overrides(**{"train.lr": 0.05}))
    changes = check_config_change(stored, requested, allow=True, what="--resume")
    record_config_change(RunDir(str(tmp_path / "runs" / "stored")), changes, from_task=2, what="--resume")
    history = json.loads((results / "config_history.json").read_text())
    assert history[-1]["from_task"] == 2 and history[-1]["how"] == "--resume"
    assert list(history[-1]["changes"]) == ["train.lr"] and history[-1]["changes"]["train.lr"]["to"] == 0.05


def test_corrupt_stored_config_is_named(tmp_path, cli):
    results = _stored_run(tmp_path)
    (results / "config.yaml").write_text("experiment: [unclosed\n")
    proc = cli("inflora_ray.run", ["--resume", "stored", "--storage-path", str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 2 and "config.yaml is not valid YAML" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ Ctrl-C, then resume
def _metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))


@pytest.mark.ray
def test_ctrl_c_saves_what_was_done_and_resume_finishes_the_same_run(ray_session, tmp_path):
    """SIGINT to a real driver process mid-task: exit 130 with the resume command, metrics.json marked
    incomplete, the MLflow run KILLED; --resume then ends with the accuracy matrix of an uninterrupted run, and
    every metric has one value per task in MLflow. The same run (each Ray Train start costs more than the checks)
    shows the data path and the checkpoints on Ray: the resumed tasks train on the driver's scan of a folder
    that changed after it (a rescan on the worker would find more images), every task-boundary checkpoint is
    kept while mid-task ones are pruned to ``run.checkpoints_to_keep``, and the final checkpoint is Ray Train's
    Result's. (The resume goes through run_experiment, the function behind --resume, on the session's Ray; the
    uninterrupted run is trained in process.)"""
    from mlflow import MlflowClient

    from inflora_ray.data import build_benchmark, scan_data
    from test_data import WNIDS, write_imagenet_r

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    root = write_imagenet_r(tmp_path / "imagenet-r")
    overrides = tiny_overrides(**{"data.benchmark": "imagenet-r", "data.root": str(root), "data.num_tasks": 3,
                                  "train.epochs": 2, "run.checkpoint_every_epochs": 1, "run.checkpoints_to_keep": 1})
    common = ["--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, *overrides]
    # The driver joins the session's Ray, as `python -m inflora_ray.run` joins a running cluster; its worker
    # waits at the first step of task 1 (after task 0's checkpoint) for the Ctrl-C.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "INFLORA_RAY_FAULT": "task=1,epoch=0,step=0,mode=hold"}
    proc = subprocess.Popen([sys.executable, "-m", "inflora_ray.run", "--name", "stopped", *common], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(str(tmp_path / "runs" / "stopped"))
    deadline = time.time() + 240
    while not os.path.exists(run.fault_marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert os.path.exists(run.fault_marker), "the run never reached task 1"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume stopped" in err, err[-3000:]
    metrics = json.loads((tmp_path / "runs" / "stopped" / "results" / "metrics.json").read_text())
    assert metrics["incomplete"] and metrics["status"] == "interrupted" and metrics["complete"] == 1
    tracking = json.loads((tmp_path / "runs" / "stopped" / "results" / "tracking.json").read_text())
    assert MlflowClient(uri).get_run(tracking["run_id"]).info.status == "KILLED"

    cfg = load_config("quickstart", overrides + [f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}"])
    scanned = scan_data(cfg.data, cfg.model.img_size)
    benchmark = build_benchmark(cfg.data, cfg.model.img_size, scanned=scanned)
    train_images = [len(benchmark.task_indices("train", t)) for t in range(3)]
    jpeg = next((root / WNIDS[0]).glob("*.jpg")).read_bytes()
    extra = [root / wnid / f"extra_{k}.jpg" for wnid in WNIDS for k in range(2)]
    for path in extra:  # every class gains images after the driver's scan
        path.write_bytes(jpeg)
    rescan = build_benchmark(cfg.data, cfg.model.img_size)
    assert all(len(rescan.task_indices("train", t)) > n for t, n in enumerate(train_images))
    resumed = run_experiment(cfg, RunOptions(name="stopped", resume=True), RunContext(data=scanned, quiet_table=True))
    # Every epoch of every task (2 each) went through the driver's scan of the task's images.
    assert [t["result"]["train_images"] for t in resumed.tasks] == [2 * n for n in train_images]
    for path in extra:  # the folder as scanned, for the uninterrupted reference
        path.unlink()
    whole = run_in_process(cfg)["accuracy_matrix"]  # the uninterrupted run
    assert resumed.accuracy_matrix == whole
    a = json.loads((tmp_path / "runs" / "stopped" / "results" / "metrics.json").read_text())
    assert a["accuracy_matrix"] == whole and not a["incomplete"]
    assert MlflowClient(uri).get_run(tracking["run_id"]).info.status == "FINISHED"
    assert _metric_steps(uri, tracking["run_id"], "pooled_accuracy") == [0, 1, 2]

    # Ray keeps num_tasks + 1 = 4 checkpoints, ranked task checkpoints first: every task's and the latest
    # mid-task one, also through the stop and the resume; the final one is Ray Train's Result's.
    assert resumed.checkpoint == os.path.join(resumed.run_dir, "checkpoint_task002")
    assert sorted(n for n in os.listdir(resumed.run_dir) if n.startswith("checkpoint_task")) == [
        "checkpoint_task000", "checkpoint_task001", "checkpoint_task002", "checkpoint_task002_epoch000"]


def test_a_sweep_resume_into_a_folder_with_a_planted_link_is_refused(tmp_path):
    from inflora_ray.preflight import PreflightError
    from inflora_ray.ray_tune.search_space import Param, SearchSpace
    from inflora_ray.ray_tune.sweep import SweepOptions, run_sweep

    cfg = load_config("quickstart", tiny_overrides(**{"run.storage_path": str(tmp_path / "sweeps"),
                                                      "tracking.enabled": "false"}))
    trial = tmp_path / "sweeps" / "sw" / "runs" / "t_00000"
    trial.mkdir(parents=True)
    (tmp_path / "sweeps" / "sw" / "sweep.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", trial / "results")
    with pytest.raises(PreflightError, match=r"t_00000/results is a symbolic link .*only inside its folder"):
        run_sweep(cfg, SearchSpace([Param("train.lr", "choice", [0.001])]), SweepOptions(name="sw", resume=True))
    assert list((tmp_path / "elsewhere").iterdir()) == []


def _hold_and_wait(path: str, held, stop) -> None:
    RunDir(path).hold()
    held.set()
    stop.wait(60)
    RunDir(path).release_hold()


def test_one_driver_holds_a_run_at_a_time(tmp_path, cli):
    """Two drivers continuing one run: the second is refused while the first is alive, naming it; the hold of
    a process that is gone (same host), or of one that stopped renewing it (any host), is taken over."""
    import socket

    _stored_run(tmp_path)
    run = RunDir(str(tmp_path / "runs" / "stored"))
    ctx = multiprocessing.get_context("fork")
    held, stop = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_and_wait, args=(run.path, held, stop))
    other.start()
    try:
        assert held.wait(30)
        proc = cli("inflora_ray.run", ["--resume", "stored", "--storage-path", str(tmp_path / "runs"),
                                       "--no-tracking"], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"run 'stored' is being run by process {other.pid} on {socket.gethostname()}" in proc.stderr
        with pytest.raises(RunClaimed, match="is being run by process"):
            run.hold()
    finally:
        stop.set()
        other.join(30)
    run.hold()  # released by its holder: free
    run.release_hold()
    dead = ctx.Process(target=run.hold)  # holds, then exits without releasing
    dead.start()
    dead.join(30)
    assert json.loads(Path(run.hold_file).read_text())["pid"] == dead.pid
    run.hold()  # its process is gone: taken over
    assert json.loads(Path(run.hold_file).read_text())["pid"] == os.getpid()
    Path(run.hold_file).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then",
                                               "renewed": time.time() - 500}))
    run.hold()  # another host's hold, not renewed for 500 s: taken over
    run.release_hold()
    assert not os.path.exists(run.hold_file)


def test_credentials_in_a_storage_path_never_reach_the_console(tmp_path, cli):
    """A storage path with a secret in it (a token in the query, a password in the user info): the error
    message shows the path with the secret as ***."""
    for path in ("file:///proc/nope?access_token=SECRETVALUE", "s3://AKIA:SECRETVALUE@[bad/runs"):
        proc = cli("inflora_ray.run", ["--storage-path", path, "--no-tracking", *tiny_overrides()], cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
        assert "SECRETVALUE" not in proc.stderr and "***" in proc.stderr, proc.stderr
