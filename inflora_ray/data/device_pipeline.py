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
- the crop, resize and flip run on the device on uint8 cache entries, and the conversion to float and the
  normalisation run there on the whole batch.

Batched views (the default on a GPU). Cropping and resizing one image at a time costs a dozen operator calls
and kernel launches per image on the host, which at thousands of images per second is more than the host has
to spare beside the training step. On any device but a CPU, a batch's views are computed together instead, by
a fixed number of calls per batch whatever its size (:func:`batched_views`): the batch's cached images are
concatenated into one flat buffer, the rows of each sample's crop box are gathered from it into a padded
(B, 3, H, W) block by one ``index_select`` (over an overlapping ``unfold`` view of the buffer, so only the
crop rows are copied), and the resize is applied as two batched matrix products, ``W_y X W_x^T`` per sample
and channel, whose matrices hold torch's antialiased bilinear weights for that sample's crop size (the flip
reverses ``W_x``'s rows; rows and columns outside a box have zero weight). This is the same filter the
per-image path runs (``interpolate(antialias=True)``), without rounding to uint8: a batched view is the
per-image view before its rounding (the CPU's uint8 kernel also rounds between its two passes), so on a CPU
the two differ by 0.29 levels of 255 on average and one level at most (measured by
``python bench/device_pipeline.py``, see docs/performance.md). Batches whose padded block would exceed
:data:`CHUNK_ELEMENTS` are cut into chunks, each one such set of calls. A view's pixels depend on its own
image and draws only, up to float rounding in the matrix products: the padding of the other samples in its
batch only adds zero terms.

Equivalence with the CPU path. On a CPU device the pipeline computes each view with the per-image calls
(``batched=False`` is the default there: a CPU has no kernel launches to save, and the batched path's dense
matrix products cost it more than the per-image kernels). With ``cache_side=None`` (the
default: images are cached at their decoded size) every view is then bitwise the CPU path's: the same
torchvision functions run on the same uint8 tensors with the same parameters (tests/test_device_pipeline.py
checks it). With ``cache_side`` set, images whose shorter side is larger are cached resized to it (less
memory); crop boxes are still drawn on the original size and scaled, so the view is the CPU path's up to the
extra resize (measured by ``python bench/device_pipeline.py``; see docs/performance.md). On CUDA the batched
views compute in float (TF32 in the matrix products when the loop enables it) where the CPU kernel works on
uint8 directly, and nvJPEG's IDCT is not libjpeg's, so pixels may differ by a few levels of 255;
``python bench/gpu.py`` measures the difference on the GPU it runs on.

No Ray import here: the loop builds one pipeline per worker.
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple, Optional, Sequence

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


def _resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) torchvision's ``resize(img, [side])`` gives: the shorter side to ``side``, the longer one scaled
    and rounded down (up or down, unlike :func:`cached_size`)."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def _center_offset(size: int, crop: int) -> int:
    """The first row (column) of torchvision's ``center_crop`` of ``crop`` from ``size``, negative when it pads
    (then zero rows come first)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


class ViewBox(NamedTuple):
    """How one view is computed from its cached image: the box (``top``, ``left``, ``h``, ``w``) is resized
    to ``out_h`` x ``out_w``, of which the ``img_size`` x ``img_size`` window at (``off_y``, ``off_x``) is kept
    (0, 0 for a training crop; a centre crop for the test view), flipped horizontally when ``flip``."""
    top: int
    left: int
    h: int
    w: int
    out_h: int
    out_w: int
    off_y: int
    off_x: int
    flip: bool


def resample_weights(in_len: torch.Tensor, out_len: torch.Tensor, offset: torch.Tensor, count: int, pad: int,
                     reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, count, pad) float32 matrices of torch's antialiased bilinear resize (``interpolate(mode="bilinear",
    antialias=True, align_corners=False)``) of a length ``in_len[i]`` to ``out_len[i]``, rows ``offset[i]`` to
    ``offset[i] + count - 1`` of the result (rows outside ``[0, out_len)`` are zero: padding), over ``pad``
    input positions (those at or beyond ``in_len`` get weight 0). With ``reverse[i]`` the rows come in reverse
    order (a horizontal flip of the output).

    torch's weights: scale ``s = in/out``, support ``max(s, 1)``; output position ``o`` reads input ``j`` with
    the triangle filter ``max(0, 1 - |j + 0.5 - s (o + 0.5)| / support)``, normalised over ``j`` (the
    filter is zero outside torch's tap window, so summing over every ``j`` is the same)."""
    dev = in_len.device
    in_f, out_f = in_len.float(), out_len.float()
    scale = in_f / out_f
    support = scale.clamp(min=1.0)
    i = torch.arange(count, device=dev)
    if reverse is not None:
        i = torch.where(reverse[:, None], count - 1 - i, i)  # (n, count)
    o = offset[:, None] + i  # (n, count)
    center = scale[:, None] * (o.float() + 0.5)
    j = torch.arange(pad, device=dev, dtype=torch.float32)
    w = (1.0 - (j + 0.5 - center[..., None]).abs() / support[:, None, None]).clamp_(min=0.0)
    w = w * ((j < in_f[:, None, None]) & (o >= 0)[..., None] & (o < out_len[:, None])[..., None])
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


# Padded crop elements (B x 3 x H x W) per batched resample call: 128 Mi elements, 512 MiB as fp32. A batch of
# 128 crops of up to 600 x 600 px (ImageNet-R's sizes) fits in one; larger batches or images are cut into chunks.
CHUNK_ELEMENTS = 1 << 27


def batched_views(images: Sequence[torch.Tensor], boxes: Sequence[ViewBox], img_size: int,
                  chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Float (B, 3, S, S) views in [0, 255] of uint8 (3, h, w) ``images`` (contiguous, on one device), each
    through its ``box``, with a fixed number of calls per chunk of the batch (see the module docstring): the
    images concatenated, each box's rows gathered by one ``index_select``, then two batched matmuls."""
    s = img_size
    device = images[0].device
    out = torch.empty((len(images), 3, s, s), device=device)
    lo = 0
    while lo < len(images):
        hi, hp, wp = lo + 1, boxes[lo].h, boxes[lo].w
        while hi < len(images):
            h2, w2 = max(hp, boxes[hi].h), max(wp, boxes[hi].w)
            if (hi + 1 - lo) * 3 * h2 * w2 > chunk_elements:
                break
            hi, hp, wp = hi + 1, h2, w2
        out[lo:hi] = _resample(images[lo:hi], boxes[lo:hi], s, hp, wp)
        lo = hi
    return out


def _resample(images: Sequence[torch.Tensor], boxes: Sequence[ViewBox], s: int, hp: int, wp: int) -> torch.Tensor:
    """:func:`batched_views` of one chunk whose boxes fit in ``hp`` x ``wp``: (n, 3, S, S), channels inner."""
    n, device = len(images), images[0].device
    bases, base = [], 0
    for img in images:
        bases.append(base)
        base += img.numel()
    # One host tensor, one copy: per sample where its rows are (n rows), then the resize of its rows (n) and of
    # its columns (n): input length, output length, first output position, reversed (the flip).
    gather = [(b, img.shape[-2], img.shape[-1], x.top, x.left, x.h) for b, img, x in zip(bases, images, boxes)]
    axes = ([(x.h, x.out_h, x.off_y, 0, 0, 0) for x in boxes]
            + [(x.w, x.out_w, x.off_x, int(x.flip), 0, 0) for x in boxes])
    p = torch.tensor(gather + axes, dtype=torch.long).to(device, non_blocking=True)
    first, height, width, top, left, h = p[:n].unbind(1)
    # Flat buffer: every image, then wp zeros so that a window of wp bytes from any row start stays inside.
    flat = torch.cat([img.reshape(-1) for img in images] + [torch.zeros(wp, dtype=torch.uint8, device=device)])
    y = torch.minimum(torch.arange(hp, device=device)[None], h[:, None] - 1)  # rows past a box repeat its last
    channel = torch.arange(3, device=device)[None, :, None]
    starts = first[:, None, None] + (channel * height[:, None, None] + (top[:, None] + y)[:, None, :]) \
        * width[:, None, None] + left[:, None, None]  # (n, 3, hp): where each gathered row starts
    crops = flat.unfold(0, wp, 1).index_select(0, starts.reshape(-1))  # (n*3*hp, wp); past a box: weight 0
    ax = p[n:]
    w = resample_weights(ax[:, 0], ax[:, 1], ax[:, 2], s, max(hp, wp), reverse=ax[:, 3].bool())
    w_y, w_x = w[:n, :, :hp], w[n:, :, :wp]  # (n, S, hp), (n, S, wp)
    t = torch.bmm(crops.view(n, 3 * hp, wp).float(), w_x.transpose(1, 2))  # (n, 3 hp, S): columns resized
    t = t.view(n, 3, hp, s).transpose(1, 2).reshape(n, hp, 3 * s)
    return torch.bmm(w_y, t).view(n, s, 3, s).transpose(1, 2)  # (n, 3, S, S): rows resized


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
                 cache_side: Optional[int] = None, gpu_decode: Optional[bool] = None,
                 batched: Optional[bool] = None):
        self.dataset = dataset
        self.preprocess: Preprocess = dataset.preprocess
        self.device = torch.device(device)
        self.cache_bytes = int(cache_bytes)
        self.loader_workers = loader_workers
        self.cache_side = cache_side
        # JPEG decode on the GPU needs the encoded bytes (folders and shards have them) and a CUDA device.
        self.gpu_decode = (self.device.type == "cuda" and hasattr(dataset.source, "encoded")
                           if gpu_decode is None else gpu_decode)
        # Views of a batch together (batched_views) on a GPU; one image at a time on a CPU (bitwise the CPU path).
        self.batched = self.device.type != "cpu" if batched is None else batched
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
                    out[i] = (img.to(self.device, non_blocking=True).contiguous(), size)
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
            out[i] = (_shrink(img.to(self.device), self.cache_side).contiguous(), size)
        return out

    # ------------------------------------------------------------------ augmentation
    def _box(self, cached: tuple[int, int], size: tuple[int, int], seed: int) -> ViewBox:
        """How the view of an image cached at ``cached`` (h, w), decoded at ``size``, is computed: parameters
        drawn on the host exactly as :class:`Preprocess` draws them (``seed`` < 0: the test transform)."""
        pp = self.preprocess
        s = pp.img_size
        ch, cw = cached
        if seed < 0:  # the test transform: the whole image resized, then (with a test resize) centre-cropped
            if pp.test_resize is None:
                return ViewBox(0, 0, ch, cw, s, s, 0, 0, False)
            rh, rw = _resized_size(ch, cw, pp.test_resize)
            return ViewBox(0, 0, ch, cw, rh, rw, _center_offset(rh, s), _center_offset(rw, s), False)
        gen = torch.Generator().manual_seed(int(seed))
        top, left, h, w = random_resized_crop_box(size[0], size[1], pp.train_scale, pp.train_ratio, gen)
        flip = pp.train_flip and float(torch.rand((), generator=gen)) < 0.5
        if (ch, cw) != size:  # cached smaller: the same box, scaled to the cached image
            sy, sx = ch / size[0], cw / size[1]
            top, left = int(round(top * sy)), int(round(left * sx))
            h, w = max(1, min(ch - top, int(round(h * sy)))), max(1, min(cw - left, int(round(w * sx))))
        return ViewBox(top, left, h, w, s, s, 0, 0, bool(flip))

    def _view(self, img: torch.Tensor, size: tuple[int, int], seed: int) -> torch.Tensor:
        """The uint8 (3, S, S) view of one cached image by per-image torchvision calls (the CPU path's)."""
        pp = self.preprocess
        s = pp.img_size
        if seed < 0:  # the test transform
            if pp.test_resize is not None:
                return TF.center_crop(TF.resize(img, [pp.test_resize], antialias=True), [s, s])
            return TF.resize(img, [s, s], antialias=True)
        box = self._box((int(img.shape[-2]), int(img.shape[-1])), size, seed)
        out = TF.resized_crop(img, box.top, box.left, box.h, box.w, [s, s], antialias=True)
        return TF.horizontal_flip(out) if box.flip else out

    def _normalise(self, out: torch.Tensor) -> torch.Tensor:
        """Float views in [0, 255] -> the batch the model reads (as :meth:`Preprocess._finish` does per image)."""
        out = out.div_(255.0)
        if self._mean is not None:
            out = out.sub_(self._mean).div_(self._std)
        return out

    def _finish(self, views: list[torch.Tensor]) -> torch.Tensor:
        """uint8 views -> the float batch the model reads."""
        return self._normalise(torch.stack(views).float())

    def views(self, items: Sequence[tuple[torch.Tensor, tuple[int, int], int]]) -> torch.Tensor:
        """The float batch of views of ``(cached image, decoded size, seed)`` items: batched or per image."""
        if not self.batched:
            return self._finish([self._view(img, size, seed) for img, size, seed in items])
        boxes = [self._box((int(img.shape[-2]), int(img.shape[-1])), size, seed) for img, size, seed in items]
        return self._normalise(batched_views([img for img, _, _ in items], boxes, self.preprocess.img_size))

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
            items = [(*(self._cache[i] if i in self._cache else fresh[i]), seed) for i, seed in batch]
            labels = torch.tensor([int(label_map[int(labels_of[i])]) for i, _ in batch], dtype=torch.long)
            yield self.views(items), labels.to(self.device, non_blocking=True)
