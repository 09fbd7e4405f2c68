"""Test helpers shared by the test modules: the tiny ViT every fast test uses, as config overrides and as a
timm model, and a learner hook that snapshots a checkpoint mid-run and kills the run. Imported as
``from helpers import ...`` (pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import io

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
READ_LOG_ENV = "INFLORA_TEST_READ_LOG"  # file to which every byte count read from a .parquet file is appended


def _log_read(n: int) -> None:
    import os

    fd = os.open(os.environ[READ_LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)


class _CountingFile:
    """A file object that logs the size of each read (wrapped in pyarrow.PythonFile)."""

    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
        _log_read(len(data))
        return data

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def close(self):
        self._f.close()

    @property
    def closed(self):
        return self._f.closed

    def readable(self):
        return True

    def seekable(self):
        return True


class _CountingFS:
    """A pyarrow filesystem whose .parquet input files log every byte read."""

    def __init__(self, fs):
        self._fs = fs

    def open_input_file(self, path):
        import pyarrow as pa

        f = self._fs.open_input_file(path)
        return pa.PythonFile(_CountingFile(f), mode="r") if path.endswith(".parquet") else f

    def __getattr__(self, name):
        return getattr(self._fs, name)


def counting_filesystem(plain):
    """``inflora_ray.storage.filesystem`` wrapped: the bytes read from .parquet files go to $READ_LOG_ENV."""
    def filesystem(path):
        fs, p = plain(path)
        return _CountingFS(fs), p
    return filesystem


def count_reads_in_loader_process(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: count this loader process's reads from the store too."""
    from inflora_ray import storage

    storage.filesystem = counting_filesystem(storage.filesystem)


def bytes_logged(path) -> int:
    """The bytes counted in the read log ``path`` (0 when nothing was read)."""
    import os

    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(int(line) for line in f if line.strip())
