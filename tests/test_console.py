"""The console and the run's log, without Ray: the driver's lines (start, epochs of a long task, the workers'
warnings and errors read from the run's log), every worker event in the run's log, and what the console shows
with and without ``--verbose``."""
from __future__ import annotations

import logging
import time

import pytest

from inflora_ray import logs
from inflora_ray.ray_train import progress
from inflora_ray.ray_train.progress import LogAlerts, ProgressWatcher, is_alert
from inflora_ray.results import write_progress
from inflora_ray.rundir import RunDir
from inflora_ray.training.state import TaskProgress

LOG = logging.getLogger("inflora_ray.test_console")


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return run


@pytest.fixture
def console(capsys):
    """The inflora_ray logger without its console handler (the test sets it up on pytest's captured stderr,
    read with ``console.readouterr().err``); its handlers and level restored afterwards."""
    logger = logging.getLogger("inflora_ray")
    saved = (logger.level, list(logger.handlers), logs._VERBOSE)
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_inflora", False)]
    yield capsys
    logger.level, logger.handlers, logs._VERBOSE = saved[0], saved[1], saved[2]


def test_without_verbose_the_console_shows_warnings_and_the_run_log_everything(run, console):
    logs.setup_logging(verbose=False)
    handler = logs.attach_run_log(run.log_path("rank0-1"))
    try:
        logs.log_event(LOG, "epoch_end", task=0, loss=0.5)
        logs.log_event(LOG, "staged_block_did_not_fit", level=logging.WARNING, mib=12)
    finally:
        logs.detach_run_log(handler)
    shown = console.readouterr().err
    assert "event=staged_block_did_not_fit" in shown and "event=epoch_end" not in shown
    written = open(run.log_path("any")).read().splitlines()
    assert [ln.split("event=")[1].split()[0] for ln in written] == ["epoch_end", "staged_block_did_not_fit"]
    assert not logs.is_verbose()


def test_with_verbose_the_console_shows_every_event(console):
    logs.setup_logging(verbose=True)
    logs.log_event(LOG, "epoch_end", task=0)
    assert "event=epoch_end" in console.readouterr().err and logs.is_verbose()


def test_every_process_appends_whole_lines_to_one_run_log(run):
    a, b = logs.RunLogHandler(run.log_path("rank0-1")), logs.RunLogHandler(run.log_path("rank1-2"))
    try:
        for i in range(50):
            for h, who in ((a, "a"), (b, "b")):
                h.emit(LOG.makeRecord(LOG.name, logging.INFO, __file__, 0, f"line_{who}_{i}", (), None))
    finally:
        a.close()
        b.close()
    lines = open(run.log_path("x")).read().splitlines()
    expected = {f"msg=line_{w}_{i}" for w in "ab" for i in range(50)}
    assert len(lines) == 100 and {ln.rsplit(" ", 1)[1] for ln in lines} == expected
    assert run.log_location == run.log_path("anything") == run.path + "/run.log"


def test_on_an_object_store_each_process_has_its_own_log_object():
    run = RunDir("s3://bucket/runs/r")
    assert run.log_location == "s3://bucket/runs/r/logs/"
    assert run.log_path("rank0-7") == "s3://bucket/runs/r/logs/rank0-7.log"


@pytest.mark.parametrize("line, alert", [
    ("ts=1 level=warning logger=x event=a", True), ("ts=1 level=error logger=x event=a", True),
    ("ts=1 level=info logger=x event=warning", False), ('{"level": "error", "event": "x"}', True),
    ('{"level": "info", "event": "warning"}', False), ("{not json level=warning ", False),
])
def test_alert_lines(line, alert):
    assert is_alert(line) is alert


def test_alerts_are_the_new_warnings_and_errors_only(run):
    path = run.log_path("x")
    with open(path, "w") as f:
        f.write("ts=1 level=warning logger=x event=from_an_earlier_attempt\n")
    alerts = LogAlerts(run)
    assert alerts.new_lines() == []  # what was there before is not shown again
    with open(path, "a") as f:
        f.write("ts=2 level=info logger=x event=epoch_end\nts=3 level=error logger=x event=fatal\nts=4 level=warn")
    assert alerts.new_lines() == ["ts=3 level=error logger=x event=fatal"]
    with open(path, "a") as f:  # the half-written line is read once it is whole
        f.write("ing logger=x event=late\n")
    assert alerts.new_lines() == ["ts=4 level=warning logger=x event=late"]
    assert alerts.new_lines() == []


def test_a_long_task_gets_epoch_lines_a_short_one_none(run, capsys, monkeypatch):
    monkeypatch.setattr(progress, "EPOCH_LINE_SECONDS", 0.0)
    watcher = ProgressWatcher(run, num_tasks=3, label="[seed 1] ")
    state = TaskProgress(task=1, epochs_done=2, losses=[0.9, 0.5], train_seconds=20.0, train_images=2000)
    write_progress(run, state, epochs=5)
    watcher.poll()
    watcher.poll()  # the same epoch is shown once
    out = capsys.readouterr().out.splitlines()
    assert out == ["[seed 1] [task 2/3] epoch 2/5  loss 0.5000  100 img/s  about 30s left in the task"]

    monkeypatch.setattr(progress, "EPOCH_LINE_SECONDS", 10.0)
    short = ProgressWatcher(run, num_tasks=3)
    write_progress(run, TaskProgress(task=1, epochs_done=3, losses=[0.1] * 3, train_seconds=3.0,
                                     train_images=300), epochs=5)
    short._last_line = time.monotonic() - 60
    short.poll()
    assert capsys.readouterr().out == ""  # 3 s of training: a short task


def test_the_watcher_prints_the_workers_warnings_with_the_run_label(run, capsys):
    watcher = ProgressWatcher(run, num_tasks=2, label="[seed 0] ")
    with open(run.log_path("x"), "a") as f:
        f.write("ts=1 level=warning logger=inflora_ray.core.subspace event=rank_reduced\n")
        f.write("ts=2 level=info logger=inflora_ray.training.learner event=epoch_end\n")
    watcher.poll()
    err = capsys.readouterr().err
    assert err == "[seed 0] ts=1 level=warning logger=inflora_ray.core.subspace event=rank_reduced\n"


def test_the_task_lines_and_the_final_table_name_both_accuracies(capsys):
    """Task sizes 10, 20, 10 test images: pooled 29/40 = 72.50 %, task-mean (0.7 + 0.6 + 1.0) / 3 = 76.67 %;
    a result stored before the task-mean fields existed still gets its line."""
    from inflora_ray.core.metrics import AccuracyCounts, summary

    counts = AccuracyCounts()
    for correct, total in (([9], [10]), ([6, 16], [10, 20]), ([7, 12, 10], [10, 20, 10])):
        counts.add_row(correct, total)
    summ = summary(counts)
    result = {"task": 2, "classes": [4, 5], "pooled_accuracy": 0.725, "task_mean_accuracy": 2.3 / 3,
              "average_incremental_accuracy": summ["average_incremental_accuracy"],
              "average_incremental_accuracy_task_mean": summ["average_incremental_accuracy_task_mean"],
              "forgetting": 0.2, "train_loss": 0.5, "task_seconds": 3.0, "images_per_second": 100.0,
              "peak_memory_mb": 0.0}
    progress.print_task_line({"result": result}, 3)
    old = {k: v for k, v in result.items() if "task_mean" not in k}
    progress.print_task_line({"result": old}, 3)
    progress.print_final_table("r", summ, 3)
    out = capsys.readouterr().out
    assert "[task 3/3] classes 4..5  pooled acc 72.50% (avg inc 78.61%)  task-mean acc 76.67% (avg inc 78.89%)  " \
           "forgetting 20.00" in out  # avg inc: (90 + 73.33 + 72.5) / 3 and (90 + 70 + 76.67) / 3
    assert "pooled acc 72.50% (avg inc 78.61%)  task-mean acc nan% (avg inc nan%)" in out
    table = out.split("== r: 3/3 tasks ==")[1].splitlines()
    assert "final accuracy A_T, pooled                 72.50%" in table
    assert "final accuracy A_T, task-mean              76.67%" in table
    assert "average incremental accuracy, pooled       78.61%" in table
    assert "average incremental accuracy, task-mean    78.89%" in table
