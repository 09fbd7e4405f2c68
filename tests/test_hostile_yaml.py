"""Hostile YAML: every YAML file or value the platform reads from elsewhere (a preset or config file, an
override, a search space, a run's stored config) is read with bounds. A 1 KB alias bomb is refused at once
with the line it is on, instead of taking all memory; so is nesting deeper than any config needs. Quoted
values in messages are cut short."""
from __future__ import annotations

import time

import pytest
import yaml

from helpers import tiny_overrides
from inflora_ray.config_errors import ConfigError
from inflora_ray.presets import load_config
from inflora_ray.yaml_io import MAX_DEPTH, load_yaml

# Nine levels of nine aliases: 9**9 (about 387 million) leaves once expanded, in about 1 KB.
BOMB = "".join([f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
               + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)])


def _refused_quickly(fn, error, match):
    t0 = time.time()
    with pytest.raises(error, match=match):
        fn()
    assert time.time() - t0 < 5


def test_the_loader_refuses_aliases_and_deep_nesting_and_reads_the_rest():
    assert len(BOMB) < 1200
    _refused_quickly(lambda: load_yaml(BOMB), yaml.YAMLError, r"line 2: an alias \(\*l0\) is not accepted")
    deep = "x: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    _refused_quickly(lambda: load_yaml(deep), yaml.YAMLError, rf"nested more than {MAX_DEPTH} levels deep")
    _refused_quickly(lambda: load_yaml("x" * (2 << 20)), yaml.YAMLError, "more than the 1048576")
    assert load_yaml("a: &anchor 1\nb: [2, 3]\n") == {"a": 1, "b": [2, 3]}  # an anchor alone is harmless


def test_a_config_file_with_a_bomb_in_model_kwargs_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("base: quickstart\n" + BOMB + "model:\n  kwargs: {depth: *l8}\n")
    _refused_quickly(lambda: load_config(str(path)), ConfigError, r"bomb\.yaml'?: invalid YAML: line 3: an alias")


def test_an_override_with_an_alias_is_refused():
    _refused_quickly(lambda: load_config("quickstart", ["model.kwargs={a: &x [1, 2], b: *x}"]), ConfigError,
                     r"override .*an alias \(\*x\) is not accepted")


def test_a_search_space_with_a_bomb_in_its_description_is_refused(tmp_path):
    from inflora_ray.ray_tune.search_space import SpaceError, load_space

    path = tmp_path / "space.yaml"
    path.write_text(BOMB + "description: *l8\nparams:\n  train.lr: {choice: [0.001]}\n")
    cfg = load_config("quickstart", tiny_overrides())
    _refused_quickly(lambda: load_space(str(path), cfg), SpaceError, r"invalid YAML: line 2: an alias")


def test_a_stored_config_with_a_bomb_is_refused_on_resume(tmp_path):
    from inflora_ray.preflight import PreflightError
    from inflora_ray.ray_train.resume import load_run_config

    (tmp_path / "r" / "results").mkdir(parents=True)
    (tmp_path / "r" / "results" / "config.yaml").write_text(BOMB + "experiment: {name: *l8}\n")
    _refused_quickly(lambda: load_run_config(str(tmp_path), "r", []), PreflightError,
                     r"config\.yaml is not valid YAML \(line 2: an alias")


def test_a_huge_value_is_cut_short_in_the_message():
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", ["method.rank=[" + ", ".join(["1"] * 5000) + "]"])
    assert len(str(e.value)) < 400 and "characters)" in str(e.value)
