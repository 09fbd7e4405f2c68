"""Presets: every shipped preset resolves to its recorded config; ``base:`` lists, recipes, cycles, bad values."""
import json
import re
from pathlib import Path

import pytest

from inflora_ray.config import ConfigError
from inflora_ray.presets import list_presets, list_recipes, load_config

FIXTURE = Path(__file__).parent / "data" / "preset_configs.json"
EXPECTED = json.loads(FIXTURE.read_text())


def resolve(preset: str, root: Path) -> dict:
    """The preset's config as the fixture records it: a dataset folder given where the benchmark needs one,
    then ``data.root`` blanked."""
    overrides = [] if EXPECTED[preset]["data"]["benchmark"] == "digits" else [f"data.root={root}"]
    resolved = load_config(preset, overrides).to_dict()
    resolved["data"]["root"] = None
    return resolved


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ shipped presets
def test_the_fixture_lists_exactly_the_presets():
    assert sorted(EXPECTED) == list_presets()


@pytest.mark.parametrize("preset", list_presets())
def test_preset_resolves_to_its_recorded_config(preset, tmp_path):
    assert resolve(preset, tmp_path) == EXPECTED[preset]


def test_recipes_are_not_presets():
    recipes = list_recipes()
    assert {"recipe-joint", "recipe-l2p", "recipe-dualprompt", "recipe-coda-prompt", "recipe-sd-lora"} <= set(recipes)
    assert not set(recipes) & set(list_presets())


def test_a_recipe_alone_is_refused_with_what_to_run():
    with pytest.raises(ConfigError, match=r"'recipe-l2p' is a method recipe, not a preset: .*'l2p-cifar100-10'.*"
                                          r"base: \[cifar100-10, recipe-l2p\]"):
        load_config("recipe-l2p")


def test_own_preset_on_a_benchmark_and_a_recipe(tmp_path):
    path = write(tmp_path / "mine.yaml", "base: [imagenet-r-10, recipe-l2p]\ntrain: {epochs: 3}\n")
    cfg = load_config(str(path), [f"data.root={tmp_path}"])
    assert (cfg.method.name, cfg.data.num_tasks, cfg.train.lr, cfg.train.epochs) == ("l2p", 10, 0.015, 3)


# ------------------------------------------------------------------------------------------ base: lists
def test_list_base_merges_left_to_right_then_own_keys(tmp_path):
    write(tmp_path / "a.yaml", "method: {rank: 2, lamb: 0.9}\ntrain: {lr: 0.1, betas: [0.5, 0.6]}\n"
                               "model: {kwargs: {patch_size: 8, depth: 2, embed_dim: 192, num_heads: 3}}\n")
    write(tmp_path / "b.yaml", "method: {rank: 3}\ntrain: {betas: [0.8, 0.9]}\n"
                               "model: {kwargs: {patch_size: 8, depth: 3, embed_dim: 192}}\n")
    child = write(tmp_path / "child.yaml", "base: [quickstart, a.yaml, b.yaml]\ntrain: {lr: 0.2}\n")
    cfg = load_config(str(child))
    assert (cfg.method.rank, cfg.method.lamb, cfg.train.lr) == (3, 0.9, 0.2)
    assert list(cfg.train.betas) == [0.8, 0.9]
    assert cfg.model.kwargs == {"patch_size": 8, "depth": 3, "embed_dim": 192}
    assert cfg.experiment.name == "quickstart"


def test_a_single_entry_list_is_a_single_base(tmp_path):
    as_list = write(tmp_path / "l.yaml", "base: [quickstart]\nmethod: {rank: 2}\n")
    as_str = write(tmp_path / "s.yaml", "base: quickstart\nmethod: {rank: 2}\n")
    assert load_config(str(as_list)) == load_config(str(as_str))


def test_relative_bases_are_read_from_the_including_files_folder(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "common" / "deeper.yaml", "method: {rank: 4}\n")
    write(tmp_path / "cfg" / "common" / "shared.yaml", "base: deeper.yaml\nmethod: {lamb: 0.9}\n")
    child = write(tmp_path / "cfg" / "run.yaml", "base: [quickstart, common/shared.yaml]\n")
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "x", "").parent)
    cfg = load_config("../cfg/run.yaml")
    assert (cfg.method.rank, cfg.method.lamb) == (4, 0.9)
    assert load_config(str(child)) == cfg


def test_a_missing_relative_base_says_where_it_looked(tmp_path):
    child = write(tmp_path / "child.yaml", "base: [quickstart, nope.yaml]\n")
    message = f"file not found: 'nope.yaml' (looked for '{tmp_path / 'nope.yaml'}', next to the file naming it)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(child))


def test_the_same_base_in_two_entries_is_not_a_cycle(tmp_path):
    child = write(tmp_path / "child.yaml", "base: [imagenet-r-5, imagenet-r-20]\n")
    cfg = load_config(str(child), [f"data.root={tmp_path}"])
    assert (cfg.experiment.name, cfg.data.num_tasks) == ("imagenet-r-20", 20)


def test_a_cycle_through_a_list_is_named(tmp_path):
    a = write(tmp_path / "a.yaml", "base: [quickstart, b.yaml]\n")
    write(tmp_path / "b.yaml", "base: [c.yaml]\n")
    write(tmp_path / "c.yaml", "base: [quickstart, a.yaml]\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {a}: base: cycle {a} -> b.yaml -> c.yaml -> a.yaml")):
        load_config(str(a))


@pytest.mark.parametrize("value", ["3", "{name: quickstart}", "[]", "[quickstart, 3]", "[[quickstart]]", "''",
                                   "true"])
def test_a_bad_base_says_what_base_accepts(value, tmp_path):
    child = write(tmp_path / "child.yaml", f"base: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(
            "base: expected a preset name, a YAML file path, or a non-empty list of them (merged left to right)")):
        load_config(str(child))


# ------------------------------------------------------------------------------------------ backbones
DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
# The other ViT-B/16 checkpoints published rows were measured on (docs/configuration.md#backbones).
OTHER_BACKBONES = ("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
                   "vit_base_patch16_224.orig_in21k")


@pytest.mark.parametrize("preset", [p for p in list_presets() if "quickstart" not in p])
def test_every_benchmark_preset_runs_on_each_published_backbone_by_one_override(preset, tmp_path):
    """The override changes the model name only, and the checkpoints share architecture and input
    normalisation (read offline from timm's registry)."""
    import timm

    from inflora_ray.core.model import meta_backbone

    base = resolve(preset, tmp_path)
    assert base["model"].pop("name") == DEFAULT_BACKBONE
    extra = [] if base["data"]["benchmark"] == "digits" else [f"data.root={tmp_path}"]
    shapes = {k: tuple(v.shape) for k, v in meta_backbone(load_config(preset, extra).model).state_dict().items()}
    default_cfg = timm.models.get_pretrained_cfg(DEFAULT_BACKBONE)
    for name in OTHER_BACKBONES:
        other = load_config(preset, extra + [f"model.name={name}"])
        changed = other.to_dict()
        changed["data"]["root"] = None
        assert changed["model"].pop("name") == name
        assert changed == base
        assert {k: tuple(v.shape) for k, v in meta_backbone(other.model).state_dict().items()} == shapes
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.mean, cfg.std) == (default_cfg.mean, default_cfg.std)


def test_the_in1k_backbone_is_the_one_the_prompt_code_bases_loaded():
    """timm 0.4.12's plain ``vit_base_patch16_224`` (pinned by the CODA-Prompt code base) is the AugReg
    in21k checkpoint fine-tuned on ImageNet-1k at 224 px."""
    import timm

    url = timm.models.get_pretrained_cfg(OTHER_BACKBONES[0]).url
    assert url.endswith("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                        "res_224.npz")
