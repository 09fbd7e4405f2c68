"""Test helpers shared by the test modules: the tiny ViT every fast test uses, as config overrides and as a
timm model, and a learner hook that snapshots a checkpoint mid-run and kills the run. Imported as
``from helpers import ...`` (pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from inflora_ray.training.learner import Hooks

# 16 px images, patch 4 (16 tokens + CLS), 2 blocks of width 48: a forward pass takes milliseconds on a CPU.
TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 16,
            "kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}}


def tiny_overrides(**extra) -> list[str]:
    """Overrides that shrink the quickstart to a few seconds: the tiny ViT (random weights), 1 epoch, rank 4."""
    kw = TINY_VIT["kwargs"]
    o = {
        "model.img_size": TINY_VIT["img_size"],
        "model.kwargs": "{" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}",
        "model.weights_file": "null", "model.pretrained": "false",
        "train.epochs": 1, "data.batch_size": 64, "method.rank": 4, "train.device": "cpu",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def tiny_vit(depth: int = 2, embed_dim: int = 48) -> nn.Module:
    """The tiny timm ViT (no classifier), in eval mode, optionally deeper or wider."""
    kw = {**TINY_VIT["kwargs"], "depth": depth, "embed_dim": embed_dim}
    return timm.create_model(TINY_VIT["name"], pretrained=False, num_classes=0, img_size=TINY_VIT["img_size"],
                             **kw).eval()


class Interrupt(Exception):
    """Raised by :class:`SnapshotAndStop` to kill a run."""


class SnapshotAndStop(Hooks):
    """A learner hook: serialise the learner's state at (task, epoch) end, like a checkpoint, into ``blob``,
    then kill the run (raise :class:`Interrupt`)."""

    def __init__(self, task: int, epoch: int):
        self.at = (task, epoch)
        self.blob = None

    def on_epoch_end(self, learner, task, epoch):
        if (task, epoch) == self.at:
            buf = io.BytesIO()
            torch.save(learner.state_dict(), buf)
            self.blob = buf.getvalue()
            raise Interrupt


# ------------------------------------------------------------------------------ counting reads from the store
# Counting the bytes read from the store: one implementation, shared with bench/read_amplification.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from read_counter import LOG_ENV as READ_LOG_ENV, bytes_logged, counting_filesystem  # noqa: E402,F401
from read_counter import install as count_reads_in_loader_process  # noqa: E402,F401


# ------------------------------------------------------------------------------ two gloo ranks, without Ray
def run_two_ranks(target, tmp_path, stuck_in: str, name: str = "result") -> str:
    """Run ``target(rank, store_path, out)`` for ranks 0 and 1 in two spawned processes (they form a gloo group
    through a file store), fail if one hangs in ``stuck_in`` or exits non-zero; returns ``out``, the prefix of
    the files ``<out>.<rank>`` the ranks wrote."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = str(tmp_path / name)
    procs = [ctx.Process(target=target, args=(r, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"a rank is stuck in {stuck_in}"
    assert [p.exitcode for p in procs] == [0, 0]
    return out
