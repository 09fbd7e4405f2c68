"""Typed experiment configuration: YAML presets, ``section.key=value`` overrides, validation.

Every field is checked before any compute is spent; a bad value raises :class:`ConfigError`
naming the field and what it accepts.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

METHODS = ("inflora", "seq-lora", "linear-probe")
BENCHMARKS = ("digits", "cifar100", "imagenet-r", "domainnet")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def builtin_weights() -> list[str]:
    """Names of the backbone weights shipped in the package (``builtin:<name>``)."""
    root = resources.files("inflora_ray") / "weights"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".pth")) if root.is_dir() else []


def resolve_weights_file(spec: str) -> str:
    """A weights path: ``builtin:<name>`` -> the file shipped in ``inflora_ray/weights``, else the path."""
    if spec.startswith("builtin:"):
        return str(resources.files("inflora_ray") / "weights" / f"{spec[len('builtin:'):]}.pth")
    return str(Path(spec).expanduser())


class ConfigError(ValueError):
    """An invalid configuration; the message says which field and what to change."""


@dataclass
class ExperimentConfig:
    name: str = "inflora"
    seed: int = 0
    log_every_steps: int = 20

    def validate(self) -> None:
        _require(self.name.strip() != "", "experiment.name", "must not be empty")
        _require(self.seed >= 0, "experiment.seed", "must be >= 0")
        _require(self.log_every_steps >= 1, "experiment.log_every_steps", "must be >= 1")


@dataclass
class MethodConfig:
    name: Literal["inflora", "seq-lora", "linear-probe"] = "inflora"
    rank: int = 10
    lamb: float = 0.95
    lame: float = 1.0
    # DualGPM representation of the memory: "auto" switches remove -> retain past d/2 (the paper);
    # "remove"/"retain" pin one representation (same projector, used to check the switch).
    memory_representation: Literal["auto", "remove", "retain"] = "auto"

    def validate(self) -> None:
        _require(self.rank >= 1, "method.rank", "must be >= 1")
        _require(0.0 < self.lamb <= 1.0, "method.lamb", "must be in (0, 1]")
        _require(0.0 < self.lame <= 1.0, "method.lame", "must be in (0, 1]")
        _require(self.lamb <= self.lame, "method.lamb", f"must be <= method.lame ({self.lame})")


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    weights_file: Optional[str] = None
    img_size: int = 224
    # Extra keyword arguments for timm.create_model (patch_size, embed_dim, depth, num_heads, ...).
    kwargs: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require(self.name.startswith("vit_"), "model.name",
                 f"must be a timm ViT (a name starting with 'vit_'), got {self.name!r}")
        _require(self.img_size >= 8, "model.img_size", "must be >= 8")
        if self.weights_file is not None:
            _require(Path(resolve_weights_file(self.weights_file)).is_file(), "model.weights_file",
                     f"file not found: {self.weights_file!r}; give the path of a saved state_dict or "
                     f"builtin:<name> for weights shipped in inflora_ray/weights ({builtin_weights()})")
        reserved = {"num_classes", "img_size", "pretrained", "pretrained_cfg_overlay"}
        bad = sorted(reserved & set(self.kwargs))
        _require(not bad, "model.kwargs", f"must not set {bad}; use the dedicated fields")


@dataclass
class DataConfig:
    benchmark: Literal["digits", "cifar100", "imagenet-r", "domainnet"] = "digits"
    # The dataset's folder as released (cifar100: the folder holding cifar-100-python/; imagenet-r: the
    # imagenet-r/ folder of wnid folders; domainnet: the six domain folders + <domain>_{train,test}.txt).
    root: Optional[str] = None
    num_tasks: int = 5
    # Class order: the dataset's natural order unless an explicit list or a shuffle seed is given.
    class_order: Optional[list[int]] = None
    class_order_seed: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    # Prepared Parquet shards (`python -m inflora_ray.data prepare`): a local path or s3:// / gs:// URI;
    # when set, training reads them instead of data.root.
    shards: Optional[str] = None
    # CIFAR-100 only: download the release through torchvision into data.root when it is missing.
    download: bool = False
    # ImageNet-R split manifest: null (apply the versioned split rule to the files found), a JSON path
    # written by `python -m inflora_ray.data manifest imagenet-r`, or "packaged" (shipped with the package).
    manifest: Optional[str] = None
    # With a manifest: also check every file's sha256 (reads the whole dataset); sizes are always checked.
    verify_hashes: bool = False
    # "none": inputs in [0, 1] (the paper); "backbone": the timm pretrained config's mean/std of model.name;
    # "imagenet" / "inception": timm's constants.
    normalize: Literal["none", "backbone", "imagenet", "inception"] = "none"
    # Per-process LRU cache of encoded image bytes read from shards (whole row groups), in MiB.
    shard_cache_mb: int = 1024

    def validate(self) -> None:
        _require(self.num_tasks >= 1, "data.num_tasks", "must be >= 1")
        _require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.shard_cache_mb >= 1, "data.shard_cache_mb", "must be >= 1")
        _require(not (self.class_order is not None and self.class_order_seed is not None),
                 "data.class_order", "give either an explicit class_order or class_order_seed, not both")
        _require(not self.download or self.benchmark == "cifar100", "data.download",
                 "only CIFAR-100 can be downloaded; ImageNet-R and DomainNet must be on disk")
        _require(self.manifest is None or self.benchmark == "imagenet-r", "data.manifest",
                 "a split manifest only applies to benchmark 'imagenet-r'")
        if self.shards is not None:
            _require(self.benchmark != "digits", "data.shards",
                     "the digits quickstart is built in memory; shards apply to cifar100, imagenet-r, domainnet")
            _require(self.shards.strip() != "", "data.shards", "must not be empty")
            if "://" not in self.shards:
                _require(Path(self.shards).expanduser().is_dir(), "data.shards",
                         f"path not found: {self.shards!r}; prepare shards with `python -m inflora_ray.data "
                         "prepare BENCHMARK --source PATH --out URI`")
        elif self.benchmark != "digits":
            _require(self.root is not None, "data.root",
                     f"benchmark {self.benchmark!r} needs data.root (the dataset's folder), "
                     "e.g. data.root=/data/" + self.benchmark + ", or data.shards (prepared Parquet shards)")
            _require(Path(self.root).expanduser().exists() or self.download, "data.root",
                     f"path not found: {self.root!r}")


@dataclass
class TrainConfig:
    epochs: int = 20
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 5e-4
    head_lr: Optional[float] = None
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # "cosine": lr * cos(99 pi e / (200 (K - 1))) per epoch e of K (the paper's schedule);
    # "step": multiply by step_gamma at each epoch in step_milestones; "constant".
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the training forward (GPU; recompiles once per task)
    deterministic: bool = True

    def validate(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.head_lr is None or self.head_lr > 0, "train.head_lr", "must be > 0 or null")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 "must be two numbers in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _require(all(m >= 1 for m in self.step_milestones), "train.step_milestones",
                 "epochs are counted from 0; milestones must be >= 1")


@dataclass
class RunSection:
    """How the run is placed on Ray: workers, resources, storage, fault tolerance, checkpoints."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Where checkpoints and results go: a local directory, an NFS path, or an s3:// / gs:// URI.
    storage_path: str = "runs"
    name: Optional[str] = None
    # Worker failures tolerated (a failed worker group restarts from the latest checkpoint); -1: unlimited.
    max_failures: int = 0
    # Also checkpoint every K epochs inside a task (0: only at task boundaries).
    checkpoint_every_epochs: int = 0
    checkpoints_to_keep: Optional[int] = None
    # False: fail at once if the cluster can never place the workers; True: wait (autoscaling clusters).
    wait_for_resources: bool = False

    def validate(self) -> None:
        _require(self.num_workers >= 1, "run.num_workers", "must be >= 1")
        _require(self.cpus_per_worker > 0, "run.cpus_per_worker", "must be > 0")
        _require(self.gpus_per_worker > 0, "run.gpus_per_worker", "must be > 0")
        _require(self.storage_path.strip() != "", "run.storage_path", "must not be empty")
        _require(self.max_failures >= -1, "run.max_failures", "must be >= -1 (-1: unlimited)")
        _require(self.checkpoint_every_epochs >= 0, "run.checkpoint_every_epochs", "must be >= 0")
        _require(self.checkpoints_to_keep is None or self.checkpoints_to_keep >= 1, "run.checkpoints_to_keep",
                 "must be >= 1 or null (keep all)")
        if self.name is not None:
            _require(re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None, "run.name",
                     "may only contain letters, digits, '.', '_' and '-'")


@dataclass
class TrackingSection:
    """MLflow tracking: one run per experiment run, written by the driver only."""
    enabled: bool = True
    # Tracking URI; null: MLFLOW_TRACKING_URI when set, else MLflow's local default store in the working dir.
    uri: Optional[str] = None
    experiment: Optional[str] = None  # MLflow experiment name; null: experiment.name
    sweep_id: Optional[str] = None  # tag that groups the runs of one sweep
    log_checkpoint: bool = True  # upload the final checkpoint (adapters, heads, memory) as an artifact
    tags: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require(all(isinstance(k, str) for k in self.tags), "tracking.tags", "keys must be strings")


@dataclass
class DebugSection:
    """Fault injection for tests: the worker of rank ``fail_rank`` fails once, before step ``fail_at_step``
    of epoch ``fail_at_epoch`` of task ``fail_at_task`` ("exit": the process dies; "raise": an exception)."""
    fail_at_task: Optional[int] = None
    fail_at_epoch: int = 0
    fail_at_step: int = 0
    fail_rank: int = 0
    fail_mode: Literal["exit", "raise"] = "exit"

    def validate(self) -> None:
        _require(self.fail_at_task is None or self.fail_at_task >= 0, "debug.fail_at_task", "must be >= 0")


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def validate(self) -> "Config":
        """Check every section's fields; raise ConfigError on the first bad one."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable) of the resolved config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML that :func:`load_config` accepts."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


# ---------------------------------------------------------------------------------------------
# Building typed dataclasses from plain mappings
# ---------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if tp is dict or origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _build(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "config"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Presets, files, overrides
# ---------------------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """Names of the presets shipped in ``inflora_ray/configs``."""
    root = resources.files("inflora_ray") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(preset_or_path: str) -> dict:
    path = Path(preset_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {preset_or_path!r}")
        text = path.read_text()
    else:
        res = resources.files("inflora_ray") / "configs" / f"{preset_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"--config: {preset_or_path!r} is neither a YAML file nor a preset; "
                              f"presets are {list_presets()}")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {preset_or_path!r}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {preset_or_path!r}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        merged = _read_yaml(str(base))
        _deep_update(merged, data)
        data = merged
    return data


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "kwargs":
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. method.rank=8")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested dict in place."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    return _build(Config, dict(data)).validate()


def load_config(preset_or_path: str = "quickstart", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply overrides, validate."""
    data = _read_yaml(preset_or_path)
    apply_overrides(data, list(overrides or []))
    return config_from_dict(data)
