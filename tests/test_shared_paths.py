"""What every node of a run or sweep must share with the driver: the storage path (absolute, refused when relative
under ``ray job submit``, for a sweep as for a run), the config's local paths on a cluster of several nodes (a
warning naming each, since the driver cannot look on the other nodes), and the S3 endpoint settings, which the
driver hands to the processes it starts (a real local Ray started without them, so what the workers read
came from the driver)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import tiny_overrides
from inflora_ray.preflight import PreflightError
from inflora_ray.presets import load_config

pytestmark = pytest.mark.ray

ENDPOINT = "http://127.0.0.1:9"  # never connected to: the storage of these runs is local


def _cfg(storage: str, **extra):
    return load_config("quickstart", tiny_overrides(**{"run.storage_path": storage, "tracking.enabled": "false",
                                                       "data.num_tasks": 2, "run.cpus_per_worker": 1, **extra}))


def _space():
    from inflora_ray.ray_tune.search_space import Param, SearchSpace

    return SearchSpace([Param("train.lr", "choice", [0.002])])


def test_a_sweep_refuses_a_relative_storage_path_under_ray_job_submit_as_a_run_does(tmp_path, monkeypatch):
    from inflora_ray.ray_train.launch import RunContext, RunOptions, run_experiment
    from inflora_ray.ray_tune.sweep import SweepOptions, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` gives its entrypoint
    cfg = _cfg("relative/runs")
    with pytest.raises(PreflightError, match=r"run.storage_path='relative/runs' is relative: under `ray job submit`"):
        run_experiment(cfg, RunOptions(name="r"), RunContext(quiet_table=True))
    with pytest.raises(PreflightError, match=r"run.storage_path='relative/runs' is relative: under `ray job submit`"):
        run_sweep(cfg, _space(), SweepOptions(name="sw"))
    assert not (tmp_path / "relative").exists()


def test_the_forwarded_settings_are_the_endpoint_and_region_never_credentials(monkeypatch):
    from inflora_ray import storage
    from inflora_ray.preflight import job_runtime_env

    for var in storage.ENDPOINT_VARS + storage.REGION_VARS + storage.RETRY_SETTING_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-forwarded")
    monkeypatch.setenv("AWS_REGION", "eu-test-1")
    assert storage.forwarded_env() == {} and job_runtime_env() is None  # AWS itself: each node has its region
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", ENDPOINT + "0")
    assert storage.forwarded_env() == {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_ENDPOINT_URL_S3": ENDPOINT + "0",
                                       "AWS_REGION": "eu-test-1"}
    assert job_runtime_env() == {"env_vars": storage.forwarded_env()}
    # Under `ray job submit`, what the job's own runtime env sets is left to it (Ray refuses a variable twice).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": ENDPOINT}}}))
    assert job_runtime_env() == {"env_vars": {"AWS_ENDPOINT_URL_S3": ENDPOINT + "0", "AWS_REGION": "eu-test-1"}}
    # The retry settings the driver was given reach the runs on other nodes too (with or without an endpoint).
    monkeypatch.setenv("INFLORA_STORAGE_RETRIES", "5")
    monkeypatch.setenv("INFLORA_TRACKING_RETRY_MAX_SECONDS", "9")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.forwarded_env() == {"INFLORA_STORAGE_RETRIES": "5", "INFLORA_TRACKING_RETRY_MAX_SECONDS": "9"}


def _started_without_endpoint(ray) -> None:
    """Skip unless the session's Ray was started without an S3 endpoint (else nothing here would be proven)."""
    @ray.remote(num_cpus=0)
    def endpoint():
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(endpoint.remote()) is not None:
        pytest.skip("the session's Ray was started with AWS_ENDPOINT_URL set")


def _read_env():
    """A Ray Train worker's function: what it sees of the S3 settings (rank 0's return value is the Result's)."""
    import os

    return {var: os.environ.get(var, "") for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SECRET_ACCESS_KEY")}


def test_the_driver_s3_endpoint_reaches_the_run_workers(ray_session, tmp_path, monkeypatch):
    """A Ray Train run started by a driver that alone has the endpoint: its worker reads it (and the region),
    though the Ray it runs on was started without them; the driver's credentials are not passed on."""
    from ray.train import RunConfig, ScalingConfig

    from inflora_ray.ray_train.trainer import RunTrainer

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _read_env, for the worker
    _started_without_endpoint(ray_session)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_REGION", "eu-test-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-forwarded")
    trainer = RunTrainer(_read_env, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name="env", storage_path=str(tmp_path)))
    assert trainer.fit().return_value == {"AWS_ENDPOINT_URL": ENDPOINT, "AWS_REGION": "eu-test-1",
                                           "AWS_SECRET_ACCESS_KEY": ""}


JOIN = textwrap.dedent("""
    import json, os, sys

    import ray

    from inflora_ray.preflight import connect_ray

    connect_ray(sys.argv[1])

    @ray.remote(num_cpus=0)
    def worker():  # a process started by another one, as a trial's run starts its workers
        return os.environ.get("AWS_ENDPOINT_URL")

    @ray.remote(num_cpus=0)
    class Trial:
        def read(self):
            return [os.environ.get("AWS_ENDPOINT_URL"), ray.get(worker.remote())]

    print(json.dumps(ray.get(Trial.remote().read.remote())))
""")


@pytest.mark.slow
def test_a_driver_joining_a_cluster_gives_its_endpoint_to_every_process_of_its_job(ray_session):
    """A driver with the endpoint joins a running Ray that lacks it (connect_ray, as a run or sweep does): an
    actor it starts (as Ray Tune starts a trial) and a task that actor starts both read it."""
    _started_without_endpoint(ray_session)
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "AWS_ENDPOINT_URL": ENDPOINT}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", JOIN, address], env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [ENDPOINT, ENDPOINT]


CLUSTER = textwrap.dedent("""
    import json, logging, sys

    import ray
    from ray.cluster_utils import Cluster

    from inflora_ray.preflight import join_cluster, warn_local_paths
    from inflora_ray.presets import load_config

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    warned = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "shared_path_warning":
                warned.append(record._inflora_fields)

    logging.getLogger("inflora_ray").addHandler(Keep())
    try:
        cfg = load_config("quickstart", sys.argv[2:])
        join_cluster(cfg, cluster.address)  # as a run or a sweep joins
        joined = [w["setting"] for w in warned]
        warn_local_paths(cfg, None, start_from=sys.argv[1])  # a run with --start-from
        join_cluster(cfg, cluster.address)  # a second run of the same driver: warned once
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"joined": joined, "warned": warned}))
""")


@pytest.mark.slow
def test_local_paths_on_a_cluster_of_two_nodes_are_named_with_what_to_do(ray_session, tmp_path, caplog):
    """On a 2-node cluster (ray.cluster_utils.Cluster, in a process of its own) every local path of the config
    and --start-from is named once, with what to do (a URI would not be); on the session's 1-node Ray, nothing."""
    import logging

    from inflora_ray.preflight import shared_paths, warn_local_paths, warn_shared_paths

    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"")
    data_root = tmp_path / "data"
    overrides = tiny_overrides(**{"run.storage_path": str(tmp_path / "runs"), "tracking.enabled": "false",
                                  "run.cpus_per_worker": 1, "data.root": str(data_root),
                                  "model.weights_file": str(weights)})
    start_from = str(tmp_path / "run" / "checkpoint_task000")
    with caplog.at_level(logging.WARNING, logger="inflora_ray"):
        cfg = load_config("quickstart", overrides)
        warn_shared_paths(cfg)
        warn_local_paths(cfg, None, start_from=start_from)
    assert "shared_path_warning" not in caplog.text
    assert set(shared_paths(cfg.with_values({"run.storage_path": "s3://bucket/runs"}), start_from)) == {
        "data.root", "model.weights_file", "--start-from"}  # a URI is the same on every node

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", CLUSTER, start_from, *overrides], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got["joined"]) == ["data.root", "model.weights_file", "run.storage_path"]
    assert [w["setting"] for w in got["warned"]] == got["joined"] + ["--start-from"]
    warned = {w["setting"]: w for w in got["warned"]}
    assert warned["data.root"]["path"] == str(data_root)
    assert warned["--start-from"]["path"] == start_from
    for setting, w in warned.items():
        assert f"{setting}={w['path']} is a local path on a cluster of several nodes: it must exist at this path " \
               "on every node" in w["message"]
        assert "or use " in w["message"]
    assert "data.shards with an s3:// or gs:// URI" in warned["data.root"]["message"]
