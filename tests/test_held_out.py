"""Selection on held-out data: ``data.val_fraction`` holds out a seeded, class-stratified part of every class's
training images, on which the run is evaluated instead of the test set; a sweep ranks its trials on that part
(by default) and runs its winner again on the test set with seeds the search did not use. The records (run
results, sweep.json, the trial table, MLflow, the report) say which split each number comes from."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import noise_png_shards, tiny_overrides
from inflora_ray import storage
from inflora_ray.config import ConfigError, DataConfig
from inflora_ray.data import build_benchmark
from inflora_ray.data.blocks import BlockCache, StagedSource
from inflora_ray.data.holdout import holdout_indices
from inflora_ray.presets import load_config
from inflora_ray.ray_tune.search_space import SpaceError, load_space
from inflora_ray.tracking.report import ComparedRun
from inflora_ray.tracking.report_table import build_table, to_csv, to_markdown


def test_held_out_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [10, 11, 3, 2, 1])
    kept, held = holdout_indices(labels, 0.2, seed=0)
    assert len(np.intersect1d(kept, held)) == 0
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    per_class = np.bincount(labels[held], minlength=5)
    assert per_class.tolist() == [2, 2, 1, 1, 0]  # round(0.2 n), at least 1, never a class's last image
    assert np.all(np.bincount(labels[kept], minlength=5) >= 1)
    again, _ = holdout_indices(labels, 0.2, seed=0)
    other, _ = holdout_indices(labels, 0.2, seed=1)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)


def test_held_out_validation_images_come_from_the_training_data():
    full = build_benchmark(DataConfig(), 16)
    val = build_benchmark(DataConfig(val_fraction=0.25, val_seed=3), 16)
    assert (full.eval_split, val.eval_split) == ("test", "validation")
    assert len(val.train) + len(val.test) == len(full.train)
    assert val.manifest["holdout"] == {"eval_split": "validation", "val_fraction": 0.25, "val_seed": 3,
                                       "train_images": len(val.train), "val_images": len(val.test)}
    train_images = {full.train.load(i).numpy().tobytes() for i in range(len(full.train))}
    test_images = {full.test.load(i).numpy().tobytes() for i in range(len(full.test))}
    held = [val.test.load(i).numpy().tobytes() for i in range(len(val.test))]
    assert all(h in train_images for h in held) and not any(h in test_images for h in held)
    kept = {val.train.load(i).numpy().tobytes() for i in range(len(val.train))}
    assert not kept & set(held)
    # every task is evaluated on its own classes' held-out images
    for t in range(val.num_tasks):
        assert set(val.test.labels[val.task_indices("test", t)]) == set(val.tasks[t])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of a 4-class ImageNet-R-layout folder of 40 px noise PNGs, 10 per class, row groups of 4."""
    return noise_png_shards(tmp_path_factory.mktemp("held-out"), per_class=10, side=40)


def test_held_out_part_of_shards_is_staged_and_read_as_the_shards_hold_it(shards, tmp_path):
    cfg = DataConfig(benchmark="imagenet-r", shards=str(shards), num_tasks=2, shard_cache_mb=1)
    full = build_benchmark(cfg, 32)
    val = build_benchmark(cfg.model_copy(update={"val_fraction": 0.3}), 32)
    kept, held = holdout_indices(full.train.labels, 0.3, 0)
    cache = BlockCache(str(tmp_path), 64 << 20)
    for source, indices in ((val.train, kept), (val.test, held)):
        block = np.arange(len(source))
        staged = cache.stage(source, block)
        assert isinstance(staged, StagedSource)  # a held-out part is staged as shard blocks are
        for i in block:
            want = full.train.load(int(indices[i]))
            assert torch.equal(source.load(int(i)), want) and torch.equal(staged.load(int(i)), want)
            assert source.encoded(int(i)) == full.train.encoded(int(indices[i]))
    assert cache.store_reads == 2  # two parts of one split: two blocks, never mixed up
    cache.close()


def test_held_out_settings_are_checked_and_never_searched(tmp_path):
    with pytest.raises(ConfigError, match="data.val_fraction"):
        load_config("quickstart", ["data.val_fraction=0.9"])
    cfg = load_config("quickstart")
    assert cfg.data.val_fraction is None and cfg.data.eval_split == "test"
    for key in ("data.val_fraction", "data.val_seed"):
        space = tmp_path / "space.yaml"
        space.write_text(f"params:\n  {key}: {{choice: [0, 1]}}\n")
        with pytest.raises(SpaceError, match=f"{key} cannot be searched"):
            load_space(str(space), cfg)


def _compared(name, val_fraction, acc, seed=0):
    params = {"method.name": "inflora", "data.benchmark": "digits", "data.num_tasks": "2", "experiment.seed": str(seed),
              "data.val_fraction": str(val_fraction)}
    summary = {"final_accuracy": acc, "final_accuracy_task_mean": acc, "average_incremental_accuracy": acc,
               "average_incremental_accuracy_task_mean": acc, "forgetting": 0.0}
    return ComparedRun(name, name, params, "finished", 2, summary, [acc, acc])


def test_report_never_averages_held_out_and_test_accuracies_together():
    runs = [_compared("trial", 0.2, 0.9), _compared("final", None, 0.5), _compared("old", 0, 0.7, seed=1)]
    del runs[2].params["data.val_fraction"]  # a run stored before held-out validation existed
    table = build_table(runs)
    assert table.columns == [("digits", 2, "test"), ("digits", 2, "validation")]
    md = to_markdown(table)
    assert "digits (2 tasks, validation) A_T pooled" in md and "digits (2 tasks) A_T pooled" in md
    assert not table.notes  # unset, null and 0 all mean "nothing held out": no spurious differing setting
    lines = [line.split(",") for line in to_csv(table).splitlines()]
    split_of = {(row[3], row[4]): row[5] for row in lines[1:]}
    assert split_of[("test", "final_accuracy")] == "60.0000"
    assert split_of[("validation", "final_accuracy")] == "90.0000"


@pytest.mark.ray
@pytest.mark.slow
def test_held_out_sweep_chooses_on_validation_and_reruns_the_winner_with_fresh_seeds(ray_session, mlflow_server,
                                                                                      tmp_path, monkeypatch):
    """Also a sweep given a relative storage path: its record holds the path the driver made absolute, which its
    trials start from, so their runs go under the driver's folder whatever their working directory and node.
    (On this one machine a trial would resolve a relative path as the driver does: the record tells them
    apart.)"""
    from mlflow import MlflowClient

    from inflora_ray.ray_tune.search_space import Param, SearchSpace
    from inflora_ray.ray_tune.sweep import SweepOptions, run_sweep
    from inflora_ray.results import read_stored_config
    from inflora_ray.rundir import RunDir

    seed = 5
    monkeypatch.chdir(tmp_path)
    cfg = load_config("quickstart", tiny_overrides(**{
        "data.num_tasks": 2, "experiment.seed": seed, "experiment.name": "held-out",
        "run.storage_path": "runs", "tracking.uri": mlflow_server}))
    space = SearchSpace([Param("method.rank", "grid", [2, 4])], metric="pooled_accuracy", mode="max")
    out = run_sweep(cfg, space, SweepOptions(name="ho", search="grid", scheduler="fifo", first_tasks=1,
                                             max_concurrent=1))
    record = json.loads((tmp_path / "runs" / "ho" / "sweep.json").read_text())
    assert record["selection_split"] == out["selection_split"] == "validation"
    assert record["search_seeds"] == [seed] and record["final_seeds"] == [seed + 1] == out["final_seeds"]
    assert record["config"]["data"]["val_fraction"] == 0.2  # the sweep's default
    assert record["config"]["run"]["storage_path"] == str(tmp_path / "runs")  # made absolute for the trials

    # The trials were measured on validation images, and the winner is the best of them on that.
    for row in out["rows"]:
        assert row["eval_split"] == "validation" and row["status"] == "completed"
        metrics = json.loads((tmp_path / "runs" / "ho" / "runs" / row["trial_id"] / "results" /
                              "metrics.json").read_text())
        assert metrics["eval_split"] == "validation"
        assert row["pooled_accuracy"] == pytest.approx(metrics["pooled_accuracy"][-1], abs=1e-12)
    assert out["best_metrics"]["pooled_accuracy"] == max(r["pooled_accuracy"] for r in out["rows"])
    best_yaml = load_config(out["sweep_dir"] + "/best_config.yaml")
    assert best_yaml.data.val_fraction is None  # the best config trains on all the training data

    # The final run: every task, the test set, a seed the search did not use.
    final = RunDir(str(tmp_path / "runs" / "ho-final"))
    metrics = storage.read_json(final.metrics)
    assert metrics["eval_split"] == "test" and metrics["complete"] == 2 and metrics["status"] == "finished"
    stored = read_stored_config(final)
    assert stored["experiment"]["seed"] == seed + 1 and stored["data"]["val_fraction"] is None
    assert out["final"]["final_accuracy"] == pytest.approx(metrics["final_accuracy"], abs=1e-12)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(out["mlflow_parent_run_id"])
    assert parent.data.tags["selection_split"] == "validation"
    assert parent.data.params["search_seeds"] == str(seed) and parent.data.params["final_seeds"] == str(seed + 1)
    assert parent.data.metrics["final_run_final_accuracy"] == pytest.approx(metrics["final_accuracy"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_split = {}
    for child in children:
        by_split.setdefault(child.data.tags["eval_split"], []).append(child)
    assert len(by_split["validation"]) == 2 and {c.data.tags["seed"] for c in by_split["validation"]} == {str(seed)}
    assert [c.data.tags["seed"] for c in by_split["test"]] == [str(seed + 1)]
    assert by_split["test"][0].info.run_name == "ho-final"
