"""The single-process continual loop: determinism, checkpoint/resume, interference (pure PyTorch)."""

import pytest
import torch

from helpers import full_and_stopped_state, tiny_overrides
from inflora_ray.presets import load_config
from inflora_ray.data.loader import global_batch_sizes, pass_batches, train_batches
from inflora_ray.training.learner import ContinualLearner
from inflora_ray.training.optim import lr_factor


def _cfg(**extra):
    return load_config("quickstart", tiny_overrides(**extra))


def test_schedule_matches_paper_formula():
    cfg = _cfg(**{"train.epochs": 20})
    assert lr_factor(cfg.train, 0) == 1.0
    assert lr_factor(cfg.train, 19) == pytest.approx(0.0157, abs=1e-4)  # ends near 1.6% of lr
    cfg = _cfg(**{"train.schedule": "step", "train.step_milestones": "[4]", "train.epochs": 5})
    assert [lr_factor(cfg.train, e) for e in range(5)] == pytest.approx([1, 1, 1, 1, 0.1])


def test_batches_cover_every_sample_once_per_epoch_for_any_worker_count():
    import numpy as np
    idx = np.arange(100, 203)
    for world in (1, 2, 3):
        got = sorted(i for r in range(world) for b in train_batches(idx, 16, 0, 1, 2, r, world) for i, _ in b)
        assert got == list(idx)
        evals = sorted(i for r in range(world) for b in pass_batches(idx, 16, r, world) for i, _ in b)
        assert evals == list(idx)
    assert sum(global_batch_sizes(103, 16)) == 103
    # a worker reads only its own contiguous block of the task's samples
    for world in (2, 3):
        for r in range(world):
            mine = {i for b in train_batches(idx, 16, 0, 1, 2, r, world) for i, _ in b}
            mine |= {i for b in pass_batches(idx, 16, r, world) for i, _ in b}
            assert mine == set(idx[np.array_split(np.arange(len(idx)), world)[r]])
        # the global batches are the same for any worker count
        per_batch = [sorted(i for r in range(world) for i, _ in train_batches(idx, 16, 0, 1, 2, r, world)[b])
                     for b in range(7)]
        assert per_batch == [sorted(i for i, _ in bb) for bb in train_batches(idx, 16, 0, 1, 2)]
    # each sample's augmentation seed does not depend on the worker count
    one = {i: s for b in train_batches(idx, 16, 0, 1, 2) for i, s in b}
    two = {i: s for r in range(2) for b in train_batches(idx, 16, 0, 1, 2, r, 2) for i, s in b}
    assert one == two


def test_run_is_deterministic_and_complete():
    cfg = _cfg(**{"data.num_tasks": 3})
    a = ContinualLearner(cfg)
    a.run()
    b = ContinualLearner(cfg)
    b.run()
    assert a.counts.to_dict() == b.counts.to_dict()
    assert len(a.task_results) == 3 and a.finished
    # every test sample of every seen task is counted exactly once
    n_test = [len(a.benchmark.task_indices("test", t)) for t in range(3)]
    assert a.counts.total[-1] == n_test
    for ha, hb in zip(a.model.heads, b.model.heads):
        assert torch.equal(ha.weight, hb.weight)
    for la, lb in zip(a.model.adapters, b.model.adapters):
        assert torch.equal(la.weight, lb.weight)


# Prompt methods on the tiny ViT (2 blocks of width 48): layers that exist, a CODA pool whose keys fit, a short
# L2P prompt (4 tokens) to keep the test cheap.
_PROMPT_SETTINGS = {
    "l2p": {"method.l2p_length": 2, "method.l2p_top_k": 2},
    "l2p-pp": {"method.l2p_length": 2, "method.l2p_top_k": 2},
    "dualprompt": {"method.dualprompt_g_layers": "[0]", "method.dualprompt_e_layers": "[1]"},
    "coda-prompt": {"method.coda_pool_size": 12, "method.coda_layers": "[0, 1]", "method.coda_ortho_mu": 0.1},
}


@pytest.mark.parametrize("method", ["inflora", "seq-lora", "linear-probe", "joint", "joint-lora", "sd-lora",
                                    "sd-lora-kv", "l2p", "l2p-pp", "dualprompt", "coda-prompt"])
def test_resume_mid_task_equals_uninterrupted(method):
    cfg = _cfg(**{"data.num_tasks": 3, "train.epochs": 2, "method.name": method,
                  **_PROMPT_SETTINGS.get(method, {})})
    full, state = full_and_stopped_state(cfg, task=1, epoch=0)
    resumed = ContinualLearner(cfg)
    resumed.load_state_dict(state)
    assert resumed.next_task == 1
    resumed.run()
    assert resumed.counts.to_dict() == full.counts.to_dict()
    for lr, lf in zip(resumed.model.adapters, full.model.adapters):
        assert torch.equal(lr.weight, lf.weight)
    extras_r, extras_f = resumed.model.extras.state_dict(), full.model.extras.state_dict()
    assert extras_r.keys() == extras_f.keys() and all(torch.equal(extras_r[k], extras_f[k]) for k in extras_f)
    if method == "inflora":
        for mr, mf in zip(resumed.method.memory, full.method.memory):
            assert torch.equal(mr.basis, mf.basis)


def test_stop_after_task_then_continue():
    cfg = _cfg(**{"data.num_tasks": 3})
    full = ContinualLearner(cfg)
    full.run()
    first = ContinualLearner(cfg)
    first.run(stop_after_task=0)
    assert first.next_task == 1 and not first.finished
    state = first.state_dict()
    second = ContinualLearner(cfg)
    second.load_state_dict(state)
    second.run()
    assert second.counts.to_dict() == full.counts.to_dict()


def _train_two_tasks(method):
    """Train tasks 0 and 1 (high lr so the update is large); return the learner, task 0's test images and
    their features, each layer's weight and protected projector after task 0."""
    cfg = _cfg(**{"data.num_tasks": 5, "method.name": method, "train.lr": 0.01, "train.epochs": 2,
                  "method.lamb": 0.99, "method.lame": 0.99})
    learner = ContinualLearner(cfg)
    learner.run(stop_after_task=0)
    idx = learner.benchmark.task_indices("test", 0)
    x = torch.stack([learner.test_set[(int(i), -1)][0] for i in idx])
    with torch.no_grad():
        feats = learner.model.features(x)
    weights = [layer.weight.detach().clone() for layer in learner.model.adapters]
    projectors = ([m.protected_projector().float() for m in learner.method.memory] if method == "inflora"
                  else None)
    learner.run(stop_after_task=1)
    return learner, x, feats, weights, projectors


def test_task_update_annihilates_the_protected_subspace():
    """Invariant 2 on a trained model: task 1's merged update dW satisfies dW P ~ 0 on every layer, so old
    inputs' components in the protected space see exactly the old weights."""
    learner, _, _, weights, projectors = _train_two_tasks("inflora")
    for layer, w0, p in zip(learner.model.adapters, weights, projectors):
        dw = layer.weight.detach() - w0
        assert dw.norm() > 1e-3  # the task really trained
        assert (dw @ p).norm() < 1e-4 * dw.norm(), float((dw @ p).norm() / dw.norm())


def test_inflora_interferes_far_less_than_sequential_lora():
    """Relative change of task 0's test features caused by training task 1."""
    drift = {}
    for method in ("inflora", "seq-lora"):
        learner, x, before, _, _ = _train_two_tasks(method)
        with torch.no_grad():
            after = learner.model.features(x)
        drift[method] = float((after - before).norm() / before.norm())
    # measured here (random tiny backbone, seeds 0/1/2): inflora 0.048/0.073/0.049, seq-lora 0.178/0.177/0.134
    # (2.4x-3.7x less); the threshold protects only the high-energy directions, so drift is not zero.
    assert drift["inflora"] < drift["seq-lora"] / 1.8, drift
