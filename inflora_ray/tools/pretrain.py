"""Pre-train the quickstart's small ViT on rendered glyphs, offline: ``python -m inflora_ray.tools.pretrain --out PATH``.

InfLoRA adapts a *pre-trained* backbone; the quickstart's ViT has no published weights, and from a random
initialisation its CLS feature barely depends on the input. This module trains that exact architecture (built
by :func:`inflora_ray.core.model.create_backbone` from the quickstart preset's model config) on glyphs rendered
from matplotlib's bundled fonts (:mod:`inflora_ray.tools.glyphs`: letters and symbols, never digits), and saves
the backbone's ``state_dict`` (no classifier: the keys of the timm model built with ``num_classes=0``), loadable
with ``model.weights_file=PATH``. A JSON record next to it keeps the recipe, versions, accuracy and checksum.

Recipe (the defaults; the shipped weights' exact command is in their record):

- data: every epoch renders ``--num-images`` *fresh* glyph images (seeded by (seed, epoch)), so the model never
  sees an image twice and augmentation is part of rendering; a fixed held-out set (its own seed, full style)
  measures accuracy.
- curriculum: the glyphs' geometric jitter (scale, aspect, rotation, shear, offset) ramps linearly from
  near-upright, centred, frame-filling glyphs to the full ranges over the first ``--curriculum-frac`` of the
  epochs. This is what makes a ViT from scratch learn here at all: shown the full jitter from the start it
  stays near chance for tens of thousands of images (3-5 % after 20k images against about 50 % with easy
  geometry), while the photometric degradations (low resolution, blur, noise) cost little.
- objective: cross-entropy with label smoothing over the glyph classes, plus small auxiliary heads that
  predict the font's family, weight and slant (``--aux-weight``); all heads are dropped when saving.
- optimiser: AdamW, no weight decay on biases, norms, position embedding and class token; linear warm-up, then
  cosine decay to ``--min-lr`` per step; gradient-norm clipping.
- inputs in [0, 1], no mean/std normalisation (as the continual pipeline feeds them).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..logs import log_event, setup_logging
from ..storage import file_digest

log = logging.getLogger("inflora_ray.tools.pretrain")

WEIGHTS_NAME = "quickstart_vit.pth"
RECORD_NAME = "quickstart_vit.json"


# ---------------------------------------------------------------------------------------------------------
# The shipped weights
# ---------------------------------------------------------------------------------------------------------

def quickstart_weights_path() -> Path:
    """Installed path of the quickstart backbone's pre-trained weights (package data; ``model.weights_file:
    builtin:quickstart_vit``). The package is installed as files (not zipped), so this is a real path."""
    return Path(str(resources.files("inflora_ray") / "weights" / WEIGHTS_NAME))


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inflora_ray.tools.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="where to save the backbone state_dict (.pth); the JSON record "
                                                "goes next to it with the suffix .json")
    p.add_argument("--config", default="quickstart", help="preset or YAML whose model section is pre-trained")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (e.g. model.kwargs=...); repeatable")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--num-images", type=int, default=16000, help="fresh glyph images rendered per epoch")
    p.add_argument("--val-images", type=int, default=2000, help="fixed held-out glyph images")
    p.add_argument("--curriculum-frac", type=float, default=0.25,
                   help="fraction of the epochs over which the glyphs' geometric jitter ramps from easy to full")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of all steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--aux-weight", type=float, default=0.1,
                   help="weight of the auxiliary font family/weight/slant losses (0: off)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    p.add_argument("--log-every-steps", type=int, default=0, help="also log every N steps (0: per epoch only)")
    return p


class _Heads(nn.Module):
    """The temporary classifiers on the CLS feature: glyph class + font family, bold, italic."""

    def __init__(self, dim: int, num_classes: int, num_families: int):
        super().__init__()
        self.glyph = nn.Linear(dim, num_classes)
        self.family = nn.Linear(dim, num_families)
        self.bold = nn.Linear(dim, 2)
        self.italic = nn.Linear(dim, 2)


def _param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name in ("pos_embed", "cls_token"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """Linear warm-up from ``peak / warmup`` to ``peak`` over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def curriculum_strength(epoch: int, epochs: int, frac: float) -> float:
    """Geometric jitter strength of ``epoch``: 0 at the first epoch, 1 from epoch ``frac * epochs`` on."""
    ramp = frac * epochs
    return 1.0 if ramp <= 0 else min(1.0, epoch / ramp)


def _font_targets(source, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .glyphs import FAMILIES, FONT_FACES

    faces = [FONT_FACES[source.face_of(int(i))] for i in indices]
    fam = torch.tensor([FAMILIES.index(f[1]) for f in faces])
    bold = torch.tensor([int(f[2]) for f in faces])
    italic = torch.tensor([int(f[3]) for f in faces])
    return fam, bold, italic


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch + 1) % (2**31)


@torch.no_grad()
def evaluate(backbone: nn.Module, heads: _Heads, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Top-1 glyph accuracy on uint8 (N, 1, H, W) images."""
    backbone.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        x = images[s:s + batch_size].float().div_(255).expand(-1, 3, -1, -1)
        correct += int((heads.glyph(backbone(x)).argmax(1) == labels[s:s + batch_size]).sum())
    backbone.train()
    return correct / len(labels)


def pretrain(args: argparse.Namespace) -> dict:
    """Run the recipe in ``args``; save the weights and the record; return the record."""
    from ..presets import load_config
    from .glyphs import FAMILIES, GLYPH_CLASSES, GlyphSource, GlyphStyle, font_checksums
    from ..core.model import create_backbone

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    record_path = out.with_suffix(".json")

    cfg = load_config(args.config, list(args.override) + ["model.weights_file=null", "model.pretrained=false"])
    mcfg = cfg.model
    backbone = create_backbone(mcfg)
    heads = _Heads(int(backbone.embed_dim), len(GLYPH_CLASSES), len(FAMILIES))
    style = GlyphStyle()
    log_event(log, "pretrain_start", model=mcfg.name, img_size=mcfg.img_size, kwargs=",".join(f"{k}={v}" for k, v in mcfg.kwargs.items()),
              params=sum(p.numel() for p in backbone.parameters()), classes=len(GLYPH_CLASSES),
              epochs=args.epochs, images_per_epoch=args.num_images, threads=torch.get_num_threads())

    val_source = GlyphSource(args.val_images, seed=args.seed * 1_000_003 + 999_983, img_size=mcfg.img_size,
                             style=style)
    val_images = val_source.render()
    val_labels = torch.from_numpy(val_source.labels)

    optimizer = torch.optim.AdamW(_param_groups([backbone, heads], args.weight_decay), lr=args.lr,
                                  betas=tuple(args.betas))
    steps_per_epoch = math.ceil(args.num_images / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(round(args.warmup_frac * total_steps)))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step = 0
    history = []
    backbone.train()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        strength = curriculum_strength(epoch, args.epochs, args.curriculum_frac)
        source = GlyphSource(args.num_images, seed=_epoch_seed(args.seed, epoch), img_size=mcfg.img_size,
                             style=style.with_geometry(strength))
        order = np.random.default_rng([args.seed, epoch, 7]).permutation(args.num_images)
        loss_sum = correct = seen = 0
        render_s = 0.0
        for s in range(0, args.num_images, args.batch_size):
            idx = order[s:s + args.batch_size]
            tr = time.perf_counter()
            x = source.render(idx).float().div_(255).expand(-1, 3, -1, -1)
            y = torch.from_numpy(source.labels[idx])
            fam, bold, italic = _font_targets(source, idx) if args.aux_weight > 0 else (None, None, None)
            render_s += time.perf_counter() - tr
            lr = lr_at(step, total_steps, args.lr, args.min_lr, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            feats = backbone(x)
            logits = heads.glyph(feats)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            if args.aux_weight > 0:
                aux = (F.cross_entropy(heads.family(feats), fam) + F.cross_entropy(heads.bold(feats), bold)
                       + F.cross_entropy(heads.italic(feats), italic)) / 3
                loss = loss + args.aux_weight * aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            step += 1
            n = len(idx)
            loss_sum += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            if args.log_every_steps and step % args.log_every_steps == 0:
                log_event(log, "pretrain_step", epoch=epoch, step=step, steps=total_steps, lr=lr,
                          loss=round(float(loss.detach()), 4))
        seconds = time.perf_counter() - t0
        val_acc = evaluate(backbone, heads, val_images, val_labels)
        row = {"epoch": epoch, "geometry": strength, "loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_accuracy": val_acc, "lr": lr, "seconds": seconds, "render_seconds": render_s}
        history.append(row)
        log_event(log, "pretrain_epoch", epoch=epoch, epochs=args.epochs, geometry=round(strength, 3), loss=round(row["loss"], 4),
                  train_accuracy=round(row["train_accuracy"], 4), val_accuracy=round(val_acc, 4),
                  lr=round(lr, 7), seconds=round(seconds, 1), render_seconds=round(render_s, 1),
                  images_per_second=round(seen / max(seconds, 1e-9), 1))

    state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    if args.half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, out)
    digest = file_digest(str(out))
    import timm

    record = {
        "file": out.name,
        "sha256": digest,
        "bytes": out.stat().st_size,
        "command": shlex.join(["python", "-m", "inflora_ray.tools.pretrain"] + _argv_of(args)),
        "arguments": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"},
        "seed": args.seed,
        "model": {"name": mcfg.name, "img_size": mcfg.img_size, "kwargs": mcfg.kwargs,
                  "state_dict_keys": len(state), "params": int(sum(v.numel() for v in state.values())),
                  "dtype": "float16" if args.half else "float32"},
        "data": {"source": "inflora_ray.tools.glyphs", "classes": "".join(GLYPH_CLASSES),
                 "num_classes": len(GLYPH_CLASSES), "style": style.to_dict(),
                 "train": f"{args.num_images} fresh images per epoch, seed of epoch e = "
                          f"(seed * 1000003 + e + 1) mod 2^31",
                 "val": f"{args.val_images} images, seed = seed * 1000003 + 999983", "fonts": font_checksums()},
        "final": {"train_accuracy": history[-1]["train_accuracy"], "val_accuracy": history[-1]["val_accuracy"],
                  "loss": history[-1]["loss"]},
        "history": history,
        "seconds": time.perf_counter() - t_start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": np.__version__, "pillow": _pillow_version()},
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    record_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log_event(log, "pretrain_done", out=str(out), sha256=digest, bytes=record["bytes"],
              val_accuracy=round(history[-1]["val_accuracy"], 4), seconds=round(record["seconds"], 1))
    return record


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The arguments as a command line (for the record), with the output path as given."""
    argv = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                argv.append(flag)
        elif isinstance(v, (list, tuple)):
            if k == "override":
                for o in v:
                    argv += [flag, str(o)]
            else:
                argv += [flag] + [str(x) for x in v]
        else:
            argv += [flag, str(v)]
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.epochs < 1 or args.num_images < 1 or args.val_images < 1 or args.batch_size < 1:
        print("pretrain: --epochs, --num-images, --val-images and --batch-size must be >= 1", file=sys.stderr)
        return 2
    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
