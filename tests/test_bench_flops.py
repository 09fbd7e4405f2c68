"""The closed-form attention FLOPs of ``bench/flops.py`` against FlopCounterMode on timm's unfused attention
path (plain matmuls, which the counter sees on every device)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_vit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from flops import attention_flops, step_flops, vit_attention_flops  # noqa: E402


def _adapted_tiny_vit(fused: bool):
    """The tiny ViT with trainable qkv projections (as adapters make them) and the chosen attention path."""
    model = tiny_vit()
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.attn.qkv.weight.requires_grad_(True)
        block.attn.fused_attn = fused
    return model


@pytest.mark.parametrize("backward", [True, False])
def test_attention_formula_equals_the_counted_unfused_matmuls(backward):
    model, batch = _adapted_tiny_vit(fused=False), 3
    x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        if backward:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    # the unfused path's attention matmuls are the only batched matmuls (linear layers are mm/addmm)
    counted = counter.get_flop_counts()["Global"][torch.ops.aten.bmm]
    # 2 blocks, 16 patches + the class token, width 48: 4 B N^2 D per block forward, x3 with the backward
    manual = 2 * 4 * batch * 17 ** 2 * 48 * (3 if backward else 1)
    assert counted == manual == attention_flops(batch, 17, 48, 2, backward) == vit_attention_flops(model, batch,
                                                                                                 backward)


def test_corrected_step_count_is_the_same_on_either_attention_path():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counts = {}
    for fused in (True, False):
        model = _adapted_tiny_vit(fused)
        counts[fused] = step_flops(lambda: model(x).sum().backward(), model, batch=2)
    (counted_fused, corrected_fused), (counted_unfused, corrected_unfused) = counts[True], counts[False]
    assert corrected_fused == corrected_unfused == counted_unfused  # the unfused path is counted in full
    # what the counter misses of the fused CPU kernel: all of it (torch 2.14), or nothing should torch count it
    assert counted_unfused - counted_fused in (attention_flops(2, 17, 48, 2), 0)
