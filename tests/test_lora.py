"""Adapted layer invariants: B = 0 is the frozen model bit for bit; only k/v move; merge is exact."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_vit
from inflora_ray.core.lora import KVLoRAQKV, adapt_vit_qkv


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
