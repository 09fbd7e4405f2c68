"""Storage that fails mid-run, on a real file system: a write that cannot complete (the process's file-size
limit, RLIMIT_FSIZE, stands for a full disk: the kernel refuses the write as a full disk would) leaves no
temporary file and names its path; a driver that cannot write a run's final results says so, exits as a
failed run (not as bad input) and prints how to resume, with every task's result kept."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from helpers import tiny_overrides
from inflora_ray.core.metrics import AccuracyCounts
from inflora_ray.presets import load_config
from inflora_ray.results import write_task_result
from inflora_ray.rundir import RunDir

LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write fails with EFBIG, as a full disk with ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_BYTES, MAX_BYTES))
""")


def _run_limited(code: str, limit: int) -> subprocess.CompletedProcess:
    script = LIMITED.replace("MAX_BYTES", str(limit)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_write_that_cannot_complete_names_its_path_and_leaves_no_temporary_file(tmp_path):
    out = _run_limited(f"""
        from inflora_ray import storage
        storage.write_bytes({str(tmp_path / 'ok.json')!r}, b"{{}}")
        try:
            storage.write_bytes({str(tmp_path / 'results' / 'big.bin')!r}, b"x" * 100000)
        except OSError as e:
            print("refused:", e)
    """, limit=4096)
    assert out.returncode == 0, out.stderr
    assert f"refused: [Errno 27] cannot write {tmp_path / 'results' / 'big.bin'}" in out.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ok.json", "results"]


def test_a_driver_that_cannot_write_the_final_results_fails_with_the_resume_command(tmp_path):
    cfg = load_config("quickstart", tiny_overrides(**{"data.num_tasks": 2}))
    run = RunDir(str(tmp_path / "r"))
    counts = AccuracyCounts(correct=[[9]], total=[[10]])
    result = {"task": 0, "classes": [0, 1], "correct": [9], "total": [10], "own_head_correct": [10],
              "accuracy": [0.9], "own_head_accuracy": [1.0], "pooled_accuracy": 0.9,
              "average_incremental_accuracy": 0.9, "forgetting": float("nan"), "backward_transfer": float("nan"),
              "train_loss": 0.1, "task_seconds": 1.0, "train_seconds": 1.0, "train_images": 10,
              "images_per_second": 10.0, "peak_memory_mb": 1.0, "info": {}}
    write_task_result(run, result, counts, counts)  # task 0 done; its result is ~1.5 KB
    out = _run_limited(f"""
        from inflora_ray.config import config_from_dict
        from inflora_ray.ray_train.launch import RunContext, RunOptions, _finish
        from inflora_ray.rundir import RunDir
        try:
            _finish(config_from_dict({cfg.to_dict()!r}), RunDir({run.path!r}), 2, None, RunOptions(),
                    RunContext(quiet_table=True), None)
        except RuntimeError as e:
            print("failed:", e)
    """, limit=900)  # metrics.json needs more
    assert out.returncode == 0, out.stderr
    assert "failed: run 'r' failed after 1 task(s): OSError: [Errno 27] cannot write" in out.stdout
    assert f"resume it with: python -m inflora_ray.run --resume r run.storage_path={tmp_path}" in out.stdout
    names = sorted(p.name for p in (tmp_path / "r" / "results").iterdir())
    assert names == ["task_000.json"], names  # the task's result kept, nothing half-written
    assert json.loads((tmp_path / "r" / "results" / "task_000.json").read_text())["result"]["task"] == 0
