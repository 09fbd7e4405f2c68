"""Config: presets, overrides, and fail-fast validation naming the field and the allowed values."""
import json
import re

import numpy as np
import pytest
import yaml

from inflora_ray.config import (
    Config,
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunSection,
    config_from_dict,
    set_dotted,
)
from inflora_ray.presets import apply_overrides, list_presets, load_config


def test_quickstart_preset_loads():
    cfg = load_config("quickstart")
    assert cfg.method.name == "inflora" and cfg.data.benchmark == "digits" and cfg.data.num_tasks == 5
    assert "quickstart" in list_presets()


def test_overrides_are_typed():
    cfg = load_config("quickstart", ["method.rank=6", "train.lr=1e-3", "method.name=seq-lora",
                                     "data.class_order=[9,8,7,6,5,4,3,2,1,0]"])
    assert cfg.method.rank == 6 and cfg.train.lr == 1e-3 and cfg.method.name == "seq-lora"
    assert cfg.data.class_order == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


def test_yaml_file_round_trip(tmp_path):
    cfg = load_config("quickstart", ["method.rank=3"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


def test_base_inheritance(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("base: quickstart\nmethod: {rank: 2}\n")
    cfg = load_config(str(path))
    assert cfg.method.rank == 2 and cfg.method.lamb == load_config("quickstart").method.lamb


@pytest.mark.parametrize("override,message", [
    ("method.rnk=3", r"method: unknown key\(s\) \['rnk'\]; valid keys are \['name', 'rank'"),
    ("bogus.x=1", r"config: unknown key\(s\) \['bogus'\]"),
    ("method.rank=three", r"method.rank: expected int, got 'three'"),
    ("method.rank=2.5", r"method.rank: expected int"),
    ("method.name=lora", r"method.name: expected one of 'inflora', 'seq-lora', 'linear-probe'"),
    ("train.optimizer=rmsprop", r"train.optimizer: expected one of 'adam', 'sgd'"),
    ("method.rank=0", r"method.rank: must be >= 1"),
    ("method.lamb=1.5", r"method.lamb: must be in \(0, 1\]"),
    ("method.lame=0.9", r"method.lamb: must be <= method.lame"),
    ("train.epochs=0", r"train.epochs: must be >= 1"),
    ("train.betas=[0.9]", r"train.betas: must be two numbers"),
    ("model.name=resnet50", r"model.name: must be a timm ViT"),
    ("model.weights_file=/nonexistent/w.pth", r"model.weights_file: file not found"),
    ("data.benchmark=cifar100", r"data.root: benchmark 'cifar100' needs data.root"),
    ("data.root=/nonexistent", r"data.root: path not found"),
    ("noequals", r"expected section.key=value"),
])
def test_bad_inputs_fail_fast_with_the_field(override, message):
    overrides = [override]
    if override == "data.root=/nonexistent":
        overrides = ["data.benchmark=cifar100", override]
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", overrides)


def test_explicit_order_and_seed_are_exclusive():
    with pytest.raises(ConfigError, match="data.class_order: give either"):
        load_config("quickstart", ["data.class_order=[0,1]", "data.class_order_seed=3"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"neither a YAML file nor a preset; presets are \[.*'quickstart'"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/tmp/definitely-missing.yaml")


def test_scientific_notation_and_seeded_order():
    cfg = load_config("quickstart", ["train.lr=2e-4", "data.class_order_seed=1993"])
    assert cfg.train.lr == 2e-4 and cfg.data.class_order_seed == 1993


# ------------------------------------------------------------------------------------------ strict types, bounds
@pytest.mark.parametrize("override,message", [
    ("train.lr=.inf", r"train.lr: must be a finite number"),
    ("train.lr=.nan", r"train.lr: must be a finite number"),
    ("method.lamb=-.inf", r"method.lamb: must be a finite number"),
    ("train.lr=1e999", r"train.lr: must be a finite number"),
    ("train.betas=[0.9, .nan]", r"train.betas\[1\]: must be a finite number"),
    ("model.pretrained=1", r"model.pretrained: expected bool, got 1 \(int\)"),
    ("method.rank=true", r"method.rank: expected int, got True \(bool\)"),
    ("train.lr=true", r"train.lr: expected float, got True \(bool\)"),
    ("train.lr=fast", r"train.lr: expected float, got 'fast' \(str\)"),
    ("train.head_lr=x", r"train.head_lr: expected float or null, got 'x'"),
    ("train.head_lr=-1", r"train.head_lr: must be > 0 or null$"),
    ("train.momentum=1", r"train.momentum: must be in \[0, 1\)"),
    ("run.max_failures=-2", r"run.max_failures: must be >= -1 \(-1: unlimited\)"),
    ("run.checkpoints_to_keep=0", r"run.checkpoints_to_keep: must be >= 1 or null \(keep all\)"),
    ("data.class_order=[0,x]", r"data.class_order\[1\]: expected int, got 'x'"),
    ("data.class_order=3", r"data.class_order: expected a list of int or null, got 3 \(int\)"),
    ("method=3", r"method: expected MethodConfig, got 3 \(int\)"),
    ("model.kwargs=3", r"model.kwargs: expected a mapping"),
    ("method.rank.x=1", r"override 'method.rank.x=1': 'rank' is not a section"),
    ("data.benchmark=mnist", r"data.benchmark: expected one of 'digits', 'cifar100', 'imagenet-r', 'domainnet', got"),
    ("data.manifest=packaged", r"data.manifest: a split manifest only applies to benchmark 'imagenet-r'"),
    ("run.name=a/b", r"run.name: .a/b. cannot name a folder"),
    ("run.name=..", r"run.name: .\.\.. cannot name a folder"),
    ("model.kwargs={num_classes: 3}", r"model.kwargs: must not set \['num_classes'\]"),
    ("train.precision=fp8", r"train.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
])
def test_strict_types_bounds_and_checks(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


def test_fractional_gpus_are_refused_for_multi_worker_runs_only():
    with pytest.raises(ConfigError, match=r"run.gpus_per_worker: 0.5 with run.num_workers=2 and run.use_gpu would "
                                          r"put two ranks of one run on one GPU, which NCCL cannot do; .*fractional "
                                          r"GPUs are for 1-worker trials in sweeps"):
        load_config("quickstart", ["run.use_gpu=true", "run.num_workers=2", "run.gpus_per_worker=0.5"])
    for ok in (["run.use_gpu=true", "run.num_workers=1", "run.gpus_per_worker=0.25"],  # a sweep trial
               ["run.use_gpu=true", "run.num_workers=4", "run.gpus_per_worker=1"],
               ["run.use_gpu=false", "run.num_workers=2", "run.gpus_per_worker=0.5"]):  # CPUs: not used
        load_config("quickstart", ok)
    with pytest.raises(ConfigError, match="NCCL"):  # also when the section is built directly
        RunSection(use_gpu=True, num_workers=3, gpus_per_worker=0.5)


def test_numbers_accepted_as_today():
    cfg = load_config("quickstart", ["train.lr=1", "train.weight_decay=1E-4", "run.cpus_per_worker=2",
                                     "train.head_lr=+5e-3"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 1e-4
    assert cfg.run.cpus_per_worker == 2.0 and cfg.train.head_lr == 5e-3


def test_errors_never_show_pydantic_text():
    for override in ("method.rank=three", "data.bogus=1", "train.lr=.inf", "run.max_failures=-5", "method=[]"):
        with pytest.raises(ConfigError) as e:
            load_config("quickstart", [override])
        assert "pydantic" not in str(e.value) and "validation error" not in str(e.value)


def test_names_are_the_config_lists_which_the_registries_hold():
    from inflora_ray.config import BENCHMARK_NAMES, METHOD_NAMES
    from inflora_ray.core.methods import METHODS
    from inflora_ray.data.registry import benchmark_names
    assert sorted(METHODS) == sorted(METHOD_NAMES) and benchmark_names() == list(BENCHMARK_NAMES)
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", ["method.name=lora"])
    assert str(e.value) == ("method.name: expected one of " + ", ".join(map(repr, METHOD_NAMES)) + ", got 'lora' (str)")
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", ["data.benchmark=3"])
    assert str(e.value) == ("data.benchmark: expected one of " + ", ".join(map(repr, BENCHMARK_NAMES))
                            + ", got 3 (int)")


def test_sections_built_directly_raise_config_error():
    with pytest.raises(ConfigError, match="model.name: must be a timm ViT"):
        ModelConfig(name="resnet18")
    with pytest.raises(ConfigError, match=r"data.batch_size: expected int, got True \(bool\)"):
        DataConfig(batch_size=True)
    with pytest.raises(ConfigError, match=r"method: unknown key\(s\) \['rnk'\]"):
        MethodConfig(rnk=3)
    assert DataConfig(class_order=(1, 0)).class_order == [1, 0]  # tuples pass for lists


# ------------------------------------------------------------------------------------------ loader processes
def test_loader_workers_are_data_loader_processes():
    with pytest.raises(ConfigError,
                       match=r"data: unknown key\(s\) \['num_workers'\]; valid keys are .*'loader_workers'"):
        load_config("quickstart", ["data.num_workers=2"])
    assert load_config("quickstart", ["data.loader_workers=2"]).data.loader_workers == 2
    with pytest.raises(ConfigError, match="data.loader_workers: must be >= 0"):
        load_config("quickstart", ["data.loader_workers=-1"])


def test_no_debug_section():
    with pytest.raises(ConfigError, match=r"config: unknown key\(s\) \['debug'\]"):
        load_config("quickstart", ["debug.fail_at_task=0"])
    assert "debug" not in Config().to_dict()


# ------------------------------------------------------------------------------------------ base: chains
def test_base_cycle_is_named(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\nmethod: {{rank: 2}}\n")
    b.write_text(f"base: {a}\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {a}: base: cycle {a} -> {b} -> {a}")):
        load_config(str(a))
    c = tmp_path / "c.yaml"
    c.write_text(f"base: {c}\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {c}: base: cycle {c} -> {c}")):
        load_config(str(c))


def test_base_chain_through_presets(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: imagenet-r-10\nexperiment: {name: mine}\n")
    cfg = load_config(str(child), [f"data.root={tmp_path}"])
    assert (cfg.experiment.name, cfg.data.num_tasks, cfg.data.benchmark) == ("mine", 10, "imagenet-r")


# ------------------------------------------------------------------------------------------ immutability, with_values
def test_config_is_frozen():
    cfg = load_config("quickstart")
    with pytest.raises(ValueError, match="frozen"):
        cfg.method.rank = 3
    with pytest.raises(ValueError, match="frozen"):
        cfg.run = RunSection()
    assert cfg.method.rank == 10


def test_with_values_returns_a_new_validated_config():
    cfg = load_config("quickstart")
    new = cfg.with_values({"run.name": "x", "experiment.seed": np.int64(3), "train.lr": np.float32(0.5),
                           "model.kwargs.depth": 2})
    assert (new.run.name, new.experiment.seed, new.train.lr, new.model.kwargs["depth"]) == ("x", 3, 0.5, 2)
    assert type(new.experiment.seed) is int and new.model.kwargs["patch_size"] == 8
    assert cfg.run.name is None and cfg.experiment.seed == 0 and cfg.model.kwargs["depth"] == 4
    assert cfg == load_config("quickstart") and new is not cfg
    with pytest.raises(ConfigError, match="method.rank: must be >= 1"):
        cfg.with_values({"method.rank": 0})
    with pytest.raises(ConfigError, match=r"run: unknown key\(s\) \['nme'\]"):
        cfg.with_values({"run.nme": "x"})
    with pytest.raises(ConfigError, match="run.name: .a b. cannot name a folder"):
        cfg.with_values({"run.name": "a b"})


def test_set_dotted_and_apply_overrides():
    data = {"method": {"rank": 3}}
    assert set_dotted(data, "method.lamb", 0.9) is data and data == {"method": {"rank": 3, "lamb": 0.9}}
    set_dotted(data, "run.name", "x")
    assert data["run"] == {"name": "x"}
    with pytest.raises(ConfigError, match="'rank' is not a section"):
        set_dotted(data, "method.rank.x", 1)
    assert apply_overrides({}, ["train.betas=[0.9, 0.99]"]) == {"train": {"betas": [0.9, 0.99]}}


# ------------------------------------------------------------------------------------------ serialisation
def test_flat_recurses_into_non_empty_mappings():
    cfg = load_config("quickstart", ["tracking.tags={team: cl}"])
    flat = cfg.flat()
    assert flat["method.rank"] == 10 and flat["model.kwargs.patch_size"] == 8 and flat["tracking.tags.team"] == "cl"
    assert "model.kwargs" not in flat and flat["data.class_order"] is None
    assert Config().flat()["model.kwargs"] == {} and "run.num_workers" in flat and "data.loader_workers" in flat
    assert not any(k.startswith("debug.") for k in flat)


@pytest.mark.parametrize("preset", ["quickstart", "cifar100-10", "imagenet-r-5", "domainnet-5"])
def test_yaml_round_trip_gives_an_equal_config(preset, tmp_path):
    overrides = [f"data.root={tmp_path}"] if preset != "quickstart" else []
    cfg = load_config(preset, overrides + ["data.class_order_seed=7", "train.head_lr=1e-3", "tracking.tags={a: b}",
                                           "run.cpus_per_worker=2", "run.name=r1"])
    path = tmp_path / "round.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_resume_refuses_a_stored_config_with_an_unknown_key(tmp_path):
    """A stored config holding a key this version does not know (a hand-edited file, another version's) is
    refused with the key named, before anything runs."""
    import yaml

    from inflora_ray.ray_train.resume import load_run_config

    data = load_config("quickstart").to_dict()
    data["debug"] = {"fail_at_task": None}
    (tmp_path / "old" / "results").mkdir(parents=True)
    (tmp_path / "old" / "results" / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"config: unknown key\(s\) \['debug'\]"):
        load_run_config(str(tmp_path), "old", [])
    del data["debug"]
    (tmp_path / "old" / "results" / "config.yaml").write_text(yaml.safe_dump(data))
    cfg, name, stored = load_run_config(str(tmp_path), "old", ["data.loader_workers=2"])
    assert name == "old" and cfg.data.loader_workers == 2 and stored["data"]["loader_workers"] == 0

def test_print_config_refuses_what_a_run_would_refuse_before_training(capsys, tmp_path, monkeypatch):
    from inflora_ray.run import main

    monkeypatch.chdir(tmp_path)  # the default storage path, runs/, would be made here: it must not be

    assert main(["--print-config", "method.rank=1000"]) == 2
    err = capsys.readouterr().err
    assert "error: method.rank=1000 is larger than the adapted layers' input dim 192" in err
    assert main(["--print-config", "--config", "cifar100-10", f"data.root={tmp_path / 'nope'}"]) == 2
    assert "data.root: path not found" in capsys.readouterr().err
    assert main(["--print-config", "method.rank=8"]) == 0
    out = capsys.readouterr().out
    assert load_config("quickstart", ["method.rank=8"]).to_dict() == __import__("yaml").safe_load(out)
    assert list(tmp_path.iterdir()) == []
