"""`ray job stop` on a real run: the job's supervisor sends the driver SIGTERM, waits the stop wait the cluster
definitions configure (``RAY_JOB_STOP_WAIT_TIME_S``), then sends SIGKILL. Within that wait the driver must save
what was done (``metrics.json`` marked interrupted), end its MLflow run and print how to resume.

The run is started and stopped as Ray's job supervisor does it (Ray 2.60, ``dashboard/modules/job/
job_supervisor.py``): the entrypoint under ``/bin/sh -c`` in a session of its own, joined to the running Ray,
then SIGTERM to the shell and every process below it and SIGKILL after the wait. (Not through the job API
itself: the job agent listens on a fixed port, which a second Ray on the same machine already holds.)
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from helpers import tiny_overrides
from inflora_ray.rundir import RunDir
from test_clusters import configured_stop_wait, stop_waits

pytestmark = pytest.mark.ray

STARTED_WITHIN_S = 240  # from the start to the held step of task 1, on 2 busy cores


def _stop_like_ray_job_stop(shell, wait: float) -> float:
    """What the job supervisor does on `ray job stop` (Ray 2.60, ``dashboard/modules/job/job_supervisor.py``
    lines 403-428): SIGTERM to the entrypoint's shell and every process below it, then SIGKILL to those still
    alive after ``wait`` seconds. Returns the seconds until all had exited (``wait`` or more: they were killed)."""
    import psutil

    procs = [psutil.Process(shell.pid), *psutil.Process(shell.pid).children(recursive=True)]
    start = time.monotonic()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=wait)
    for p in alive:
        p.kill()
    shell.wait(timeout=60)
    return time.monotonic() - start if not alive else max(wait, time.monotonic() - start)


def test_transient_ray_job_stop_saves_the_run_ends_mlflow_and_offers_resume(ray_session, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    waits = stop_waits()
    assert len(set(waits.values())) == 1, f"the cluster definitions disagree on RAY_JOB_STOP_WAIT_TIME_S: {waits}"
    wait = configured_stop_wait()
    assert wait > 0, "clusters/aws-gpu.yaml sets no RAY_JOB_STOP_WAIT_TIME_S: Ray's default is 3 s"

    name, runs = "stopped", tmp_path / "runs"
    argv = [sys.executable, "-m", "inflora_ray.run", "--config", "quickstart", "--name", name,
            "--storage-path", str(runs), "--tracking-uri", mlflow_server,
            *tiny_overrides(**{"data.num_tasks": 2, "experiment.name": "transient-stop"})]
    # As under `ray job submit`: the entrypoint runs under /bin/sh -c in a session of its own (job_supervisor.py
    # lines 184-185), joined to the running Ray; its worker holds at the first step of task 1 (after task 0's
    # results), where the stop comes.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "INFLORA_RAY_FAULT": "task=1,epoch=0,step=0,mode=hold"}
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        shell = subprocess.Popen(shlex.join(argv) + " && echo done", shell=True, start_new_session=True,
                                 cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        marker = RunDir(str(runs / name)).fault_marker
        deadline = time.time() + STARTED_WITHIN_S
        while time.time() < deadline and not os.path.exists(marker) and shell.poll() is None:
            time.sleep(0.5)
        assert os.path.exists(marker), "the run never reached task 1: " + log.read_text()[-3000:]
        took = _stop_like_ray_job_stop(shell, wait)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
    output = log.read_text()
    print(f"stop: the driver exited {took:.1f} s after SIGTERM (stop wait {wait} s)")
    assert took < wait, f"the driver was still running at SIGKILL, {wait} s after SIGTERM: {output[-3000:]}"

    # What was done is saved, marked interrupted.
    metrics = json.loads((runs / name / "results" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["incomplete"], metrics
    assert metrics["complete"] == 1 and len(metrics["accuracy_matrix"]) == 1, metrics
    # The MLflow run is ended, not left RUNNING.
    tracking = json.loads((runs / name / "results" / "tracking.json").read_text())
    assert MlflowClient(mlflow_server).get_run(tracking["run_id"]).info.status == "KILLED"
    # The job's output says what stopped it and how to continue.
    assert "interrupted (SIGTERM)" in output, output[-3000:]
    assert f"--resume {name}" in output, output[-3000:]


def test_transient_ray_job_stop_of_a_sweep_with_a_pending_trial_tables_every_trial_and_offers_resume(
        ray_session, mlflow_server, tmp_path):
    """SIGTERM to a sweep's driver while one trial runs and the other waits for its turn: Ray Tune stops, every
    trial it made is in the table as unfinished, the trials' runs and the parent run end KILLED, the driver
    exits 130 within the stop wait, and it prints the sweep's own --resume command (not Ray Tune's)."""
    import csv

    import psutil
    from mlflow import MlflowClient

    wait = configured_stop_wait()
    space = tmp_path / "space.yaml"
    space.write_text("metric: pooled_accuracy\nparams:\n  method.rank: {grid: [2, 4]}\n")
    argv = [sys.executable, "-m", "inflora_ray.tune", "--config", "quickstart", "--space", str(space),
            "--search", "grid", "--scheduler", "fifo", "--max-concurrent", "1", "--name", "sw",
            "--storage-path", str(tmp_path / "runs"), "--tracking-uri", mlflow_server,
            *tiny_overrides(**{"data.num_tasks": 3, "train.epochs": 30, "experiment.name": "transient-stop-sweep"})]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + STARTED_WITHIN_S
        for line in driver.stdout:  # until the first trial has finished its first task
            lines.append(line)
            if "] task 1/3" in line or time.time() > deadline:
                break
        assert any("] task 1/3" in ln for ln in lines), "".join(lines)[-3000:]
        procs = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        start = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=wait)
        took = time.monotonic() - start
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = "".join(lines) + out
    print(f"stop: the sweep's driver exited {took:.1f} s after SIGTERM (stop wait {wait} s)")
    assert driver.returncode == 130, output[-3000:]
    assert "--name sw --resume" in output and "Tuner.restore" not in output, output[-3000:]

    rows = list(csv.DictReader(open(tmp_path / "runs" / "sw" / "trials.csv")))
    # The running trial, and the waiting one if Tune had created it yet (a grid's later points are made lazily).
    assert "2" in {r["param.method.rank"] for r in rows} and len(rows) <= 2, rows
    assert {r["status"] for r in rows} == {"unfinished"}, rows
    sweep = json.loads((tmp_path / "runs" / "sw" / "sweep.json").read_text())
    client = MlflowClient(mlflow_server)
    parent = client.get_run(sweep["mlflow_parent_run_id"])
    assert parent.info.status == "KILLED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
