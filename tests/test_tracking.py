"""MLflow tracking against a real `mlflow server` on loopback (sqlite backend, local artifact root; the session's
shared one), the local default store, and a server that is down at start or dies mid-run. No mocks."""
from __future__ import annotations

import csv
import json
import os
import time

import pytest

from helpers import free_port, start_mlflow_server, stop_server, tiny_overrides
from inflora_ray.presets import load_config
from inflora_ray.ray_train.faults import ENV_VAR
from inflora_ray.ray_train.launch import RunContext, RunInterrupted, RunOptions, run_experiment
from inflora_ray.preflight import PreflightError
from inflora_ray.ray_train.seeds import run_seeds

pytestmark = pytest.mark.ray


def _cfg(tmp_path, **extra):
    o = {"data.num_tasks": 2, "run.storage_path": str(tmp_path), "experiment.name": "tracking-test", **extra}
    return load_config("quickstart", tiny_overrides(**o))


def test_seeds_log_parent_children_params_metrics_and_artifacts(ray_session, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path, **{"tracking.uri": mlflow_server, "tracking.sweep_id": "sw1"})
    out = run_seeds(cfg, [0, 1], RunOptions(name="multi"))
    client = MlflowClient(mlflow_server)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["seed"] == "parent"
    finals, finals_task_mean = [], []
    for seed, res in out["runs"].items():
        run = client.get_run(res.mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["method"] == "inflora" and run.data.tags["benchmark"] == "digits"
        assert run.data.tags["seed"] == str(seed) and run.data.tags["sweep_id"] == "sw1"
        p = run.data.params
        assert p["method.rank"] == "4" and p["experiment.seed"] == str(seed) and p["num_workers"] == "1"
        assert json.loads(p["class_order"]) == list(range(10)) and "version.torch" in p and "git_commit" in p
        # one point per task, step = task index, values equal to what the run computed
        hist = client.get_metric_history(run.info.run_id, "pooled_accuracy")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [0, 1]
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(res.summary["pooled_accuracy"])
        assert len(client.get_metric_history(run.info.run_id, "accuracy_task_0")) == 2
        assert len(client.get_metric_history(run.info.run_id, "accuracy_task_1")) == 1
        mem = client.get_metric_history(run.info.run_id, "memory_dim_layer_00")
        assert len(mem) == 2 and all(m.value >= 1 for m in mem)
        assert run.data.metrics["final_accuracy"] == pytest.approx(res.summary["final_accuracy"])
        # both accuracy definitions, per task and at the end (pooled without a suffix)
        hist = sorted(client.get_metric_history(run.info.run_id, "task_mean_accuracy"), key=lambda m: m.step)
        assert [m.value for m in hist] == pytest.approx(res.summary["task_mean_accuracy"])
        assert [m.value for m in hist] == pytest.approx([sum(r) / len(r) for r in res.summary["accuracy_matrix"]])
        last = max(client.get_metric_history(run.info.run_id, "average_incremental_accuracy_task_mean"),
                   key=lambda m: m.step)
        assert last.step == 1 and last.value == pytest.approx(res.summary["average_incremental_accuracy_task_mean"])
        for mlflow_key, key in (("final_accuracy_task_mean", "final_accuracy_task_mean"),
                                ("final_average_incremental_accuracy", "average_incremental_accuracy"),
                                ("final_average_incremental_accuracy_task_mean",
                                 "average_incremental_accuracy_task_mean")):
            assert run.data.metrics[mlflow_key] == pytest.approx(res.summary[key])
        # artifacts, checked for content
        art = client.download_artifacts(run.info.run_id, "tasks/task_001", str(tmp_path / f"dl{seed}"))
        names = set(os.listdir(art))
        assert {"accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_vs_task.png", "memory_dims.json",
                "adapters.pt"} <= names
        rows = list(csv.reader(open(os.path.join(art, "accuracy_matrix.csv"))))
        assert [float(x) for x in rows[2][1:3]] == pytest.approx(res.summary["accuracy_matrix"][1], abs=1e-6)
        import torch
        adapters = torch.load(os.path.join(art, "adapters.pt"), weights_only=True)
        assert len(adapters) == 2 and adapters[0]["lora_B_k"].abs().sum() > 0  # one entry per block
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"tasks", "results", "checkpoint"} <= top
        ckpt = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert "checkpoint/state.pt" in ckpt
        finals.append(res.summary["final_accuracy"])
        finals_task_mean.append(res.summary["final_accuracy_task_mean"])
    import statistics
    assert parent.data.metrics["final_accuracy_mean"] == pytest.approx(statistics.fmean(finals))
    assert parent.data.metrics["final_accuracy_std"] == pytest.approx(statistics.stdev(finals))
    assert parent.data.metrics["final_accuracy_task_mean_mean"] == pytest.approx(statistics.fmean(finals_task_mean))
    assert parent.data.metrics["final_accuracy_task_mean_std"] == pytest.approx(statistics.stdev(finals_task_mean))


def test_a_run_its_caller_stopped_is_saved_as_interrupted_and_left_to_the_caller_in_mlflow(
        ray_session, mlflow_server, tmp_path, monkeypatch):
    """A sweep's trial that Ray Tune stops loses its runs' controllers and workers. A run that fails after its
    caller asked it to stop is resumable (interrupted, not failed), and its MLflow run is ended by the sweep
    alone: the dying run writes no status or end_reason that could land after the sweep's."""
    from mlflow import MlflowClient

    monkeypatch.setenv(ENV_VAR, "task=0,mode=raise")  # stands in for the controller that Tune's stop kills
    cfg = _cfg(tmp_path, **{"tracking.uri": mlflow_server, "run.max_failures": 0})
    with pytest.raises(RunInterrupted, match=r"(?s)stopped by its caller \(.*--resume cut"):
        run_experiment(cfg, RunOptions(name="cut"), RunContext(quiet_table=True, stop_requested=lambda: True))
    assert json.load(open(tmp_path / "cut" / "results" / "metrics.json"))["status"] == "interrupted"
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("tracking-test").experiment_id
    [run] = client.search_runs([exp], "attributes.run_name = 'cut'")
    assert run.info.status == "RUNNING" and "end_reason" not in run.data.tags


def test_local_default_store_with_no_environment(tmp_path, monkeypatch):
    """No tracking URI anywhere: the driver's tracker (no Ray involved) logs to MLflow's default store, in the
    working directory."""
    from mlflow import MlflowClient

    from inflora_ray.rundir import RunDir
    from inflora_ray.preflight import start_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path / "runs", **{"data.num_tasks": 1})
    assert cfg.tracking.uri is None
    tracker = start_tracker(cfg)
    run_id = tracker.start("local", {"class_order": list(range(10))})
    (tmp_path / "runs" / "local" / "results").mkdir(parents=True)
    tracker.finish(RunDir(str(tmp_path / "runs" / "local")), {}, run_status="finished")
    import mlflow
    uri = mlflow.get_tracking_uri()
    assert str(tmp_path) in uri  # MLflow's default store lives in the working directory
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["method"] == "inflora"


def test_the_runs_page_link_opens_the_experiments_runs_table(mlflow_server, tmp_path, monkeypatch):
    """What the driver prints under its start line: the MLflow UI's table of the experiment's runs
    (``#/experiments/<id>/runs``: MLflow 3 opens an experiment's root at its GenAI overview); a local store has
    no UI address, so no link."""
    import urllib.request

    from mlflow import MlflowClient

    from inflora_ray.preflight import start_tracker

    tracker = start_tracker(_cfg(tmp_path, **{"tracking.uri": mlflow_server, "experiment.name": "runs-page"}))
    tracker.start("linked", {"class_order": list(range(10))})
    exp_id = MlflowClient(mlflow_server).get_experiment_by_name("runs-page").experiment_id
    assert tracker.runs_page() == f"{mlflow_server.rstrip('/')}/#/experiments/{exp_id}/runs"
    with urllib.request.urlopen(tracker.runs_page().split("#")[0], timeout=30) as page:  # the UI answers
        assert page.status == 200
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert start_tracker(_cfg(tmp_path / "runs", **{"experiment.name": "local"})).runs_page() is None


def test_server_down_at_start_fails_fast(tmp_path):
    t0 = time.time()
    with pytest.raises(PreflightError, match=r"MLflow tracking server at http://127.0.0.1:\d+ is unreachable"):
        run_experiment(_cfg(tmp_path, **{"tracking.uri": f"http://127.0.0.1:{free_port()}"}), RunOptions(name="down"))
    assert time.time() - t0 < 15
    assert not (tmp_path / "down").exists()


def test_server_killed_mid_run_does_not_stop_training(ray_session, tmp_path, capsys):
    proc, uri = start_mlflow_server(tmp_path / "dying")
    killed = []

    def kill_after_first_task(rec):
        if rec["result"]["task"] == 0 and not killed:
            stop_server(proc)
            killed.append(True)

    res = run_experiment(_cfg(tmp_path / "runs", **{"tracking.uri": uri, "data.num_tasks": 3}),
                         RunOptions(name="dying"), RunContext(on_task=kill_after_first_task, quiet_table=True))
    assert killed and len(res.tasks) == 3  # training completed
    assert res.tracking_lost is not None and "task 1" in res.tracking_lost
    err = capsys.readouterr().err
    assert "MLflow tracking at" in err and "was lost during the run" in err
    assert (tmp_path / "runs" / "dying" / "results" / "metrics.json").exists()
