"""The prompt-based methods under Ray Train data parallelism: 2 workers give the same training as 1 process
(pull/orthogonality losses are summed per sample and divided by the global batch size, so the gradients of
the prompts and keys are the global batch's mean whatever the split)."""
from __future__ import annotations

import sys

import pytest
import torch

from inflora_ray.presets import load_config

pytestmark = pytest.mark.ray

METHODS = ("l2p", "dualprompt", "coda-prompt")
# Each method's quickstart preset (pre-trained backbone: predictions are far from degenerate) cut to 2 tasks x
# 1 epoch; CODA's pool cut to 20 components (10 per task) to keep the test cheap.
RUN = ["data.num_tasks=2", "train.epochs=1", "train.device=cpu", "tracking.enabled=false",
       "method.coda_pool_size=20"]


def _cfg(method: str):
    return load_config(f"{method}-quickstart", RUN)


def _state(learner) -> dict:
    return {"correct": learner.record.to_dict(), "world": learner.world_size,
            "extras": {k: v.detach().cpu().clone() for k, v in learner.model.extras.state_dict().items()},
            "heads": [h.weight.detach().cpu().clone() for h in learner.model.heads]}


def _train_all(config):
    """Worker function: every rank trains each method; rank 0 saves what it ended with."""
    import ray.train

    from inflora_ray.config import config_from_dict
    from inflora_ray.training.learner import ContinualLearner

    out = {}
    for method, cfg in config["cfgs"].items():
        learner = ContinualLearner(config_from_dict(cfg), device=torch.device("cpu"))
        learner.run()
        out[method] = _state(learner)
    if ray.train.get_context().get_world_rank() == 0:
        torch.save(out, config["out"])


def test_two_workers_train_prompts_like_one_process(ray_session, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from inflora_ray.training.learner import ContinualLearner

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfgs = {m: _cfg(m) for m in METHODS}
    out = tmp_path / "two.pt"
    TorchTrainer(_train_all, train_loop_config={"cfgs": {m: c.to_dict() for m, c in cfgs.items()}, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="prompts-ddp", storage_path=str(tmp_path))).fit()
    two = torch.load(out, weights_only=True)
    for method in METHODS:
        one = ContinualLearner(cfgs[method], device=torch.device("cpu"))
        one.run()
        ref, got = _state(one), two[method]
        assert got["world"] == 2 and ref["world"] == 1
        # Only float summation order differs (the gradient all-reduce): the tolerance of the InfLoRA test
        # (2 test samples per entry) for predictions, and the trained prompts/keys agree closely.
        for r1, r2 in zip(ref["correct"]["correct"], got["correct"]["correct"]):
            assert all(abs(a - b) <= 2 for a, b in zip(r1, r2)), (method, ref["correct"], got["correct"])
        acc = sum(ref["correct"]["correct"][-1]) / sum(ref["correct"]["total"][-1])
        assert acc > 0.6, (method, acc)  # the runs really learn, so agreement is not trivial
        # Adam's per-element normalisation turns summation-order noise on near-zero gradients into full-size
        # steps, so the trained tensors are compared relative to how far training moved them: a wrong
        # gradient scale (a loss term counted per rank, or not divided by the global batch) moves them apart
        # by a sizeable fraction of that.
        init = _state(ContinualLearner(cfgs[method], device=torch.device("cpu")))["extras"]
        rel = {k: float((got["extras"][k] - v).norm() / (v - init[k]).norm()) for k, v in ref["extras"].items()
               if (v - init[k]).norm() > 0}
        assert rel and max(rel.values()) < 0.05, (method, rel)
