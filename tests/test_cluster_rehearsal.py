"""The cluster rehearsal (``inflora_ray.tools.rehearsal``), end to end: a Ray head (0 CPUs) and two 1-CPU worker
nodes with token authentication, moto's S3 server with a bucket, an MLflow server (SQLite, artifacts in the
bucket), all on loopback. Everything reaches the cluster the way a cluster user does: ``python -m
inflora_ray.data prepare`` to ``s3://``, ``ray job submit`` of a sweep and a run reading shards from ``s3://``,
storing on ``s3://`` and tracking to the server, each run on 2 workers, one per node. The run loses a worker
node mid-task (replaced, as an autoscaler would), is stopped, resumed from ``s3://``, and ends with the
accuracy matrix of the sweep's uninterrupted run of the same config (each job costs a Ray Train start on the
nodes: the suite's time).

This module never calls ``ray.init``; it is named to run before the modules that use the session Ray (two Ray
clusters on 2 cores at once are not something to rehearse). Run it alone with
``pytest tests/test_cluster_rehearsal.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import remove_node, tiny_overrides, wait_job, wait_node_dead, worker_of
from inflora_ray import storage
from inflora_ray.data.shards import verify_shards
from inflora_ray.provenance import code_hash
from inflora_ray.rundir import RunDir, SweepDir
from inflora_ray.tools.rehearsal import Rehearsal, port_open
from test_data import write_imagenet_r

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Never uploaded with --working-dir (.gitignore already keeps most of them out; this is explicit).
EXCLUDES = [".venv", ".venv-ci", ".git", "runs", "mlruns", "mlflow.db", ".pytest_cache", "**/__pycache__"]
# The tiny ViT on a 6-class ImageNet-R-layout dataset in 3 tasks; 2 workers of 1 CPU, i.e. one per node; each
# decodes in one loader process, started by a fork server after the worker's S3 client (the preset's 4 cost
# each worker start about 7 s more on 2 cores; the sweep's trials decode in the worker itself).
SMALL = {"data.num_tasks": 3, "data.batch_size": 4, "run.use_gpu": "false"}  # the runs' and the sweep's
RUN = ["python", "-m", "inflora_ray.run", "--config", "imagenet-r-5",
       *tiny_overrides(**SMALL, **{"data.loader_workers": 1, "run.max_failures": 3}),
       "--num-workers", "2", "--cpus-per-worker", "1"]
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def rehearsal():
    bin_dir = Path(sys.executable).parent
    missing = [t for t in ("ray", "moto_server", "mlflow") if not (bin_dir / t).exists()]
    if missing:
        pytest.skip(f"{missing} not installed next to this Python (pip install -e '.[test]')")
    r = Rehearsal(workers=2)
    saved = {k: os.environ.get(k) for k in r.env()}
    os.environ.update({k: v for k, v in r.env().items() if k.startswith(("AWS_", "MLFLOW_S3"))})
    try:
        yield r
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ports = [p for s in [r.cluster.head, *r.cluster.workers.values(), *r.services] for p in s.ports]
        left = r.stop()
        assert not left, f"processes {left} outlived their parent and had to be killed"
        assert not [p for p in ports if port_open(p)], "a rehearsal port is still open after stopping"


def _data_cli(r: Rehearsal, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inflora_ray.data", *args], env=r.client_env(),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def shards(rehearsal, tmp_path_factory):
    """A generated ImageNet-R-layout dataset prepared into Parquet shards in the bucket."""
    root = write_imagenet_r(tmp_path_factory.mktemp("imr") / "imagenet-r")
    uri = rehearsal.uri("shards", "imagenet-r")
    p = _data_cli(rehearsal, "prepare", "imagenet-r", "--source", str(root), "--out", uri, "--num-tasks", "3",
                  "--rows-per-group", "4", "--threads", "2")
    assert p.returncode == 0, p.stderr
    return {"uri": uri, "summary": json.loads(p.stdout)}


def _submit(r: Rehearsal, sid: str, entry: list[str], env_vars: dict | None = None) -> str:
    poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}  # conftest.py
    r.cluster.submit(sid, entry, REPO, tuple(EXCLUDES),
                     {"MLFLOW_TRACKING_URI": r.tracking_uri, **poll, **(env_vars or {})})
    return sid


def _finish(r: Rehearsal, sid: str, timeout: float = JOB_TIMEOUT) -> str:
    status = wait_job(r.cluster, sid, timeout)
    logs = r.cluster.job_logs(sid)
    assert status == "SUCCEEDED", f"job {sid}: {status}\n{logs[-6000:]}"
    return logs


def _run_cmd(r: Rehearsal, shards: dict, name: str, *extra: str) -> list[str]:
    return [*RUN, f"data.shards={shards['uri']}", "--storage-path", r.uri("runs"), "--name", name, *extra]


def _matrix(r: Rehearsal, name: str) -> list:
    return storage.read_json(RunDir(r.uri("runs", name)).metrics)["accuracy_matrix"]


@pytest.fixture(scope="module")
def sweep(rehearsal, shards):
    """A 2-trial grid sweep over method.rank whose trials are 2-worker runs, side by side (0.45 CPU per worker:
    the four workers and the two trials' drivers fit the two 1-CPU nodes; one thread each, as with 1 CPU); its
    rank-4 trial is the uninterrupted reference of the node-removal run (which decodes in a loader process:
    the matrix does not depend on where samples are decoded).
    A job with a bad config is submitted alongside (it fails before asking for any CPU)."""
    bad = [*RUN[:5], *tiny_overrides(**{"method.rank": 0}), "--storage-path", rehearsal.uri("bad"), "--no-tracking"]
    # Without a working dir (the package from PYTHONPATH, as from an image): two jobs that share one
    # working-dir package while one of them ends can lose its files (Ray removes the package).
    rehearsal.cluster.submit("bad-config", bad, env_vars={"PYTHONPATH": str(REPO)})
    _submit(rehearsal, "python", ["python", "-c", "import sys, inflora_ray; print('prefix=' + sys.prefix); "
                                  "print('package=' + inflora_ray.__file__)"])
    space = rehearsal.root / "space.yaml"  # read by the job's driver, on this machine
    space.write_text("metric: average_incremental_accuracy\nmode: max\nparams:\n  method.rank: {grid: [2, 4]}\n")
    entry = ["python", "-m", "inflora_ray.tune", "--config", "imagenet-r-5",
             *tiny_overrides(**SMALL, **{"data.loader_workers": 0}),
             f"data.shards={shards['uri']}", "data.val_fraction=0", "run.cpus_per_worker=0.45", "--space", str(space),
             "--search", "grid",
             "--scheduler", "fifo", "--num-workers", "2", "--max-concurrent", "2",
             "--storage-path", rehearsal.uri("sweeps"), "--name", "rh-sweep"]
    sid = _submit(rehearsal, "sweep", entry)
    return {"logs": _finish(rehearsal, sid), "dir": SweepDir(rehearsal.uri("sweeps", "rh-sweep"))}


@pytest.fixture(scope="module")
def preempted(rehearsal, shards, sweep):
    """A 2-worker run that loses the node of rank 0 mid-task (a replacement node joins), stops after task 1 and
    is resumed with --resume from ``s3://``; the two jobs' records and logs."""
    cluster = rehearsal.cluster
    # Rank 0 waits at the first step of task 1 (after task 0's checkpoint) until its node is removed; the
    # run stops after task 1, to be resumed.
    sid = _submit(rehearsal, "preempted", _run_cmd(rehearsal, shards, "preempted", "--stop-after-task", "1"),
                  {"INFLORA_RAY_FAULT": "task=1,epoch=0,step=0,rank=0,mode=hold"})
    run = RunDir(rehearsal.uri("runs", "preempted"))
    deadline = time.time() + 180
    while not storage.exists(run.fault_marker):
        assert cluster.job(sid)["status"] in ("PENDING", "RUNNING"), cluster.job_logs(sid)[-4000:]
        assert time.time() < deadline, "rank 0 never reached task 1"
        time.sleep(0.5)
    where = storage.read_json(run.fault_marker)
    k = worker_of(cluster, where["node_id"])
    assert k in cluster.workers, f"rank 0 is on node {where['node_id']}, not a worker node"
    assert storage.exists(run.task_result(0)) and not storage.exists(run.task_result(1))
    remove_node(cluster, k)  # preempted: its raylet, the worker and every process of the node, at once
    replacement = cluster.add_node(1)  # what an autoscaler does next
    wait_node_dead(cluster, where["node_id"])
    logs = _finish(rehearsal, sid)
    stopped = {"task_1_done": storage.exists(run.task_result(1)), "task_2_done": storage.exists(run.task_result(2))}
    metrics = storage.read_json(run.metrics)
    stopped["status"], stopped["incomplete"] = metrics["status"], metrics["incomplete"]
    mlflow_run = _mlflow_run(rehearsal, "preempted")
    stopped["mlflow"] = (mlflow_run.info.status, mlflow_run.data.tags.get("run_status"),
                         mlflow_run.data.tags.get("end_reason", ""))
    entry = [*RUN, f"data.shards={shards['uri']}", "--storage-path", rehearsal.uri("runs"), "--resume", "preempted"]
    resumed = _submit(rehearsal, "resumed", entry)
    return {"removed": k, "replacement": replacement, "job": cluster.job(sid), "logs": logs, "stopped": stopped,
            "resumed_logs": _finish(rehearsal, resumed), "resumed_job": cluster.job(resumed)}


def _mlflow_run(r: Rehearsal, name: str):
    """The one MLflow run of the run ``name`` on the rehearsal's tracking server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=r.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.run_name = '{name}'")
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------------------------ cluster
def test_submit_without_the_token_is_refused(rehearsal):
    env = {k: v for k, v in rehearsal.client_env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(rehearsal.root)  # no ~/.ray/auth_token either
    r = rehearsal.cluster.cli("job", "list", f"--address={rehearsal.cluster.address}", env=env)
    assert r.returncode != 0 and "Unauthorized" in (r.stdout + r.stderr), r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ data
def test_prepare_writes_shards_to_the_bucket(rehearsal, shards):
    s = shards["summary"]
    assert s["out"] == shards["uri"] and s["num_classes"] == 6 and s["rows"]["train"] + s["rows"]["test"] == 30
    names = storage.list_names(shards["uri"])
    assert {"manifest.json", "train", "test"} <= set(names), names
    assert verify_shards(shards["uri"])["files"] >= 6  # every file read back through the S3 path


# ------------------------------------------------------------------------------------------------ runs
def _reference_matrix(sweep: dict) -> list:
    """The accuracy matrix of the sweep's trial whose config is the node-removal run's (method.rank 4)."""
    import csv
    import io

    table, _ = sweep["dir"].table_files
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(table).decode())))
    (trial,) = [row["trial_id"] for row in rows if int(float(row["param.method.rank"])) == 4]
    return storage.read_json(sweep["dir"].trial(trial).metrics)["accuracy_matrix"]


def test_node_removed_mid_task_replaced_then_resumed_from_s3_gives_the_same_matrix(rehearsal, sweep, preempted):
    cluster = rehearsal.cluster
    nodes = {worker_of(cluster, a["node_id"]) for a in cluster.actors(preempted["job"]["job_id"], "RayTrainWorker")}
    # The restarted group used the new node.
    assert preempted["replacement"] in nodes and preempted["removed"] in nodes, nodes
    stopped = preempted["stopped"]
    assert (stopped["task_1_done"], stopped["task_2_done"]) == (True, False)  # --stop-after-task 1
    # Stopped after task 1 of 3: never "finished", in metrics.json or MLflow, until the resume finished it.
    assert (stopped["status"], stopped["incomplete"]) == ("stopped", True)
    assert stopped["mlflow"][:2] == ("KILLED", "stopped") and "--stop-after-task" in stopped["mlflow"][2]
    resumed = _mlflow_run(rehearsal, "preempted")
    assert (resumed.info.status, resumed.data.tags["run_status"]) == ("FINISHED", "finished")
    assert "end_reason" not in resumed.data.tags
    assert _matrix(rehearsal, "preempted") == _reference_matrix(sweep), preempted["resumed_logs"][-4000:]


def test_two_worker_jobs_on_two_nodes_with_s3_storage_and_mlflow_server(rehearsal, preempted):
    from mlflow.tracking import MlflowClient

    logs = preempted["logs"] + preempted["resumed_logs"]
    for t in range(1, 4):
        assert re.search(rf"^\[task {t}/3\] classes ", logs, re.M), f"no progress line for task {t}:\n{logs[-6000:]}"
    assert "accuracy matrix (%)" in preempted["resumed_logs"] and "final accuracy A_T" in preempted["resumed_logs"]
    # The driver's console (no --verbose): its own lines and the workers' warnings, never their other events;
    # those are in the run's log objects in the bucket, one per worker process.
    assert re.search(r"^run preempted: inflora on imagenet-r, 3 tasks, 2 worker\(s\)", logs, re.M), logs[-3000:]
    assert re.search(r"level=warning .*event=fault_injected", preempted["logs"]), preempted["logs"][-4000:]
    assert "event=epoch_end" not in logs and "RayTrainWorker pid=" not in logs, logs[-4000:]
    log_dir = RunDir(rehearsal.uri("runs", "preempted")).log_location
    objects = storage.list_names(log_dir.rstrip("/"))
    assert len(objects) >= 3 and all(n.startswith("rank") for n in objects), objects
    events = "".join(storage.read_bytes(storage.join(log_dir, n)).decode() for n in objects)
    assert "event=task_end task=2" in events and "event=fault_injected" in events
    # The entrypoint ran this environment's python and the package uploaded with --working-dir.
    job = preempted["job"]
    assert job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")

    # The resumed run's two Ray Train workers ran on two different worker nodes.
    workers = rehearsal.cluster.actors(preempted["resumed_job"]["job_id"], "RayTrainWorker")
    assert len(workers) == 2 and len({a["node_id"] for a in workers}) == 2, workers

    # Results and checkpoints in the bucket.
    run = RunDir(rehearsal.uri("runs", "preempted"))
    metrics = storage.read_json(run.metrics)
    assert metrics["complete"] == 3 and storage.exists(run.accuracy_matrix)
    ray_files = storage.list_names(run.path)
    assert any(n.startswith("checkpoint") for n in ray_files), ray_files

    # Code identity: no git commit (the working dir has no .git), the hash of the code that was shipped.
    record = storage.read_json(run.record)
    code = record["code"]
    assert code["git_commit"] is None and code["code_sha256"] == code_hash()
    assert code["ray_working_dir"] == job["runtime_env"]["working_dir"] and code["package_version"]

    # MLflow: the run on the server (one run through the stop and the resume), its metrics, its artifacts in
    # the bucket.
    client = MlflowClient(tracking_uri=rehearsal.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.run_name = 'preempted'")
    assert len(runs) == 1
    mr = runs[0]
    assert mr.info.status == "FINISHED" and mr.info.artifact_uri.startswith("mlflow-artifacts:")
    assert mr.data.metrics["final_accuracy"] == pytest.approx(metrics["final_accuracy"])
    assert mr.data.tags["code.code_sha256"] == code_hash() and "code.git_commit" not in mr.data.tags
    assert mr.data.params["git_commit"] == "None"
    fs, root = storage.filesystem(rehearsal.uri("mlflow"))
    import pyarrow.fs as pafs
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
               if i.type == pafs.FileType.File and mr.info.run_id in i.path]
    assert objects, f"no artifact of run {mr.info.run_id} under {rehearsal.uri('mlflow')}"
    assert any(p.endswith("accuracy_matrix.csv") for p in objects), objects


def test_bad_config_job_fails_with_the_message_and_writes_nothing(rehearsal, sweep):
    sid = "bad-config"
    assert wait_job(rehearsal.cluster, sid, 120) == "FAILED"
    logs = rehearsal.cluster.job_logs(sid)
    assert "error: method.rank: must be >= 1" in logs, logs[-3000:]
    assert storage.list_names(rehearsal.uri("bad")) == []


def test_job_python_is_this_environment_and_the_package_comes_from_the_working_dir(rehearsal, sweep):
    logs = _finish(rehearsal, "python", timeout=60)
    assert f"prefix={sys.prefix}\n" in logs, logs
    package = re.search(r"^package=(.*)$", logs, re.M).group(1)
    assert "working_dir_files" in package and str(rehearsal.root) in package, package


# ------------------------------------------------------------------------------------------------ sweep
def test_two_trial_sweep_on_the_cluster(rehearsal, sweep):
    from mlflow.tracking import MlflowClient

    outcomes = storage.read_json(sweep["dir"].outcomes)
    assert len(outcomes) == 2 and all(o["outcome"] == "completed" for o in outcomes.values()), outcomes
    # The sweep's console: a line per trial start, per finished task of a trial, per trial end.
    for trial in outcomes:
        assert re.search(rf"^trial {trial} started: method.rank=[24]$", sweep["logs"], re.M), sweep["logs"][-3000:]
        assert re.search(rf"^\[trial {trial}\] task 3/3  average_incremental_accuracy ", sweep["logs"], re.M)
        assert re.search(rf"^trial {trial} completed after 3/3 tasks$", sweep["logs"], re.M)
    client = MlflowClient(tracking_uri=rehearsal.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("sweep_id")]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), sweep["logs"][-4000:]
    # The two trials' four Ray Train workers ran on the two worker nodes.
    trial_workers = rehearsal.cluster.actors(rehearsal.cluster.job("sweep")["job_id"], "RayTrainWorker")
    assert len(trial_workers) == 4 and len({a["node_id"] for a in trial_workers}) == 2, trial_workers
