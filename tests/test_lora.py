"""Adapted layer invariants: B = 0 is the frozen model bit for bit; only k/v move; merge is exact."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_vit
from inflora_ray.core.lora import KVLoRAQKV, adapt_vit_qkv

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
from flops import flop_counter  # noqa: E402


def _vit(depth=2, dim=48):
    torch.manual_seed(0)
    return tiny_vit(depth=depth, embed_dim=dim)


def _randomise(layers, gen):
    with torch.no_grad():
        for layer in layers:
            for p in (layer.lora_A, layer.lora_B_k, layer.lora_B_v):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_zero_B_is_frozen_model_bit_for_bit():
    frozen = _vit()
    adapted = copy.deepcopy(frozen)
    layers = adapt_vit_qkv(adapted, rank=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:  # a designed A with B = 0 (the state at the start of every task)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
    x = torch.rand(5, 3, 16, 16, generator=gen)
    with torch.no_grad():
        assert torch.equal(frozen(x), adapted(x))


def test_branch_touches_only_key_and_value_thirds():
    lin = torch.nn.Linear(12, 36)
    layer = KVLoRAQKV(lin, rank=3)
    _randomise([layer], torch.Generator().manual_seed(0))
    x = torch.randn(4, 7, 12)
    with torch.no_grad():
        base, out = lin(x), layer(x)
    assert torch.equal(out[..., :12], base[..., :12])  # q untouched
    assert not torch.allclose(out[..., 12:], base[..., 12:])
    expected = F.linear(x, lin.weight + layer.delta_weight(), lin.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_merge_preserves_outputs_and_resets_branch():
    model = _vit()
    layers = adapt_vit_qkv(model, rank=4)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 16, 16, generator=gen)
    for _task in range(3):  # merge several tasks in sequence, as the loop does
        _randomise(layers, gen)
        with torch.no_grad():
            before = model(x)
            for layer in layers:
                layer.merge_and_reset()
            after = model(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        for layer in layers:
            assert not layer.lora_A.any() and not layer.lora_B_k.any() and not layer.lora_B_v.any()


def test_step_cost_is_constant_in_number_of_tasks():
    """After merging, a layer holds exactly one branch's parameters whatever the task count."""
    model = _vit()
    layers = adapt_vit_qkv(model, rank=4)
    n0 = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        _randomise(layers, gen)
        for layer in layers:
            layer.merge_and_reset()
    assert sum(p.numel() for p in model.parameters()) == n0


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank=100 is larger than the adapted layers. input dim 48"):
        adapt_vit_qkv(_vit(), rank=100)


def _zero_block_branch(layer, x):
    """The branch as a plain composition: ``x W^T + b + (x A^T) [0; B_k; B_v]^T`` (a 3d-wide temporary and
    a matmul over a zero q block), the reference the fused branch must equal."""
    b_full = torch.cat([torch.zeros_like(layer.lora_B_k), layer.lora_B_k, layer.lora_B_v], dim=0)
    return F.linear(x, layer.weight, layer.bias) + F.linear(F.linear(x, layer.lora_A), b_full)


def _trainable_layer(dtype=torch.float64):
    layer = KVLoRAQKV(torch.nn.Linear(16, 48).to(dtype), rank=3)
    _randomise([layer], torch.Generator().manual_seed(4))
    layer.set_trainable(a=True, b=True)
    return layer


def _forward_backward(fn, layer, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = [x.grad] + [p.grad for p in (layer.lora_A, layer.lora_B_k, layer.lora_B_v)]
    for p in layer.parameters():
        p.grad = None
    return out.detach(), grads


def test_fused_branch_equals_the_zero_block_composition_forward_and_backward():
    layer = _trainable_layer()
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, grads = _forward_backward(layer, layer, x)
    ref_out, ref_grads = _forward_backward(lambda t: _zero_block_branch(layer, t), layer, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_fused_branch_under_bf16_autocast_computes_in_bf16_and_trains_fp32_up_projections():
    layer = _trainable_layer(torch.float32)
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = _zero_block_branch(layer, x)
    assert out.dtype == torch.bfloat16
    # One rounding to bf16 instead of two (the product is added inside the matmul): within a bf16 ulp or so.
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.lora_B_k.grad.dtype == torch.float32 and layer.lora_B_k.grad.abs().sum() > 0


class _BytesWritten(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every tensor an aten op outputs (what the ops write to memory)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and func not in (torch.ops.aten.view.default, torch.ops.aten.t.default,
                                                            torch.ops.aten.slice.Tensor, torch.ops.aten.detach.default,
                                                            torch.ops.aten._unsafe_view.default):
                self.bytes += t.numel() * t.element_size()
        return out


def test_fused_branch_costs_fewer_flops_and_bytes_than_the_zero_block_composition():
    layer = _trainable_layer(torch.float32)
    layer.set_trainable(a=False, b=True)  # as in training: A fixed, B_k and B_v trained
    n, d_in, d, r = 2 * 50, 16, 16, 3
    x = torch.randn(2, 50, d_in, generator=torch.Generator().manual_seed(7))

    def cost(fn):
        with flop_counter() as flops, _BytesWritten() as written:
            _forward_backward(fn, layer, x)
        return flops.get_total_flops(), written.bytes

    fused_flops, fused_bytes = cost(layer)
    ref_flops, ref_bytes = cost(lambda t: _zero_block_branch(layer, t))
    # Forward: the dense 3d-wide projection, x A^T, z [B_k; B_v]^T. Backward: dx through W and through the
    # branch (z-gradient, then A), and the gradient of [B_k; B_v] -- never the q block.
    dense = 2 * n * d_in * 3 * d
    forward = dense + 2 * n * r * d_in + 2 * n * r * 2 * d
    backward = dense + 2 * n * 2 * d * r + 2 * n * r * d_in + 2 * n * 2 * d * r
    assert fused_flops == forward + backward
    assert fused_flops < ref_flops
    assert fused_bytes <= ref_bytes - n * 3 * d * 4  # at least one 3d-wide fp32 tensor fewer written
