"""Ray Train integration on a real local Ray cluster (2 CPUs, gloo): 1 worker equals the same run in process,
fault injection and resume, branch from a checkpoint, fail-fast inputs. (Every method on 2 workers against one
process: test_ddp_methods.py; a 2-worker run through run_experiment: test_hostile_checkpoints.py and the cluster
rehearsal.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from ray.train import UserCallback

from helpers import run_in_process
from inflora_ray.config import flatten
from inflora_ray.presets import load_config
from inflora_ray.ray_train.faults import ENV_VAR
from inflora_ray.ray_train.launch import RunContext, RunOptions, run_experiment

QUIET = RunContext(quiet_table=True)
from inflora_ray.preflight import PreflightError

pytestmark = pytest.mark.ray

# The quickstart (pre-trained backbone, so predictions are far from degenerate) cut to 2 tasks x 2 epochs,
# with a mid-task checkpoint after epoch 0 of every task; no MLflow (tested in test_tracking.py).
RUN = {"data.num_tasks": 2, "train.epochs": 2, "run.checkpoint_every_epochs": 1, "run.cpus_per_worker": 1,
       "tracking.enabled": "false", "train.device": "cpu"}


def _cfg(tmp_path, **extra):
    o = {**RUN, "run.storage_path": str(tmp_path), **extra}
    return load_config("quickstart", [f"{k}={v}" for k, v in o.items()])


class ControllerModules(UserCallback):
    """A Ray Train callback (it runs in the run's controller): writes which of torch/torchvision/timm the
    controller process has imported, at each report."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        import json
        import sys

        with open(self.path, "w") as f:
            json.dump([m for m in ("torch", "torchvision", "timm") if m in sys.modules], f)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """The reference run shared by several tests: 1 worker; the Ray actors of the classes it should or should
    not start, counted before and after it; the modules its controller had imported."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback's class, for the controller
    root = tmp_path_factory.mktemp("ref")
    before = _actor_counts()
    probe = ControllerModules(str(root / "controller_modules.json"))
    one = run_experiment(_cfg(root, **{"run.num_workers": 1}), RunOptions(name="one"),
                         RunContext(quiet_table=True, train_callbacks=(probe,)))
    return {"root": root, "one": one, "actors": (before, _actor_counts()),
            "controller_modules": json.loads((root / "controller_modules.json").read_text())}


def _actor_counts() -> dict[str, int]:
    from ray.util.state import list_actors

    return {cls: len(list_actors(filters=[("class_name", "=", cls)], limit=10_000))
            for cls in ("RayTrainWorker", "DatasetManager")}


def _counts(result):
    return [t["result"]["correct"] for t in result.tasks]


# ------------------------------------------------------------------------------------------------------------
def test_one_worker_equals_the_same_run_in_process(runs):
    """What lets other tests take an uninterrupted run's result from :func:`helpers.run_in_process`."""
    cfg = _cfg(runs["root"], **{"run.num_workers": 1})
    # json: the same NaNs (forgetting before a second task) compare equal
    assert json.dumps(run_in_process(cfg), sort_keys=True) == json.dumps(runs["one"].summary, sort_keys=True)


def test_a_run_starts_no_ray_data_actor(runs):
    """The run's trainer leaves out Ray Train's Ray Data callback (inflora_ray/ray_train/trainer.py): its
    worker group started without a DatasetManager actor beside it."""
    before, after = runs["actors"]
    assert after["RayTrainWorker"] == before["RayTrainWorker"] + 1
    assert after["DatasetManager"] == before["DatasetManager"]


def test_the_controller_of_a_run_imports_no_torch(runs):
    """The run's process group is configured by ProcessGroupConfig (inflora_ray/ray_train/process_group.py),
    so Ray Train's controller, started for every run, does not import torch; the worker's process group is
    tested by every run (and with 2 workers by test_ddp_methods.py)."""
    assert runs["controller_modules"] == []


def test_process_group_backend_follows_the_workers_devices():
    from ray.train import ScalingConfig

    from inflora_ray.ray_train.process_group import ProcessGroupConfig, choose_backend
    from inflora_ray.ray_train.trainer import RunTrainer

    assert choose_backend(ProcessGroupConfig(), {"CPU": 1}) == "gloo"
    assert choose_backend(ProcessGroupConfig(), {"CPU": 1, "GPU": 1}) == "nccl"
    assert choose_backend(ProcessGroupConfig(backend="gloo"), {"GPU": 1}) == "gloo"
    for use_gpu, backend in ((False, "gloo"), (True, "nccl")):  # as Ray's TorchTrainer decides
        trainer = RunTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu))
        assert isinstance(trainer.backend_config, ProcessGroupConfig)
        assert trainer.backend_config.backend == backend


@pytest.fixture(scope="module")
def branched(runs):
    """A new run started from the reference's task-0 checkpoint, whose worker process dies (os._exit) in task 1,
    epoch 1, after the mid-task checkpoint of epoch 0 (one Ray Train run for the two checks below)."""
    root = runs["root"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "task=1,epoch=1,step=1,rank=0,mode=exit")
        cfg = _cfg(root, **{"run.num_workers": 1, "run.max_failures": 1})
        result = run_experiment(cfg, RunOptions(name="branch", start_from=str(root / "one" / "checkpoint_task000")),
                                QUIET)
    return {"dir": root / "branch", "result": result}


def test_worker_killed_mid_task_resumes_to_the_same_result(runs, branched):
    """Ray Train starts a new worker group after the worker's death, which resumes from the run's mid-task
    checkpoint and ends exactly where the reference run did. (Two workers, one of them lost with its node: the
    cluster rehearsal.)"""
    assert os.path.exists(branched["dir"] / ".fault_injected")
    assert _counts(branched["result"]) == _counts(runs["one"])
    assert branched["result"].summary == runs["one"].summary


def test_failure_beyond_max_failures_is_reported(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "task=0,mode=raise")
    cfg = _cfg(tmp_path, **{"run.num_workers": 1, "run.max_failures": 0, "data.num_tasks": 2})
    with pytest.raises(RuntimeError, match=r"(?s)run 'broken' failed after 0 task\(s\).*--resume broken"):
        run_experiment(cfg, RunOptions(name="broken"), QUIET)


def test_branch_from_a_task_checkpoint_equals_one_run(runs, branched):
    """A new run started from the task-0 checkpoint of the reference run ends the same way (its worker lost on
    the way, above). (--stop-after-task then --resume: test_hostile_runs.py and the cluster rehearsal.)"""
    assert _counts(branched["result"]) == _counts(runs["one"])
    # results on disk: Parquet accuracy matrix and JSON metrics
    import pyarrow.parquet as pq
    table = pq.read_table(branched["dir"] / "results" / "accuracy_matrix.parquet").to_pydict()
    assert len(table["accuracy"]) == 3 and table["after_task"] == [0, 1, 1]


def test_existing_run_name_without_resume_is_refused(runs):
    with pytest.raises(PreflightError, match="already exists.*--resume one"):
        run_experiment(_cfg(runs["root"]), RunOptions(name="one"))


def test_more_workers_than_the_cluster_can_place_fails_fast(ray_session, tmp_path):
    t0 = time.time()
    with pytest.raises(PreflightError, match=r"can never place 16 worker\(s\).*CPU: needs 16"):
        run_experiment(_cfg(tmp_path, **{"run.num_workers": 16}), RunOptions(name="toobig"))
    assert time.time() - t0 < 30
    assert not (tmp_path / "toobig").exists()  # nothing half-written


def test_unwritable_storage_fails_fast(ray_session, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not writable"):
        run_experiment(_cfg(blocker / "sub"), RunOptions(name="x"))


def test_missing_start_checkpoint_fails_fast(ray_session, tmp_path):
    with pytest.raises(PreflightError, match="no inflora-ray checkpoint"):
        run_experiment(_cfg(tmp_path), RunOptions(name="y", start_from=str(tmp_path / "nope")))


def test_unreachable_ray_address_fails_fast(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "inflora_ray.run", "--storage-path", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach the Ray cluster at RAY_ADDRESS='127.0.0.1:9'" in proc.stderr
    assert time.time() - t0 < 60


def test_a_branch_keeps_the_checkpoints_settings_and_records_its_overrides(runs, capsys):
    """``inflora-run --start-from``: the checkpoint's config is the base (its epochs, rank, ... kept, not the
    quickstart preset's), the override is applied and recorded with the first task it applies to; without
    --allow-config-change nothing is written; --config is refused."""
    import yaml

    from inflora_ray.run import main

    root = runs["root"]
    ckpt = str(root / "one" / "checkpoint_task000")
    saved = yaml.safe_load((root / "one" / "results" / "config.yaml").read_text())
    assert main(["--start-from", ckpt, "--name", "refused", "train.lr=0.001"]) == 2
    assert "would change settings that alter results (train.lr: 0.002 -> 0.001)" in capsys.readouterr().err
    assert main(["--start-from", ckpt, "--config", "quickstart", "--name", "refused"]) == 2
    assert "not --config" in capsys.readouterr().err
    assert not (root / "refused").exists()

    assert main(["--start-from", ckpt, "--name", "cli-branch", "train.lr=0.001", "--allow-config-change"]) == 0
    branch = yaml.safe_load((root / "cli-branch" / "results" / "config.yaml").read_text())
    flat_saved, flat_branch = flatten(saved), flatten(branch)
    differ = {k for k in flat_saved if flat_saved[k] != flat_branch.get(k)}
    assert differ == {"train.lr", "run.name"} and flat_branch["train.epochs"] == RUN["train.epochs"]
    history = json.loads((root / "cli-branch" / "results" / "config_history.json").read_text())
    assert [(h["how"], h["from_task"], h["changes"]) for h in history] == [
        ("--start-from", 1, {"train.lr": {"from": 0.002, "to": 0.001}})]
    metrics = json.loads((root / "cli-branch" / "results" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["complete"] == RUN["data.num_tasks"]


def test_every_private_ray_function_the_process_group_calls_is_there():
    """The installed Ray (the version pyproject.toml pins) has every function, class and constant that
    process_group.py and trainer.py use outside Ray's public API, with a signature that takes their call."""
    from inflora_ray.ray_train.process_group import RAY_PRIVATE_API, ray_api_problems

    assert ray_api_problems() == []
    assert "_setup_torch_process_group" in RAY_PRIVATE_API["ray.train.torch.config"]


def test_a_changed_or_missing_private_ray_function_is_reported():
    """The check against a stand-in module (its input, not Ray): a function whose signature no longer takes
    the project's call, a missing one, a missing class attribute and a module that cannot be imported are
    each named; the error names the Ray found, the one supported and what to do."""
    import types

    import ray

    from inflora_ray.ray_train.process_group import Call, RayVersionError, check_ray_api, ray_api_problems

    class Group:
        def execute_single(self, rank, fn, *args, **kwargs):
            return None

        def execute_async(self, fn, *args, **kwargs):
            return None

    class OldGroup:
        def execute_single(self, rank, fn, *args, **kwargs):
            return None

    def setup(backend, world_rank, world_size, init_method, timeout_s):
        return None

    def changed(backend, rank, size, init_method="env://", timeout_s=1800):  # a renamed keyword
        return None

    api = {"stand_in": {"setup": Call(kwargs=("backend", "world_rank", "world_size", "init_method", "timeout_s")),
                        "Group.execute_single": Call(args=3), "Group.execute_async": Call(args=2),
                        "CONSTANT": None}}
    good = types.ModuleType("stand_in")
    good.setup, good.Group, good.CONSTANT = setup, Group, 1
    assert ray_api_problems(api, lambda name: good) == []

    bad = types.ModuleType("stand_in")
    bad.setup, bad.Group = changed, OldGroup

    def import_module(name):
        if name != "stand_in":
            raise ImportError(f"No module named {name!r}")
        return bad

    problems = ray_api_problems({**api, "gone": {"x": None}}, import_module)
    assert len(problems) == 4
    assert problems[0].startswith("stand_in.setup(backend, rank, size, init_method='env://', timeout_s=1800) no "
                                  "longer takes the project's call")
    assert problems[1:] == ["stand_in.Group.execute_async is missing", "stand_in.CONSTANT is missing",
                            "module gone cannot be imported (No module named 'gone')"]
    with pytest.raises(RayVersionError) as e:
        check_ray_api(api, import_module)
    msg = str(e.value)
    assert f"Ray {ray.__version__} is installed" in msg and "supports Ray 2.60.x" in msg
    assert "stand_in.Group.execute_async is missing" in msg and "pip install 'ray[default,train,tune]==2.60.*'" in msg


def test_a_ray_without_a_function_the_process_group_calls_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """A Ray whose private function is gone (monkeypatched away) fails the first preflight check of a run, with
    its name, before the storage path is even created."""
    import ray.train.torch.config as torch_config

    monkeypatch.delattr(torch_config, "_shutdown_torch")
    cfg = _cfg(tmp_path / "runs")
    with pytest.raises(PreflightError, match=r"ray\.train\.torch\.config\._shutdown_torch is missing"):
        run_experiment(cfg, RunOptions(name="refused"), QUIET)
    assert not (tmp_path / "runs").exists()
