"""The InfLoRA math: covariance accumulation, design of A_t, DualGPM memory (hand-built spectra)."""
import logging

import pytest
import torch

from helpers import tiny_vit
from inflora_ray.core.lora import KVLoRAQKV, adapt_vit_qkv
from inflora_ray.core.subspace import (A_SCALE, LayerMemory, covariance_sums, design_lora_A, threshold_schedule)

D = 8


def _rotation(d=D, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _cov(q, eigs):
    e = torch.zeros(q.shape[0], dtype=torch.float64)
    for i, v in eigs.items():
        e[i] = v
    return q @ torch.diag(e) @ q.T


def _proj(basis):
    return basis @ basis.T


def _random_cov(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.1, d,
                                                                                           dtype=torch.float64)
    return x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------------------- thresholds
def test_threshold_schedule_rises_from_lamb_towards_lame():
    assert threshold_schedule(0.95, 1.0, 0, 10) == pytest.approx(0.95)
    assert threshold_schedule(0.95, 1.0, 5, 10) == pytest.approx(0.975)
    assert threshold_schedule(0.95, 1.0, 9, 10) == pytest.approx(0.995)
    assert threshold_schedule(0.98, 0.98, 3, 5) == pytest.approx(0.98)


# ------------------------------------------------------------------------------------------- DualGPM
# Eigenvalues 4, 2, 1.5, 1, 0.5, 0.25 on q0..q5: energies S^2 = 16, 4, 2.25, 1, .25, .0625 (total 23.5625);
# cumulative ratios .679, .849, .944, .987, .997, 1.
@pytest.mark.parametrize("eps,expected_r", [(0.95, 3), (0.9, 2), (0.85, 2), (0.8, 1), (0.3, 1)])
def test_first_task_energy_criterion(eps, expected_r):
    q = _rotation()
    mem = LayerMemory(dim=D)
    added = mem.update(_cov(q, {0: 4, 1: 2, 2: 1.5, 3: 1, 4: 0.5, 5: 0.25}), eps)
    assert added == expected_r and mem.protected_dim == expected_r and mem.mode == "remove"
    torch.testing.assert_close(mem.protected_projector(), _proj(q[:, :expected_r]))


def test_remove_mode_update_and_switch_to_retain():
    q = _rotation(seed=1)
    mem = LayerMemory(dim=D)
    mem.update(_cov(q, {0: 4, 1: 2, 2: 1.5, 3: 1, 4: 0.5, 5: 0.25}), 0.95)  # protects q0..q2
    # Task 2: energies q0: 1, q3: 9, q4: 4, q5: 1 (total 15). Covered already 1/15; adding q3 -> .667,
    # q4 -> .933 >= 0.9: two directions added, 5 > d/2 protected -> stored as the 3-dim complement.
    added = mem.update(_cov(q, {0: 1, 3: 3, 4: 2, 5: 1}), 0.9)
    assert added == 2
    assert mem.mode == "retain" and mem.basis.shape[1] == 3 and mem.protected_dim == 5
    torch.testing.assert_close(mem.protected_projector(), _proj(q[:, :5]))


def test_retain_mode_update_shrinks_complement():
    q = _rotation(seed=2)
    mem = LayerMemory(dim=D, basis=q[:, 5:].clone(), mode="retain")  # free space q5, q6, q7
    # energies q5: 4, q6: 1, q0: 1 (total 6); free energy 5/6. With eps 0.8 remove q5 (free -> 1/6 < 0.2).
    added = mem.update(_cov(q, {5: 2, 6: 1, 0: 1}), 0.8)
    assert added == 1 and mem.mode == "retain" and mem.free_dim == 2
    torch.testing.assert_close(_proj(mem.basis), _proj(q[:, 6:]))
    # with eps 0.9 both q5 and q6 go
    mem2 = LayerMemory(dim=D, basis=q[:, 5:].clone(), mode="retain")
    assert mem2.update(_cov(q, {5: 2, 6: 1, 0: 1}), 0.9) == 2
    torch.testing.assert_close(_proj(mem2.basis), _proj(q[:, 7:]))


def test_remove_and_retain_representations_give_the_same_projector():
    d = 12
    mems = {rep: LayerMemory(dim=d, representation=rep) for rep in ("remove", "retain", "auto")}
    modes = set()
    for task in range(6):
        cov = _random_cov(d, seed=10 + task, rank=4)  # low-rank tasks so the memory grows step by step
        eps = threshold_schedule(0.9, 0.99, task, 6)
        added = {rep: m.update(cov, eps) for rep, m in mems.items()}
        assert len(set(added.values())) == 1, added
        ref = mems["remove"].protected_projector()
        for rep, m in mems.items():
            torch.testing.assert_close(m.protected_projector(), ref, atol=1e-9, rtol=0)
        modes.add(mems["auto"].mode)
        assert mems["remove"].mode == "remove" and mems["retain"].mode == "retain"
    assert modes == {"remove", "retain"}  # the auto memory really switched representation on the way


def test_memory_never_exceeds_input_dim():
    d = 6
    mem = LayerMemory(dim=d)
    for task in range(10):
        mem.update(_random_cov(d, seed=task), threshold=1.0)
        assert mem.basis.shape[1] <= d and 0 <= mem.protected_dim <= d
    assert mem.protected_dim == d and mem.free_dim == 0
    # a full memory leaves nothing to design in: A_t is all zeros (handled, not crashed)
    design = design_lora_A(_random_cov(d, seed=99).float(), mem, rank=3)
    assert design.used_rank == 0 and not design.lora_A.any()


def test_state_dict_round_trip():
    mem = LayerMemory(dim=D)
    mem.update(_random_cov(D, 3), 0.9)
    back = LayerMemory.from_state_dict(mem.state_dict())
    torch.testing.assert_close(back.protected_projector(), mem.protected_projector())


# ------------------------------------------------------------------------------------------- design of A_t
def test_first_task_design_is_the_reference_top_singular_vectors_over_sqrt3():
    """The reference's first-task design (InfLoRA ``methods/inflora.py``): the covariance's top-``rank`` left
    singular vectors as rows, over sqrt(3); later tasks: tests/test_reference_methods.py."""
    c = _random_cov(D, seed=4)
    design = design_lora_A(c, None, rank=3)
    a = design.lora_A
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=a.dtype) * A_SCALE**2, atol=1e-10, rtol=0)
    evals, evecs = torch.linalg.eigh(c)
    top = evecs[:, evals.argsort(descending=True)[:3]]
    torch.testing.assert_close(a.T @ a / A_SCALE**2, _proj(top), atol=1e-8, rtol=0)


@pytest.mark.parametrize("mode", ["remove", "retain"])
def test_design_avoids_old_subspace(mode):
    q = _rotation(seed=5)
    protected = q[:, :3]
    mem = LayerMemory(dim=D, basis=protected.clone() if mode == "remove" else q[:, 3:].clone(), mode=mode)
    design = design_lora_A(_random_cov(D, seed=6), mem, rank=4)
    a = design.lora_A
    assert design.used_rank == 4
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=a.dtype) * A_SCALE**2, atol=1e-10, rtol=0)
    assert (a @ protected).abs().max() < 1e-10  # A_t M ~ 0: the rows live outside the old subspace
    # the branch's output on any input inside the old subspace is ~0, whatever B becomes
    layer = KVLoRAQKV(torch.nn.Linear(D, 3 * D).double(), rank=4)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B_k.normal_()
        layer.lora_B_v.normal_()
        x = (protected @ torch.randn(3, 20, dtype=torch.float64)).T
        delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert delta.abs().max() < 1e-9


def test_rank_larger_than_free_space_is_clamped_and_explained(caplog):
    q = _rotation(seed=7)
    mem = LayerMemory(dim=D, basis=q[:, :6].clone(), mode="remove")  # 2 free directions left
    with caplog.at_level(logging.WARNING, logger="inflora_ray.core.subspace"):
        design = design_lora_A(_random_cov(D, seed=8), mem, rank=4)
    assert design.used_rank == 2 and design.free_dim == 2
    assert design.lora_A[:2].abs().sum() > 0 and not design.lora_A[2:].any()
    assert (design.lora_A @ q[:, :6]).abs().max() < 1e-10
    assert "only 2 direction(s) are free" in caplog.text


def test_low_rank_data_does_not_use_energyless_directions():
    c = _cov(_rotation(seed=9), {0: 3.0, 1: 1.0})  # data spans 2 directions
    design = design_lora_A(c, None, rank=4)
    assert design.used_rank == 2 and not design.lora_A[2:].any()


# ------------------------------------------------------------------------------------------- covariance
def _tiny_vit():
    torch.manual_seed(0)
    model = tiny_vit()
    return model, adapt_vit_qkv(model, rank=4)


def test_covariance_sums_every_token_of_the_attention_input():
    model, layers = _tiny_vit()
    seen = {i: [] for i in range(len(layers))}
    for i, block in enumerate(model.blocks):  # norm1's output is the qkv input
        block.norm1.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out.detach()))
    batches = [torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16)]
    sums, counts = covariance_sums(model, layers, batches)
    tokens = 5 * (1 + (16 // 4) ** 2)  # class token + 16 patches per image
    assert counts.tolist() == [tokens] * len(layers)
    for i, s in enumerate(sums):
        x = torch.cat([t.reshape(-1, 48) for t in seen[i]])
        assert x.shape[0] == tokens
        torch.testing.assert_close(s, x.T @ x, rtol=1e-5, atol=1e-4)
        assert s.dtype == torch.float32


def test_per_worker_sums_add_up_to_the_one_process_sums():
    model, layers = _tiny_vit()
    data = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    full, n_full = covariance_sums(model, layers, data)
    part_a, n_a = covariance_sums(model, layers, data[0::2])
    part_b, n_b = covariance_sums(model, layers, data[1::2])
    assert torch.equal(n_a + n_b, n_full)
    for f, a, b in zip(full, part_a, part_b):
        # fp32 sums of 68 token outer products in another order: relative error ~1e-6
        torch.testing.assert_close(a + b, f, rtol=1e-5, atol=1e-4)
    # and so the designed subspaces agree (compare projectors: singular-vector signs are arbitrary)
    da = design_lora_A((part_a[0] + part_b[0]) / (n_full[0]), None, 4).lora_A
    df = design_lora_A(full[0] / n_full[0], None, 4).lora_A
    torch.testing.assert_close(da.T @ da, df.T @ df, atol=1e-4, rtol=0)


def test_empty_block_gives_zero_sums():
    model, layers = _tiny_vit()
    sums, counts = covariance_sums(model, layers, [])
    assert all(not s.any() for s in sums) and counts.sum() == 0


def test_covariance_stays_fp32_under_bf16_autocast():
    from inflora_ray.core.subspace import CovarianceRecorder
    layer = torch.nn.Linear(64, 8)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), CovarianceRecorder([layer]) as rec:
        layer(x)
    exact = (x.double().T @ x.double())
    err = float(((rec.sums[0].double() - exact).abs().max() / exact.abs().max()))
    assert rec.sums[0].dtype == torch.float32
    assert err < 1e-5, err  # a bf16 matmul would be off by ~1e-3
