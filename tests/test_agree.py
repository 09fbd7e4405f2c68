"""Results each rank computes itself (A_t, the DualGPM memory) end equal on every rank: two real gloo ranks
(torch.multiprocessing, no Ray), with the same covariances (bit-identical, nothing logged) and with
deliberately different ones (rank 0's results everywhere, and a warning naming what differed)."""
import logging
from types import SimpleNamespace

import torch
from torch import nn

from helpers import run_two_ranks
from inflora_ray.config import MethodConfig
from inflora_ray.core.lora import KVLoRAQKV
from inflora_ray.core.methods import build_method
from inflora_ray.training import collective

D, LAYERS, TASKS = 12, 2, 3


def _covariances(seed: int) -> list[list[torch.Tensor]]:
    """Per task, per layer: a covariance with a decaying spectrum (so memory sizes depend on it)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(TASKS):
        covs = []
        for _ in range(LAYERS):
            x = torch.randn(200, D, generator=g) * torch.logspace(0, -2, D)
            covs.append(x.T @ x / 200)
        out.append(covs)
    return out


def _run(covs: list[list[torch.Tensor]], agree=None) -> dict:
    """Three InfLoRA tasks on two adapted layers; the A_t of every task and the final memory."""
    torch.manual_seed(0)
    model = SimpleNamespace(adapters=[KVLoRAQKV(nn.Linear(D, 3 * D), rank=3) for _ in range(LAYERS)])
    method = build_method(MethodConfig(name="inflora", rank=3, lamb=0.6, lame=0.9), TASKS, seed=0, agree=agree)
    a_ts, used = [], []
    for t in range(TASKS):
        cov = lambda which, t=t: [c.clone() for c in covs[t]]  # noqa: E731
        used.append(method.prepare_task(model, t, cov)["used_rank"])
        a_ts.append([layer.lora_A.detach().clone() for layer in model.adapters])
        method.finish_task(model, t, cov)
    return {"A": a_ts, "used": used, "basis": [m.basis for m in method.memory],
            "mode": [m.mode for m in method.memory]}


def _rank_main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("inflora_ray.training.collective").addHandler(handler)
    try:
        same = _run(_covariances(0), agree=collective.agree_with_rank0)
        warned_same = list(warnings)
        # Rank 1 gets other covariances: other SVDs, other memory sizes; rank 0's must win everywhere.
        different = _run(_covariances(rank), agree=collective.agree_with_rank0)
        torch.save({"same": same, "different": different, "warned_same": warned_same,
                    "warned_different": warnings[len(warned_same):]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _assert_equal(a: dict, b: dict) -> None:
    assert a["used"] == b["used"] and a["mode"] == b["mode"]
    for x, y in zip([t for task in a["A"] for t in task] + a["basis"],
                    [t for task in b["A"] for t in task] + b["basis"]):
        assert x.shape == y.shape and torch.equal(x, y)


def test_two_ranks_end_with_rank0s_A_t_and_memory(tmp_path):
    out = run_two_ranks(_rank_main, tmp_path, "a broadcast", name="result")
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    alone = _run(_covariances(0))
    # Same data: bit-identical on both ranks and to one process, and nothing to warn about.
    _assert_equal(r0["same"], alone)
    _assert_equal(r1["same"], alone)
    assert r0["warned_same"] == [] and r1["warned_same"] == []
    # Different data on rank 1: rank 0's results on both ranks, and rank 1 says what differed.
    _assert_equal(r0["different"], alone)
    _assert_equal(r1["different"], alone)
    own = _run(_covariances(1))
    assert [m.shape for m in own["basis"]] != [m.shape for m in alone["basis"]] or \
        not all(torch.equal(x, y) for x, y in zip(own["basis"], alone["basis"]))
    assert r0["warned_different"] == []
    assert any("A_t of task 0, adapted layer 0" in w for w in r1["warned_different"])
    assert any("memory basis after task" in w for w in r1["warned_different"])


def test_without_a_process_group_agree_is_the_identity():
    t = [torch.randn(3, 4), torch.tensor([1, 2])]
    assert collective.agree_with_rank0(["a", "b"], t) is t
