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


def _first_task(precision):
    """Task 0 of a tiny run in ``precision``: its epoch's (loss, scaler state, B norms) and accuracy row."""
    watch = _Watch()
    learner = ContinualLearner(_cfg(**{"data.num_tasks": 3, "train.precision": precision}), hooks=watch)
    assert learner.precision.name == precision
    learner.run(stop_after_task=0)
    return watch.epochs, learner.counts.matrix()


@pytest.fixture(scope="module")
def fp32_first_task():
    return _first_task("fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_runs_in_bf16_and_fp16_on_cpu(precision, fp32_first_task):
    """The run trains, and stays within bounds of the same run in fp32 (matmuls in the low precision, the
    frozen weights held in it, LayerNorm, residual stream and loss in fp32)."""
    ((loss, scaler, norms),), accuracy = _first_task(precision)
    assert torch.isfinite(torch.tensor(loss)) and all(n > 0 for n in norms)  # B started at 0 and moved
    ((loss32, _, norms32),), accuracy32 = fp32_first_task
    assert loss != loss32  # it did compute in the low precision
    assert abs(loss - loss32) <= 1e-3 * loss32
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(norms32), rtol=0.01, atol=0)
    assert abs(accuracy[0][0] - accuracy32[0][0]) <= 0.03
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


def _adapted_vit():
    from helpers import tiny_vit
    from inflora_ray.core.lora import adapt_vit_qkv
    torch.manual_seed(0)
    model = tiny_vit(depth=2, embed_dim=48)
    model.requires_grad_(False)
    layers = adapt_vit_qkv(model, rank=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            layer.set_trainable(a=False, b=True)
    return model, layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_weights_held_in_low_precision_change_no_result_and_come_back_bit_for_bit(dtype):
    from inflora_ray.training.precision import frozen_weights_in
    model, layers = _adapted_vit()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}

    def step():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        out.float().square().sum().backward()
        grads = [layer.lora_B_k.grad.clone() for layer in layers]
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    out, grads = step()
    with frozen_weights_in(model, dtype) as converted:
        assert model.blocks[0].attn.qkv.weight.dtype == dtype and model.patch_embed.proj.weight.dtype == dtype
        assert layers[0].lora_B_k.dtype == torch.float32 and layers[0].lora_A.dtype == torch.float32
        assert model.blocks[0].norm1.weight.dtype == torch.float32 and model.pos_embed.dtype == torch.float32
        held_out, held_grads = step()
    assert converted == 2 * (1 + 4 * 2)  # weight and bias of the patch conv and of 4 matmul layers per block
    assert torch.equal(held_out, out) and all(torch.equal(a, b) for a, b in zip(held_grads, grads))
    for k, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[k]), k


def test_frozen_weights_leave_fp32_and_trainable_tensors_alone():
    from inflora_ray.training.precision import frozen_weights_in
    model, _ = _adapted_vit()
    model.blocks[1].mlp.fc1.weight.requires_grad_(True)
    with frozen_weights_in(model, None) as none:
        assert none == 0
    with frozen_weights_in(model, torch.bfloat16):
        assert model.blocks[1].mlp.fc1.weight.dtype == torch.float32  # trained: the optimizer's fp32 tensor
        assert model.blocks[1].mlp.fc1.bias.dtype == torch.bfloat16

