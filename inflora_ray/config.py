"""Typed experiment configuration: YAML presets, ``section.key=value`` overrides, validation.

Every field is checked before any compute is spent; a bad value raises :class:`ConfigError` naming the field and
what it accepts. The sections are frozen pydantic models: a validated config is never mutated, only replaced
(:meth:`Config.with_values`). Every key is described in docs/configuration.md; presets, files and overrides are read by
:mod:`inflora_ray.presets`.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config_errors import ConfigError, config_error

__all__ = ["BENCHMARK_NAMES", "METHOD_NAMES", "Config", "ConfigError", "DataConfig", "ExperimentConfig",
           "MethodConfig", "ModelConfig", "RunSection", "TrackingSection", "TrainConfig", "config_from_dict"]

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# The names a config accepts. The methods register under these names (inflora_ray.core.methods.registry, which
# refuses any other) and the benchmarks are declared under these (inflora_ray.data.registry); tests check that
# both registries hold exactly these. The config itself imports neither.
METHOD_NAMES = ("inflora", "seq-lora", "linear-probe", "joint", "joint-lora", "sd-lora", "sd-lora-kv", "l2p", "l2p-pp",
                "dualprompt", "coda-prompt")
BENCHMARK_NAMES = ("digits", "cifar100", "imagenet-r", "domainnet")
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
BenchmarkName = Literal[BENCHMARK_NAMES]  # type: ignore[valid-type]


def builtin_weights() -> list[str]:
    """Names of the backbone weights shipped in the package (``builtin:<name>``)."""
    root = resources.files("inflora_ray") / "weights"
    return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".pth")) if root.is_dir() else []


def resolve_weights_file(spec: str) -> str:
    """A weights path: ``builtin:<name>`` -> the file shipped in ``inflora_ray/weights``, else the path."""
    if spec.startswith("builtin:"):
        return str(resources.files("inflora_ray") / "weights" / f"{spec.removeprefix('builtin:')}.pth")
    return str(Path(spec).expanduser())


# Names that become a folder (run, sweep): no separators, no '.'/'..', nothing hidden, a portable length.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
NAME_RULE = "letters, digits, '.', '_' and '-', not starting with '.' or '-', at most 128 characters"


def check_name(name: object, what: str) -> str:
    """``name`` if it may name a run or sweep folder, else a ConfigError saying ``what`` is wrong and the rule."""
    _require(isinstance(name, str) and _NAME.fullmatch(name) is not None, what,
             f"{name!r} cannot name a folder: use {NAME_RULE}")
    return name  # type: ignore[return-value]


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; empty mappings stay values."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


# Keys that say where and how a run is placed, stored or watched, not what it computes.
_PLACEMENT = ("run.", "tracking.")
_FREE_KEYS = {"experiment.log_every_steps", "data.root", "data.shards", "data.loader_workers",
              "data.eval_batch_size", "data.shard_cache_mb", "data.device_cache_mb", "data.block_cache_mb",
              "data.block_cache_dir", "data.verify_hashes", "data.download", "data.verify_release", "train.compile",
              "train.compile_mode", "train.compile_backend"}


def alters_results(key: str) -> bool:
    """False for the flat config keys that cannot change a run's numbers (placement, storage, tracking,
    loaders, logging); a resumed run may change those freely, and runs that differ only in them compare."""
    return not key.startswith(_PLACEMENT) and key not in _FREE_KEYS


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


# PyYAML reads 1e-3 (no dot) as a string: float fields take it. List fields take tuples too.
_scientific = BeforeValidator(lambda v: float(v) if isinstance(v, str) and _SCIENTIFIC.fullmatch(v.strip()) else v)
_tuple = BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v)
Float = Annotated[float, _scientific]
Ints = Annotated[list[int], _tuple]
Floats = Annotated[list[Float], _tuple]


class _Model(BaseModel):
    """Strict, frozen, closed: no int for bool, no float for int, no string for a number, no unknown key."""
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)
    section: ClassVar[str] = ""  # the section's key in Config ("" for Config itself): where error paths start

    def __init__(self, **data: Any):
        """Validate; a bad value raises ConfigError, also when a section is built directly."""
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self)) from None

    @model_validator(mode="after")
    def _after(self) -> _Model:
        self._check()
        return self

    def _check(self) -> None:
        """Checks across fields and against the file system; raise ConfigError."""


class ExperimentConfig(_Model):
    """Name, seed and logging cadence of the experiment."""
    section: ClassVar[str] = "experiment"
    name: str = "inflora"
    seed: int = Field(0, ge=0)
    log_every_steps: int = Field(20, ge=1)

    def _check(self) -> None:
        _require(self.name.strip() != "", "experiment.name", "must not be empty")


class MethodConfig(_Model):
    """The continual-learning method (one of :data:`METHOD_NAMES`) and its hyperparameters."""
    section: ClassVar[str] = "method"
    name: MethodName = "inflora"
    rank: int = Field(10, ge=1)
    lamb: Float = Field(0.95, gt=0, le=1)
    lame: Float = Field(1.0, gt=0, le=1)
    memory_representation: Literal["auto", "remove", "retain"] = "auto"  # DualGPM: auto switches past d/2
    # L2P and L2P++ (a prompt pool matched to the query, docs/baselines.md#l2p); read only when name is l2p or
    # l2p-pp. l2p puts the chosen prompts at the input; l2p-pp prepends them as key/value prefixes in
    # l2p_prefix_layers (each prompt of length L split into L/2 keys and L/2 values).
    l2p_pool_size: int = Field(10, ge=1)
    l2p_length: int = Field(5, ge=1)
    l2p_top_k: int = Field(5, ge=1)
    l2p_pull_coef: Float = Field(0.1, ge=0)
    l2p_prefix_layers: Ints = Field(default_factory=lambda: [0])
    # l2p only: prompts and keys drawn from U[0, 0.01) ("jax", the official code's) or U(-1, 1) ("port", its
    # PyTorch port's); docs/baselines.md#l2p measures both.
    l2p_init: Literal["jax", "port"] = "jax"
    # DualPrompt (G-/E-prefixes, docs/baselines.md#dualprompt); read only when name is dualprompt.
    dualprompt_g_length: int = Field(6, ge=2)
    dualprompt_g_layers: Ints = Field(default_factory=lambda: [0, 1])
    dualprompt_e_length: int = Field(20, ge=2)
    dualprompt_e_layers: Ints = Field(default_factory=lambda: [2, 3, 4])
    dualprompt_pull_coef: Float = Field(1.0, ge=0)
    # CODA-Prompt (attention-weighted components, docs/baselines.md#coda-prompt); read only when name is coda-prompt.
    coda_pool_size: int = Field(100, ge=1)
    coda_length: int = Field(8, ge=2)
    coda_layers: Ints = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    coda_ortho_mu: Float = Field(0.0, ge=0)

    def _check(self) -> None:
        _require(self.lamb <= self.lame, "method.lamb", f"must be <= method.lame ({self.lame})")
        _require(self.l2p_top_k <= self.l2p_pool_size, "method.l2p_top_k",
                 f"must be <= method.l2p_pool_size ({self.l2p_pool_size}): top-N prompts are chosen from the pool")
        for key in ("dualprompt_g_length", "dualprompt_e_length", "coda_length"):
            _require(getattr(self, key) % 2 == 0, f"method.{key}",
                     f"must be even (a prefix of length L is split into L/2 keys and L/2 values), got {getattr(self, key)}")
        for key in ("dualprompt_g_layers", "dualprompt_e_layers", "coda_layers", "l2p_prefix_layers"):
            layers = getattr(self, key)
            _require(all(i >= 0 for i in layers) and len(set(layers)) == len(layers), f"method.{key}",
                     f"must be distinct block indices >= 0 (counted from 0), got {layers}")
        _require(bool(self.coda_layers), "method.coda_layers", "must name at least one block")
        _require(bool(self.dualprompt_e_layers), "method.dualprompt_e_layers", "must name at least one block")
        if self.name == "l2p-pp":
            _require(self.l2p_length % 2 == 0, "method.l2p_length", "must be even for l2p-pp (each prompt of length "
                     f"L is split into L/2 keys and L/2 values), got {self.l2p_length}")
            _require(bool(self.l2p_prefix_layers), "method.l2p_prefix_layers", "must name at least one block")


class ModelConfig(_Model):
    """The timm ViT backbone and its weights."""
    section: ClassVar[str] = "model"
    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    weights_file: str | None = None  # a state_dict path, or builtin:<name> (inflora_ray/weights)
    img_size: int = Field(224, ge=8)
    kwargs: dict = Field(default_factory=dict)  # extra timm.create_model arguments (patch_size, depth, ...)

    @field_validator("weights_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """A local path with ``~`` expanded and made absolute against the working directory (Ray workers run in
        other folders); ``builtin:<name>`` and blank values (refused by ``_check``) stay as given."""
        if value is None or not value.strip() or value.startswith("builtin:"):
            return value
        return str(Path(value).expanduser().absolute())

    def _check(self) -> None:
        _require(self.name.startswith("vit_"), "model.name",
                 f"must be a timm ViT (a name starting with 'vit_'), got {self.name!r}")
        _require(self.weights_file is None or Path(resolve_weights_file(self.weights_file)).is_file(),
                 "model.weights_file", f"file not found: {self.weights_file!r}; give the path of a saved state_dict"
                 f" or builtin:<name> for weights shipped in inflora_ray/weights ({builtin_weights()})")
        bad = sorted({"num_classes", "img_size", "pretrained", "pretrained_cfg_overlay"} & set(self.kwargs))
        _require(not bad, "model.kwargs", f"must not set {bad}; use the dedicated fields")


class DataConfig(_Model):
    """The benchmark (one of :data:`BENCHMARK_NAMES`), where it is, its task split and loaders.

    Local paths (``root``, ``shards``, ``manifest``) are stored absolute, so that Ray workers, whose working
    directory differs, read the same files. What depends on the benchmark itself (which options apply to it,
    whether its dataset is there) is checked by :func:`inflora_ray.data.registry.check_data_config`.
    """
    section: ClassVar[str] = "data"
    benchmark: BenchmarkName = "digits"
    root: str | None = None  # the dataset's folder as released
    num_tasks: int = Field(5, ge=1)
    class_order: Ints | None = None
    class_order_seed: int | None = None
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per Ray worker (not run.num_workers)
    shards: str | None = None  # prepared Parquet shards (path or URI), read instead of root
    download: bool = False
    manifest: str | None = None  # split manifest: a JSON path or "packaged"
    verify_hashes: bool = False
    verify_release: bool = True  # CIFAR-100: the files' MD5 must be the official release's (false: modified copy)
    normalize: Literal["none", "backbone", "imagenet", "inception"] = "none"
    shard_cache_mb: int = Field(1024, ge=1)  # per-process LRU of row groups, for blocks that are not staged
    # Local disk per Ray worker for its staged blocks of the tasks (read from the shards once per task); 0: off
    block_cache_mb: int = Field(32768, ge=0)
    block_cache_dir: str | None = None  # where staged blocks go (a private folder in it); null: system temp
    # Input pipeline: "cpu" decodes and augments in DataLoader processes every epoch; "device" caches each
    # task's decoded images (uint8) and crops/flips/normalises on the training device; "auto": device on CUDA.
    pipeline: Literal["auto", "cpu", "device"] = "auto"
    device_cache_mb: int = Field(8192, ge=0)  # per worker; images beyond it are decoded again in every pass
    device_cache_side: int | None = Field(None, ge=1)  # cache images with a larger shorter side resized to it
    # Held-out validation: this fraction of every class's training images is kept out of training and the run is
    # evaluated on it instead of the test images (how a sweep chooses without looking at the test set). The
    # split depends on val_seed only, so every trial and seed of a sweep holds out the same images.
    # null: 0 for a run, the sweep's default (inflora_ray.ray_tune.sweep.SWEEP_VAL_FRACTION) for a sweep.
    val_fraction: Float | None = Field(None, ge=0, le=0.5)
    val_seed: int = 0

    @field_validator("root", "shards", "manifest", "block_cache_dir")
    @classmethod
    def _absolute(cls, value: str | None, info) -> str | None:
        """A local path with ``~`` expanded and made absolute against the working directory; URIs, the
        manifest name ``packaged`` and blank values (refused by ``_check``) stay as given. ``info``: pydantic's
        ValidationInfo (which field)."""
        if value is None or not value.strip() or "://" in value or (info.field_name, value) == ("manifest", "packaged"):
            return value
        return str(Path(value).expanduser().absolute())

    @property
    def eval_split(self) -> Literal["validation", "test"]:
        """What a run's accuracies are measured on: ``validation`` (images held out of the training data, with
        ``val_fraction`` > 0) or ``test``."""
        return "validation" if self.val_fraction else "test"

    def _check(self) -> None:
        _require(self.class_order is None or self.class_order_seed is None,
                 "data.class_order", "give either an explicit class_order or class_order_seed, not both")
        _require(self.block_cache_dir is None or ("://" not in self.block_cache_dir
                                                  and self.block_cache_dir.strip() != ""),
                 "data.block_cache_dir", "must be a local folder (blocks are staged on the worker's own disk)")
        for key in ("root", "shards"):
            _require(getattr(self, key) is None or getattr(self, key).strip() != "", f"data.{key}", "must not be empty")


class TrainConfig(_Model):
    """Optimiser, schedule, device and precision of the per-task training."""
    section: ClassVar[str] = "train"
    epochs: int = Field(20, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: Float = Field(5e-4, gt=0)
    head_lr: Float | None = Field(None, gt=0)  # null: lr
    momentum: Float = Field(0.9, ge=0, lt=1)
    betas: Floats = Field(default_factory=lambda: [0.9, 0.999])
    weight_decay: Float = Field(0.0, ge=0)
    # cosine: factor f(e) = cos(99 pi e / (200 (K - 1))) in epoch e of K; cosine-repeat-first: f(0), f(0), f(1),
    # ..., f(K - 2), the factors the InfLoRA and CODA-Prompt reference code applies (docs/method.md#learning-rate)
    schedule: Literal["cosine", "cosine-repeat-first", "step", "constant"] = "cosine"
    step_milestones: Ints = Field(default_factory=list)
    step_gamma: Float = 0.1
    # Clip the global gradient norm (over every trained tensor, after the all-reduce) to this value; null: no
    # clipping. The L2P references clip at 1.0 (docs/baselines.md#l2p).
    grad_clip: Float | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 / fp16 + grad scaler / fp32
    compile: bool = False
    # How train.compile compiles (docs/performance.md#compiled-training-step): inductor's default mode; or its
    # max-autotune-no-cudagraphs (tries matmul kernels, a longer compile); aot_eager / eager stop before
    # inductor (AOTAutograd, or Dynamo alone): to find which stage a compiler bug is in, and for tests.
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    deterministic: bool = True

    def _check(self) -> None:
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 "must be two numbers in [0, 1)")
        _require(all(m >= 1 for m in self.step_milestones), "train.step_milestones",
                 "epochs are counted from 0; milestones must be >= 1")


class RunSection(_Model):
    """How the run is placed on Ray: workers, resources, storage, fault tolerance, checkpoints."""
    section: ClassVar[str] = "run"
    num_workers: int = Field(1, ge=1)  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: Float = Field(1.0, gt=0)
    gpus_per_worker: Float = Field(1.0, gt=0)
    storage_path: str = "runs"  # local directory, NFS path, or s3:// / gs:// URI
    name: str | None = None
    max_failures: int = Field(0, ge=-1, description="-1: unlimited")
    checkpoint_every_epochs: int = Field(0, ge=0)  # 0: only at task boundaries
    # Mid-task checkpoints (checkpoint_every_epochs) kept: the latest N; task-boundary ones are always kept.
    checkpoints_to_keep: int | None = Field(2, ge=1, description="keep all")
    wait_for_resources: bool = False

    def _check(self) -> None:
        _require(self.storage_path.strip() != "", "run.storage_path", "must not be empty")
        _require(not (self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1), "run.gpus_per_worker",
                 f"{self.gpus_per_worker:g} with run.num_workers={self.num_workers} and run.use_gpu would put two "
                 "ranks of one run on one GPU, which NCCL cannot do; use run.gpus_per_worker >= 1 (fractional "
                 "GPUs are for 1-worker trials in sweeps)")
        if self.name is not None:
            check_name(self.name, "run.name")


class TrackingSection(_Model):
    """MLflow tracking: one run per experiment run, written by the driver only."""
    section: ClassVar[str] = "tracking"
    enabled: bool = True
    uri: str | None = None  # null: MLFLOW_TRACKING_URI, else MLflow's local store
    experiment: str | None = None  # null: experiment.name
    sweep_id: str | None = None
    log_checkpoint: bool = True
    tags: dict = Field(default_factory=dict)

    def _check(self) -> None:
        _require(all(isinstance(k, str) for k in self.tags), "tracking.tags", "keys must be strings")


class Config(_Model):
    """The whole experiment: one frozen model per section."""
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunSection = Field(default_factory=RunSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    def _check(self) -> None:
        m, depth = self.method, self.model.kwargs.get("depth")
        if m.name == "coda-prompt":
            _require(m.coda_pool_size >= self.data.num_tasks, "method.coda_pool_size",
                     f"must be >= data.num_tasks ({self.data.num_tasks}): each task gets "
                     "coda_pool_size // num_tasks components")
        layers = {"dualprompt": ("dualprompt_g_layers", "dualprompt_e_layers"), "coda-prompt": ("coda_layers",)}
        for key in layers.get(m.name, ()) if isinstance(depth, int) else ():
            bad = [i for i in getattr(m, key) if i >= depth]
            _require(not bad, f"method.{key}", f"blocks {bad} do not exist: model.kwargs.depth is {depth} "
                     f"(blocks 0..{depth - 1})")

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-serialisable) of the resolved config."""
        return self.model_dump()

    def to_yaml(self) -> str:
        """The resolved config as YAML that :func:`load_config` accepts."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}``; non-empty mappings (model.kwargs, tracking.tags) are flattened too."""
        return flatten(self.to_dict())

    def with_values(self, values: dict[str, Any]) -> Config:
        """A new validated config with the flat ``section.key`` values set (numpy/torch scalars unwrapped)."""
        data = self.to_dict()
        for key, value in values.items():
            set_dotted(data, key, value.item() if getattr(value, "ndim", None) == 0 else value)
        return config_from_dict(data)


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """Set ``data[a][b]... = value`` for ``key = "a.b..."`` in place, creating missing sections."""
    keys = [k for k in key.split(".") if k]
    _require(bool(keys), repr(key), "empty key")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        _require(isinstance(node, dict), key, f"{k!r} is not a section")
    node[keys[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise config_error(e, Config) from None
