"""``python -m inflora_ray.report`` on real runs of the tiny quickstart: two methods x 3 seeds and one run
stopped after its first task, trained in this process (no Ray: the learner that a Ray Train worker runs),
written by the driver's own writers and logged by its Tracker to a real ``mlflow server`` on loopback. The
table must reproduce mean and sample std computed directly from each run's ``results/metrics.json``, from the
run folders and from MLflow alike, and must show the stopped run instead of averaging it in. No mocks."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import statistics
import time

import pytest
from helpers import free_port, tiny_overrides

from inflora_ray import storage
from inflora_ray.ray_train.worker import save_task_result
from inflora_ray.config import config_from_dict
from inflora_ray.results import read_metrics, read_stored_config, read_task_results, run_status, write_final_results
from inflora_ray.presets import load_config
from inflora_ray.report import main
from inflora_ray.rundir import RunDir
from inflora_ray.tracking import Tracker, start_parent
from inflora_ray.tracking.report import ComparedRun
from inflora_ray.tracking.report_table import build_table, to_markdown
from inflora_ray.training.learner import ContinualLearner

EXPERIMENT = "report-test"
METHODS = ("inflora", "seq-lora")
METRICS = ("final_accuracy", "final_accuracy_task_mean", "average_incremental_accuracy",
           "average_incremental_accuracy_task_mean", "forgetting")
HEADERS = ("A_T pooled", "A_T task-mean", "A_avg pooled", "A_avg task-mean", "F")  # one per metric, in order
TASK_MEAN_KEYS = ("task_mean_accuracy", "final_accuracy_task_mean", "average_incremental_accuracy_task_mean")


def _train(cfg, name: str, storage_path, stop_after_task: int | None = None) -> RunDir:
    """One run's folder as the driver writes it (``results/config.yaml``, ``task_NNN.json``, ``metrics.json``
    with ``status`` stopped when it stopped early by ``stop_after_task``), with the learner in this process
    instead of a Ray Train worker."""
    run = RunDir.of(str(storage_path), name)
    run.claim()
    storage.write_bytes(run.config, cfg.with_values({"run.name": name}).to_yaml().encode())
    learner = ContinualLearner(cfg)
    storage.write_json(run.record, {"class_order": learner.benchmark.class_order})
    learner.run(stop_after_task)
    for task in range(learner.next_task):
        save_task_result(run, learner, task)
    tasks, summ = read_task_results(run, learner.benchmark.num_tasks)
    write_final_results(run, tasks, summ, run_status(len(tasks), learner.benchmark.num_tasks))
    return run


def _log(cfg, run: RunDir, parent_run_id: str | None) -> None:
    """The run's MLflow run as the driver logs it, through the same :class:`Tracker`."""
    tracker = Tracker(cfg)
    tracker.start(run.name, storage.read_json(run.record), parent_run_id=parent_run_id)
    for task in run.finished_tasks():
        tracker.log_task(storage.read_json(run.task_result(task)), run)
    tracker.finish(run, read_task_results(run, cfg.data.num_tasks)[1], run_status=read_metrics(run)["status"])


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server):
    """Run folders under ``runs/`` and the same runs in MLflow: each method with seeds 0, 1, 2 under a parent
    run (as ``--seeds`` makes them), and ``inflora-stopped`` (seed 3), stopped after task 0 of 2."""
    root, uri = tmp_path_factory.mktemp("report"), mlflow_server
    base = {"data.num_tasks": 2, "experiment.name": EXPERIMENT, "tracking.log_checkpoint": "false"}
    runs = {}
    for method, seed in [(m, s) for m in METHODS for s in (0, 1, 2)] + [("inflora", 3)]:
        cfg = load_config("quickstart", tiny_overrides(**base, **{"method.name": method, "experiment.seed": seed}))
        name = f"{method}-seed{seed}" if seed < 3 else "inflora-stopped"
        runs[name] = cfg, _train(cfg, name, root / "runs", stop_after_task=0 if seed == 3 else None)
    for method in METHODS:
        first = runs[f"{method}-seed0"][0].with_values({"tracking.uri": uri})
        parent = start_parent(first, method, params={"seeds": "0,1,2"}, tags={"seed": "parent"})
        for seed in (0, 1, 2):
            cfg, run = runs[f"{method}-seed{seed}"]
            _log(cfg.with_values({"tracking.uri": uri}), run, parent.run_id)
        parent.finish_parent({})
    cfg, run = runs["inflora-stopped"]
    _log(cfg.with_values({"tracking.uri": uri}), run, None)
    return {"runs": root / "runs", "uri": uri, "root": root}


def _expected(runs_root) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, metric) -> (mean, sample std) in %, straight from the finished runs' metrics.json."""
    values: dict[tuple[str, str], list[float]] = {}
    for path in sorted(runs_root.glob("*/results/metrics.json")):
        data = json.loads(path.read_text())
        if path.parent.parent.name == "inflora-stopped":
            assert data["status"] == "stopped" and data["complete"] == 1 and data["incomplete"]  # 1 of 2 tasks
            continue
        method = path.parent.parent.name.rsplit("-seed", 1)[0]
        for metric in METRICS:
            values.setdefault((method, metric), []).append(100 * data[metric])
    assert all(len(v) == 3 for v in values.values()) and len(values) == 2 * len(METRICS)
    # the digits tasks have unequal test sets: the two definitions differ (the columns are not copies)
    assert values[("inflora", "final_accuracy")] != values[("inflora", "final_accuracy_task_mean")]
    return {k: (statistics.fmean(v), statistics.stdev(v)) for k, v in values.items()}


def _report(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_table(markdown: str, table_csv: str, expected: dict, stopped_status: str | None) -> None:
    """The table holds ``expected`` for both methods and, with a ``stopped_status``, the stopped run as left out
    (None: there is no stopped run)."""
    rows = list(csv.DictReader(io.StringIO(table_csv)))
    assert len(rows) == len(METHODS) * len(METRICS)
    assert markdown.splitlines()[0] == "| method.name | " + " | ".join(f"digits (2 tasks) {h}" for h in HEADERS) + \
        " | digits (2 tasks) n |"
    for row in rows:
        mean, std = expected[(row["method.name"], row["metric"])]
        assert float(row["mean_pct"]) == pytest.approx(mean, abs=1e-3)
        assert float(row["std_pct"]) == pytest.approx(std, abs=1e-3)
        assert (row["n"], row["seeds"], row["benchmark"], row["num_tasks"]) == ("3", "0 1 2", "digits", "2")
        assert row["left_out"] == ("1" if row["method.name"] == "inflora" and stopped_status else "0")
    for method in METHODS:
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:6] == [f"{expected[(method, m)][0]:.1f} +- {expected[(method, m)][1]:.1f}" for m in METRICS]
        assert cells[6] == ("3 (1 left out)" if method == "inflora" and stopped_status else "3")
    assert "pooled: correct / total over the test images of all seen tasks together" in markdown
    assert "task-mean: the mean over the seen tasks of each one's accuracy" in markdown
    if stopped_status is None:
        return
    left = markdown.split("**Not included**", 1)[1]
    assert f"| inflora-stopped | inflora | digits (2 tasks) | 3 | {stopped_status} | 1/2 |" in left
    assert "**Notes**" not in markdown  # same seeds in every row, no repeated seed, no differing setting


def test_table_from_run_folders_reproduces_metrics_json(world, capsys, tmp_path):
    code, out, err = _report(capsys, "--runs", str(world["runs"]), "--csv", str(tmp_path / "t.csv"),
                             "--plot", str(tmp_path / "t.png"))
    assert code == 0, err
    _check_table(out, (tmp_path / "t.csv").read_text(), _expected(world["runs"]), "stopped")
    assert "1 unfinished run(s) not included" in err
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one run folder, and a selection
    code, out, _ = _report(capsys, "--runs", str(world["runs"] / "seq-lora-seed1"), str(world["runs"]),
                           "--method", "seq-lora")
    assert code == 0 and "| seq-lora |" in out and "| inflora |" not in out
    assert "seed 1 appears 2 times (seq-lora-seed1, seq-lora-seed1)" in out


def test_table_from_mlflow_and_logged_back(world, capsys, tmp_path):
    from mlflow import MlflowClient

    uri = world["uri"]
    code, out, err = _report(capsys, "--experiment", EXPERIMENT, "--tracking-uri", uri, "--csv",
                             str(tmp_path / "t.csv"), "--log-to-mlflow", "cmp")
    assert code == 0, err
    _check_table(out, (tmp_path / "t.csv").read_text(), _expected(world["runs"]), "stopped")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    [parent] = client.search_runs([exp.experiment_id], "tags.report = 'parent'")
    assert parent.info.run_name == "cmp" and parent.info.status == "FINISHED"
    assert parent.data.metrics == {"runs_averaged": 6.0, "runs_left_out": 1.0}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"table.md", "table.csv",
                                                                           "accuracy_after_task.png"}
    logged = client.download_artifacts(parent.info.run_id, "table.md", str(tmp_path / "dl"))
    with open(logged) as f:
        assert f.read() == out
    # the report's own run, like the seeds' parent runs, never becomes a row; filters narrow the runs
    code, again, _ = _report(capsys, "--experiment", EXPERIMENT, "--tracking-uri", uri)
    assert code == 0 and again == out
    code, out, _ = _report(capsys, "--experiment", EXPERIMENT, "--tracking-uri", uri, "--filter",
                           "params.`method.name` = 'seq-lora'")
    assert code == 0 and "| seq-lora |" in out and "| inflora |" not in out


def _record(name: str, seed: int, value: float, **params) -> ComparedRun:
    return ComparedRun(name, name, {"experiment.seed": str(seed), "data.benchmark": "digits", "data.num_tasks": "2",
                                  "method.name": "inflora", "method.rank": "4", **params},
                     "finished", 2, {m: value for m in METRICS}, [value, value])


def test_repeated_seeds_differing_seed_sets_and_settings_are_flagged():
    runs = [_record("a", 0, 0.5), _record("b", 0, 0.7), _record("c", 1, 0.6, **{"method.rank": "16"}),
            _record("d", 0, 0.4, **{"method.name": "seq-lora"}),
            _record("e", 2, 0.5, **{"method.name": "seq-lora", "run.name": "x"}),
            ComparedRun("f", "f", {"experiment.seed": "1", "data.benchmark": "digits", "data.num_tasks": "2",
                                 "method.name": "seq-lora"}, "failed", 1)]
    md = to_markdown(build_table(runs))
    assert "| inflora |" + " 60.0 +- 10.0 |" * 5 + " 3 [note 1, note 2, note 3] |" in md
    assert "inflora, digits (2 tasks): seed 0 appears 2 times (a, b)" in md
    assert "differ in settings other than the group keys and the seed (method.rank: 16 (1 run), 4 (2 runs))" in md
    assert "the rows were averaged over different seeds (inflora: 0, 1; seq-lora: 0, 2)" in md
    assert "| seq-lora |" + " 45.0 +- 7.1 |" * 5 + " 2 (1 left out) [note 3] |" in md
    assert "| f | seq-lora | digits (2 tasks) | 1 | failed | 1/2 |" in md  # run.name differs: not a setting
    by_rank = to_markdown(build_table(runs, ("method.name", "method.rank")))
    rows = [line for line in by_rank.splitlines() if line.startswith("| inflora |")]
    assert rows[0].startswith("| inflora | 4 | 60.0 +- 14.1 |")  # ranks in numeric order
    assert rows[1] == "| inflora | 16 |" + " 60.0 |" * 5 + " 1 [note 2] |"  # one run: no std


def _strip_task_mean(results) -> None:
    """Make the run folder ``results`` look as it was written before the task-mean metrics existed."""
    data = json.loads((results / "metrics.json").read_text())
    for d in (data, *data["tasks"]):
        for key in TASK_MEAN_KEYS:
            d.pop(key, None)
    (results / "metrics.json").write_text(json.dumps(data))
    for path in results.glob("task_*.json"):
        rec = json.loads(path.read_text())
        for d in (rec["result"], rec["summary"]):
            for key in TASK_MEAN_KEYS:
                d.pop(key, None)
        path.write_text(json.dumps(rec))
    assert "task_mean" not in (results / "metrics.json").read_text()


def _by_hand(runs_root) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, metric) -> (mean, std) in % of the task-mean metrics, computed here from each metrics.json's
    accuracy matrix (the mean of a row is the task-mean accuracy after that task)."""
    values: dict[tuple[str, str], list[float]] = {}
    for path in sorted(runs_root.glob("*/results/metrics.json")):
        data = json.loads(path.read_text())
        method = path.parent.parent.name.rsplit("-seed", 1)[0]
        after = [statistics.fmean(row) for row in data["accuracy_matrix"]]
        values.setdefault((method, "final_accuracy_task_mean"), []).append(100 * after[-1])
        values.setdefault((method, "average_incremental_accuracy_task_mean"), []).append(100 * statistics.fmean(after))
    return {k: (statistics.fmean(v), statistics.stdev(v)) for k, v in values.items()}


def test_runs_stored_before_the_task_mean_metrics_report_both(world, capsys, tmp_path):
    """Run folders and MLflow runs written before the task-mean metrics existed: the report computes them
    (from the stored accuracy matrix; from the per-task accuracy histories) and shows both definitions."""
    from mlflow import MlflowClient

    store = tmp_path / "old"
    for method in METHODS:
        for seed in (0, 1, 2):
            shutil.copytree(world["runs"] / f"{method}-seed{seed}", store / f"{method}-seed{seed}")
            _strip_task_mean(store / f"{method}-seed{seed}" / "results")
    expected = _expected(world["runs"])
    by_hand = _by_hand(store)
    assert len(by_hand) == 4
    for key, (mean, std) in by_hand.items():
        assert expected[key] == pytest.approx((mean, std), abs=1e-9)
    code, out, err = _report(capsys, "--runs", str(store), "--csv", str(tmp_path / "old.csv"))
    assert code == 0, err
    _check_table(out, (tmp_path / "old.csv").read_text(), expected, None)
    # the same runs logged to MLflow as before: no task-mean metric at any step nor at the end
    uri, experiment = world["uri"], "report-old-test"
    for name in sorted(p.name for p in store.iterdir()):
        run = RunDir(str(store / name))
        cfg = config_from_dict(read_stored_config(run)).with_values({"tracking.uri": uri,
                                                                      "tracking.experiment": experiment})
        tracker = Tracker(cfg)
        tracker.start(name, storage.read_json(run.record))
        for task in run.finished_tasks():
            tracker.log_task(storage.read_json(run.task_result(task)), run)  # the stored (old) file as it is
        old_summary = {k: v for k, v in read_metrics(run).items() if k not in TASK_MEAN_KEYS}
        tracker.finish(run, old_summary)
        logged = MlflowClient(uri).get_run(tracker.run_id).data.metrics
        assert "final_accuracy" in logged and not any("task_mean" in k for k in logged), logged
    code, out, err = _report(capsys, "--experiment", experiment, "--tracking-uri", uri, "--csv",
                             str(tmp_path / "mlflow.csv"))
    assert code == 0, err
    _check_table(out, (tmp_path / "mlflow.csv").read_text(), expected, None)


@pytest.fixture
def damaged(world, tmp_path):
    """A copy of one finished run's results, to damage."""
    shutil.copytree(world["runs"] / "inflora-seed0" / "results", tmp_path / "store" / "run" / "results")
    return tmp_path / "store" / "run" / "results"


@pytest.mark.parametrize("args,fragment", [
    ([], "give the runs to report: --runs DIR"),
    (["--runs", "{tmp}/missing"], "no such folder"),
    (["--runs", "{tmp}"], "not a run folder (it has no results/config.yaml) and it holds no run folders"),
    (["--runs", "{store}", "--group-by", "method.nope"], "--group-by method.nope: no run has this setting"),
    (["--runs", "{store}", "--method", "nope"], "no runs match"),
    (["--runs", "{store}", "--filter", "tags.a = 'b'"], "--filter applies to --experiment"),
    (["--runs", "{store}", "--log-to-mlflow"], "--log-to-mlflow needs --experiment NAME"),
    (["--experiment", "x", "--tracking-uri", "http://127.0.0.1:{port}"],
     "MLflow tracking server at http://127.0.0.1:{port} is unreachable"),
    (["--experiment", "nope", "--tracking-uri", "{uri}"],
     ("--experiment 'nope': no such experiment at {uri}; it has 'Default', ", f"'{EXPERIMENT}'")),
    (["--experiment", EXPERIMENT, "--tracking-uri", "{uri}", "--filter", "tags.sweep_id ="], "MLflow refuses it"),
])
def test_bad_input_exits_2_with_what_to_fix(world, damaged, capsys, tmp_path, args, fragment):
    fill = {"tmp": tmp_path / "empty", "store": damaged.parent.parent, "uri": world["uri"], "port": free_port()}
    (tmp_path / "empty").mkdir()
    t0 = time.time()
    code, out, err = _report(capsys, *(a.format(**fill) for a in args))
    assert (code, out) == (2, ""), err
    for part in fragment if isinstance(fragment, tuple) else (fragment,):  # the server is shared: other
        assert part.format(**fill) in err, err                           # modules' experiments are listed too
    assert "Traceback" not in err, err
    assert time.time() - t0 < 20


@pytest.mark.parametrize("content,fragment", [
    (b"{\"status\": \"finished\", ", "metrics.json is not valid JSON"),
    (b"\x80\x04\x95pickle", "metrics.json is not valid JSON"),
    (b"[1, 2]", "metrics.json: expected a JSON object, got list"),
    (b"{\"status\": \"finished\", \"complete\": \"2\"}", "'complete' is '2', not a number of tasks"),
    (b"{\"status\": \"finished\", \"complete\": 2, \"pooled_accuracy\": [0.5]}", "'pooled_accuracy' must be a list"),
])
def test_damaged_metrics_json_is_named(damaged, capsys, content, fragment):
    (damaged / "metrics.json").write_bytes(content)
    code, _, err = _report(capsys, "--runs", str(damaged.parent.parent))
    assert code == 2 and fragment in err and str(damaged / "metrics.json") in err, err


class _Planted:
    """Unpickling this runs a command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_in_place_of_metrics_json_is_never_unpickled(damaged, capsys, tmp_path):
    (damaged / "metrics.json").write_bytes(pickle.dumps(_Planted(tmp_path / "ran")))
    code, _, err = _report(capsys, "--runs", str(damaged.parent.parent))
    assert code == 2 and "metrics.json is not valid JSON" in err, err
    assert not (tmp_path / "ran").exists()



def test_a_storage_folder_with_runs_a_sweep_and_strays_is_accounted_for(world, capsys, tmp_path):
    """Run folders are tabled, a sweep folder's trials too, and every other entry is named as skipped."""
    store = tmp_path / "store"
    for seed in (0, 1, 2):
        shutil.copytree(world["runs"] / f"inflora-seed{seed}", store / f"inflora-seed{seed}")
        shutil.copytree(world["runs"] / f"seq-lora-seed{seed}", store / "sw" / "runs" / f"t_0000{seed}")
    (store / "sw" / "sweep.json").write_text(json.dumps({"name": "sw"}))
    (store / "empty-sweep").mkdir()
    (store / "empty-sweep" / "sweep.json").write_text("{}")
    (store / "notes").mkdir()
    (store / "readme.txt").write_text("x")
    code, out, err = _report(capsys, "--runs", str(store))
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["inflora"].rstrip().endswith("| 3 |") and rows["seq-lora"].rstrip().endswith("| 3 |")
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped "))
    assert skipped == [f"skipped {store}/empty-sweep: a sweep folder with no trial run in it yet",
                       f"skipped {store}/notes: neither a run folder (no results/config.yaml) nor a sweep folder "
                       "(no sweep.json)",
                       f"skipped {store}/readme.txt: neither a run folder (no results/config.yaml) nor a sweep "
                       "folder (no sweep.json)"]
