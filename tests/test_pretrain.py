"""Glyph pre-training: the command end to end, the shipped weights' checksum, the glyph source's guarantees."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from inflora_ray.config import ModelConfig
from inflora_ray.presets import load_config
from inflora_ray.tools.glyphs import EXCLUDED, GLYPH_CLASSES, GlyphSource
from inflora_ray.core.model import create_backbone
from helpers import verify_weights
from inflora_ray.tools.pretrain import quickstart_weights_path


def test_pretrain_command_end_to_end(tmp_path):
    out = tmp_path / "w" / "vit.pth"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "inflora_ray.tools.pretrain", "--out", str(out), "--epochs", "1", "--num-images", "192",
         "--val-images", "64", "--batch-size", "64", "--threads", "1", "--seed", "3"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event=pretrain_epoch" in proc.stderr and "event=pretrain_done" in proc.stderr
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["arguments"]["epochs"] == 1 and record["seed"] == 3
    assert {"torch", "timm"} <= set(record["versions"])
    verify_weights(out, out.with_suffix(".json"))

    saved = torch.load(out, weights_only=True)
    cfg = load_config("quickstart", [f"model.weights_file={out}"]).model
    backbone = create_backbone(cfg)
    reference = create_backbone(load_config("quickstart", ["model.weights_file=null"]).model)
    assert list(saved) == list(reference.state_dict())  # exactly the num_classes=0 model's keys: no head
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    out.write_bytes(out.read_bytes() + b"\0")  # a corrupted file must be refused
    with pytest.raises(ValueError, match="the file is damaged or was replaced"):
        verify_weights(out, out.with_suffix(".json"))


def test_shipped_weights_match_record_and_load():
    path = quickstart_weights_path()
    record_path = path.with_suffix(".json")
    verify_weights(path)
    record = json.loads(record_path.read_text())
    model = record["model"]
    cfg = ModelConfig(name=model["name"], img_size=model["img_size"], kwargs=model["kwargs"], weights_file=str(path))
    backbone = create_backbone(cfg)
    saved = torch.load(path, weights_only=True)
    loaded = backbone.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved)
    assert path.stat().st_size < 10 * 2**20


def test_glyph_source_is_deterministic_and_has_no_digits():
    assert len(set(GLYPH_CLASSES)) == len(GLYPH_CLASSES) >= 50
    assert not set(GLYPH_CLASSES) & set(EXCLUDED)
    assert not any(ch.isdigit() for ch in GLYPH_CLASSES)
    assert all(str(d) in EXCLUDED for d in range(10))
    assert {"O", "o", "I", "l", "|", "S", "s", "Z", "B", "g", "q"} <= set(EXCLUDED)

    a, b = GlyphSource(64, seed=5), GlyphSource(64, seed=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    order = [13, 2, 40, 2]
    batch = a.render(order)  # rendering order and caching do not change an image
    for row, i in zip(batch, order):
        img = b.load(i)
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert torch.equal(img[0], row[0]) and torch.equal(img[0], img[2])
        assert int(img.max()) > 100  # the glyph is visible
    c = GlyphSource(64, seed=6)
    assert not torch.equal(a.render(range(8)), c.render(range(8)))
    # Balanced classes; a subset source relabels 0..k-1.
    counts = np.bincount(GlyphSource(len(GLYPH_CLASSES) * 2, seed=0).labels, minlength=len(GLYPH_CLASSES))
    assert (counts == 2).all()
    sub = GlyphSource(10, seed=0, classes=["A", "Ω"], img_size=16)
    assert set(sub.labels) <= {0, 1} and sub.load(0).shape == (3, 16, 16)
