"""Ray Train data parallelism (2 workers of 1 CPU, gloo) against one process, for every method, from ONE Ray
Train job (starting a worker group costs more than the training here): the all-reduced covariance of task 0
and the A_0 designed from it; then each method, InfLoRA included, trained on both workers. Only float
summation order may differ (the gradient all-reduce): predictions agree within 2 test samples per entry and
the trained tensors closely. The prompt methods' pull/orthogonality
losses are summed per sample and divided by the global batch size, so the gradients of prompts and keys are
the global batch's mean however the batch is split."""
from __future__ import annotations

import sys

import pytest
import torch

from inflora_ray.core.subspace import CovariancePass, design_lora_A
from inflora_ray.presets import load_config
from inflora_ray.training.learner import ContinualLearner

pytestmark = pytest.mark.ray

# The quickstart (pre-trained backbone: predictions are far from degenerate), no MLflow, CPU.
BASE = ["train.device=cpu", "tracking.enabled=false"]
# Each method on 2 tasks x 1 epoch; CODA's pool cut to 20 components (10 per task) to keep it cheap.
METHOD_RUN = BASE + ["data.num_tasks=2", "train.epochs=1", "method.coda_pool_size=20"]
# Compared on the classifier heads and the method's own tensors (SD-LoRA's directions and magnitudes).
WEIGHTED = ("inflora", "joint", "joint-lora", "sd-lora", "sd-lora-kv")
PROMPTS = ("l2p", "l2p-pp", "dualprompt", "coda-prompt")  # compared on prompts and keys, relative to how far they moved
# L2P++'s pull loss pairs each image with the keys chosen by its own worker's images, as the reference pairs
# them per GPU, so its keys train differently on 2 workers (docs/baselines.md#l2p-pp); without the pull term
# everything else must agree.
EXTRA = {"l2p-pp": ["method.l2p_pull_coef=0"]}


def _method_cfg(method: str):
    """Each method's quickstart preset (its recipe), cut to 2 tasks x 1 epoch."""
    preset = "quickstart" if method == "inflora" else f"{method}-quickstart"
    return load_config(preset, METHOD_RUN + EXTRA.get(method, []))


def _covariance_cfg():
    return load_config("quickstart", BASE + ["data.num_tasks=3"])


def _state(learner) -> dict:
    return {"correct": learner.counts.to_dict(), "world": learner.world_size,
            "extras": {k: v.detach().cpu().clone() for k, v in learner.model.extras.state_dict().items()},
            "heads": [h.weight.detach().cpu().clone() for h in learner.model.heads]}


def _probe(config):
    """Worker function: every rank computes the all-reduced covariance of task 0 and designs A_0, then trains
    each method; rank 0 saves what it ended with."""
    import ray.train

    from inflora_ray.config import config_from_dict

    learner = ContinualLearner(config_from_dict(config["covariance"]), device=torch.device("cpu"))
    covs = learner.covariance(task=0, which=CovariancePass.BEFORE_TASK)
    out = {"covariance": {"covs": covs, "designs": [design_lora_A(c, None, 10).lora_A for c in covs],
                          "world": learner.world_size}}
    for method, cfg in config["methods"].items():
        learner = ContinualLearner(config_from_dict(cfg), device=torch.device("cpu"))
        learner.run()
        out[method] = _state(learner)
    if ray.train.get_context().get_world_rank() == 0:
        torch.save(out, config["out"])


@pytest.fixture(scope="module")
def two_workers(ray_session, tmp_path_factory):
    """What rank 0 of the 2-worker job ended with: the covariance probe and each method's state."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from inflora_ray.ray_train.trainer import RunTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "two.pt"
    loop = {"covariance": _covariance_cfg().to_dict(), "out": str(out),
            "methods": {m: _method_cfg(m).to_dict() for m in WEIGHTED + PROMPTS}}
    RunTrainer(_probe, train_loop_config=loop,
               scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
               run_config=RunConfig(name="ddp-methods", storage_path=str(tmp))).fit()
    return torch.load(out, weights_only=True)


def test_two_worker_covariance_and_design_equal_one_process(two_workers):
    got = two_workers["covariance"]
    assert got["world"] == 2
    ref = ContinualLearner(_covariance_cfg(), device=torch.device("cpu")).covariance(
        task=0, which=CovariancePass.BEFORE_TASK)
    for c2, c1, a2 in zip(got["covs"], ref, got["designs"]):
        # Two fp32 partial sums of ~5k token outer products added once vs one running sum: the relative
        # difference is ~1e-7 (fp32 epsilon times a few); 1e-5 leaves ample margin.
        torch.testing.assert_close(c2, c1, rtol=1e-5, atol=1e-6)
        a1 = design_lora_A(c1, None, 10).lora_A
        torch.testing.assert_close(a2.T @ a2, a1.T @ a1, atol=1e-4, rtol=0)


def _one_process(method: str) -> dict:
    one = ContinualLearner(_method_cfg(method), device=torch.device("cpu"))
    one.run()
    return _state(one)


def _predictions_agree(method: str, ref: dict, got: dict) -> None:
    assert got["world"] == 2 and ref["world"] == 1
    assert ref["correct"]["total"] == got["correct"]["total"]
    for r1, r2 in zip(ref["correct"]["correct"], got["correct"]["correct"]):
        assert all(abs(a - b) <= 2 for a, b in zip(r1, r2)), (method, ref["correct"], got["correct"])
    acc = sum(ref["correct"]["correct"][-1]) / sum(ref["correct"]["total"][-1])
    assert acc > 0.6, (method, acc)  # the runs really learn, so agreement is not trivial


@pytest.mark.parametrize("method", WEIGHTED)
def test_two_workers_agree_with_one_worker(two_workers, method):
    ref, got = _one_process(method), two_workers[method]
    _predictions_agree(method, ref, got)
    for h1, h2 in zip(ref["heads"], got["heads"]):
        torch.testing.assert_close(h1, h2, atol=2e-3, rtol=1e-3)
    for k, v in ref["extras"].items():  # SD-LoRA's directions and magnitudes
        torch.testing.assert_close(v, got["extras"][k], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("method", PROMPTS)
def test_two_workers_train_prompts_like_one_process(two_workers, method):
    ref, got = _one_process(method), two_workers[method]
    _predictions_agree(method, ref, got)
    # Adam's per-element normalisation turns summation-order noise on near-zero gradients into full-size
    # steps, so the trained tensors are compared relative to how far training moved them: a wrong gradient
    # scale (a loss term counted per rank, or not divided by the global batch) moves them apart by a
    # sizeable fraction of that.
    init = _state(ContinualLearner(_method_cfg(method), device=torch.device("cpu")))["extras"]
    rel = {k: float((got["extras"][k] - v).norm() / (v - init[k]).norm()) for k, v in ref["extras"].items()
           if (v - init[k]).norm() > 0}
    assert rel and max(rel.values()) < 0.05, (method, rel)
