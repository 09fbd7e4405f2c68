"""Search-space files: the shipped ones load; bad ones fail before any trial starts, naming what to fix."""
from pathlib import Path

import pytest
from helpers import tiny_overrides

from inflora_ray.ray_tune.search_space import (
    SpaceError,
    check_sample,
    load_space,
    valid_param_keys,
)
from inflora_ray.presets import load_config

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
    ("params:\n  method.rnak: {choice: [1, 2]}\n",
     r"unknown parameter 'method.rnak'; valid parameters are \[.*'method.rank'"),
    ("params:\n  method.rank: {choice: []}\n", r"method.rank: choice needs a non-empty list"),
    ("params:\n  experiment.seed: {grid: [0, 1, 2]}\n",
     r"experiment.seed cannot be searched: a sweep would pick the luckiest seed.*--seeds-per-trial"),
    ("params:\n  train.lr: {uniform: [0.1, 0.01]}\n", r"train.lr: low 0.1 > high 0.01"),
    ("params:\n  train.lr: {loguniform: [0, 0.01]}\n", r"loguniform needs low > 0"),
    ("params:\n  train.lr: {normal: [0, 1]}\n", r"expected one of \{choice"),
    ("params:\n  method.rank: {choice: [4, 1000]}\n",
     r"method.rank=1000 gives an invalid config: method.rank=1000 is larger"),
    ("params:\n  method.lamb: {uniform: [0.5, 1.5]}\n", r"method.lamb=1.5 gives an invalid config"),
    ("params:\n  train.optimizer: {choice: [adam, rmsprop]}\n", r"train.optimizer='rmsprop' gives an invalid config"),
    ("params: {}\n", r"non-empty 'params:'"),
    ("metric: loss\nparams:\n  method.rank: {choice: [2]}\n", r"metric 'loss' is not reported per task"),
    ("bogus: 1\nparams:\n  method.rank: {choice: [2]}\n", r"unknown top-level key\(s\) \['bogus'\]"),
    # distribution vs the field's declared type
    ("params:\n  method.rank: {uniform: [4, 16]}\n",
     r"method.rank is an integer field but uniform samples floats .*use randint: \[low, high\] or choice"),
    ("params:\n  method.rank: {loguniform: [4, 16]}\n", r"method.rank is an integer field .*use randint"),
    ("params:\n  method.rank: {choice: [4, 8.5]}\n", r"method.rank is an integer field; choice value\(s\) \[8.5\]"),
    ("params:\n  train.epochs: {grid: [1, true]}\n", r"train.epochs is an integer field; grid value\(s\) \[True\]"),
    ("params:\n  train.optimizer: {uniform: [0, 1]}\n", r"train.optimizer takes one of 'adam', 'sgd': only choice"),
    ("params:\n  train.compile: {randint: [0, 1]}\n", r"train.compile takes bool: only choice: \[...\] or grid"),
    # cross-field rules at the joint corners of ranges and every combination of listed values
    ("params:\n  method.lamb: {uniform: [0.9, 0.99]}\n  method.lame: {uniform: [0.95, 1.0]}\n",
     r"method.lamb=0.99 with method.lame=0.95 give an invalid config: method.lamb: must be <= method.lame \(0.95\); "
     + r"make the ranges not overlap"),
    ("params:\n  method.lamb: {choice: [0.9, 0.97]}\n  method.lame: {grid: [0.96, 1.0]}\n",
     r"method.lamb=0.97 with method.lame=0.96 give an invalid config: .*every combination of choice/grid values"),
    ("params:\n  method.lame: {uniform: [0.9, 1.0]}\n", r"method.lame=0.9 gives an invalid config: method.lamb: "
     + r"must be <= method.lame"),  # base lamb is 0.95
    ("params:\n  method.rank: {randint: [2, 100]}\n  train.lr: {uniform: [0.001, 0.01]}\n",
     r"method.rank=100 gives an invalid config: method.rank=100 is larger"),
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


@pytest.mark.parametrize("text", [
    "params:\n  method.lamb: {uniform: [0.8, 0.95]}\n  method.lame: {uniform: [0.95, 1.0]}\n",  # may touch
    "params:\n  method.lamb: {choice: [0.9, 0.95]}\n  method.lame: {grid: [0.95, 1.0]}\n",
    "params:\n  method.lamb: {uniform: [0.5, 0.6]}\n  method.lame: {choice: [0.6, 0.7]}\n"
    + "  method.rank: {randint: [1, 8]}\n  train.lr: {loguniform: [1.0e-4, 1]}\n"
    + "  train.momentum: {uniform: [0, 0.9]}\n",
    "params:\n  train.lr: {randint: [1, 3]}\n  train.optimizer: {choice: [adam, sgd]}\n",  # ints are valid floats
])
def test_good_spaces_load(tmp_path, base, text):
    space = load_space(_write(tmp_path, text), base)
    assert space.params and space.to_tune()


def test_large_space_checks_pairs(tmp_path, base, monkeypatch):
    """Past MAX_COMBINATIONS the check covers every pair of parameters: a bad pair is still found."""
    import inflora_ray.ray_tune.search_space as ss

    monkeypatch.setattr(ss, "MAX_COMBINATIONS", 4)
    text = ("params:\n  train.epochs: {choice: [1, 2, 3]}\n  method.lamb: {uniform: [0.5, 0.97]}\n"
            "  method.lame: {choice: [1.0, 0.96]}\n")
    with pytest.raises(SpaceError, match=r"method.lamb=0.97 with method.lame=0.96 give an invalid config"):
        load_space(_write(tmp_path, text), base)


def test_check_sample(base):
    cfg = check_sample(base, {"method.lamb": 0.9, "method.lame": 0.96, "method.rank": 2})
    assert (cfg.method.lamb, cfg.method.lame, cfg.method.rank) == (0.9, 0.96, 2)
    with pytest.raises(SpaceError, match=r"^sampled method.lamb=0.97 with method.lame=0.96 give an invalid config: "
                                         r"method.lamb: must be <= method.lame \(0.96\)$"):
        check_sample(base, {"method.lamb": 0.97, "method.lame": 0.96, "method.rank": 2})
    with pytest.raises(SpaceError, match=r"^sampled method.rank=4.5 gives an invalid config: method.rank"):
        check_sample(base, {"method.rank": 4.5, "train.lr": 0.01})


def test_repeating_an_all_grid_space_with_the_same_seeds_is_refused(tmp_path, base):
    """--num-samples N on grid parameters only would run each point N times with the same seeds; mixed with a
    sampled parameter each sample differs, and one sample is always fine."""
    from inflora_ray.ray_tune.sweep import SweepOptions, check_no_repeats

    grid = load_space(_write(tmp_path, "params:\n  method.lamb: {grid: [0.9, 0.95]}\n"), base)
    mixed = load_space(_write(tmp_path, "params:\n  method.lamb: {grid: [0.9, 0.95]}\n"
                                        "  train.lr: {loguniform: [0.001, 0.01]}\n"), base)
    with pytest.raises(SpaceError, match=r"--num-samples 3 on a space of grid parameters only .* same seeds.*"
                                         r"--seeds-per-trial 3"):
        check_no_repeats(grid, SweepOptions(num_samples=3))
    check_no_repeats(grid, SweepOptions(num_samples=1))
    check_no_repeats(mixed, SweepOptions(num_samples=3))
