"""Ray Train integration on a real local Ray cluster (2 CPUs, gloo): covariance all-reduce, 1 vs 2 workers,
fault injection and resume, stop/resume, branch from a checkpoint, fail-fast inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from inflora_ray.presets import load_config
from inflora_ray.core.subspace import CovariancePass
from inflora_ray.distributed.faults import ENV_VAR
from inflora_ray.distributed.launch import run_experiment
from inflora_ray.distributed.preflight import PreflightError
from inflora_ray.training.learner import ContinualLearner

pytestmark = pytest.mark.ray

# The quickstart (pre-trained backbone, so predictions are far from degenerate) cut to 3 tasks x 2 epochs,
# with a mid-task checkpoint after epoch 0 of every task; no MLflow (tested in test_tracking.py).
RUN = {"data.num_tasks": 3, "train.epochs": 2, "run.checkpoint_every_epochs": 1, "run.cpus_per_worker": 1,
       "tracking.enabled": "false", "train.device": "cpu"}


def _cfg(tmp_path, **extra):
    o = {**RUN, "run.storage_path": str(tmp_path), **extra}
    return load_config("quickstart", [f"{k}={v}" for k, v in o.items()])


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Reference runs shared by several tests: 1 worker and 2 workers, same seed."""
    root = tmp_path_factory.mktemp("ref")
    one = run_experiment(_cfg(root, **{"run.num_workers": 1}), "one", quiet_table=True)
    two = run_experiment(_cfg(root, **{"run.num_workers": 2}), "two", quiet_table=True)
    return {"root": root, "one": one, "two": two}


def _counts(result):
    return [t["report"]["correct"] for t in result.tasks]


# ------------------------------------------------------------------------------------------------------------
def _covariance_probe(config):
    """Worker function: every rank computes the all-reduced covariance and designs A_0; rank 0 saves them."""
    import ray.train

    from inflora_ray.config import config_from_dict
    from inflora_ray.core.subspace import design_lora_A
    from inflora_ray.training.learner import ContinualLearner

    learner = ContinualLearner(config_from_dict(config["cfg"]), device=torch.device("cpu"))
    covs = learner.covariance(task=0, which=CovariancePass.BEFORE_TASK)
    designs = [design_lora_A(c, None, 10).lora_A for c in covs]
    if ray.train.get_context().get_world_rank() == 0:
        torch.save({"covs": covs, "designs": designs, "world": learner.world_size}, config["out"])


def test_two_worker_covariance_and_design_equal_one_process(ray_session, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from inflora_ray.core.subspace import design_lora_A
    from inflora_ray.training.learner import ContinualLearner

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = _cfg(tmp_path)
    out = tmp_path / "cov.pt"
    TorchTrainer(_covariance_probe, train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="cov", storage_path=str(tmp_path))).fit()
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    single = ContinualLearner(cfg, device=torch.device("cpu"))
    ref = single.covariance(task=0, which=CovariancePass.BEFORE_TASK)
    for c2, c1, a2 in zip(got["covs"], ref, got["designs"]):
        # Two fp32 partial sums of ~5k token outer products added once vs one running sum: the relative
        # difference is ~1e-7 (fp32 epsilon times a few); 1e-5 leaves ample margin.
        torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-6)
        a1 = design_lora_A(c1, None, 10).lora_A
        torch.testing.assert_close(a2.T @ a2, a1.T @ a1, atol=1e-4, rtol=0)


def test_two_workers_agree_with_one_worker(runs):
    one, two = runs["one"], runs["two"]
    assert len(one.tasks) == len(two.tasks) == 3
    assert [t["report"]["total"] for t in one.tasks] == [t["report"]["total"] for t in two.tasks]
    assert two.tasks[0]["world_size"] == 2
    # Same global batches and augmentations; only float summation order differs (the gradient all-reduce,
    # the all-reduced covariance). That can flip a prediction sitting on a decision boundary: allow 2 test
    # samples per (task, test set) entry.
    for r1, r2 in zip(_counts(one), _counts(two)):
        assert all(abs(a - b) <= 2 for a, b in zip(r1, r2)), (_counts(one), _counts(two))
    a1, a2 = one.summary["final_accuracy"], two.summary["final_accuracy"]
    assert abs(a1 - a2) <= 0.02
    assert a1 > 0.6  # the runs really learn (pre-trained backbone), so agreement is not trivial


# Methods besides InfLoRA: one 2-worker Ray Train job runs each method (2 tasks x 1 epoch of the quickstart)
# and is compared with the same run in one process (one worker), with the tolerance used for InfLoRA above.
OTHER_METHODS = ("joint", "sd-lora")


def _methods_probe(config):
    """Worker function: every rank runs each method's learner; rank 0 saves the counts and trained tensors."""
    import ray.train

    from inflora_ray.config import config_from_dict

    out = {}
    for method, cfg in config["cfgs"].items():
        learner = ContinualLearner(config_from_dict(cfg), device=torch.device("cpu"))
        learner.run()
        out[method] = {"correct": learner.record.to_dict(), "world": learner.world_size,
                       "heads": [h.weight.detach().clone() for h in learner.model.heads],
                       "extras": {k: v.clone() for k, v in learner.model.extras.state_dict().items()}}
    if ray.train.get_context().get_world_rank() == 0:
        torch.save(out, config["out"])


def test_two_workers_agree_with_one_worker_for_every_method(ray_session, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfgs = {m: _cfg(tmp_path, **{"method.name": m, "data.num_tasks": 2, "train.epochs": 1}) for m in OTHER_METHODS}
    out = tmp_path / "methods.pt"
    TorchTrainer(_methods_probe, train_loop_config={"cfgs": {m: c.to_dict() for m, c in cfgs.items()},
                                                    "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="methods", storage_path=str(tmp_path))).fit()
    got = torch.load(out, weights_only=True)
    for method, cfg in cfgs.items():
        two = got[method]
        assert two["world"] == 2
        one = ContinualLearner(cfg, device=torch.device("cpu"))
        one.run()
        rec = one.record.to_dict()
        assert rec["total"] == two["correct"]["total"]
        for r1, r2 in zip(rec["correct"], two["correct"]["correct"]):
            assert all(abs(a - b) <= 2 for a, b in zip(r1, r2)), (method, rec, two["correct"])
        assert sum(rec["correct"][-1]) > 0.6 * sum(rec["total"][-1]), method  # the runs really learn
        for h1, h2 in zip(one.model.heads, two["heads"]):
            torch.testing.assert_close(h1.weight.detach(), h2, atol=2e-3, rtol=1e-3)
        for k, v in one.model.extras.state_dict().items():  # SD-LoRA's directions and magnitudes
            torch.testing.assert_close(v, two["extras"][k], atol=2e-3, rtol=1e-3)


def test_worker_killed_mid_task_resumes_to_the_same_result(runs, tmp_path, monkeypatch):
    # rank 1 dies (os._exit) in task 1, epoch 1, after the mid-task checkpoint of epoch 0
    monkeypatch.setenv(ENV_VAR, "task=1,epoch=1,step=1,rank=1,mode=exit")
    cfg = _cfg(tmp_path, **{"run.num_workers": 2, "run.max_failures": 1})
    result = run_experiment(cfg, "faulty", quiet_table=True)
    assert os.path.exists(tmp_path / "faulty" / ".fault_injected")
    assert _counts(result) == _counts(runs["two"])
    assert result.summary == runs["two"].summary


def test_failure_beyond_max_failures_is_reported(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "task=0,mode=raise")
    cfg = _cfg(tmp_path, **{"run.num_workers": 1, "run.max_failures": 0, "data.num_tasks": 2})
    with pytest.raises(RuntimeError, match=r"(?s)run 'broken' failed after 0 task\(s\).*--resume broken"):
        run_experiment(cfg, "broken", quiet_table=True)


def test_stop_after_task_then_resume_equals_one_run(runs):
    root = runs["root"]
    cfg = _cfg(root, **{"run.num_workers": 1})
    first = run_experiment(cfg, "staged", stop_after_task=0, quiet_table=True)
    assert len(first.tasks) == 1
    resumed = run_experiment(cfg, "staged", resume=True, quiet_table=True)
    assert _counts(resumed) == _counts(runs["one"])
    # branch: a new run started from the task-0 checkpoint of the reference run ends the same way
    branch = run_experiment(cfg, "branch", start_from=str(root / "one" / "checkpoint_task000"), quiet_table=True)
    assert _counts(branch) == _counts(runs["one"])
    # results on disk: Parquet accuracy matrix and JSON metrics
    import pyarrow.parquet as pq
    table = pq.read_table(root / "staged" / "results" / "accuracy_matrix.parquet").to_pydict()
    assert len(table["accuracy"]) == 6 and table["after_task"] == [0, 1, 1, 2, 2, 2]


def test_existing_run_name_without_resume_is_refused(runs):
    with pytest.raises(PreflightError, match="already exists.*--resume one"):
        run_experiment(_cfg(runs["root"]), "one")


def test_more_workers_than_the_cluster_can_place_fails_fast(ray_session, tmp_path):
    t0 = time.time()
    with pytest.raises(PreflightError, match=r"can never place 16 worker\(s\).*CPU: needs 16"):
        run_experiment(_cfg(tmp_path, **{"run.num_workers": 16}), "toobig")
    assert time.time() - t0 < 30
    assert not (tmp_path / "toobig").exists()  # nothing half-written


def test_unwritable_storage_fails_fast(ray_session, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="is not writable"):
        run_experiment(_cfg(blocker / "sub"), "x")


def test_missing_start_checkpoint_fails_fast(ray_session, tmp_path):
    with pytest.raises(PreflightError, match="no inflora-ray checkpoint"):
        run_experiment(_cfg(tmp_path), "y", start_from=str(tmp_path / "nope"))


def test_unreachable_ray_address_fails_fast(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "inflora_ray.run", "--storage-path", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach the Ray cluster at RAY_ADDRESS='127.0.0.1:9'" in proc.stderr
    assert time.time() - t0 < 60
