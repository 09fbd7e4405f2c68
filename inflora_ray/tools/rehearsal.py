"""The processes of a cluster rehearsal on one machine, all on loopback: a multi-node Ray cluster (``ray start``
head and worker nodes, token authentication), an S3-compatible object store (moto's server) and an MLflow
tracking server (SQLite, artifacts in the store).

Every process is started in its own session and stopped by its pid (and the pids it started, each checked
against its start time so a reused pid is never signalled): nothing else on the machine is touched, unlike
``ray stop``. Used by ``python -m inflora_ray.rehearse`` and by ``tests/test_cluster_rehearsal.py``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from .processes import LOOPBACK, RehearsalError, Service, free_ports, http_ok, port_open, start, tool

BUCKET = "rehearsal"
# moto accepts any credentials; these are what the rehearsal exports, like a MinIO root user.
ACCESS_KEY, SECRET_KEY, REGION = "rehearsal", "rehearsal-secret", "us-east-1"

__all__ = ["BUCKET", "RayCluster", "Rehearsal", "RehearsalError", "port_open"]


# ----------------------------------------------------------------------------------------- Ray
class RayCluster:
    """A Ray cluster of ``ray start --block`` nodes on loopback with token authentication: a head (by default
    with 0 CPUs, like a CPU head that schedules no training) and worker nodes that can be added and removed.

    Each worker node carries a custom resource ``rehearsal_node_<k>`` (k = 1, 2, ...) naming it in Ray's state.
    """

    def __init__(self, root: Path, env: dict, head_cpus: float = 0, object_store_mb: int = 200):
        self.root = root
        self.ray = tool("ray")
        self.token_file = root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.object_store = object_store_mb * 1024 * 1024
        base = {k: v for k, v in env.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
        # Both sides of token authentication read these: the cluster's processes and the CLI / SDK clients.
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0")
        self.client_env = dict(base)
        # Entrypoints of `ray job submit` run with the cluster's PATH: this environment's bin first, as an
        # activated virtual environment has it, so `python` in a job is this interpreter.
        bin_dir = str(Path(sys.executable).parent)
        base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
        if sys.prefix != sys.base_prefix:
            base["VIRTUAL_ENV"] = sys.prefix
        base["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM: stop now, not after a drain
        self.node_env = base
        self.gcs_port, self.dash_port, *head_ports = free_ports(7)
        self.address = f"http://{LOOPBACK}:{self.dash_port}"
        self.gcs_address = f"{LOOPBACK}:{self.gcs_port}"
        # The head declares a node that stops answering dead after five missed checks 1 s apart (Ray's
        # defaults: 3 s apart, ~15 s), so a rehearsed node loss is noticed in seconds; a node that is alive
        # but slow still has a 10 s timeout per check.
        head_env = {**self.node_env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
        self.head = start("ray head", [
            self.ray, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={self.gcs_port}",
            f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dash_port}", "--include-dashboard=true",
            *self._node_ports(head_ports[:5]), f"--num-cpus={head_cpus:g}", "--num-gpus=0",
            f"--object-store-memory={self.object_store}", f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
        ], head_env, root / "ray-head.log", ports=[self.gcs_port, self.dash_port])
        self.workers: dict[int, Service] = {}
        self._next = 1

    @staticmethod
    def _node_ports(ports: list[int]) -> list[str]:
        agent, agent_grpc, env_agent, metrics, *rest = ports
        return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
                *(f"--node-manager-port={p}" for p in rest)]

    @property
    def token(self) -> str:
        return self.token_file.read_text()

    def wait_head(self, timeout: float = 150) -> None:
        """Until the head's job API answers (with the token)."""
        self.head.wait(lambda: http_ok(f"{self.address}/api/jobs/", self.token), timeout, "job API answer")

    def nodes(self) -> list[dict]:
        """Ray's state API: every node, with ``node_id``, ``state`` (ALIVE / DEAD), ``resources_total``."""
        return self._get("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]

    def node_id(self, k: int) -> Optional[str]:
        """The Ray node id of worker node ``k`` while it is alive."""
        for n in self.nodes():
            if n["state"] == "ALIVE" and f"rehearsal_node_{k}" in n.get("resources_total", {}):
                return n["node_id"]
        return None

    def add_node(self, num_cpus: float = 1, timeout: float = 120, attempts: int = 2) -> int:
        """Start a worker node (``ray start --address ... --block``) and wait until Ray sees it alive; returns
        its number ``k``. ``ray start`` gives a raylet 30 s to register, which a loaded machine can miss: a
        node that exits before registering is started again, up to ``attempts`` times in all."""
        for attempt in range(attempts):
            k = self.start_node(num_cpus)
            try:
                self.wait_node(k, timeout)
                return k
            except RehearsalError:
                if self.workers[k].proc.poll() is None or attempt == attempts - 1:
                    raise
                self.workers.pop(k).stop()
        raise AssertionError("unreachable")

    def wait_node(self, k: int, timeout: float = 120) -> None:
        """Until worker node ``k`` is alive in Ray's state."""
        self.workers[k].wait(lambda: self.node_id(k) is not None, timeout, "node registered with the head")

    def start_node(self, num_cpus: float = 1) -> int:
        """Start worker node ``k`` without waiting for it; returns ``k``."""
        k, self._next = self._next, self._next + 1
        ports = free_ports(6)
        svc = start(f"ray worker node {k}", [
            self.ray, "start", f"--address={self.gcs_address}", "--block", f"--node-ip-address={LOOPBACK}",
            *self._node_ports(ports), f"--num-cpus={num_cpus:g}", "--num-gpus=0",
            f"--resources={json.dumps({f'rehearsal_node_{k}': 1})}", f"--object-store-memory={self.object_store}",
            # A temp dir of its own, as on a separate machine: nodes sharing one would unpack each job's
            # working-dir package into the same folder and remove it under each other's running jobs.
            f"--temp-dir={self.root / f'n{k}'}", "--disable-usage-stats",
        ], self.node_env, self.root / f"ray-node-{k}.log")
        self.workers[k] = svc
        return k

    def cli(self, *args: str, timeout: float = 120, cwd: Optional[Path] = None,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run ``ray ARGS`` as a client of this cluster (its address is not implied: pass ``--address``)."""
        return subprocess.run([self.ray, *args], env=env or self.client_env, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def _get(self, path: str):
        req = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def submit(self, submission_id: str, entrypoint: list[str], working_dir: Optional[Path] = None,
               excludes: tuple[str, ...] = (), env_vars: Optional[dict] = None) -> None:
        """``ray job submit --no-wait`` of ``entrypoint``, with ``working_dir`` uploaded (minus ``excludes``)."""
        runtime_env = {"excludes": list(excludes), "env_vars": dict(env_vars or {})} if working_dir else \
            {"env_vars": dict(env_vars or {})}
        wd = [f"--working-dir={working_dir}"] if working_dir else []
        r = self.cli("job", "submit", f"--address={self.address}", f"--submission-id={submission_id}", *wd,
                     f"--runtime-env-json={json.dumps(runtime_env)}", "--no-wait", "--", *entrypoint, cwd=working_dir)
        if r.returncode != 0:
            raise RehearsalError(f"ray job submit {submission_id} failed:\n{r.stdout}\n{r.stderr}")

    def job(self, submission_id: str) -> dict:
        """The job's record from the job API (``status``, ``job_id``, ``runtime_env``, ...)."""
        return self._get(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        """The job driver's output."""
        return self._get(f"/api/jobs/{submission_id}/logs")["logs"]

    def actors(self, job_id: str, class_name: str) -> list[dict]:
        """Ray's state API: the actors of class ``class_name`` of Ray job ``job_id``, dead or alive."""
        rows = self._get("/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]
        return [a for a in rows if a.get("job_id") == job_id and a.get("class_name") == class_name]

    def stop(self) -> list[int]:
        """Stop the worker nodes, then the head; returns pids that outlived their ``ray start`` and were killed."""
        left = []
        for k in list(self.workers):
            left += self.workers.pop(k).stop()
        return left + self.head.stop()


# ----------------------------------------------------------------------------------------- object store
def s3_env(endpoint: str) -> dict[str, str]:
    """The variables every S3 client (pyarrow through :mod:`inflora_ray.storage`, boto3, MLflow, the AWS CLI)
    reads to reach an S3-compatible store."""
    return {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


def start_object_store(root: Path, env: dict) -> tuple[Service, str]:
    """moto's S3 server on a free loopback port; returns it and its endpoint URL."""
    (port,) = free_ports(1)
    svc = start("object store (moto_server)", [tool("moto_server"), "-H", LOOPBACK, "-p", str(port)], env,
                 root / "object-store.log", ports=[port])
    endpoint = f"http://{LOOPBACK}:{port}"
    svc.wait(lambda: port_open(port), 60, "listening port")
    return svc, endpoint


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` through pyarrow's S3 filesystem (the client the runs use)."""
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", region=REGION, access_key=ACCESS_KEY,
                      secret_key=SECRET_KEY, allow_bucket_creation=True).create_dir(bucket)


# ----------------------------------------------------------------------------------------- MLflow
# Without MLflow's job executor (its GenAI jobs are not what a rehearsal or a test tracks): the server starts
# in about half the time and runs no consumer process beside it.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow(root: Path, env: dict, artifacts: str) -> tuple[Service, str]:
    """``mlflow server`` on a free loopback port, runs in SQLite, artifacts proxied to ``artifacts``; not yet
    waited for (:func:`wait_mlflow`)."""
    (port,) = free_ports(1)
    svc = start("MLflow server", [
        tool("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", artifacts,
    ], {**env, **MLFLOW_SERVER_ENV}, root / "mlflow.log", cwd=root, ports=[port])
    return svc, f"http://{LOOPBACK}:{port}"


def wait_mlflow(svc: Service, uri: str, timeout: float = 180) -> None:
    """Until the MLflow server answers on /health."""
    svc.wait(lambda: http_ok(f"{uri}/health"), timeout, "answer on /health")


# ----------------------------------------------------------------------------------------- all of it
class Rehearsal:
    """Everything a cluster user has, on loopback: object store + bucket, MLflow server, Ray head + workers.

    ``env()`` gives the variables a client exports (``RAY_ADDRESS`` for ``ray job submit``, token, S3 and
    MLflow); the cluster's nodes have the same S3 and MLflow settings in their environment, as nodes of a real
    cluster have credentials and the tracking URI. ``stop()`` stops exactly what was started.
    """

    def __init__(self, workers: int = 2, cpus_per_node: float = 1, head_cpus: float = 0,
                 root: Optional[Path] = None, bucket: str = BUCKET):
        # Short: Ray puts unix sockets under its temp dir (108-byte limit on their paths).
        self._made_root = root is None  # only a folder it made is removed at the end
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.services: list[Service] = []
        self.cluster: Optional[RayCluster] = None
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        try:
            store, self.s3_endpoint = start_object_store(self.root, base)
            self.services.append(store)
            create_bucket(self.s3_endpoint, bucket)
            base.update(s3_env(self.s3_endpoint))
            mlflow_svc, self.tracking_uri = start_mlflow(self.root, base, f"s3://{bucket}/mlflow")
            self.services.append(mlflow_svc)
            base["MLFLOW_TRACKING_URI"] = self.tracking_uri
            # The MLflow server and the Ray nodes come up side by side.
            self.cluster = RayCluster(self.root, base, head_cpus=head_cpus)
            self.cluster.wait_head()
            for _ in range(workers):
                self.cluster.add_node(cpus_per_node)
            wait_mlflow(mlflow_svc, self.tracking_uri)
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        """What a client exports to use the rehearsal (``ray job submit``, the S3 and MLflow clients)."""
        c = self.cluster
        return {"RAY_ADDRESS": c.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(c.token_file),
                **s3_env(self.s3_endpoint), "MLFLOW_TRACKING_URI": self.tracking_uri}

    def client_env(self) -> dict[str, str]:
        """This process's environment with :meth:`env` applied (and no other Ray, AWS or MLflow settings)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        return {**base, "RAY_USAGE_STATS_ENABLED": "0", **self.env()}

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def stop(self) -> list[int]:
        """Stop the Ray nodes, the MLflow server and the store; remove the rehearsal's folder if it made it.
        Returns pids that had to be killed after their parent stopped."""
        left = self.cluster.stop() if self.cluster is not None else []
        self.cluster = None
        for svc in reversed(self.services):
            left += svc.stop(grace=15)
        self.services = []
        if self._made_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return left
