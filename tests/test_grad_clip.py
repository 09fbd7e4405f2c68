"""``train.grad_clip``: one training step clips the global gradient norm of every trained tensor as the L2P
references do (``g * min(1, c / (||g|| + 1e-6))`` after the gradient all-reduce), on one process and on two gloo
ranks; bad values are refused by the config."""
import pytest
import torch
import torch.nn.functional as F
from helpers import run_two_ranks
from torch import nn

from inflora_ray.config import ConfigError
from inflora_ray.presets import load_config
from inflora_ray.training.step import train_step

X = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _model():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2)
    return model


def _step(x, y, grad_clip, global_size=8):
    """One plain-SGD step (lr 1: the update is minus the applied gradient); the parameters after it."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(model, x, y, global_size, opt, scaler, lambda: torch.autocast("cpu", enabled=False), grad_clip)
    return [p.detach().clone() for p in model.parameters()]


def _expected(grad_clip):
    """The same step written out: the batch-mean cross-entropy's gradients, scaled together by
    ``min(1, c / (global norm + 1e-6))``."""
    model = _model()
    grads = torch.autograd.grad(F.cross_entropy(model(X), Y), list(model.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    factor = 1.0 if grad_clip is None else min(1.0, grad_clip / (float(norm) + 1e-6))
    return [p.detach() - factor * g for p, g in zip(model.parameters(), grads)], float(norm)


@pytest.mark.parametrize("grad_clip", [None, 0.05, 1e6])
def test_a_step_applies_the_globally_clipped_gradients(grad_clip):
    want, norm = _expected(grad_clip)
    assert norm > 0.05 * 10  # the small limit does clip, and by a large factor
    for got, exp in zip(_step(X, Y, grad_clip), want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    # and the same as torch's own clipping of the same gradients
    model = _model()
    F.cross_entropy(model(X), Y).backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), grad_clip)
    for got, p in zip(_step(X, Y, grad_clip), model.parameters()):
        torch.testing.assert_close(got, p.detach() - p.grad, rtol=1e-5, atol=1e-6)


def _rank_main(rank: int, store: str, out: str) -> None:
    """Each rank owns half of the global batch and takes one clipped step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        half = slice(0, 4) if rank == 0 else slice(4, 8)
        torch.save(_step(X[half], Y[half], 0.05, global_size=len(X)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_clip_the_reduced_gradient_and_agree_with_one_process(tmp_path):
    """Clipping acts on the all-reduced (global-batch) gradient: two ranks with half a batch each end where one
    process with the whole batch does (clipping each rank's half before the reduce would not)."""
    out = run_two_ranks(_rank_main, tmp_path, "the gradient all-reduce", name="params")
    single = _step(X, Y, 0.05)
    for rank in (0, 1):
        for got, want in zip(torch.load(f"{out}.{rank}"), single):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_a_non_positive_limit_is_refused(value):
    with pytest.raises(ConfigError, match=r"train.grad_clip"):
        load_config("quickstart", [f"train.grad_clip={value}"])


def test_null_turns_clipping_off_and_the_l2p_recipe_clips_at_1():
    assert load_config("quickstart", ["train.grad_clip=null"]).train.grad_clip is None
    assert load_config("quickstart").train.grad_clip is None
    assert load_config("l2p-quickstart").train.grad_clip == 1.0
    assert load_config("l2p-pp-quickstart").train.grad_clip is None  # CODA-Prompt's L2P++ does not clip
