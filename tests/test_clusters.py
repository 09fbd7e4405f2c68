"""clusters/: the Ray cluster launcher YAMLs against the schema shipped inside the installed ray package (and
the checks `ray up` makes before it touches a cloud), the KubeRay manifests' required fields, and a real
`ray job submit` of the quickstart to a `ray start` cluster on this machine, with token authentication on.

Offline apart from loopback. The cluster is started with `ray start --head --block` and stopped by signalling
that process and, if anything is left, the processes it started, by id: `ray stop` would stop every Ray on
the machine, including other test sessions'.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import jsonschema  # a dependency of ray itself
import pytest
import yaml

from helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = CLUSTERS / "kuberay"
# Never uploaded with --working-dir (.gitignore already keeps most of them out; this is explicit).
EXCLUDES = [".venv", ".venv-ci", ".git", "runs", "mlruns", "mlflow.db", ".pytest_cache", "**/__pycache__"]
AWS_GPU_INSTANCE = re.compile(r"^(p4d|p4de|p5|p5e|p5en|p6-b200|g5|g6|g6e)\.\w+$")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(gpu|cu\d+)$")


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ================================================================================ launcher YAMLs
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_is_valid_for_ray_up(name):
    """The shipped JSON schema, then what `ray up` does before any cloud call: fill in the provider's
    defaults, merge the setup commands, check docker and the node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load(CLUSTERS / name)
    try:
        jsonschema.validate(cfg, _ray_schema())
    except jsonschema.ValidationError as e:
        pytest.fail(f"{name}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["provider"]["type"] == {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp"}[name]


def _gpus(provider: str, node_type: dict) -> int:
    if provider == "gcp":  # GCP resources are not detected: they are declared
        return int(node_type["resources"].get("GPU", 0))
    itype = node_type["node_config"]["InstanceType"]  # AWS: detected from the instance type
    return 1 if AWS_GPU_INSTANCE.match(itype) else 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_has_cpu_head_autoscaling_gpu_workers_and_the_package(name):
    cfg = _load(CLUSTERS / name)
    provider = cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert _gpus(provider, head) == 0, "the head node should be CPU-only"
    gpu_types = {k: t for k, t in types.items() if k != cfg["head_node_type"] and _gpus(provider, t) > 0}
    assert gpu_types, "no GPU worker type"
    for key, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0 < t["max_workers"] <= cfg["max_workers"], \
            f"{key}: an autoscaling group needs min_workers 0 < max_workers <= the cluster's max_workers"
        if provider == "gcp":
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", \
                f"{key}: GPU VMs cannot live-migrate"

    # The docker image: Ray's GPU image, Python 3.11.
    m = RAY_IMAGE.match(cfg["docker"]["image"])
    assert m and m["py"] == "311", cfg["docker"]["image"]

    # Token auth and the MLflow URI reach every process in the containers.
    opts = " ".join(cfg["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in opts
    assert re.search(r"--env MLFLOW_TRACKING_URI=https?://\S+", opts)

    # The package: its source is mounted from this repository and installed on every node.
    mounts = cfg["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} does not exist in the repository"
    assert mounts.get("/home/ray/inflora-ray/inflora_ray") == "./inflora_ray"
    assert "/home/ray/inflora-ray/pyproject.toml" in mounts
    setup = cfg["setup_commands"]
    assert any(re.search(r"pip install .*torch==\S+ .*torchvision==\S+", c) for c in setup)
    assert any(c.rstrip().endswith("pip install --no-cache-dir /home/ray/inflora-ray") for c in setup)


def _all_pins() -> dict[str, set[str]]:
    """Ray version, torch and torchvision pins as written in every file of clusters/."""
    found: dict[str, set[str]] = {"ray": set(), "torch": set(), "torchvision": set()}
    texts = [(p, p.read_text()) for p in [*(CLUSTERS / n for n in LAUNCHERS), CLUSTERS / "Dockerfile"]]
    for path, text in texts:
        found["ray"].update(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-", text))
        found["torch"].update(re.findall(r"\btorch==(\S+)", text))
        found["torchvision"].update(re.findall(r"\btorchvision==(\S+)", text))
    for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"):
        doc = _load(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        found["ray"].add(spec["rayVersion"])
        for c in _containers(spec):
            found["ray"].update(re.findall(r"-ray(\d+\.\d+\.\d+)-", c["image"]))
    return found


def test_versions_agree_across_all_cluster_files():
    """One Ray version (launcher images, Dockerfile, KubeRay rayVersion and image tags), one torch build."""
    pins = _all_pins()
    for what, values in pins.items():
        assert len(values) == 1, f"{what} versions differ across clusters/: {sorted(values)}"


def test_every_placeholder_is_explained_in_the_readme():
    readme = (CLUSTERS / "README.md").read_text()
    placeholders = set()
    for p in [*CLUSTERS.glob("*.yaml"), *KUBERAY.glob("*.yaml"), CLUSTERS / "Dockerfile"]:
        placeholders.update(re.findall(r"CHANGE-ME[\w-]*", p.read_text()))
    missing = sorted(p for p in placeholders if p not in readme)
    assert not missing, f"clusters/README.md does not say what to put for {missing}"
    for f in [*LAUNCHERS, "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "Dockerfile"]:
        assert f in readme, f"clusters/README.md does not mention {f}"


# ================================================================================ KubeRay manifests
_QTY_CPU = r"^\d+(\.\d+)?m?$"
_QTY_MEM = r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RESOURCES = {
    "type": "object",
    "properties": {k: {"type": "object",
                       "properties": {"cpu": {"type": "string", "pattern": _QTY_CPU},
                                      "memory": {"type": "string", "pattern": _QTY_MEM},
                                      "nvidia.com/gpu": {"type": "string", "pattern": r"^[1-9]\d*$"}},
                       "required": ["cpu", "memory"]}
                   for k in ("limits", "requests")},
    "required": ["limits"],
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {
        "type": "object",
        "required": ["containers"],
        "properties": {"containers": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["name", "image", "resources"],
                      "properties": {"name": {"type": "string", "pattern": _DNS_LABEL},
                                     "image": {"type": "string", "minLength": 1},
                                     "resources": _RESOURCES,
                                     "env": {"type": "array",
                                             "items": {"type": "object", "required": ["name"],
                                                       "properties": {"value": {"type": "string"}}}}}}}}}},
}
# What KubeRay's ray.io/v1 RayClusterSpec requires of the fields we use (rayStartParams is map[string]string:
# a bare number or boolean there is rejected by the API server).
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["token", "disabled"]}}},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                          "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE,
                                         "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}},
        "workerGroupSpecs": {
            "type": "array", "minItems": 1,
            "items": {"type": "object",
                      "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                                   "template"],
                      "properties": {"groupName": {"type": "string", "pattern": _DNS_LABEL},
                                     "replicas": {"type": "integer", "minimum": 0},
                                     "minReplicas": {"type": "integer", "minimum": 0},
                                     "maxReplicas": {"type": "integer", "minimum": 1},
                                     "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE}}},
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string",
                                                                              "pattern": _DNS_LABEL}}}
RAY_CLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                              "metadata": _METADATA, "spec": RAY_CLUSTER_SPEC}}
RAY_JOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
           "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
                          "metadata": _METADATA,
                          "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"],
                                   "properties": {
                                       "entrypoint": {"type": "string", "minLength": 1},
                                       "runtimeEnvYAML": {"type": "string"},
                                       "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode",
                                                                   "SidecarMode"]},
                                       "shutdownAfterJobFinishes": {"type": "boolean"},
                                       "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                                       "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                                       "backoffLimit": {"type": "integer", "minimum": 0},
                                       "rayClusterSpec": RAY_CLUSTER_SPEC}}}}


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _validate(doc: dict, schema: dict, name: str) -> None:
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        pytest.fail(f"{name}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")


def _check_cluster_spec(spec: dict, name: str) -> int:
    """Cross-field rules; returns the most GPUs the worker groups can ever provide."""
    head_res = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {}), f"{name}: the head should be CPU-only"
    assert spec.get("enableInTreeAutoscaling") is True, f"{name}: the GPU group should autoscale"
    max_gpus = 0
    for g in spec["workerGroupSpecs"]:
        where = f"{name}: workerGroupSpecs[{g['groupName']}]"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: needs min <= replicas <= max"
        for c in g["template"]["spec"]["containers"]:
            res = c["resources"]
            gpus = res["limits"].get("nvidia.com/gpu")
            if "nvidia.com/gpu" in res.get("requests", {}):
                # Kubernetes: extended resources cannot be overcommitted, requests must equal limits.
                assert res["requests"]["nvidia.com/gpu"] == gpus, f"{where}: GPU requests != limits"
            if gpus:
                max_gpus += int(gpus) * g["maxReplicas"]
    assert max_gpus > 0, f"{name}: no worker group has nvidia.com/gpu limits"
    return max_gpus


def test_kuberay_raycluster_manifest():
    doc = _load(KUBERAY / "raycluster.yaml")
    _validate(doc, RAY_CLUSTER, "raycluster.yaml")
    _check_cluster_spec(doc["spec"], "raycluster.yaml")
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in head.get("env", [])), "the driver needs MLflow's URI"


def _entrypoint_config(entrypoint: str):
    """The Config that `python -m inflora_ray.run ...` would run, parsed and validated as the CLI does."""
    from inflora_ray.presets import load_config
    from inflora_ray.cli import flag_overrides
    from inflora_ray.run import FLAGS, build_parser

    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "inflora_ray.run"], f"entrypoint does not run inflora_ray.run: {argv[:3]}"
    args = build_parser().parse_args(argv[3:])
    assert "--config" in argv, "the entrypoint should name its preset with --config"
    return load_config(args.config, list(args.overrides) + flag_overrides(args, FLAGS))


def test_kuberay_rayjob_manifest():
    doc = _load(KUBERAY / "rayjob.yaml")
    _validate(doc, RAY_JOB, "rayjob.yaml")
    spec = doc["spec"]
    max_gpus = _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    cfg = _entrypoint_config(spec["entrypoint"])  # a valid config: the job would not fail on its arguments
    r = cfg.run
    assert r.use_gpu and r.num_workers * r.gpus_per_worker <= max_gpus, \
        f"the run needs {r.num_workers * r.gpus_per_worker:g} GPUs, the worker groups give at most {max_gpus}"
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:  # the workers that share a pod must fit its CPUs
            cpu = limits["cpu"]
            pod_cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
            per_pod = int(limits["nvidia.com/gpu"]) / r.gpus_per_worker
            assert per_pod * r.cpus_per_worker <= pod_cpus, \
                f"{per_pod:g} worker(s) x {r.cpus_per_worker:g} CPUs do not fit a {cpu}-CPU pod"
    if all(g["minReplicas"] == 0 for g in spec["rayClusterSpec"]["workerGroupSpecs"]):
        assert r.wait_for_resources, "GPU workers start at 0 pods: the run must wait for the autoscaler"
    assert re.match(r"^(s3|gs)://", r.storage_path), "the cluster is deleted after the job: use a bucket"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and "MLFLOW_TRACKING_URI" in runtime_env.get("env_vars", {})


# ================================================================================ ray job submit, end to end
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Live descendants of ``root``: pid -> start time (to never signal a reused pid)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def _kill_left(procs: dict[int, int]) -> list[int]:
    left = []
    for pid, start in procs.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            left.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


class RayHead:
    """`ray start --head --block` on loopback with its own ports, temp dir and token; `ray job` CLI calls."""

    def __init__(self, workdir: Path):
        self.bin = Path(sys.executable).parent
        self.ray = self.bin / "ray"
        # Short: Ray puts unix sockets under it (108-byte limit on their paths).
        self.temp = Path(tempfile.mkdtemp(prefix="rayc", dir="/tmp"))
        self.token_file = self.temp / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.workdir = workdir
        (self.gcs_port, self.dash_port, self.client_port, self.agent_port, self.agent_grpc_port,
         self.env_agent_port, self.metrics_port) = _free_ports(7)
        self.address = f"http://127.0.0.1:{self.dash_port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "MLFLOW_")) or k == "RAY_USAGE_STATS_ENABLED"}
        # Token authentication for the cluster and for our CLI calls, with a token of our own (not
        # ~/.ray/auth_token): both sides read RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0")
        self.client_env = dict(env)
        # The cluster runs job entrypoints with its own PATH: put this environment's bin first, as an activated
        # virtual environment does, so that `python` in an entrypoint is this interpreter.
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # on SIGTERM: stop now, not after a 30 s drain
        self.log = self.temp / "ray_start.log"
        cmd = [str(self.ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
               "--include-dashboard=true", f"--ray-client-server-port={self.client_port}",
               f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
               f"--runtime-env-agent-port={self.env_agent_port}", f"--metrics-export-port={self.metrics_port}",
               "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={200 * 1024 * 1024}",
               f"--temp-dir={self.temp}", "--disable-usage-stats"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 150) -> None:
        token = self.token_file.read_text()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            req = urllib.request.Request(f"{self.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the Ray dashboard did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def cli(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.ray), *args], env=env or self.client_env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    def submit(self, submission_id: str, entrypoint: list[str], env_vars: dict | None = None) -> None:
        runtime_env = {"excludes": EXCLUDES, "env_vars": dict(env_vars or {})}
        r = self.cli("job", "submit", f"--address={self.address}", f"--submission-id={submission_id}",
                     f"--working-dir={REPO}", f"--runtime-env-json={json.dumps(runtime_env)}", "--no-wait",
                     "--", *entrypoint)
        assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"

    def status(self, submission_id: str) -> str:
        r = self.cli("job", "status", f"--address={self.address}", submission_id)
        out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
        if f"Job '{submission_id}' succeeded" in out:
            return "SUCCEEDED"
        if f"Job '{submission_id}' failed" in out:
            return "FAILED"
        if f"Job '{submission_id}' was stopped" in out:
            return "STOPPED"
        m = re.search(rf"Status for job '{re.escape(submission_id)}': (\w+)", out)
        assert m, f"ray job status: unexpected output:\n{out}"
        return m.group(1)

    def wait(self, submission_id: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        self.cli("job", "stop", f"--address={self.address}", submission_id)
        pytest.fail(f"job {submission_id} did not finish in {timeout:.0f} s:\n{self.logs(submission_id)[-4000:]}")

    def logs(self, submission_id: str) -> str:
        r = self.cli("job", "logs", f"--address={self.address}", submission_id)
        assert r.returncode == 0, f"ray job logs failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops everything it started), then SIGKILL to any leftover
        among the processes it had started, by pid; nothing else on the machine is touched."""
        procs = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_proc_stat(p) is not None for p in procs):
            time.sleep(0.5)
        self.leftovers = _kill_left(procs)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` CLI is not next to this Python")
    head = RayHead(REPO)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        if head.leftovers:
            warnings.warn(f"Ray processes {head.leftovers} outlived `ray start --block` and were killed")
        for port in (head.gcs_port, head.dash_port):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after stopping the cluster"


@pytest.mark.ray
def test_submit_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in ray_head.client_env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(ray_head.temp)  # no ~/.ray/auth_token either
    r = ray_head.cli("job", "list", f"--address={ray_head.address}", env=env)
    assert r.returncode != 0 and "Unauthorized" in (r.stdout + r.stderr), r.stdout + r.stderr


@pytest.mark.ray
def test_job_python_is_this_environment_and_the_package_comes_from_the_working_dir(ray_head):
    ray_head.submit("clusters-python", ["python", "-c", "import sys, inflora_ray; "
                                        "print('prefix=' + sys.prefix); print('package=' + inflora_ray.__file__)"])
    assert ray_head.wait("clusters-python", timeout=120) == "SUCCEEDED"
    logs = ray_head.logs("clusters-python")
    assert f"prefix={sys.prefix}\n" in logs, logs
    # --working-dir: the job imports the uploaded copy of the repository, not the installed one.
    package = re.search(r"^package=(.*)$", logs, re.M).group(1)
    assert "working_dir_files" in package and str(ray_head.temp) in package, package


@pytest.mark.ray
def test_quickstart_job_succeeds_with_progress_table_results_and_mlflow(ray_head, tmp_path):
    storage = tmp_path / "runs"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entry = ["python", "-m", "inflora_ray.run", "--config", "quickstart", *tiny_overrides(),
             "--storage-path", str(storage), "--name", "clusters-e2e"]
    # The MLflow URI reaches the driver through the job's runtime environment.
    ray_head.submit("clusters-quickstart", entry, env_vars={"MLFLOW_TRACKING_URI": mlflow_uri})
    status = ray_head.wait("clusters-quickstart", timeout=300)
    logs = ray_head.logs("clusters-quickstart")
    assert status == "SUCCEEDED", logs[-6000:]
    for t in range(1, 6):
        assert re.search(rf"^\[task {t}/5\] classes ", logs, re.M), f"no progress line for task {t}:\n{logs[-6000:]}"
    assert "accuracy matrix (%)" in logs and "final accuracy A_T" in logs, logs[-6000:]

    results = storage / "clusters-e2e" / "results"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["complete"] == 5 and (results / "accuracy_matrix.parquet").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("method") == "inflora"
    assert run.data.metrics["final_accuracy"] == pytest.approx(metrics["final_accuracy"])


@pytest.mark.ray
def test_bad_config_job_fails_with_the_message_and_writes_nothing(ray_head, tmp_path):
    storage = tmp_path / "runs"
    entry = ["python", "-m", "inflora_ray.run", "--config", "quickstart", *tiny_overrides(**{"method.rank": 0}),
             "--storage-path", str(storage), "--no-tracking"]
    ray_head.submit("clusters-bad-config", entry)
    assert ray_head.wait("clusters-bad-config", timeout=120) == "FAILED"
    logs = ray_head.logs("clusters-bad-config")
    assert "error: method.rank: must be >= 1" in logs, logs[-3000:]
    assert not storage.exists()
