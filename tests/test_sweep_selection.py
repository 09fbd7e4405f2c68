"""How a sweep names its winner and tables its trials, without Ray: only completed trials compete, per-task
metrics sent to Tune are means over a trial's seeds, in task order (the last one after every run ended), local
tracking URIs are pinned for trials in other working directories."""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from types import SimpleNamespace

import pytest

from inflora_ray.ray_tune.sweep import errored_summary, errored_trials, planned_trials, select_best, trial_status
from inflora_ray.ray_tune.search_space import Param, SearchSpace
from inflora_ray.ray_tune.trial import _send_as_tasks_finish, mean_over_seeds
from inflora_ray.ray_tune.hooks import trial_run_names
from inflora_ray.tracking.store import pin_uri


def _row(tid, status, aia, done):
    return {"trial_id": tid, "status": status, "average_incremental_accuracy": aia, "tasks_done": done}


def test_a_pruned_trial_with_a_higher_early_metric_never_wins():
    # Average incremental accuracy falls as tasks accumulate: the trial stopped after task 1 reports 0.97,
    # more than either trial that finished all three tasks.
    rows = [_row("pruned", "pruned", 0.97, 1), _row("a", "completed", 0.83, 3), _row("b", "completed", 0.86, 3),
            _row("err", "error", 0.99, 1)]
    assert select_best(rows, "average_incremental_accuracy", "max")["trial_id"] == "b"
    assert select_best(rows, "average_incremental_accuracy", "min")["trial_id"] == "a"


def test_no_completed_trial_is_an_error_that_says_why():
    rows = [_row("p", "pruned", 0.9, 1), _row("e", "error", math.nan, 0), _row("u", "unfinished", 0.8, 2)]
    with pytest.raises(RuntimeError, match="no trial completed every task.*1 pruned, 1 error, 1 unfinished"):
        select_best(rows, "average_incremental_accuracy", "max")


def test_a_completed_trial_without_the_metric_does_not_compete():
    rows = [_row("nan", "completed", math.nan, 3), _row("ok", "completed", 0.5, 3)]
    assert select_best(rows, "average_incremental_accuracy", "max")["trial_id"] == "ok"


@pytest.mark.parametrize("error, outcome, done, expected", [
    (None, "pruned", 1, "pruned"),
    (None, "completed", 3, "completed"),
    ("boom", None, 1, "error"),
    (None, None, 3, "completed"),  # outcome not recorded (storage trouble): judged by tasks done
    (None, None, 2, "unfinished"),  # the sweep was interrupted
])
def test_trial_status(error, outcome, done, expected):
    result = SimpleNamespace(error=error, metrics={"trial_id": "t1", "tasks_done": done})
    outcomes = {"t1": {"outcome": outcome}} if outcome else {}
    assert trial_status(result, outcomes, horizon=3) == expected


def test_mean_over_seeds_with_spread_and_undefined_metrics():
    per_seed = [{"average_incremental_accuracy": 0.8, "forgetting": math.nan, "train_loss": 1.0},
                {"average_incremental_accuracy": 0.9, "forgetting": math.nan, "train_loss": 3.0}]
    m = mean_over_seeds(per_seed)
    assert m["average_incremental_accuracy"] == pytest.approx(0.85)
    assert m["average_incremental_accuracy_std"] == pytest.approx(math.sqrt(0.005))  # sample std
    assert m["train_loss"] == 2.0 and "train_loss_std" not in m
    assert math.isnan(m["forgetting"]) and math.isnan(m["forgetting_std"])
    one = mean_over_seeds(per_seed[:1])
    assert one["average_incremental_accuracy_std"] == 0.0


def test_task_means_wait_for_every_seed_and_the_last_waits_for_the_runs_to_end():
    records: queue.Queue = queue.Queue()
    release = threading.Event()  # the runs still write their results after their last task

    def seed_run(seed: int) -> None:
        for task in range(3):
            records.put((seed, {"result": _result(task, 0.9 - 0.1 * task + 0.01 * seed)}))
            time.sleep(0.05 * (seed + 1))
        release.wait(10)

    threads = [threading.Thread(target=seed_run, args=(s,), daemon=True) for s in (0, 1)]
    for t in threads:
        t.start()
    threading.Timer(1.0, release.set).start()
    reported: list[tuple[dict, bool]] = []  # (task means, were the runs still going when they were sent)
    _send_as_tasks_finish(records, threads, [0, 1], 3,
                            lambda m: reported.append((m, any(t.is_alive() for t in threads))))
    assert [m["tasks_done"] for m, _ in reported] == [1, 2, 3]
    assert [m["seeds"] for m, _ in reported] == [2, 2, 2]
    assert reported[0][0]["pooled_accuracy"] == pytest.approx(0.905)
    assert [alive for _, alive in reported] == [True, True, False]


def test_a_failed_seed_stops_the_reports_at_the_last_task_every_seed_finished():
    records: queue.Queue = queue.Queue()
    records.put((0, {"result": _result(0, 0.9)}))
    records.put((1, {"result": _result(0, 0.8)}))
    records.put((0, {"result": _result(1, 0.7)}))  # seed 1 failed during task 1
    reported = []
    _send_as_tasks_finish(records, [], [0, 1], 3, reported.append)
    assert [m["tasks_done"] for m in reported] == [1]


def _result(task: int, acc: float) -> dict:
    return {"task": task, "pooled_accuracy": acc, "average_incremental_accuracy": acc, "forgetting": math.nan,
            "backward_transfer": math.nan, "train_loss": 1.0, "task_seconds": 1.0, "images_per_second": 1.0,
            "peak_memory_mb": 1.0, "accuracy": [acc] * (task + 1), "own_head_accuracy": [acc] * (task + 1)}


def test_planned_trials_counts_grid_points():
    space = SearchSpace([Param("train.lr", "grid", [1, 2, 3]), Param("method.rank", "grid", [4, 8]),
                         Param("method.lamb", "uniform", [0.9, 0.95])])
    assert planned_trials(space, 2) == 12


def test_trial_run_names():
    names = ["t_00001", "t_00001-seed0", "t_00001-seed12", "t_000010", "t_00001-seedx", "t_00002-seed0"]
    assert trial_run_names("t_00001", names) == ["t_00001", "t_00001-seed0", "t_00001-seed12"]


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:///" + os.path.abspath("mlflow.db")),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("file:./mlruns", "file://" + os.path.abspath("mlruns")),
    ("mlruns", os.path.abspath("mlruns")),
    ("http://user:pw@host:5000", "http://user:pw@host:5000"),
    ("databricks", "databricks"),
])
def test_local_tracking_uris_are_pinned(uri, expected):
    assert pin_uri(uri) == expected


def test_run_names_are_made_and_read_back_by_one_pair_of_functions():
    from inflora_ray.rundir import run_name, split_run_name

    for base, seed in [("quickstart-inflora-20261207-130538", 0), ("t_00001", 12), ("a-seed-b", 3), ("x", None)]:
        assert split_run_name(run_name(base, seed)) == (base, seed)
    assert split_run_name("t_00001-seedx") == ("t_00001-seedx", None)
    assert split_run_name("-seed3") == ("-seed3", None)


def test_a_trial_that_never_started_is_tabled_as_unfinished():
    """A sweep stopped (Ctrl-C) with trials still pending: Tune gives those no config and no metrics; the
    trial table names them unfinished (and the sweep then says how to resume) instead of failing."""
    from inflora_ray.ray_tune.sweep import trial_table

    space = SearchSpace([Param("train.lr", "choice", [0.001, 0.002])])
    pending = SimpleNamespace(error=None, metrics=None, config=None, path="/s/sw/run_trial_0000a_00001")
    done = SimpleNamespace(error=None, metrics={"trial_id": "0000a_00000", "tasks_done": 3,
                                                "pooled_accuracy": 0.8}, config={"train.lr": 0.002}, path=None)
    rows = trial_table([done, pending], space, horizon=3)
    assert [(r["trial_id"], r["status"], r["param.train.lr"]) for r in rows] == [
        ("0000a_00000", "completed", 0.002), ("run_trial_0000a_00001", "unfinished", None)]


def test_errored_trials_are_named_with_their_errors_beside_a_winner():
    """A sweep that names a winner while trials errored says how many, which, and why (and exits 3)."""
    rows = [{"trial_id": "a", "status": "completed", "error": "", "m": 0.5},
            {"trial_id": "b", "status": "error", "error": "RuntimeError: trial b: seed(s) [0] failed", "m": math.nan},
            {"trial_id": "c", "status": "pruned", "error": "", "m": 0.9}]
    assert select_best(rows, "m", "max")["trial_id"] == "a"
    assert [r["trial_id"] for r in errored_trials(rows)] == ["b"]
    text = errored_summary(rows)
    assert text.startswith("warning: 1 of 3 trial(s) ended with an error and took no part in choosing the winner")
    assert "  b: RuntimeError: trial b: seed(s) [0] failed" in text


def test_the_tune_cli_exits_3_when_trials_errored(monkeypatch, tmp_path):
    """The exit status of a sweep with a winner and errored trials (the CLI's own code path, no Ray)."""
    import inflora_ray.tune as tune_cli

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  train.lr: {choice: [0.001, 0.002]}\n")
    outcomes = iter([{"errored": ["b"]}, {"errored": []}])
    monkeypatch.setattr(tune_cli, "run_sweep", lambda cfg, space, opts: next(outcomes))
    args = ["--space", str(space), "tracking.enabled=false"]
    assert tune_cli.main(args) == 3
    assert tune_cli.main(args) == 0
