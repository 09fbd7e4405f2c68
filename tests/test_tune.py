"""Real Ray Tune sweeps on 2 CPUs. The quickstart sweep: parent + child MLflow runs on a real server that all
end with their trial's true status, ASHA stops trials at task boundaries, a trial stopped after its first
task (whose early metric beats every finished trial's final one) does not win, the best-config YAML
reproduces the winner, resume re-uses trials. An Optuna sweep with 2 seeds per trial: the stopped trial is
PRUNED in the study, trials report the mean over their seeds, a trial whose process died resumes to the
result of an uninterrupted run."""
from __future__ import annotations

import csv

import pytest

from helpers import run_in_process
from inflora_ray.presets import load_config
from inflora_ray.distributed.search_space import load_space
from inflora_ray.distributed.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The quickstart (pre-trained backbone) cut to 3 tasks x 1 epoch; trials run one at a time, in grid order, so
# ASHA decides on each trial against the ones already recorded. lr 0.002 goes first and completes; lr LOW
# learns task 1 a little worse (stopped after it) but still above what 0.002 averages over 3 tasks.
LOW = 0.0005
OVERRIDES = ["data.num_tasks=3", "train.epochs=1", "experiment.name=tune-test"]
SPACE = f"""
metric: average_incremental_accuracy
mode: max
params:
  train.lr: {{grid: [0.002, {LOW}]}}
"""


@pytest.fixture(scope="module")
def sweep(ray_session, mlflow_server, tmp_path_factory):
    tmp, uri = tmp_path_factory.mktemp("tune"), mlflow_server
    cfg = load_config("quickstart", OVERRIDES + [f"run.storage_path={tmp / 'runs'}", f"tracking.uri={uri}"])
    (tmp / "space.yaml").write_text(SPACE)
    space = load_space(str(tmp / "space.yaml"), cfg)
    out = run_sweep(cfg, space, name="sw", max_concurrent=1, scheduler="asha", search="grid", grace_period=1,
                    reduction_factor=2)
    return {"out": out, "uri": uri, "cfg": cfg, "space": space, "tmp": tmp}


def test_sweep_logs_parent_and_child_runs(sweep):
    from mlflow import MlflowClient

    out, client = sweep["out"], MlflowClient(sweep["uri"])
    parent = client.get_run(out["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "parent"
    exp = parent.info.experiment_id
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    assert {c.data.params["train.lr"] for c in children} == {str(LOW), "0.002"}
    assert all(c.data.tags["sweep_id"] == "sw" for c in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "trials.parquet", "best_config.yaml"} <= arts
    table = client.download_artifacts(parent.info.run_id, "trials.csv", str(sweep["tmp"] / "dl"))
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 2 and {r["param.train.lr"] for r in rows} == {str(LOW), "0.002"}


def test_every_trial_run_ends_with_its_trials_status(sweep):
    from mlflow import MlflowClient

    out, client = sweep["out"], MlflowClient(sweep["uri"])
    exp = client.get_run(out["mlflow_parent_run_id"]).info.experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp], "tags.sweep_id = 'sw'")}
    want = {"completed": "FINISHED", "pruned": "KILLED", "error": "FAILED"}
    for row in out["rows"]:
        run = runs[row["trial_id"]]
        assert run.info.status == want[row["status"]], (row, run.info.status)
        if row["status"] == "pruned":
            assert run.data.tags["end_reason"] == "pruned"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def test_a_trial_stopped_early_with_a_higher_early_metric_does_not_win(sweep):
    out = sweep["out"]
    rows = {float(r["param.train.lr"]): r for r in out["rows"]}
    early = rows[LOW]
    finished = [r for r in out["rows"] if r["status"] == "completed"]
    # The case this test is about: the stopped trial's last (task 1) metric beats every finished trial's final.
    assert early["status"] == "pruned" and early["tasks_done"] == 1, early  # ASHA stopped it at task 1
    assert rows[0.002]["status"] == "completed" and rows[0.002]["tasks_done"] == 3
    assert early["average_incremental_accuracy"] > max(r["average_incremental_accuracy"] for r in finished)
    assert out["best_trial"] in {r["trial_id"] for r in finished}
    assert out["best_params"] == {"train.lr": 0.002}


def test_best_config_yaml_reproduces_the_best_trial(sweep, tmp_path):
    out = sweep["out"]
    best_yaml = out["sweep_dir"] + "/best_config.yaml"
    cfg = load_config(best_yaml, [f"run.storage_path={tmp_path}", "tracking.enabled=false"])
    assert cfg.train.lr == out["best_params"]["train.lr"]
    alone = run_in_process(cfg)  # bit for bit the 1-worker run `inflora-run --config best_config.yaml` makes
    metric = sweep["space"].metric
    assert alone[metric] == pytest.approx(out["best_metrics"][metric], abs=1e-12)


def test_resume_reuses_finished_trials(sweep, capsys):
    cfg, space = sweep["cfg"], sweep["space"]
    again = run_sweep(cfg, space, name="sw", max_concurrent=1, search="grid", resume=True)
    assert sorted(r["trial_id"] for r in again["rows"]) == sorted(r["trial_id"] for r in sweep["out"]["rows"])
    assert again["best_params"] == sweep["out"]["best_params"]


# Optuna on the quickstart cut to 2 tasks x 1 epoch, 2 seeds per trial, trials one at a time. With the sampler seeded by
# experiment.seed=11 the choices come as 0.002, then 5.0: the second trial is stopped at the first rung.
# The first trial's process is made to exit after task 0 (a lost node): Tune restarts it and it continues.
OPTUNA_SPACE = """
metric: average_incremental_accuracy
mode: max
params:
  train.lr: {choice: [0.002, 5.0]}
"""


@pytest.fixture(scope="module")
def optuna_sweep(ray_session, tmp_path_factory):
    pytest.importorskip("optuna")
    tmp = tmp_path_factory.mktemp("optuna")
    cfg = load_config("quickstart", ["data.num_tasks=2", "train.epochs=1", "experiment.seed=11",
                                     f"run.storage_path={tmp / 'runs'}", "tracking.enabled=false"])
    (tmp / "space.yaml").write_text(OPTUNA_SPACE)
    space = load_space(str(tmp / "space.yaml"), cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFLORA_RAY_TRIAL_FAULT", "task=0")
        out = run_sweep(cfg, space, name="opt", num_samples=2, max_concurrent=1, search="optuna",
                        scheduler="asha", grace_period=1, reduction_factor=2, seeds_per_trial=2, trial_retries=1)
    return {"out": out, "cfg": cfg, "tmp": tmp}


def test_optuna_study_records_a_stopped_trial_as_pruned(optuna_sweep):
    from optuna.trial import TrialState

    out = optuna_sweep["out"]
    rows = out["rows"]
    pruned = [r for r in rows if r["status"] == "pruned"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert pruned and completed, f"the sweep was meant to complete one trial and stop one: {rows}"
    trials = out["optuna_study"].get_trials()
    assert sum(t.state == TrialState.PRUNED for t in trials) == len(pruned)
    done = sorted(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert done == pytest.approx(sorted(r["average_incremental_accuracy"] for r in completed))


def test_a_trial_reports_the_mean_over_its_seeds(optuna_sweep):
    import json
    import statistics

    out = optuna_sweep["out"]
    best = next(r for r in out["rows"] if r["trial_id"] == out["best_trial"])
    runs_root = f"{out['sweep_dir']}/runs"
    per_seed = [json.load(open(f"{runs_root}/{best['trial_id']}-seed{s}/results/metrics.json")) for s in (11, 12)]
    assert all(m["status"] == "finished" and m["complete"] == 2 for m in per_seed)
    aia = [m["average_incremental_accuracy"] for m in per_seed]
    assert aia[0] != aia[1]  # two seeds, two runs
    assert best["seeds"] == 2
    assert best["average_incremental_accuracy"] == pytest.approx(statistics.fmean(aia), abs=1e-12)
    assert best["average_incremental_accuracy_std"] == pytest.approx(statistics.stdev(aia), abs=1e-12)


def test_a_trial_whose_process_died_resumed_to_the_result_of_an_uninterrupted_run(optuna_sweep):
    import json

    out, cfg = optuna_sweep["out"], optuna_sweep["cfg"]
    assert (optuna_sweep["tmp"] / "runs" / "opt" / "runs" / "trial.fault").exists()  # a trial's process did exit
    first = next(r for r in out["rows"] if r["status"] == "completed")
    assert first["param.train.lr"] == 0.002
    resumed = json.load(open(f"{out['sweep_dir']}/runs/{first['trial_id']}-seed11/results/metrics.json"))
    alone = run_in_process(cfg.with_values({"train.lr": 0.002}))  # the uninterrupted run
    assert resumed["status"] == "finished"
    assert resumed["accuracy_matrix"] == alone["accuracy_matrix"]
