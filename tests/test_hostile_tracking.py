"""Hostile inputs to MLflow tracking, table-driven (input -> expected message or behaviour): credentials in
the tracking URI never reach a param, a tag, ``tracking.json``, a log line or the console; unusable stores
(missing database driver, MLflow 3's file store, a dead server, a redacted URI) fail at start with a message
that says what to fix; an interrupted run ends KILLED; a resumed run logs each metric once per step.

Real stores only: a local sqlite store, and a real ``mlflow server`` on loopback (no Ray needed)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import pytest

from helpers import free_port, results_dir, start_mlflow_server, stop_server, task_record, tiny_overrides
from inflora_ray.preflight import PreflightError, start_tracker
from inflora_ray.presets import load_config
from inflora_ray.rundir import RunDir
from inflora_ray.tracking import Tracker, is_redacted, redact_config, redact_text, redact_uri

SECRET = "S3cret-Pw-771"  # appears nowhere but in the URIs under test
TOKEN = "Tok-9f8e7d"
EXPERIMENT = "hostile-tracking"


# ---------------------------------------------------------------------------------------------- helpers
def _with_password(uri: str, user: str = "alice", password: str = SECRET) -> str:
    return uri.replace("://", f"://{user}:{password}@", 1)


def _cfg(tmp_path, uri: str, **extra):
    o = {"tracking.uri": uri, "experiment.name": EXPERIMENT, "run.storage_path": str(tmp_path), **extra}
    return load_config("quickstart", tiny_overrides(**o))




_RECORD = {"class_order": list(range(10)), "versions": {"mlflow": "3"}}


# ---------------------------------------------------------------------------------------------- redaction
@pytest.mark.parametrize("uri, shown, redacted", [
    (f"https://alice:{SECRET}@mlflow.example.org:5000", "https://alice:***@mlflow.example.org:5000", False),
    (f"https://mlflow.example.org/?access_token={TOKEN}&x=1", "https://mlflow.example.org/?access_token=***&x=1",
     False),
    (f"postgresql://mlflow:{SECRET}@db:5432/mlflow?sslmode=require&password={TOKEN}",
     "postgresql://mlflow:***@db:5432/mlflow?sslmode=require&password=***", False),
    (f"s3://bucket/key?X-Amz-Signature={TOKEN}", "s3://bucket/key?X-Amz-Signature=***", False),
    (f"http://alice:p@ss{SECRET}@host/x", "http://alice:***@host/x", False),  # '@' inside the password
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db", False),
    ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", False),
    ("https://alice@host", "https://alice@host", False),  # a user name alone is no secret
    ("./mlruns", "./mlruns", False),
    ("https://alice:***@host", "https://alice:***@host", True),
    ("https://host/?token=***", "https://host/?token=***", True),
    ("http://[::1", "***", False),  # unparseable: nothing of it is shown
])
def test_redact_uri(uri, shown, redacted):
    assert redact_uri(uri) == shown
    assert is_redacted(uri) is redacted
    assert SECRET not in redact_uri(uri) and TOKEN not in redact_uri(uri)


def test_redact_text_finds_urls_and_the_bare_secret():
    uri = _with_password("http://127.0.0.1:1")
    text = f"API request to {uri}/api/2.0/x failed; password was {SECRET}; see s3://b/k?token={TOKEN}"
    out = redact_text(text, uri)
    assert SECRET not in out and TOKEN not in out and "http://alice:***@127.0.0.1:1/api/2.0/x" in out


def test_redact_uri_refuses_what_is_not_a_string():
    with pytest.raises(TypeError, match="expected a URI string, got NoneType"):
        redact_uri(None)


def test_redact_config_is_what_config_yaml_may_store(tmp_path):
    cfg = _cfg(tmp_path, _with_password("http://127.0.0.1:5000"))
    stored = redact_config(cfg)
    assert stored.tracking.uri == "http://alice:***@127.0.0.1:5000" and SECRET not in stored.to_yaml()
    plain = _cfg(tmp_path, "sqlite:///mlflow.db")
    assert redact_config(plain) is plain


# ---------------------------------------------------------------------------------------------- refused at start
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("uri, fragment, driver", [
    (f"postgresql://mlflow:{SECRET}@127.0.0.1:1/mlflow", "pip install 'psycopg[binary]'", "psycopg"),
    (f"postgresql+psycopg2://mlflow:{SECRET}@127.0.0.1:1/mlflow", "pip install psycopg2-binary", "psycopg2"),
    (f"mysql://mlflow:{SECRET}@127.0.0.1:1/mlflow", "pip install mysqlclient", "MySQLdb"),
    (f"mysql+pymysql://mlflow:{SECRET}@127.0.0.1:1/mlflow", "pip install PyMySQL", "pymysql"),
    ("file://{tmp}/mlruns", "MLFLOW_ALLOW_FILE_STORE=true", None),
    ("{tmp}/mlruns", "sqlite:///mlflow.db", None),
    (f"http://alice:{SECRET}@127.0.0.1:{{port}}", "is unreachable", None),
    (f"http://127.0.0.1:{{port}}/?token={TOKEN}", "is unreachable", None),
    ("https://alice:***@127.0.0.1:{port}", "has its credentials redacted", None),
    ("bogus://x", "opening the tracking store failed", None),
    ("http://[::1", "MLflow at ***", None),
])
def test_unusable_store_fails_at_start_with_what_to_fix(tmp_path, monkeypatch, uri, fragment, driver):
    if driver is not None and _installed(driver):
        pytest.skip(f"{driver} is installed here")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = uri.format(tmp=tmp_path, port=free_port())
    t0 = time.time()
    with pytest.raises(PreflightError) as err:
        start_tracker(_cfg(tmp_path / "runs", uri))
    message = str(err.value)
    assert fragment in message and SECRET not in message and TOKEN not in message
    if uri.startswith("http://127"):
        assert time.time() - t0 < 15  # a dead server fails at once, not after minutes of retries
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_file_store_is_used_when_the_user_allows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracker = start_tracker(_cfg(tmp_path, f"file://{tmp_path}/mlruns"))
    assert tracker.start("r", _RECORD)


def test_redacted_uri_gives_way_to_the_one_in_the_environment(tmp_path, monkeypatch, mlflow_server):
    """--resume of a run whose stored config holds ``user:***@``: MLFLOW_TRACKING_URI gives it back."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _with_password(mlflow_server))
    tracker = start_tracker(_cfg(tmp_path, redact_uri(_with_password(mlflow_server))))
    assert tracker.uri == redact_uri(_with_password(mlflow_server))
    assert tracker.start("r", _RECORD)


# ---------------------------------------------------------------------------------------------- never stored
def _capture_all_logs(caplog):
    """Capture every record, also of the ``inflora_ray`` logger (which may not propagate to the root)."""
    caplog.set_level(logging.DEBUG)
    logging.getLogger("inflora_ray").addHandler(caplog.handler)


def test_password_and_tokens_reach_no_param_tag_file_log_or_console(tmp_path, mlflow_server, caplog, capfd):
    _capture_all_logs(caplog)
    uri = _with_password(mlflow_server)
    cfg = _cfg(tmp_path, uri, **{"tracking.tags": f"{{source: 'https://git.example.org/x?private_token={TOKEN}'}}"})
    run = results_dir(tmp_path)
    tracker = start_tracker(cfg)
    run_id = tracker.start("r", _RECORD)
    tracker.save_state(run)
    tracker.log_task(task_record(0), run)
    tracker.finish(run, {}, run_status="finished")
    assert tracker.lost is None

    from mlflow import MlflowClient
    stored = MlflowClient(mlflow_server).get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["tracking.uri"] == redact_uri(uri)
    assert stored.data.tags["source"] == "https://git.example.org/x?private_token=***"
    state = (tmp_path / "r" / "results" / "tracking.json").read_text()
    assert json.loads(state)["uri"] == redact_uri(uri)
    out, err = capfd.readouterr()
    for where in [*stored.data.params.values(), *stored.data.tags.values(), state, caplog.text, out, err]:
        assert SECRET not in where and TOKEN not in where


def test_lost_server_message_and_log_line_hold_no_password(tmp_path, mlflow_server, caplog):
    """A server that dies mid-run: MLflow's error quotes the URL it called, password included."""
    _capture_all_logs(caplog)
    run = results_dir(tmp_path)
    live = start_tracker(_cfg(tmp_path, _with_password(mlflow_server)))
    live.start("r", _RECORD)
    dead = Tracker(_cfg(tmp_path, _with_password(f"http://127.0.0.1:{free_port()}")))
    dead.run_id = live.run_id  # the same run, through a server that is gone
    dead.log_task(task_record(0), run)
    assert dead.lost is not None and "logging task 0" in dead.lost
    assert SECRET not in dead.lost and SECRET not in caplog.text and "tracking_lost" in caplog.text


# ---------------------------------------------------------------------------------------------- run status
@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One local sqlite store for the module (creating a store runs MLflow's migrations: seconds), whose
    experiment keeps its artifacts next to it (not in ./mlruns of the working directory)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    return uri


def _sqlite_tracker(tmp_path, uri: str) -> Tracker:
    return start_tracker(_cfg(tmp_path, uri))


def _fake_checkpoint(run: RunDir) -> None:
    folder = Path(run.path, "checkpoint_task000")
    folder.mkdir()
    for name in ("state.pt", "meta.json"):
        (folder / name).write_text("x")


@pytest.mark.parametrize("run_status, status, checkpoint_logged", [
    ("interrupted", "KILLED", False), ("stopped", "KILLED", True), ("failed", "FAILED", True),
    ("finished", "FINISHED", True)])
def test_run_ends_with_the_status_given(tmp_path, sqlite_uri, run_status, status, checkpoint_logged):
    tracker, run = _sqlite_tracker(tmp_path, sqlite_uri), results_dir(tmp_path)
    _fake_checkpoint(run)
    run_id = tracker.start("r", _RECORD)
    tracker.finish(run, {}, run_status=run_status)
    ended = tracker.client.get_run(run_id)
    assert ended.info.status == status and ended.data.tags["run_status"] == run_status
    top = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert ("checkpoint" in top) is checkpoint_logged  # an interrupted run is resumed: no checkpoint upload


@pytest.mark.parametrize("kwargs, status", [({"status": "KILLED"}, "KILLED"), ({"ok": False}, "FAILED"),
                                            ({}, "FINISHED"), ({"ok": False, "status": "KILLED"}, "KILLED")])
def test_parent_run_ends_with_the_status_given(tmp_path, sqlite_uri, kwargs, status):
    tracker = _sqlite_tracker(tmp_path, sqlite_uri)
    run_id = tracker.create("parent", {"seed": "parent"}, {})
    tracker.finish_parent({"final_accuracy_mean": 0.5}, **kwargs)
    assert tracker.client.get_run(run_id).info.status == status


def test_a_trials_runs_are_found_by_name_among_the_parents_children(tmp_path, sqlite_uri):
    """What a sweep does as each trial ends: the store searches one trial's runs by name prefix (its seeds'
    runs too), never another trial's or another parent's; the quote of a hostile prefix cannot widen it."""
    from inflora_ray.ray_tune.hooks import end_trial_runs, register_tracker

    tracker = _sqlite_tracker(tmp_path, sqlite_uri)
    parent = tracker.create("sweep", {"sweep": "parent"}, {})
    other = _sqlite_tracker(tmp_path, sqlite_uri)
    other.create("other-sweep", {"sweep": "parent"}, {})
    ids = {n: tracker.client.create_run(tracker.experiment_id(), run_name=n,
                                        tags={"mlflow.parentRunId": parent}).info.run_id
           for n in ("t_00001", "t_00001-seed1", "t_00002", "t_000010")}
    stranger = other.client.create_run(other.experiment_id(), run_name="t_00001",
                                       tags={"mlflow.parentRunId": other.run_id}).info.run_id
    assert sorted(r.info.run_name for r in tracker.child_runs(name_prefix="t_00001")) == \
        ["t_00001", "t_00001-seed1", "t_000010"]  # the store's prefix match; exact names are picked after
    assert tracker.child_runs(name_prefix="t_00001' or '1'='1") == []
    register_tracker("s", tracker)
    try:
        assert end_trial_runs("s", {"t_00001": {"outcome": "pruned"}}) == 2
    finally:
        register_tracker("s", None)
    status = {n: tracker.client.get_run(i).info.status for n, i in ids.items()}
    assert status == {"t_00001": "KILLED", "t_00001-seed1": "KILLED", "t_00002": "RUNNING", "t_000010": "RUNNING"}
    assert tracker.client.get_run(stranger).info.status == "RUNNING"


@pytest.mark.parametrize("call, message", [
    (lambda t, run: t.finish(run, {}, run_status="CANCELLED"),
     "run_status must be one of finished, stopped, interrupted, failed"),
    (lambda t, run: t.finish(run, {}, run_status="FINISHED"), "run_status must be one of"),
    (lambda t, run: t.finish_parent({}, ok=False, status="FINISHED"), "a failed run cannot end as FINISHED"),
])
def test_bad_status_is_refused_before_anything_is_written(tmp_path, sqlite_uri, call, message):
    tracker, run = _sqlite_tracker(tmp_path, sqlite_uri), results_dir(tmp_path)
    run_id = tracker.start("r", _RECORD)
    with pytest.raises(ValueError, match=message):
        call(tracker, run)
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert tracker.client.list_artifacts(run_id) == [] and not os.path.exists(run.tracking)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("saved_tasks", [
    [0, 1],  # the driver died after task 1 was logged and saved (Ctrl-C, crash)
    [0],  # ... died after logging task 1's metrics but before saving tracking.json
])
def test_resumed_run_logs_each_metric_once_per_step(tmp_path, sqlite_uri, saved_tasks):
    run = results_dir(tmp_path)
    first = _sqlite_tracker(tmp_path, sqlite_uri)
    run_id = first.start("r", _RECORD)
    for task in (0, 1):
        first.log_task(task_record(task), run)
        assert Tracker.load_state(run)["logged_tasks"] == list(range(task + 1))  # saved at once
    if saved_tasks != [0, 1]:
        state = Tracker.load_state(run)
        (tmp_path / "r" / "results" / "tracking.json").write_text(json.dumps({**state, "logged_tasks": saved_tasks}))

    # a new driver process: a new Tracker reads tracking.json and reopens the run, as launch.py does
    second = _sqlite_tracker(tmp_path, sqlite_uri)
    previous = Tracker.load_state(run)
    second.start("r", _RECORD, resume_run_id=previous["run_id"])
    second.logged_tasks = set(previous["logged_tasks"])
    for task in (0, 1, 2):
        second.log_task(task_record(task), run)
    second.finish(run, {}, run_status="finished")

    client = second.client
    metrics = client.get_run(run_id).data.metrics
    assert "memory_dim_layer_01" in metrics and "accuracy_task_2" in metrics
    for key in metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == sorted(set(steps)), f"{key} logged twice at a step: {steps}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "pooled_accuracy")) == [0, 1, 2]
    tasks = {a.path for a in client.list_artifacts(run_id, "tasks")}
    assert tasks == {"tasks/task_000", "tasks/task_001", "tasks/task_002"}
    assert Tracker.load_state(run)["logged_tasks"] == [0, 1, 2]


def test_resume_of_a_run_the_store_does_not_hold_fails_at_start(tmp_path, sqlite_uri):
    tracker = _sqlite_tracker(tmp_path, sqlite_uri)
    with pytest.raises(Exception, match="reopening MLflow run 0123456789abcdef.*logged to this tracking URI"):
        tracker.start("r", _RECORD, resume_run_id="0123456789abcdef")
    assert tracker.run_id is None


# ---------------------------------------------------------------------------------------------- basic auth
@pytest.mark.skipif(not _installed("flask_wtf"), reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)")
def test_basic_auth_server(tmp_path, monkeypatch):
    """``mlflow server --app-name basic-auth``: credentials from the environment work, wrong or missing ones
    fail at start with what to set, and no password is stored."""
    admin = "Adm1n-" + TOKEN
    root = tmp_path / "auth"
    root.mkdir()
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/users.db\n"
                                   "admin_username = admin\n")
    proc, uri = start_mlflow_server(root, "--app-name", "basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"})
    try:
        from mlflow.server import get_app_client
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        get_app_client("basic-auth", tracking_uri=uri).create_user(username="alice", password=SECRET)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        for given in (uri, _with_password(uri, password="wrong-pw")):
            with pytest.raises(PreflightError, match=r"refused the credentials \(HTTP 401\).*MLFLOW_TRACKING_USERNAME"):
                start_tracker(_cfg(tmp_path, given))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        tracker = start_tracker(_cfg(tmp_path, uri))
        run_id = tracker.start("r", _RECORD)
        assert SECRET not in json.dumps(tracker.client.get_run(run_id).data.params)
    finally:
        stop_server(proc)


def test_reopening_a_run_remembers_how_it_had_ended(tmp_path, sqlite_uri):
    """What a failed resume of a finished sweep restores its parent run to (ray_tune/sweep.py)."""
    tracker = _sqlite_tracker(tmp_path, sqlite_uri)
    parent = tracker.create("sweep", tags={"sweep": "parent"}, params={})
    tracker.finish_parent({}, status="FINISHED")
    again = _sqlite_tracker(tmp_path, sqlite_uri)
    assert again.reopened_from is None
    again.reopen(parent)
    assert again.reopened_from == "FINISHED" and again.client.get_run(parent).info.status == "RUNNING"
    again.finish_parent({}, status=again.reopened_from)
    assert again.client.get_run(parent).info.status == "FINISHED"
