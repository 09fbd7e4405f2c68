"""A real Ray Tune sweep of the quickstart on 2 CPUs: parent + child MLflow runs on a real server, ASHA stops a
clearly bad trial at a task boundary, the best-config YAML reproduces the best trial, resume re-uses trials."""
from __future__ import annotations

import csv

import pytest

from inflora_ray.presets import load_config
from inflora_ray.distributed.launch import run_experiment
from inflora_ray.distributed.search_space import load_space
from inflora_ray.distributed.sweep import run_sweep
from test_tracking import _start_server, _stop

pytestmark = pytest.mark.ray

# The quickstart (pre-trained backbone) cut to 3 tasks x 1 epoch; trials run one at a time so that ASHA's
# decision for the last trial is made against the two already recorded.
OVERRIDES = ["data.num_tasks=3", "train.epochs=1", "experiment.name=tune-test"]
SPACE = """
metric: average_incremental_accuracy
mode: max
params:
  train.lr: {grid: [0.0005, 0.002, 5.0]}
"""


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    proc, uri = _start_server(tmp, "srv")
    cfg = load_config("quickstart", OVERRIDES + [f"run.storage_path={tmp / 'runs'}", f"tracking.uri={uri}"])
    (tmp / "space.yaml").write_text(SPACE)
    space = load_space(str(tmp / "space.yaml"), cfg)
    out = run_sweep(cfg, space, name="sw", max_concurrent=1, scheduler="asha", search="grid", grace_period=1,
                    reduction_factor=2)
    yield {"out": out, "uri": uri, "cfg": cfg, "space": space, "tmp": tmp}
    _stop(proc)


def test_sweep_logs_parent_and_child_runs(sweep):
    from mlflow import MlflowClient

    out, client = sweep["out"], MlflowClient(sweep["uri"])
    parent = client.get_run(out["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "parent"
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    assert {c.data.params["train.lr"] for c in children} == {"0.0005", "0.002", "5.0"}
    assert all(c.data.tags["sweep_id"] == "sw" for c in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.parquet", "best_config.yaml"} <= arts
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(sweep["tmp"] / "dl"))
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 3 and {r["param.train.lr"] for r in rows} == {"0.0005", "0.002", "5.0"}


def test_asha_stops_the_bad_trial_before_the_last_task(sweep):
    rows = {float(r["param.train.lr"]): r for r in sweep["out"]["rows"]}
    bad = rows[5.0]
    assert bad["status"] == "stopped_early" and bad["tasks_done"] < 3, bad
    assert rows[0.0005]["tasks_done"] == 3 or rows[0.002]["tasks_done"] == 3
    assert bad["average_incremental_accuracy"] < max(r["average_incremental_accuracy"] for r in rows.values())


def test_best_config_yaml_reproduces_the_best_trial(sweep, tmp_path):
    out = sweep["out"]
    best_yaml = out["sweep_dir"] + "/best_config.yaml"
    cfg = load_config(best_yaml, [f"run.storage_path={tmp_path}", "tracking.enabled=false"])
    assert cfg.train.lr == out["best_params"]["train.lr"]
    alone = run_experiment(cfg, "alone", quiet_table=True)
    metric = sweep["space"].metric
    assert alone.summary[metric] == pytest.approx(out["best_metrics"][metric], abs=1e-12)


def test_resume_reuses_finished_trials(sweep, capsys):
    cfg, space = sweep["cfg"], sweep["space"]
    again = run_sweep(cfg, space, name="sw", max_concurrent=1, search="grid", resume=True)
    assert sorted(r["trial_id"] for r in again["rows"]) == sorted(r["trial_id"] for r in sweep["out"]["rows"])
    assert again["best_params"] == sweep["out"]["best_params"]
