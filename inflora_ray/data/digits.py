"""The quickstart source: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, offline)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from .base import TensorSource

TEST_EVERY = 5  # per class, every 5th image (in dataset order) is a test image: a fixed 80/20 split


def load_digits_sources(img_size: int) -> tuple[TensorSource, TensorSource, list[str], dict]:
    """Train/test sources of the digits, upsampled (bilinear) to ``img_size``, grey replicated to RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.asarray(digits.images, dtype=np.float32) / 16.0  # values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    x = torch.from_numpy(raw)[:, None]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        is_test[np.flatnonzero(labels == c)[::TEST_EVERY]] = True
    train = TensorSource(images[~is_test], labels[~is_test])
    test = TensorSource(images[is_test], labels[is_test])
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "split": f"per class, every {TEST_EVERY}th image is test",
        "num_train": len(train), "num_test": len(test),
        "sha256": hashlib.sha256(raw.tobytes() + labels.tobytes()).hexdigest(),
    }
    return train, test, [str(c) for c in range(10)], manifest
