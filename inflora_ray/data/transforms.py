"""Preprocessing in one place: train/test transforms on uint8 CHW tensors, outputs in [0, 1].

The paper's preprocessing: training images get a RandomResizedCrop to ``img_size`` (area fraction 0.08-1,
aspect ratio 3/4-4/3) and a horizontal flip with probability 1/2; test images are resized to ``img_size`` for
CIFAR-100, and for ImageNet-R and DomainNet resized to 256/224 of ``img_size`` (shorter side) and centre-cropped
to ``img_size`` (256 then 224 at the paper's 224 px). Pixels are scaled to [0, 1] and not normalised. Each
benchmark's crop, flip and test resize are registry facts (:mod:`inflora_ray.data.registry`); the digits
quickstart uses milder crops and no flip.

Randomness comes from an explicit per-sample ``torch.Generator``, so an image's augmentation depends only
on (seed, task, augmentation stream, sample) and not on how samples are spread over workers or loader
processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.transforms.v2 import functional as TF

from .registry import get_benchmark


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    """A float uniform in [low, high) drawn from ``gen``."""
    return low + (high - low) * float(torch.rand((), generator=gen))


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect ratio (log-uniform) in
    ``ratio``; after 10 failed draws, the central crop clamped to ``ratio`` (Szegedy et al. 2015)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Preprocess:
    """Train: RandomResizedCrop(img_size) with area fraction in ``train_scale`` and aspect ratio in
    ``train_ratio`` [+ horizontal flip when ``train_flip``]. Test: Resize(test_resize) + CenterCrop(img_size)
    when ``test_resize`` is set, else Resize to ``img_size`` x ``img_size``. Output float in [0, 1], optionally
    normalised with ``mean``/``std`` (for backbones trained that way; the paper's setup uses none)."""
    img_size: int
    train_scale: tuple[float, float]
    train_ratio: tuple[float, float]
    train_flip: bool
    test_resize: Optional[int] = None
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None

    def _finish(self, img: torch.Tensor) -> torch.Tensor:
        """Float in [0, 1] (uint8 input scaled by 1/255), normalised when ``mean`` is set."""
        out = img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
        if self.mean is not None:
            out = TF.normalize(out, list(self.mean), list(self.std))
        return out.contiguous()

    def train(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augmented training view of a uint8 (C, H, W) image."""
        _, h, w = img.shape
        top, left, ch, cw = random_resized_crop_box(h, w, self.train_scale, self.train_ratio, gen)
        out = TF.resized_crop(img, top, left, ch, cw, [self.img_size, self.img_size], antialias=True)
        if self.train_flip and float(torch.rand((), generator=gen)) < 0.5:
            out = TF.horizontal_flip(out)
        return self._finish(out)

    def test(self, img: torch.Tensor) -> torch.Tensor:
        """Deterministic evaluation view of a uint8 (C, H, W) image."""
        if self.test_resize is not None:
            out = TF.resize(img, [self.test_resize], antialias=True)
            out = TF.center_crop(out, [self.img_size, self.img_size])
        else:
            out = TF.resize(img, [self.img_size, self.img_size], antialias=True)
        return self._finish(out)


# ---------------------------------------------------------------------------------------------------------
# The preprocessing of each benchmark, and optional normalisation
# ---------------------------------------------------------------------------------------------------------

def paper_preprocess(benchmark: str, img_size: int, mean: Optional[tuple[float, float, float]] = None,
                     std: Optional[tuple[float, float, float]] = None) -> Preprocess:
    """The preprocessing of ``benchmark`` at ``img_size`` px, from its registry entry: the paper's for the real
    benchmarks (see the module docstring), the digits quickstart's own mild crops. Outputs in [0, 1] unless
    ``mean``/``std`` are given; an unknown benchmark raises ``ValueError``."""
    spec = get_benchmark(benchmark)
    test_resize = None if spec.test_resize_ratio is None else int(round(img_size * spec.test_resize_ratio))
    return Preprocess(img_size=img_size, train_scale=spec.train_scale, train_ratio=spec.train_ratio,
                      train_flip=spec.train_flip, test_resize=test_resize, mean=mean, std=std)


def resolve_normalization(kind: str, model_name: Optional[str] = None
                          ) -> tuple[Optional[tuple[float, float, float]], Optional[tuple[float, float, float]]]:
    """(mean, std) for ``data.normalize``: "none" (the paper: inputs in [0, 1]), "imagenet" / "inception"
    (timm's constants), or "backbone" (the mean/std of ``model_name``'s timm pretrained config)."""
    from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                           IMAGENET_INCEPTION_STD)

    if kind == "none":
        return None, None
    if kind == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if kind == "inception":
        return tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)
    if kind == "backbone":
        if not model_name:
            raise ValueError("data.normalize=backbone needs the model name: call "
                             "build_benchmark(cfg.data, cfg.model.img_size, model=cfg.model), or set "
                             "data.normalize to 'inception' (augreg ViTs: mean = std = 0.5) or 'imagenet'")
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(model_name)
        if pcfg is None or pcfg.mean is None or pcfg.std is None:
            raise ValueError(f"data.normalize=backbone: timm has no pretrained config (mean/std) for "
                             f"{model_name!r}; set data.normalize to 'none', 'imagenet' or 'inception'")
        return tuple(float(m) for m in pcfg.mean), tuple(float(s) for s in pcfg.std)
    raise ValueError(f"data.normalize={kind!r}: expected 'none', 'backbone', 'imagenet' or 'inception'")
