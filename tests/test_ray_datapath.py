"""On a real local Ray: the dataset is scanned once, by the driver, and its workers use that scan; every
task-boundary checkpoint is kept while mid-task ones are pruned (by Ray Train, to the latest
run.checkpoints_to_keep once every task is done), through --stop-after-task and --resume, which end with the
uninterrupted run's result; the final checkpoint is Ray Train's Result's."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from helpers import run_in_process, tiny_overrides
from inflora_ray.data import build_benchmark, scan_data
from inflora_ray.distributed.launch import run_experiment
from inflora_ray.presets import load_config
from test_data import WNIDS, write_imagenet_r

pytestmark = pytest.mark.ray


def test_workers_use_the_drivers_scan_of_the_dataset(ray_session, tmp_path):
    root = write_imagenet_r(tmp_path / "imagenet-r")
    cfg = load_config("quickstart", tiny_overrides(**{
        "data.benchmark": "imagenet-r", "data.root": str(root), "data.num_tasks": 2, "run.num_workers": 2,
        "run.storage_path": str(tmp_path / "runs"), "tracking.enabled": "false"}))
    scanned = scan_data(cfg.data, cfg.model.img_size)
    task0 = len(build_benchmark(cfg.data, cfg.model.img_size, scanned=scanned).task_indices("train", 0))
    # The folder changes after the driver's scan: a rescan (on a worker) would find more training images.
    rng = np.random.default_rng(3)
    for k in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (root / WNIDS[0] / f"extra_{k}.jpg").write_bytes(buf.getvalue())
    assert len(build_benchmark(cfg.data, cfg.model.img_size).task_indices("train", 0)) > task0
    result = run_experiment(cfg, "scan-once", data=scanned, stop_after_task=0, quiet_table=True)
    assert result.tasks[0]["report"]["train_images"] == task0  # 1 epoch: every worker trained on the driver's scan


def test_mid_task_checkpoints_pruned_task_checkpoints_kept(ray_session, tmp_path):
    cfg = load_config("quickstart", tiny_overrides(**{
        "data.num_tasks": 2, "train.epochs": 4, "run.checkpoint_every_epochs": 1, "run.checkpoints_to_keep": 1,
        "run.storage_path": str(tmp_path), "tracking.enabled": "false"}))
    first = run_experiment(cfg, "pruned", stop_after_task=0, quiet_table=True)
    run_dir = first.run_dir
    assert first.checkpoint == os.path.join(run_dir, "checkpoint_task000")  # Ray's Result, not a listing
    # Ray keeps num_tasks + 1 = 3: the task checkpoint and the latest mid-task ones in the places left
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_task")) == [
        "checkpoint_task000", "checkpoint_task000_epoch001", "checkpoint_task000_epoch002"]
    # Ray Train resumes the run after its older checkpoints were deleted, and prunes on.
    done = run_experiment(cfg, "pruned", resume=True, quiet_table=True)
    assert done.checkpoint == os.path.join(run_dir, "checkpoint_task001")
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_task")) == [
        "checkpoint_task000", "checkpoint_task001", "checkpoint_task001_epoch002"]
    assert len(done.tasks) == 2
    assert done.accuracy_matrix == run_in_process(cfg)["accuracy_matrix"]  # stopped and resumed = uninterrupted
