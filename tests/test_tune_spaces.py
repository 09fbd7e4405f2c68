"""Search-space files: the shipped ones load; bad ones fail before any trial starts, naming what to fix."""
from pathlib import Path

import pytest

from helpers import tiny_overrides
from inflora_ray.presets import load_config
from inflora_ray.distributed.search_space import SpaceError, load_space, valid_param_keys

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"


@pytest.fixture
def base():
    return load_config("quickstart", tiny_overrides())


@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_shipped_spaces_load(name):
    space = load_space(str(SPACES / name), load_config("quickstart"))
    assert space.params and space.to_tune()


def test_required_spaces_exist():
    assert {"rank_threshold.yaml", "lr.yaml"} <= {p.name for p in SPACES.glob("*.yaml")}


def _write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,message", [
    ("params:\n  method.rnak: {choice: [1, 2]}\n", r"unknown parameter 'method.rnak'; valid parameters are \[.*'method.rank'"),
    ("params:\n  method.rank: {choice: []}\n", r"method.rank: choice needs a non-empty list"),
    ("params:\n  train.lr: {uniform: [0.1, 0.01]}\n", r"train.lr: low 0.1 > high 0.01"),
    ("params:\n  train.lr: {loguniform: [0, 0.01]}\n", r"loguniform needs low > 0"),
    ("params:\n  train.lr: {normal: [0, 1]}\n", r"expected one of \{choice"),
    ("params:\n  method.rank: {choice: [4, 1000]}\n", r"method.rank=1000 gives an invalid config: method.rank=1000 is larger"),
    ("params:\n  method.lamb: {uniform: [0.5, 1.5]}\n", r"method.lamb=1.5 gives an invalid config"),
    ("params:\n  train.optimizer: {choice: [adam, rmsprop]}\n", r"train.optimizer='rmsprop' gives an invalid config"),
    ("params: {}\n", r"non-empty 'params:'"),
    ("metric: loss\nparams:\n  method.rank: {choice: [2]}\n", r"metric 'loss' is not reported per task"),
    ("bogus: 1\nparams:\n  method.rank: {choice: [2]}\n", r"unknown top-level key\(s\) \['bogus'\]"),
])
def test_bad_spaces_fail_fast(tmp_path, base, text, message):
    with pytest.raises(SpaceError, match=message):
        load_space(_write(tmp_path, text), base)


def test_missing_file(base):
    with pytest.raises(SpaceError, match="file not found"):
        load_space("/nonexistent/space.yaml", base)


def test_with_values_sets_flat_keys(base):
    cfg = base.with_values({"method.rank": 2, "train.lr": 0.01})
    assert cfg.method.rank == 2 and cfg.train.lr == 0.01
    assert "run.num_workers" not in valid_param_keys()  # placement is not a hyperparameter
