"""MLflow outages that pass: each call of the tracker is retried with backoff (transient errors only), and
what still fails is kept as a backlog that is logged at the next opportunity (the next task, the run's end,
``--resume``), so the MLflow run ends holding every task's metrics and artifacts and the final metrics, as
without the outage. An outage longer than the run is reported, and ``--resume`` logs what is missing.

Real stores only: the session's ``mlflow server`` on loopback, reached through a proxy that resets every
connection while it is switched off (a server restarting, a load balancer dropping its connections)."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

import pytest
from helpers import ResettingProxy, results_dir, task_record, tiny_overrides

from inflora_ray.preflight import PreflightError, start_tracker
from inflora_ray.presets import load_config
from inflora_ray.results import RESULT
from inflora_ray.rundir import RunDir
from inflora_ray.storage import RETRY_ENV
from inflora_ray.tracking import Tracker
from inflora_ray.tracking.store import RETRY_WAIT_ENV, is_transient_tracking

EXPERIMENT = "transient-tracking"
_RECORD = {"class_order": list(range(10)), "versions": {"mlflow": "3"}}
TASK_FILES = {"accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_vs_task.png", "memory_dims.json"}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def proxy(mlflow_server):
    host, port = mlflow_server.split("://", 1)[1].rstrip("/").split(":")
    p = ResettingProxy((host, int(port)))
    yield p
    p.close()


@pytest.fixture
def fast_retries(monkeypatch):
    """Waits of 0.1-0.2 s doubling, at most 1 s in all per call (the default is about a minute)."""
    monkeypatch.setenv(RETRY_ENV["base_seconds"], "0.2")
    monkeypatch.setenv(RETRY_ENV["cap_seconds"], "0.4")
    monkeypatch.setenv(RETRY_WAIT_ENV, "1")


@contextmanager
def events(*names: str):
    """The (event, fields) of every ``names`` event that inflora_ray logs inside the block."""
    got: list[tuple[str, dict]] = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage() in names:
                got.append((record.getMessage(), dict(getattr(record, "_inflora_fields", {}))))

    logger, handler = logging.getLogger("inflora_ray"), Grab(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield got
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _cfg(tmp_path, uri: str, **extra):
    o = {"tracking.uri": uri, "experiment.name": EXPERIMENT, "run.storage_path": str(tmp_path), **extra}
    return load_config("quickstart", tiny_overrides(**o))




def _write_result(run: RunDir, task: int) -> dict:
    rec = task_record(task)
    with open(f"{run.results}/task_{task:03d}.json", "w") as f:
        json.dump(rec, f)
    return rec


def assert_holds_everything(client, run_id: str, tasks: int, summ: dict) -> None:
    """The MLflow run holds each task's metrics once (step = task) and artifacts, and the final metrics."""
    data = client.get_run(run_id).data
    for key in data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == sorted(set(steps)), f"{key} logged twice at a step: {steps}"
    hist = sorted(client.get_metric_history(run_id, "pooled_accuracy"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(tasks))
    assert [m.value for m in hist] == pytest.approx(summ["pooled_accuracy"])
    assert len(client.get_metric_history(run_id, "accuracy_task_0")) == tasks
    assert data.metrics["final_accuracy"] == pytest.approx(summ["final_accuracy"])
    assert {a.path for a in client.list_artifacts(run_id, "tasks")} == {f"tasks/task_{t:03d}" for t in range(tasks)}
    for t in range(tasks):
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, f"tasks/task_{t:03d}")}
        assert TASK_FILES <= names, (t, names)


# ---------------------------------------------------------------------------------------------- classifier
def _rest(code: str):
    from mlflow.exceptions import RestException
    return RestException({"error_code": code, "message": f"{code.lower()}: what the server said"})


def _client_error(text: str):
    from mlflow.exceptions import MlflowException
    return MlflowException(text)


URL = "http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch"
CASES = [
    # what MLflow's REST client raised (rest_utils.http_request / verify_rest_response), transient?
    (lambda: _client_error(f"API request to {URL} failed with exception HTTPConnectionPool(host='127.0.0.1', "
                           "port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch (Caused by "
                           "NewConnectionError('<urllib3.connection.HTTPConnection>: Failed to establish a new "
                           "connection: [Errno 111] Connection refused'))"), True),
    (lambda: _client_error(f"API request to {URL} failed with exception ('Connection aborted.', "
                           "ConnectionResetError(104, 'Connection reset by peer'))"), True),
    (lambda: _client_error(f"API request to {URL} failed with timeout exception HTTPConnectionPool(host="
                           "'127.0.0.1', port=5000): Read timed out. (read timeout=20)."), True),
    (lambda: _client_error(f"API request to {URL} failed with exception HTTPConnectionPool(host='127.0.0.1', "
                           "port=5000): Max retries exceeded with url: /x (Caused by ResponseError('too many 503 "
                           "error responses'))"), True),
    (lambda: _client_error("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 502 != "
                           "200. Response body: '<html>Bad Gateway</html>'"), True),
    (lambda: _client_error("API request to endpoint /api/2.0/mlflow/runs/log-batch failed with error code 429 != "
                           "200. Response body: 'slow down'"), True),
    (lambda: _rest("TEMPORARILY_UNAVAILABLE"), True),
    (lambda: _rest("REQUEST_LIMIT_EXCEEDED"), True),
    (lambda: _rest("INTERNAL_ERROR"), True),
    (lambda: ConnectionResetError(104, "Connection reset by peer"), True),
    # permanent: the same request will be refused again
    (lambda: _rest("INVALID_PARAMETER_VALUE"), False),
    (lambda: _rest("RESOURCE_DOES_NOT_EXIST"), False),
    (lambda: _rest("PERMISSION_DENIED"), False),
    (lambda: _client_error("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 401 != 200. "
                           "Response body: 'You are not authenticated.'"), False),
    (lambda: _client_error("API request to endpoint /x failed with error code 404 != 200. Response body: ''"), False),
    (lambda: ValueError("a bug"), False),
]


@pytest.mark.parametrize("make, transient", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_transient_tracking_classifier(make, transient):
    assert is_transient_tracking(make()) is transient


def test_transient_bad_wait_setting_fails_at_start(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv(RETRY_WAIT_ENV, "soon")
    with pytest.raises(PreflightError, match=f"{RETRY_WAIT_ENV}='soon': expected a finite number of seconds"):
        start_tracker(_cfg(tmp_path, mlflow_server))


# ---------------------------------------------------------------------------------------------- the tracker
def test_transient_hiccup_is_ridden_out_by_retries(tmp_path, proxy, monkeypatch):
    """A connection reset for 1.5 s while task 0 is logged: the retries (here up to 20 s) ride it out and
    nothing is deferred."""
    monkeypatch.setenv(RETRY_ENV["base_seconds"], "0.2")
    monkeypatch.setenv(RETRY_WAIT_ENV, "20")
    run = results_dir(tmp_path)
    tracker = start_tracker(_cfg(tmp_path, proxy.endpoint))
    run_id = tracker.start("r", _RECORD)
    with events("tracking_retry", "tracking_lost") as got:
        proxy.down_for(1.5)
        tracker.log_task(_write_result(run, 0), run)
    assert proxy.resets > 0
    assert [name for name, _ in got].count("tracking_retry") >= 1 and "tracking_lost" not in {n for n, _ in got}
    assert tracker.lost is None and tracker.backlog == [] and tracker.logged_tasks == {0}
    tracker.finish(run, task_record(0)["summary"], run_status="finished")
    from mlflow import MlflowClient
    assert_holds_everything(MlflowClient(proxy.endpoint), run_id, 1, task_record(0)["summary"])


def test_transient_outage_is_deferred_then_delivered_in_order(tmp_path, proxy, fast_retries, capfd):
    """The proxy is down while tasks 1 and 2 are logged: task 1 waits the retries out (1 s here) and is
    deferred, task 2 is tried once (the server is known down) and deferred too; ``tracking.json`` keeps the
    backlog. Task 3, the server back, logs 1, 2 and 3 in order, each once."""
    from mlflow import MlflowClient

    run = results_dir(tmp_path)
    tracker = start_tracker(_cfg(tmp_path, proxy.endpoint))
    run_id = tracker.start("r", _RECORD)
    tracker.save_state(run)
    tracker.log_task(_write_result(run, 0), run)
    proxy.down()
    with events("tracking_retry", "tracking_lost", "tracking_caught_up") as got:
        t0 = time.monotonic()
        tracker.log_task(_write_result(run, 1), run)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        tracker.log_task(_write_result(run, 2), run)
        second = time.monotonic() - t0
        assert tracker.backlog == [1, 2] and "logging task 1" in tracker.lost
        state = Tracker.load_state(run)
        assert state["logged_tasks"] == [0] and state["backlog"] == [1, 2]
        proxy.up()
        tracker.log_task(_write_result(run, 3), run)
    assert proxy.resets > 0
    assert 0.5 < first < 10 and second < 2  # bounded retries, then one attempt while the server is down
    names = [n for n, _ in got]
    assert "tracking_retry" in names and names.count("tracking_lost") == 2 and names[-1] == "tracking_caught_up"
    assert tracker.lost is None and tracker.backlog == [] and tracker.logged_tasks == {0, 1, 2, 3}
    assert Tracker.load_state(run)["backlog"] == [] and Tracker.load_state(run)["logged_tasks"] == [0, 1, 2, 3]
    tracker.finish(run, task_record(3)["summary"], run_status="finished")
    client = MlflowClient(proxy.endpoint)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_holds_everything(client, run_id, 4, task_record(3)["summary"])
    assert "is incomplete" not in capfd.readouterr().err


def test_transient_outage_past_the_end_is_reported_then_backfilled_by_resume(tmp_path, proxy, fast_retries, capfd):
    """The server is still down when the run ends: the end says what MLflow lacks and how to log it (an event
    and a line on stderr), and ``tracking.json`` keeps the backlog. ``--resume`` of the run, the server back
    (a new tracker reopening the run as the driver does), logs every missing task and the end, each once."""
    from mlflow import MlflowClient

    run = results_dir(tmp_path)
    tracker = start_tracker(_cfg(tmp_path, proxy.endpoint))
    run_id = tracker.start("r", _RECORD)
    tracker.save_state(run)
    tracker.log_task(_write_result(run, 0), run)
    proxy.down()
    tracker.log_task(_write_result(run, 1), run)
    _write_result(run, 2)  # done, but its logging never ran (a driver that stopped after it)
    summ = task_record(2)["summary"]
    with events("tracking_incomplete") as got:
        tracker.finish(run, summ, run_status="finished")
    err = capfd.readouterr().err
    assert [n for n, _ in got] == ["tracking_incomplete"]
    assert f"MLflow run {run_id} at {proxy.endpoint} is incomplete, the server kept failing (logging task 1: " in err
    assert ("not written: the metrics and artifacts of task(s) 1, 2; finishing the run (final metrics, results, "
            "status).") in err and f"write them with: python -m inflora_ray.run --resume r run.storage_path={tmp_path}\n" in err
    state = Tracker.load_state(run)
    assert state["logged_tasks"] == [0] and state["backlog"] == [1, 2]
    assert state["owed"] == ["logging task 1", "logging task 2", "finishing the run (final metrics, results, status)"]
    proxy.up()
    client = MlflowClient(proxy.endpoint)
    assert client.get_run(run_id).info.status == "RUNNING"

    resumed = start_tracker(_cfg(tmp_path, proxy.endpoint))
    previous = Tracker.load_state(run)
    resumed.start("r", _RECORD, resume_run_id=previous["run_id"])
    resumed.logged_tasks = set(previous["logged_tasks"])  # as ray_train/launch.py does
    resumed.finish(run, summ, run_status="finished")
    assert resumed.lost is None and Tracker.load_state(run)["backlog"] == []
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_holds_everything(client, run_id, 3, summ)


def test_transient_interrupted_run_does_not_wait_again_for_a_server_known_down(tmp_path, proxy, monkeypatch,
                                                                               capfd):
    """Ctrl-C while the server is down: the end is tried once, not for another minute; --resume logs it."""
    monkeypatch.setenv(RETRY_ENV["base_seconds"], "0.2")
    monkeypatch.setenv(RETRY_WAIT_ENV, "3")
    run = results_dir(tmp_path)
    tracker = start_tracker(_cfg(tmp_path, proxy.endpoint))
    tracker.start("r", _RECORD)
    tracker.log_task(_write_result(run, 0), run)
    proxy.down()
    tracker.log_task(_write_result(run, 1), run)  # waits its 3 s, then deferred
    t0 = time.monotonic()
    tracker.finish(run, task_record(1)["summary"], run_status="interrupted")
    assert time.monotonic() - t0 < 2
    assert Tracker.load_state(run)["backlog"] == [1] and "is incomplete" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.ray
@pytest.mark.slow
def test_transient_mlflow_outage_mid_run_loses_nothing(ray_session, tmp_path, proxy, fast_retries, capfd):
    """A real run of 3 tasks tracking through the proxy, which goes down once task 0 is logged and up again
    once task 1's logging has given up: the run trains on, and ends with an MLflow run that holds every
    task's metrics and artifacts and the final metrics, FINISHED, as without the outage."""
    from mlflow import MlflowClient

    from inflora_ray.ray_train.launch import RunContext, RunOptions, run_experiment

    seen, logged = [], {}

    def outage(rec):  # called by the driver just after it logged the task
        task = rec[RESULT]["task"]
        seen.append(task)
        logged[task] = json.loads((tmp_path / "outage" / "results" / "tracking.json").read_text())["logged_tasks"]
        if task == 0:
            proxy.down()
        elif task == 1:
            proxy.up()

    cfg = _cfg(tmp_path, proxy.endpoint, **{"data.num_tasks": 3})
    with events("tracking_lost", "tracking_caught_up") as got:
        res = run_experiment(cfg, RunOptions(name="outage"), RunContext(on_task=outage, quiet_table=True))
    assert seen == [0, 1, 2] and proxy.resets > 0 and len(res.tasks) == 3
    assert logged == {0: [0], 1: [0], 2: [0, 1, 2]}  # task 1 deferred, then logged with task 2, before the end
    assert [n for n, _ in got] == ["tracking_lost", "tracking_caught_up"]
    assert "logging task 1" in got[0][1]["error"]
    assert res.tracking_lost is None
    client = MlflowClient(proxy.endpoint)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["run_status"] == "finished"
    assert_holds_everything(client, res.mlflow_run_id, 3, res.summary)
    assert "adapters.pt" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(res.mlflow_run_id,
                                                                                       "tasks/task_001")}
    assert {"results", "checkpoint"} <= {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    state = json.loads((tmp_path / "outage" / "results" / "tracking.json").read_text())
    assert state["logged_tasks"] == [0, 1, 2] and state["backlog"] == [] and state["owed"] == []
    err = capfd.readouterr().err
    assert "is incomplete" not in err and "was lost during the run" not in err
