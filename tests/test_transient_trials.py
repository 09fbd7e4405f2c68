"""No trial of a sweep is lost silently: a trial whose run failed for a transient cause (its Ray Train restarts
spent on errors that pass) is retried by Tune and completes, or re-run by ``--resume``; a trial with a
permanent error is listed with its error and cause (trial table, stderr, exit status 3) while the sweep still
names a winner; a seed's permanent failure stops its sibling seed at once. Faults are injected into one seed
of one trial (``INFLORA_RAY_FAULT`` with ``run=`` / ``seed=``, ``mode=transient|fatal``, ``times=``).

Each sweep is the tiny ViT on the digits quickstart, 2 tasks, FIFO (no pruning), one worker per run, ranked
on the test set (``data.val_fraction=0``: no final run of the winner after the search)."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from helpers import tiny_overrides
from inflora_ray.ray_tune.trial import error_cause, trial_error


TASKS = 2
HOLD = 150  # seconds the sibling seed is held unless stopped


def _space(tmp_path: Path, values: list[float]) -> str:
    path = tmp_path / "space.yaml"
    path.write_text("metric: average_incremental_accuracy\nmode: max\n"
                    f"params:\n  train.lr: {{grid: {values}}}\n")
    return str(path)


def _tune(tmp_path: Path, values: list[float], *extra: str, overrides: tuple = ()) -> list[str]:
    """The ``python -m inflora_ray.tune`` arguments of a grid sweep over ``train.lr`` (one trial per value,
    trial ``_0000k`` runs the k-th value), named ``sw``."""
    return ["--config", "quickstart", "--space", _space(tmp_path, values), "--search", "grid",
            "--scheduler", "fifo", "--name", "sw", "--storage-path", str(tmp_path / "runs"),
            *extra, *tiny_overrides(**{"data.num_tasks": TASKS, "tracking.enabled": "false", "data.val_fraction": 0}),
            *overrides]


def _main(args: list[str], capsys) -> tuple[int, str]:
    """The CLI's exit status and what it printed on stderr (``inflora_ray.tune.main``, in this process)."""
    from inflora_ray.tune import main

    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def _table(tmp_path: Path) -> dict[str, dict]:
    with open(tmp_path / "runs" / "sw" / "trials.csv") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def _outcomes(tmp_path: Path) -> dict[str, dict]:
    return json.loads((tmp_path / "runs" / "sw" / "trial_outcomes.json").read_text())


def _metrics(tmp_path: Path, run: str) -> dict:
    return json.loads((tmp_path / "runs" / "sw" / "runs" / run / "results" / "metrics.json").read_text())


def test_a_trial_error_names_its_cause_and_the_stopped_seeds():
    """The trial's one-line error (what the table, stderr and the resume read back) names the permanent
    failure first, its cause, and the seeds stopped with it."""
    from inflora_ray.ray_train.errors import NonRetryableError
    from inflora_ray.ray_train.launch import RunStopped

    err = trial_error("t_00001", {11: RunStopped("stopped by its caller"), 12: NonRetryableError("bad\nmore")})
    assert str(err) == ("trial t_00001 failed (permanent): seed 12: NonRetryableError: bad; seed(s) [11] stopped "
                        "with it (resumable)")
    assert err.cause == "permanent" and error_cause(f"x.TrialFailed: {err}") == "permanent"
    transient = trial_error("t", {11: RuntimeError("run 't' failed after 0 task(s): TrainingFailedError")})
    assert transient.cause == "transient" and error_cause(str(transient)) == "transient"
    assert error_cause("ray.exceptions.ActorDiedError: the actor died") == "transient"  # a lost trial process
    assert error_cause("TypeError: something the trial did not classify") == "permanent"


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_whose_run_failed_transiently_is_retried_and_completes(ray_session, tmp_path, capsys, monkeypatch):
    """The run's only restart (run.max_failures=1) is spent on a store that stays down (2 faults): the run
    fails for a transient cause, Tune retries the trial (--trial-retries 1), the run resumes and completes,
    and the sweep names it the winner and exits 0; its outcome keeps the retry."""
    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,step=1,mode=transient,times=2")
    code, err = _main(_tune(tmp_path, [0.002], "--trial-retries", "1", overrides=("run.max_failures=1",)), capsys)
    assert code == 0, err
    (tid, row), = _table(tmp_path).items()
    assert (row["status"], row["tasks_done"], row["cause"], row["error"]) == ("completed", str(TASKS), "", "")
    rec = _outcomes(tmp_path)[tid]
    assert rec["outcome"] == "completed" and rec["attempts"] == 2
    assert "failed (transient)" in rec["retried_after"][0] and "TransientStorageError" in rec["retried_after"][0]
    assert "retried after" in row["earlier"] and row["attempts"] == "2"
    assert f"trial {tid} failed (transient), retried" in err
    assert json.loads((tmp_path / "runs" / "sw" / "runs" / tid / ".fault_injected").read_text())["fired"] == 2
    assert _metrics(tmp_path, tid)["status"] == "finished"
    assert (tmp_path / "runs" / "sw" / "best_config.yaml").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_permanent_trial_error_is_listed_and_exits_3_beside_a_winner(ray_session, tmp_path, capsys, monkeypatch):
    """Trial _00001's run hits an error no restart can fix: the trial table lists it (status error, cause
    permanent, the error), stderr's summary names it, the CLI exits 3, and trial _00000 wins. Its Tune retry
    fails at once with the same error, starting nothing."""
    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,step=1,mode=fatal,run=_00001")
    code, err = _main(_tune(tmp_path, [0.002, 0.001], "--trial-retries", "1"), capsys)
    assert code == 3, err
    rows = _table(tmp_path)
    (ok,) = [r for r in rows.values() if r["status"] == "completed"]
    (bad,) = [r for r in rows.values() if r["status"] == "error"]
    assert ok["trial_id"].endswith("_00000") and bad["trial_id"].endswith("_00001")
    assert bad["cause"] == "permanent" and "NonRetryableError" in bad["error"] and "injected fault" in bad["error"]
    assert "failed (permanent)" in bad["error"]
    assert "1 of 2 trial(s) ended with an error" in err
    assert f"  {bad['trial_id']} (permanent): {bad['error']}" in err
    rec = _outcomes(tmp_path)[bad["trial_id"]]
    assert rec["attempts"] == 2 and rec["retried_after"] == [bad["error"]]  # the retry repeated the same error
    assert _metrics(tmp_path, bad["trial_id"])["status"] == "failed"
    best = (tmp_path / "runs" / "sw" / "best_config.yaml").read_text()
    assert "lr: 0.002" in best


@pytest.mark.ray
@pytest.mark.slow
def test_a_seeds_permanent_failure_stops_its_sibling_at_once(ray_session, mlflow_server, tmp_path, monkeypatch):
    """Seed 12 of the trial fails for good at its first steps; seed 11 is held at its first steps for two
    minutes (so it is still under way whichever seed starts first) and is stopped there: its run ends
    interrupted (resumable) with no task done, its MLflow run KILLED, and the trial errors with seed 12's
    error. Without the stop, seed 11 would go on after its hold and finish."""
    from mlflow import MlflowClient

    from inflora_ray.presets import load_config
    from inflora_ray.ray_tune.search_space import load_space
    from inflora_ray.ray_tune.sweep import SweepOptions, run_sweep

    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,step=1,mode=fatal,seed=12;task=0,step=1,mode=hold,seed=11,"
                                            f"seconds={HOLD}")
    cfg = load_config("quickstart", tiny_overrides(**{
        # half a CPU per worker: both seeds' workers fit beside the trial's 0.01 CPU on the tests' 2-CPU Ray
        "data.num_tasks": TASKS, "data.val_fraction": 0, "run.cpus_per_worker": 0.5, "experiment.seed": 11,
        "experiment.name": "transient-sibling",
        "run.storage_path": str(tmp_path / "runs"), "tracking.uri": mlflow_server}))
    space = load_space(_space(tmp_path, [0.002]), cfg)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no trial completed every task .*1 error"):
        run_sweep(cfg, space, SweepOptions(name="sw", search="grid", scheduler="fifo", seeds_per_trial=2,
                                           trial_retries=0))
    took = time.monotonic() - start
    (tid,) = _outcomes(tmp_path)
    rec = _outcomes(tmp_path)[tid]
    assert rec["cause"] == "permanent" and f"trial {tid} failed (permanent): seed 12: NonRetryableError" in rec["error"]
    assert "seed(s) [11] stopped with it" in rec["error"]
    failed, sibling = _metrics(tmp_path, f"{tid}-seed12"), _metrics(tmp_path, f"{tid}-seed11")
    assert failed["status"] == "failed"
    assert sibling["status"] == "interrupted" and sibling["complete"] == 0, sibling
    # Stopped while under way: in its hold, or (when seed 12 failed first) before it got there; either way
    # it did not wait out its hold and go on to finish.
    assert took < HOLD, took
    assert not (tmp_path / "runs" / "sw" / "runs" / f"{tid}-seed11" / ".stop_requested").exists()
    client = MlflowClient(mlflow_server)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("transient-sibling").experiment_id], "tags.sweep_id = 'sw'")}
    assert runs[f"{tid}-seed12"].info.status == "FAILED"
    assert runs[f"{tid}-seed11"].info.status == "KILLED"
    assert runs[f"{tid}-seed11"].data.tags["end_reason"].startswith("stopped with its trial: ")
    print(f"sweep with a stopped sibling took {took:.0f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_resume_reruns_a_transiently_errored_trial(ray_session, tmp_path, capsys, monkeypatch):
    """Without trial retries, trial _00000 errors for a transient cause (its run's only restart spent) while
    _00001 completes: exit 3, and the summary says that --resume runs it again. ``--resume`` runs _00000
    again: its run resumes and completes, the sweep exits 0, and its outcome keeps the earlier error."""
    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,step=1,mode=transient,times=2,run=_00000")
    args = _tune(tmp_path, [0.002, 0.001], "--trial-retries", "0", overrides=("run.max_failures=1",))
    code, err = _main(args, capsys)
    assert code == 3, err
    first = _table(tmp_path)
    assert sorted((r["trial_id"][-5:], r["status"], r["cause"]) for r in first.values()) == [
        ("00000", "error", "transient"), ("00001", "completed", "")]
    assert "1 of them failed for a transient cause: the same command with --name and --resume runs them again" in err
    code, err = _main(args + ["--resume"], capsys)
    assert code == 0, err
    rows = _table(tmp_path)
    (t0,) = [r for r in rows.values() if r["trial_id"].endswith("_00000")]
    assert (t0["status"], t0["tasks_done"], t0["attempts"], t0["cause"]) == ("completed", str(TASKS), "2", "")
    assert "error after 0 task(s) (transient)" in t0["earlier"] and "TransientStorageError" in t0["earlier"]
    rec = _outcomes(tmp_path)[t0["trial_id"]]
    assert rec["earlier"][0]["outcome"] == "error" and rec["earlier"][0]["cause"] == "transient"
    assert _metrics(tmp_path, t0["trial_id"])["status"] == "finished"
    (t1,) = [r for r in rows.values() if r["trial_id"].endswith("_00001")]
    assert (t1["status"], t1["attempts"], t1["earlier"]) == ("completed", "1", "")  # re-used, not run again


def test_a_resumed_trial_with_a_permanent_error_fails_again_with_the_same_error(tmp_path):
    """A --resume starts every errored trial again; one recorded with a permanent error fails at once with
    the error it was recorded with (so its row does not change), one with a transient error runs."""
    from inflora_ray.ray_tune.trial import recorded_permanent_error

    path = tmp_path / "trial_outcomes.json"
    path.write_text(json.dumps({
        "a_00000": {"outcome": "error", "cause": "permanent", "error":
                    "inflora_ray.ray_tune.trial.TrialFailed: trial a_00000 failed (permanent): seed 0: boom"},
        "a_00001": {"outcome": "error", "cause": "transient", "error": "trial a_00001 failed (transient): x"},
        "a_00002": {"outcome": "completed"},
        "a_00003": {"outcome": "error", "error": "TypeError: not classified"}}))
    assert recorded_permanent_error(str(path), "a_00000") == "trial a_00000 failed (permanent): seed 0: boom"
    assert recorded_permanent_error(str(path), "a_00001") is None
    assert recorded_permanent_error(str(path), "a_00002") is None
    assert recorded_permanent_error(str(path), "a_00003") == ("trial a_00003 failed (permanent): TypeError: not "
                                                              "classified")
    assert recorded_permanent_error(str(tmp_path / "none.json"), "a_00000") is None


def test_a_fault_targets_one_seed_of_one_trial_and_fires_a_set_number_of_times(tmp_path, monkeypatch):
    """``INFLORA_RAY_FAULT``'s ``seed=`` / ``run=`` hand the fault to the matching runs only (the first of
    several ``;``-separated faults that matches), ``times=`` fires it on that many attempts of a run, and
    ``mode=transient`` / ``mode=fatal`` raise an error Ray Train retries / one recorded as fatal."""
    from inflora_ray.ray_train.errors import NonRetryableError
    from inflora_ray.ray_train.faults import FaultPlan
    from inflora_ray.ray_train.worker import FATAL_WHILE_TRAINING
    from inflora_ray.storage import TransientStorageError

    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,mode=fatal,seed=12,run=_00001;task=1,mode=transient,times=2")
    assert FaultPlan.for_run("ab_00001-seed12", 12) == "task=0,mode=fatal,seed=12,run=_00001"
    assert FaultPlan.for_run("ab_00000-seed12", 12) == FaultPlan.for_run("ab_00001-seed11", 11) == \
        "task=1,mode=transient,times=2"
    monkeypatch.setenv("INFLORA_RAY_FAULT", "task=0,seed=12")
    assert FaultPlan.for_run("ab_00001-seed11", 11) is None
    for bad in ("task=0,times=0", "task=0,seed=x", "task=0;task=0,mode=explode"):
        monkeypatch.setenv("INFLORA_RAY_FAULT", bad)
        with pytest.raises(ValueError, match="INFLORA_RAY_FAULT"):
            FaultPlan.from_env()

    marker = str(tmp_path / ".fault_injected")
    transient = FaultPlan.parse("task=1,step=2,mode=transient,times=2")
    transient.fire_if_due(marker, 1, 0, 1, 0)  # not the planned step: nothing
    for _ in range(2):
        with pytest.raises(TransientStorageError) as e:
            transient.fire_if_due(marker, 1, 0, 2, 0)
        assert not isinstance(e.value, FATAL_WHILE_TRAINING)  # left to Ray Train's restarts
    transient.fire_if_due(marker, 1, 0, 2, 0)  # spent: the third attempt goes on
    assert json.loads(Path(marker).read_text())["fired"] == 2
    with pytest.raises(NonRetryableError):
        FaultPlan.parse("task=0,mode=fatal").fire_if_due(str(tmp_path / "other"), 0, 0, 0, 0)
