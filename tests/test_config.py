"""Config: presets, overrides, and fail-fast validation naming the field and the allowed values."""
import pytest

from inflora_ray.config import ConfigError, list_presets, load_config


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
