"""bench/loop.py end to end on the CPU at a tiny size: it generates an ImageNet-R-like folder, times the bench's
step, runs the real training loop (``python -m inflora_ray.run`` through Ray Train, device input pipeline) on
it, and reports the run's own images/s beside the step's; with ``--dry-run`` it only prints the command it
would run."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from loop import main as loop_main  # noqa: E402

pytestmark = pytest.mark.ray


def test_the_loop_bench_runs_the_real_loop_beside_the_step(ray_session, tmp_path, monkeypatch, capsys):
    # The run joins the session's Ray instead of starting its own.
    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    deterministic = torch.are_deterministic_algorithms_enabled()
    out = tmp_path / "loop.json"
    try:
        assert loop_main(["--cpu", "--tiny", "--repeats", "2", "--timeout", "180", "--out", str(out)]) == 0
    finally:  # the bench sets the loop's backend settings in its own process: leave the session's as they were
        torch.use_deterministic_algorithms(deterministic)
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert "-m inflora_ray.run --config imagenet-r-10 data.root=ROOT" in r["command"]
    assert "data.pipeline=device" in r["command"] and "run.num_workers=1" in r["command"]
    assert [t["task"] for t in r["loop_tasks"]] == [0, 1]
    # 4 classes x 10 JPEGs in 2 tasks: 16 training images per task (80% of each class), 2 epochs
    assert all(t["train_images"] == 32 and t["images_per_s"] > 0 for t in r["loop_tasks"])
    assert r["loop_images_per_s"] == r["loop_tasks"][-1]["images_per_s"] and r["step"]["images_per_s"] > 0
    assert r["loop_over_step"] == pytest.approx(r["loop_images_per_s"] / r["step"]["images_per_s"])
    assert f"loop / step: {r['loop_over_step']:.3f}" in printed
    assert loop_main(["--dry-run"]) == 0  # the plan only
    assert "--dry-run: nothing measured" in capsys.readouterr().out
