"""Empty per-rank batches never reach the model: where they occur, the training step's skip path alone and
with two real gloo ranks (no Ray), and the passes that cannot produce them."""

import numpy as np
import pytest
import torch
from torch import nn

from helpers import run_two_ranks
from inflora_ray.data.loader import global_batch_sizes, pass_batches, train_batches
from inflora_ray.training.step import train_step

X = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2])


class _NoEmptyBatch(nn.Module):
    """A linear classifier that fails when handed a batch of 0 (as some attention kernels do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            self.fc.weight.copy_(torch.randn(3, 5, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        assert len(x) > 0, "the model was handed an empty batch"
        return self.fc(x)


def _step(model, x, y, global_size):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(model, x, y, global_size, opt, scaler, lambda: torch.autocast("cpu", enabled=False))
    return loss, [p.detach().clone() for p in model.parameters()]


def test_a_rank_can_own_none_of_a_global_batch_but_every_pass_batch_is_non_empty():
    idx = np.arange(10)
    world = 4
    parts = [train_batches(idx, 2, seed=0, task=0, epoch=0, rank=r, world_size=world) for r in range(world)]
    assert any(len(b) == 0 for rank_batches in parts for b in rank_batches)  # the case exists
    assert [sum(len(p[b]) for p in parts) for b in range(5)] == global_batch_sizes(10, 2)
    for n, bs, w in ((3, 2, 4), (10, 4, 3), (1, 8, 2)):  # fewer samples than ranks: ranks with no batch at all
        for r in range(w):
            assert all(len(b) > 0 for b in pass_batches(np.arange(n), bs, r, w))


def test_an_empty_step_does_not_call_the_model_or_move_it():
    model = _NoEmptyBatch()
    before = [p.detach().clone() for p in model.parameters()]
    loss, after = _step(model, X[:0], Y[:0], global_size=6)
    assert float(loss) == 0.0 and all(torch.equal(a, b) for a, b in zip(before, after))
    loss, after = _step(model, X, Y, global_size=6)
    assert float(loss) > 0 and not torch.equal(after[0], before[0])


def _rank_main(rank: int, store: str, out: str) -> None:
    """Rank 0 owns the whole global batch, rank 1 none of it: both take the step and save their parameters."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        x, y = (X, Y) if rank == 0 else (X[:0], Y[:0])
        _, params = _step(_NoEmptyBatch(), x, y, global_size=len(X))
        torch.save(params, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_rank_without_samples_joins_the_all_reduce_and_makes_the_same_update(tmp_path):
    """Two gloo ranks, one with an empty part: no hang, and both ranks end where one process does."""
    out = run_two_ranks(_rank_main, tmp_path, "the gradient all-reduce", name="params")
    _, single = _step(_NoEmptyBatch(), X, Y, global_size=len(X))
    for rank in (0, 1):
        for got, want in zip(torch.load(f"{out}.{rank}"), single):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_few_steps_under_autocast_and_the_scaler_train_the_model(precision):
    from inflora_ray.training.precision import Precision

    p = Precision(precision, "cpu")
    model = _NoEmptyBatch()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    scaler = p.scaler()
    w0 = model.fc.weight.detach().clone()
    losses = [float(train_step(model, X, Y, len(X), opt, scaler, p.autocast)) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not torch.equal(model.fc.weight, w0)
    if precision == "fp16":
        assert scaler.get_scale() > 0 and scaler.state_dict()["_growth_tracker"] == 5
