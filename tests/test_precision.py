"""Precision: the rule of ``train.precision: auto``, bf16 and fp16 (with its gradient scaler) training on a CPU,
the scaler's state across a resume, and covariance passes in full fp32 whatever the training precision."""
import io

import pytest
import torch

from helpers import Interrupt, SnapshotAndStop, tiny_overrides
from inflora_ray.core.subspace import CovariancePass, CovarianceRecorder, full_fp32
from inflora_ray.presets import load_config
from inflora_ray.training.learner import ContinualLearner, Hooks
from inflora_ray.training.precision import Precision, resolve_precision


def _cfg(**extra):
    return load_config("quickstart", tiny_overrides(**extra))


@pytest.mark.parametrize("choice, device, bf16, expected", [
    ("auto", "cuda", True, "bf16"),   # A100, H100
    ("auto", "cuda", False, "fp16"),  # V100, T4: fp16 with a gradient scaler
    ("auto", "cpu", False, "fp32"),
    ("auto", "cpu", True, "fp32"),    # CPUs train in fp32 under auto, whatever they support
    ("fp32", "cuda", True, "fp32"),
    ("bf16", "cpu", False, "bf16"),   # an explicit choice is kept
    ("fp16", "cuda", True, "fp16"),
])
def test_auto_is_bf16_where_supported_else_fp16_else_fp32(choice, device, bf16, expected):
    assert resolve_precision(choice, device, bf16) == expected


def test_only_fp16_enables_the_gradient_scaler():
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = Precision(name, "cpu")
        assert p.dtype == dtype and p.scaler().is_enabled() == (name == "fp16")
    assert Precision.for_device("auto", torch.device("cpu")).name == "fp32"


def test_full_fp32_turns_autocast_and_tf32_off_and_restores_them():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with full_fp32("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
            assert torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(KeyError), full_fp32("cpu"):
            raise KeyError  # restored on errors too
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_covariance_pass_is_fp32_whatever_the_training_precision():
    """The covariance under train.precision=bf16 equals fp32's; the same forward under bf16 autocast would
    not (so the tolerance below does tell the two apart)."""
    learners = {p: ContinualLearner(_cfg(**{"train.precision": p})) for p in ("fp32", "bf16")}
    assert learners["bf16"].precision.name == "bf16"
    covs = {p: learner.covariance(0, CovariancePass.BEFORE_TASK) for p, learner in learners.items()}
    for c32, c16 in zip(covs["fp32"], covs["bf16"]):
        torch.testing.assert_close(c16, c32, rtol=1e-6, atol=1e-7)

    learner = learners["bf16"]
    idx = learner.benchmark.task_indices("train", 0)[:64]
    x = torch.stack([learner.train_set[(int(i), -1)][0] for i in idx])
    sums = {}
    for name, region in (("fp32", lambda: full_fp32("cpu")), ("bf16", learner.precision.autocast)):
        with torch.no_grad(), region(), CovarianceRecorder(learner.model.adapters) as rec:
            learner.model.features(x)
        sums[name] = rec.sums
    # bf16 matmuls (patch embedding, attention, MLP) move the sums by far more than the tolerance above
    rel = max(float((b - a).abs().max() / a.abs().max()) for a, b in zip(sums["fp32"], sums["bf16"]))
    assert rel > 1e-3, rel


class _Watch(Hooks):
    """Records each epoch's loss, scaler state and adapter B norms (B is merged away at the task's end)."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, learner, task, epoch):
        p = learner.in_progress
        norms = [float(layer.lora_B_k.detach().norm() + layer.lora_B_v.detach().norm())
                 for layer in learner.model.adapters]
        self.epochs.append((p.losses[-1], p.scaler, norms))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_runs_in_bf16_and_fp16_on_cpu(precision):
    watch = _Watch()
    learner = ContinualLearner(_cfg(**{"data.num_tasks": 3, "train.precision": precision}), hooks=watch)
    assert learner.precision.name == precision
    learner.run(stop_after_task=0)
    (loss, scaler, norms), = watch.epochs
    assert torch.isfinite(torch.tensor(loss)) and all(n > 0 for n in norms)  # B started at 0 and moved
    if precision == "fp16":
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # steps taken under the scaler
    else:
        assert scaler is None


def test_fp16_scaler_state_is_checkpointed_and_restored(monkeypatch):
    """Stopped after task 0's first epoch and resumed: the second epoch continues the saved scaler, and ends
    where an uninterrupted run does."""
    cfg = _cfg(**{"data.num_tasks": 2, "train.epochs": 2, "train.precision": "fp16"})
    full = _Watch()
    uninterrupted = ContinualLearner(cfg, hooks=full)
    uninterrupted.run(stop_after_task=0)
    hook = SnapshotAndStop(task=0, epoch=0)
    with pytest.raises(Interrupt):
        ContinualLearner(cfg, hooks=hook).run()
    state = torch.load(io.BytesIO(hook.blob), weights_only=True)
    saved = state["in_task"]["scaler"]
    assert saved == full.epochs[0][1] and saved != torch.amp.GradScaler("cpu").state_dict()  # not a fresh one

    loaded = []
    original = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, sd: (loaded.append(dict(sd)), original(self, sd))[1])
    watch = _Watch()
    resumed = ContinualLearner(cfg, hooks=watch)
    resumed.load_state_dict(state)
    resumed.run(stop_after_task=0)
    assert loaded == [saved]
    assert watch.epochs == full.epochs[1:]  # loss, scaler state and B norms of the second epoch
    assert resumed.counts.to_dict() == uninterrupted.counts.to_dict()
