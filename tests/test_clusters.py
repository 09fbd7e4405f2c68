"""clusters/: the Ray cluster launcher YAMLs against the schema shipped inside the installed ray package (and
the checks `ray up` makes before it touches a cloud) and the KubeRay manifests' required fields. Offline.

Jobs submitted to a real multi-node cluster (token authentication, S3 storage, an MLflow server) are in
tests/test_cluster_rehearsal.py.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema  # a dependency of ray itself
import pytest
import yaml


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


# ================================================================================ a 64-GPU sweep, stopping
SWEEP_GPUS = 64  # the largest sweep the definitions are sized for (docs/clusters.md#sizing-for-a-64-gpu-sweep)
# GPUs per node of the AWS instance types the launcher YAML names (AWS detects them; the YAML does not say).
AWS_GPUS = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8,
            "g5.xlarge": 1, "g6.xlarge": 1}
_QTY_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_STOP_WAIT = re.compile(r"\bRAY_JOB_STOP_WAIT_TIME_S=(\d+) ray start --head\b")


def _bytes(quantity: str) -> float:
    """A Kubernetes quantity (``48Gi``, ``500M``) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    assert m, f"not a Kubernetes quantity: {quantity!r}"
    return float(m[1]) * _QTY_UNITS[m[2] or ""]


def _kuberay_spec(name: str) -> dict:
    doc = _load(KUBERAY / name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _head_start(cfg: dict) -> str:
    starts = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert len(starts) == 1, starts
    return starts[0]


def stop_waits() -> dict[str, int]:
    """``RAY_JOB_STOP_WAIT_TIME_S`` as each cluster definition gives it to the head's Ray processes (the launcher
    YAMLs: on the ``ray start --head`` command; KubeRay: in the head container's environment); 0 where unset."""
    waits = {}
    for name in LAUNCHERS:
        m = _STOP_WAIT.search(_head_start(_load(CLUSTERS / name)))
        waits[name] = int(m[1]) if m else 0
    for name in ("raycluster.yaml", "rayjob.yaml"):
        head = _kuberay_spec(name)["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in head.get("env", [])}
        waits[name] = int(env.get("RAY_JOB_STOP_WAIT_TIME_S") or 0)
    return waits


def configured_stop_wait() -> int:
    """The stop wait clusters/aws-gpu.yaml configures (every definition must agree: checked below)."""
    return stop_waits()["aws-gpu.yaml"]


def test_every_definition_gives_ray_job_stop_the_same_long_wait():
    """Ray's default wait between `ray job stop`'s SIGTERM and its SIGKILL (3 s) is shorter than a driver needs
    to save a run; every definition sets one wait, well above the measured stop (docs/clusters.md)."""
    waits = stop_waits()
    assert len(set(waits.values())) == 1, f"RAY_JOB_STOP_WAIT_TIME_S differs or is missing: {waits}"
    assert configured_stop_wait() >= 60, waits


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_head_schedules_nothing_and_gpu_workers_reach_64_gpus(name):
    cfg = _load(CLUSTERS / name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # The launcher hands the node type's resources to `ray start` (RAY_OVERRIDE_RESOURCES), where they win over
    # its flags: both must say 0.
    assert head.get("resources", {}).get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, head.get("resources")
    start = _head_start(cfg)
    assert "--num-cpus=0" in start.split() and "--num-gpus=0" in start.split(), start
    gpus = 0
    for key, t in cfg["available_node_types"].items():
        if key == cfg["head_node_type"]:
            continue
        per_node = int(t["resources"].get("GPU", 0)) if cfg["provider"]["type"] == "gcp" else \
            AWS_GPUS.get(t["node_config"]["InstanceType"], 0)
        gpus += per_node * min(t["max_workers"], cfg["max_workers"])
    assert gpus >= SWEEP_GPUS, f"{name}: at most {gpus} GPUs"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_head_schedules_nothing_and_gpu_pods_have_disk_for_the_block_cache(name):
    from inflora_ray.config import DataConfig

    spec = _kuberay_spec(name)
    params = spec["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0" and params.get("num-gpus") == "0", params
    assert _check_cluster_spec(spec, name) >= SWEEP_GPUS
    cache = DataConfig.model_fields["block_cache_mb"].default * 2**20  # per worker; one worker per GPU
    for g in spec["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            res = c["resources"]
            gpus = int(res["limits"].get("nvidia.com/gpu", 0))
            for kind in ("requests", "limits"):
                disk = res.get(kind, {}).get("ephemeral-storage")
                assert disk is not None, f"{name}: {g['groupName']} has no ephemeral-storage {kind}"
                assert _bytes(disk) >= gpus * cache, \
                    f"{name}: {g['groupName']}: ephemeral-storage {kind} {disk} < {gpus} x the block cache"


def test_rayjob_has_no_deadline_that_ends_a_sweep():
    spec = _load(KUBERAY / "rayjob.yaml")["spec"]
    assert "activeDeadlineSeconds" not in spec, "a deadline ends a long sweep however far it has got"
