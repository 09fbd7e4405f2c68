"""The device input pipeline: decode a task's images once into a uint8 cache, augment on the device.

The CPU path (:class:`inflora_ray.data.loader.TaskDataset` in DataLoader processes) decodes, crops, resizes
and converts every image on the host in every epoch, and ships fp32 batches. Here, for the training data of
the task being trained (its epochs and both covariance passes):

- each image is decoded once per task into a uint8 cache on the training device (per worker, bounded by
  ``cache_bytes``; images beyond the bound are decoded again in each pass, as on the CPU path). The first
  pass of a task decodes in ``loader_workers`` DataLoader processes as the CPU path does, or, on CUDA, reads
  the encoded bytes there and decodes JPEGs on the GPU (``torchvision.io.decode_jpeg(device="cuda")``);
- per sample, the crop box and the flip are drawn on the host from the sample's own seeded generator, with
  the same draws in the same order as :meth:`inflora_ray.data.transforms.Preprocess.train`, so an image's
  view depends on (seed, task, pass, sample) only, never on the number of workers;
- the crop, resize and flip run on the device on uint8, and the conversion to float and the normalisation
  run there on the whole batch.

Equivalence with the CPU path. With ``cache_side=None`` (the default: images are cached at their decoded size)
and the device a CPU, every view is bitwise the CPU path's: the same torchvision functions run on the same
uint8 tensors with the same parameters (tests/test_device_pipeline.py checks it). With ``cache_side`` set,
images whose shorter side is larger are cached resized to it (less memory); crop boxes are still drawn on the
original size and scaled, so the view is the CPU path's up to the extra resize (measured by
``python bench/device_pipeline.py``; see docs/performance.md). On CUDA, torchvision resizes uint8 images in
float and rounds, where the CPU kernel works on uint8 directly, and nvJPEG's IDCT is not libjpeg's, so pixels
may differ by a few levels of 255; ``python bench/gpu.py`` measures the difference on the GPU it runs on.

No Ray import here: the loop builds one pipeline per worker.
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from .loader import TaskDataset, loader_context
from .transforms import Preprocess, random_resized_crop_box

log = logging.getLogger(__name__)

Batch = list[tuple[int, int]]  # (sample index, augmentation seed; -1 for the test transform)


def resolve_pipeline(choice: str, device: torch.device) -> str:
    """``data.pipeline`` on ``device``: "auto" is "device" on CUDA and "cpu" elsewhere."""
    if choice not in ("auto", "cpu", "device"):
        raise ValueError(f"data.pipeline={choice!r}: expected 'auto', 'cpu' or 'device'")
    if choice == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return choice


def cached_size(height: int, width: int, cache_side: Optional[int]) -> tuple[int, int]:
    """(h, w) an image of ``height`` x ``width`` is cached at: its own size, or with the shorter side brought
    down to ``cache_side`` (never up), aspect ratio kept. The longer side is rounded down, as torchvision's
    ``resize(img, [side])`` does, so a cache at the test resize gives bitwise the CPU path's test views."""
    short = min(height, width)
    if cache_side is None or short <= cache_side:
        return height, width
    long = int(cache_side * max(height, width) / short)
    return (cache_side, long) if height <= width else (long, cache_side)


def _shrink(img: torch.Tensor, cache_side: Optional[int]) -> torch.Tensor:
    """``img`` (uint8 CHW) at its cached size."""
    h, w = cached_size(int(img.shape[-2]), int(img.shape[-1]), cache_side)
    if (h, w) == tuple(img.shape[-2:]):
        return img
    return TF.resize(img, [h, w], antialias=True)


class _Decoded(Dataset):
    """What the first pass of a task reads per sample, in DataLoader processes: (index, original (h, w), the
    image at its cached size) or, when the loop decodes JPEGs on the GPU, (index, None, encoded bytes)."""

    def __init__(self, dataset: TaskDataset, cache_side: Optional[int], encoded_jpeg: bool):
        self.source = dataset.source
        self.cache_side = cache_side
        self.encoded_jpeg = encoded_jpeg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        if self.encoded_jpeg:
            data, fmt = self.source.encoded(index)
            if fmt == "jpeg":
                return index, None, torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = self.source.load(index)
        return index, (int(img.shape[-2]), int(img.shape[-1])), _shrink(img, self.cache_side)


def _as_list(items):
    return items


class DevicePipeline:
    """One worker's device input pipeline over a :class:`TaskDataset` (see the module docstring).

    ``loader(batches)`` yields ``(images, labels)`` on ``device`` for precomputed batches of (index, seed),
    like :func:`inflora_ray.data.loader.make_loader` does on the host. The cache holds one group of samples
    (a task's training block on this worker): a pass over samples outside the group starts a new group.
    """

    def __init__(self, dataset: TaskDataset, device: torch.device, cache_bytes: int, loader_workers: int = 0,
                 cache_side: Optional[int] = None, gpu_decode: Optional[bool] = None):
        self.dataset = dataset
        self.preprocess: Preprocess = dataset.preprocess
        self.device = torch.device(device)
        self.cache_bytes = int(cache_bytes)
        self.loader_workers = loader_workers
        self.cache_side = cache_side
        # JPEG decode on the GPU needs the encoded bytes (folders and shards have them) and a CUDA device.
        self.gpu_decode = (self.device.type == "cuda" and hasattr(dataset.source, "encoded")
                           if gpu_decode is None else gpu_decode)
        self._group: frozenset[int] = frozenset()
        self._cache: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        self._cached_bytes = 0
        self.decoded = 0  # images decoded since construction (cache misses), for benchmarks and tests
        pp = self.preprocess
        self._mean = None if pp.mean is None else torch.tensor(pp.mean, device=self.device).view(1, 3, 1, 1)
        self._std = None if pp.std is None else torch.tensor(pp.std, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ cache
    def _start_group(self, batches: Sequence[Batch]) -> None:
        """Keep the cache when every sample of the pass is in the current group, else start a new one."""
        keys = frozenset(i for b in batches for i, _ in b)
        if keys <= self._group:
            return
        self._group, self._cache, self._cached_bytes = keys, {}, 0

    def _store(self, index: int, img: torch.Tensor, size: tuple[int, int]) -> None:
        nbytes = img.numel()
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[index] = (img, size)
            self._cached_bytes += nbytes

    def _decode_missing(self, batches: Sequence[Batch]) -> Iterator[dict[int, tuple[torch.Tensor, tuple[int, int]]]]:
        """Per batch, the samples that are not cached, decoded (uint8 on the device, at the cached size) with
        their original size; decoding runs ahead in ``loader_workers`` processes as on the CPU path."""
        missing = [sorted({i for i, _ in b if i not in self._cache}) for b in batches]
        if not any(missing):
            for _ in batches:
                yield {}
            return
        loader = DataLoader(_Decoded(self.dataset, self.cache_side, self.gpu_decode), batch_sampler=missing,
                            num_workers=self.loader_workers, collate_fn=_as_list,
                            multiprocessing_context=loader_context() if self.loader_workers else None)
        for items in loader:
            out = {}
            jpegs = [(i, data) for i, size, data in items if size is None]
            for i, size, img in items:
                if size is not None:
                    self.decoded += 1
                    out[i] = (img.to(self.device, non_blocking=True), size)
            if jpegs:
                out.update(self._decode_on_gpu(jpegs))
            yield out

    def _decode_on_gpu(self, jpegs: list[tuple[int, torch.Tensor]]) -> dict[int, tuple[torch.Tensor, tuple[int, int]]]:
        """JPEGs decoded by nvJPEG on the device, then brought to the cached size there (CUDA only)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out = {}
        try:
            images = decode_jpeg([data for _, data in jpegs], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:  # a JPEG nvJPEG cannot read (e.g. CMYK): decode these on the host instead
            log.warning("GPU JPEG decode failed (%s); decoding this batch on the host", e)
            images = [self.dataset.source.load(i) for i, _ in jpegs]
        for (i, _), img in zip(jpegs, images):
            self.decoded += 1
            size = (int(img.shape[-2]), int(img.shape[-1]))
            out[i] = (_shrink(img.to(self.device), self.cache_side), size)
        return out

    # ------------------------------------------------------------------ augmentation
    def _view(self, img: torch.Tensor, size: tuple[int, int], seed: int) -> torch.Tensor:
        """The uint8 (3, S, S) view of one cached image: parameters drawn on the host exactly as
        :class:`Preprocess` draws them, pixels computed on the image's device."""
        pp = self.preprocess
        s = pp.img_size
        if seed < 0:  # the test transform
            if pp.test_resize is not None:
                return TF.center_crop(TF.resize(img, [pp.test_resize], antialias=True), [s, s])
            return TF.resize(img, [s, s], antialias=True)
        gen = torch.Generator().manual_seed(int(seed))
        top, left, h, w = random_resized_crop_box(size[0], size[1], pp.train_scale, pp.train_ratio, gen)
        flip = pp.train_flip and float(torch.rand((), generator=gen)) < 0.5
        ch, cw = int(img.shape[-2]), int(img.shape[-1])
        if (ch, cw) != size:  # cached smaller: the same box, scaled to the cached image
            sy, sx = ch / size[0], cw / size[1]
            top, left = int(round(top * sy)), int(round(left * sx))
            h, w = max(1, min(ch - top, int(round(h * sy)))), max(1, min(cw - left, int(round(w * sx))))
        out = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
        return TF.horizontal_flip(out) if flip else out

    def _finish(self, views: list[torch.Tensor]) -> torch.Tensor:
        """uint8 views -> the float batch the model reads (as :meth:`Preprocess._finish` does per image)."""
        out = torch.stack(views).float().div_(255.0)
        if self._mean is not None:
            out = out.sub_(self._mean).div_(self._std)
        return out

    def loader(self, batches: Sequence[Batch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images float (B, 3, S, S), labels)`` on the device per batch; an empty batch gives empty tensors."""
        self._start_group(batches)
        s = self.preprocess.img_size
        label_map, labels_of = self.dataset.label_map, self.dataset.source.labels
        for batch, fresh in zip(batches, self._decode_missing(batches)):
            if not batch:
                yield (torch.empty((0, 3, s, s), device=self.device),
                       torch.empty(0, dtype=torch.long, device=self.device))
                continue
            for i, (img, size) in fresh.items():
                self._store(i, img, size)
            views = []
            for i, seed in batch:
                img, size = self._cache[i] if i in self._cache else fresh[i]
                views.append(self._view(img, size, seed))
            labels = torch.tensor([int(label_map[int(labels_of[i])]) for i, _ in batch], dtype=torch.long)
            yield self._finish(views), labels.to(self.device, non_blocking=True)
