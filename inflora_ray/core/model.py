"""A timm ViT with k/v low-rank adapters on every block and one linear head per task."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from ..config import ModelConfig, resolve_weights_file
from ..storage import file_digest
from .lora import KVLoRAQKV, adapt_vit_qkv


def check_weights_digest(weights_path: Path, record_path: Path, expected: object) -> None:
    """Raise ``ValueError`` naming the weights file unless its SHA-256 equals ``expected`` (from its record)."""
    if not isinstance(expected, str) or not expected:
        raise ValueError(f"model: {record_path} records no 'sha256' for {weights_path}; the shipped weights "
                         "cannot be verified (reinstall the package)")
    actual = file_digest(str(weights_path))
    if actual != expected:
        raise ValueError(f"model: weights file {weights_path} has SHA-256 {actual}, but its record {record_path} "
                         f"says {expected}: the file is damaged or was replaced (reinstall the package)")


def check_builtin_weights(cfg: ModelConfig) -> None:
    """Shipped weights record their SHA-256 and the architecture they were trained with: refuse a file whose
    checksum differs, and a config whose architecture differs (timm would otherwise silently resample the
    patch embedding and position embedding to fit). Raises ``ValueError`` naming the file."""
    weights_path = Path(resolve_weights_file(cfg.weights_file))
    record_path = weights_path.with_suffix(".json")
    if not record_path.is_file():
        raise ValueError(f"model: {cfg.weights_file}: the record {record_path} of {weights_path} is missing; "
                         "the shipped weights cannot be verified (reinstall the package)")
    try:
        record = json.loads(record_path.read_text())
    except ValueError as e:
        raise ValueError(f"model: the record {record_path} of {weights_path} is not valid JSON ({e}); "
                         "reinstall the package") from None
    check_weights_digest(weights_path, record_path, record.get("sha256"))
    arch = record["model"]
    want = {"name": arch["name"], "img_size": arch["img_size"], **arch["kwargs"]}
    have = {"name": cfg.name, "img_size": cfg.img_size, **cfg.kwargs}
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ValueError(f"model: {cfg.weights_file} was trained as {want}; the config differs in "
                         + ", ".join(f"{k}={a!r} (weights: {b!r})" for k, (a, b) in diff.items()))


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm ViT returning the final-norm CLS feature (``num_classes=0``, token pooling, no dropout).

    Weights: ``pretrained=True`` uses timm's registry (hub/url); ``weights_file`` loads a local state_dict
    through the same timm code path (``pretrained_cfg_overlay=dict(file=...)``), for offline clusters.
    """
    kwargs = dict(num_classes=0, global_pool="token", qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.0, proj_drop_rate=0.0, pos_drop_rate=0.0, img_size=cfg.img_size)
    kwargs.update(cfg.kwargs)
    if cfg.weights_file is not None and cfg.weights_file.startswith("builtin:"):
        check_builtin_weights(cfg)
    pretrained = cfg.pretrained or cfg.weights_file is not None
    if cfg.weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=resolve_weights_file(cfg.weights_file))
    try:
        backbone = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"model: could not create {cfg.name!r} (weights_file={cfg.weights_file!r}, "
                           f"pretrained={cfg.pretrained}): {e}") from e
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "embed_dim"):
        raise ValueError(f"model.name={cfg.name!r} is not a timm VisionTransformer")
    return backbone


def meta_backbone(cfg: ModelConfig) -> nn.Module:
    """The configured timm ViT built on the meta device (no weights, no memory), to check an architecture
    before anything is loaded; ``ValueError`` when timm cannot build it."""
    kwargs = dict(num_classes=0, img_size=cfg.img_size, **cfg.kwargs)
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
    except Exception as e:
        raise ValueError(f"model: cannot build {cfg.name!r} with kwargs {cfg.kwargs}: {e}") from None


class ContinualViT(nn.Module):
    """Frozen ViT backbone + k/v adapters (optional) + per-task heads with class-incremental inference."""

    def __init__(self, backbone: nn.Module, rank: Optional[int]):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.adapters: list[KVLoRAQKV] = adapt_vit_qkv(backbone, rank) if rank else []
        self.heads = nn.ModuleList()
        # A method's own modules (prompt pools, SD-LoRA magnitudes...), registered by ``Method.build`` so that
        # they move with ``.to(device)``; empty for InfLoRA, seq-lora and the linear probe.
        self.extras = nn.ModuleDict()
        self.embed_dim = int(backbone.embed_dim)

    def add_head(self, num_classes: int, generator: Optional[torch.Generator] = None) -> nn.Linear:
        """Append task head (default nn.Linear init, drawn from ``generator`` for reproducibility)."""
        ref = next(self.backbone.parameters())
        head = nn.Linear(self.embed_dim, num_classes).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            bound = 1.0 / self.embed_dim ** 0.5  # nn.Linear's default init bound for weight and bias
            for p in (head.weight, head.bias):
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        self.heads.append(head)
        return head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS token after the final LayerNorm."""
        return self.backbone(images)

    def logits(self, feats: torch.Tensor, num_heads: Optional[int] = None) -> torch.Tensor:
        """Concatenated logits of the first ``num_heads`` heads (default all) on features ``feats``."""
        heads = self.heads if num_heads is None else self.heads[:num_heads]
        return torch.cat([h(feats) for h in heads], dim=1)

    def forward(self, images: torch.Tensor, num_heads: Optional[int] = None) -> torch.Tensor:
        """Concatenated logits of the first ``num_heads`` heads (default all): class-incremental inference."""
        return self.logits(self.features(images), num_heads)


def build_model(cfg: ModelConfig, rank: Optional[int]) -> ContinualViT:
    """Create the backbone from config and wrap it; ``rank=None`` means no adapters (linear probe)."""
    return ContinualViT(create_backbone(cfg), rank)
