"""Metrics on hand-computed accuracy counts."""
import math

import pytest

from inflora_ray.core.metrics import (AccuracyCounts, aggregate_over_seeds, average_incremental_accuracy,
                                      backward_transfer, final_accuracy, forgetting, format_matrix, summary,
                                      task_mean_accuracy)
from inflora_ray.results import fill_task_mean
from inflora_ray.training.state import task_metrics, with_task_mean


def _record():
    rec = AccuracyCounts()
    # task sizes 10, 20, 10 test samples
    rec.add_row([9], [10])                 # acc 0.9
    rec.add_row([6, 16], [10, 20])         # 0.6, 0.8
    rec.add_row([7, 12, 10], [10, 20, 10])  # 0.7, 0.6, 1.0
    return rec


def test_matrix_and_pooled():
    rec = _record()
    assert rec.matrix() == [[0.9], [0.6, 0.8], [0.7, 0.6, 1.0]]
    # pooled: 9/10, 22/30, 29/40 (not the mean of per-task accuracies when sizes differ)
    assert rec.pooled_accuracy() == pytest.approx([0.9, 22 / 30, 29 / 40])
    pooled = rec.pooled_accuracy()
    assert final_accuracy(pooled) == pytest.approx(0.725)
    assert average_incremental_accuracy(pooled) == pytest.approx((0.9 + 22 / 30 + 0.725) / 3)


def test_forgetting_and_bwt_by_hand():
    acc = _record().matrix()
    # task 0: max(0.9, 0.6) - 0.7 = 0.2 ; task 1: max(0.8) - 0.6 = 0.2
    assert forgetting(acc) == pytest.approx(0.2)
    # BWT: ((0.7 - 0.9) + (0.6 - 0.8)) / 2 = -0.2
    assert backward_transfer(acc) == pytest.approx(-0.2)
    # forgetting uses the max over earlier rows, not the diagonal
    acc2 = [[0.5], [0.9, 0.8], [0.4, 0.8, 0.7]]
    assert forgetting(acc2) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert backward_transfer(acc2) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.8)) / 2)


def test_single_task_and_bad_rows():
    rec = AccuracyCounts()
    rec.add_row([3], [4])
    s = summary(rec)
    assert s["final_accuracy"] == 0.75 and math.isnan(s["forgetting"]) and math.isnan(s["backward_transfer"])
    with pytest.raises(ValueError):
        rec.add_row([1], [1])  # row 1 needs two entries
    with pytest.raises(ValueError):
        AccuracyCounts().add_row([0], [0])
    assert "T0" in format_matrix(rec.matrix())


def test_round_trip():
    rec = _record()
    assert AccuracyCounts.from_dict(rec.to_dict()).matrix() == rec.matrix()


def test_task_mean_differs_from_pooled_on_unequal_task_sizes():
    """Task sizes 10, 20, 10: task-mean weighs each task the same, pooled each test image."""
    rec = _record()
    # after each task: 0.9; (0.6 + 0.8) / 2; (0.7 + 0.6 + 1.0) / 3   (pooled: 0.9, 22/30, 29/40)
    assert rec.task_mean_accuracy() == pytest.approx([0.9, 0.7, 2.3 / 3])
    assert task_mean_accuracy(rec.matrix()) == rec.task_mean_accuracy()
    s = summary(rec)
    assert s["task_mean_accuracy"] == pytest.approx([0.9, 0.7, 2.3 / 3])
    assert s["final_accuracy_task_mean"] == pytest.approx(2.3 / 3)  # 76.67 %, pooled 72.50 %
    assert s["final_accuracy"] == pytest.approx(0.725)
    assert s["average_incremental_accuracy_task_mean"] == pytest.approx((0.9 + 0.7 + 2.3 / 3) / 3)
    assert s["average_incremental_accuracy"] == pytest.approx((0.9 + 22 / 30 + 0.725) / 3)
    assert s["final_accuracy_task_mean"] != pytest.approx(s["final_accuracy"])


def test_task_mean_and_pooled_agree_on_equal_task_sizes():
    rec = AccuracyCounts()
    rec.add_row([9], [10])
    rec.add_row([6, 8], [10, 10])
    rec.add_row([7, 6, 10], [10, 10, 10])
    s = summary(rec)
    assert s["task_mean_accuracy"] == pytest.approx(s["pooled_accuracy"])
    assert s["task_mean_accuracy"] == pytest.approx([0.9, 0.7, 23 / 30])
    assert s["final_accuracy_task_mean"] == pytest.approx(s["final_accuracy"])
    assert s["average_incremental_accuracy_task_mean"] == pytest.approx(s["average_incremental_accuracy"])


def test_aggregate_over_seeds_has_both_definitions():
    a, b = summary(_record()), summary(AccuracyCounts(correct=[[8]], total=[[10]]))
    agg = aggregate_over_seeds([a, None, b])
    assert agg["final_accuracy_task_mean_mean"] == pytest.approx((2.3 / 3 + 0.8) / 2)
    assert agg["final_accuracy_task_mean_std"] == pytest.approx(abs(2.3 / 3 - 0.8) / math.sqrt(2))
    assert agg["average_incremental_accuracy_task_mean_mean"] == pytest.approx(((0.9 + 0.7 + 2.3 / 3) / 3 + 0.8) / 2)
    assert agg["final_accuracy_mean"] == pytest.approx((0.725 + 0.8) / 2)
    assert agg["forgetting_std"] == 0.0  # one run has it (b has a single task)
    # a summary stored before the task-mean metrics existed is left out of their mean, not an error
    old = {k: v for k, v in a.items() if "task_mean" not in k}
    assert aggregate_over_seeds([old, b])["final_accuracy_task_mean_mean"] == pytest.approx(0.8)


def _old_format(results: list[dict]) -> list[dict]:
    """Task results as stored before the task-mean fields existed."""
    return [{k: v for k, v in r.items() if k not in ("task_mean_accuracy", "average_incremental_accuracy_task_mean")}
            for r in results]


def test_results_stored_without_task_mean_get_it_from_their_accuracies():
    acc = _record().matrix()
    old = _old_format([{"task": i, "accuracy": row, "pooled_accuracy": 0.5} for i, row in enumerate(acc)])
    filled = with_task_mean(old)
    assert [r["task_mean_accuracy"] for r in filled] == pytest.approx([0.9, 0.7, 2.3 / 3])
    assert [r["average_incremental_accuracy_task_mean"] for r in filled] == pytest.approx(
        [0.9, 0.8, (0.9 + 0.7 + 2.3 / 3) / 3])
    assert "task_mean_accuracy" not in old[0]  # the input is left as it is
    assert with_task_mean([{**r, "task_mean_accuracy": 0.1} for r in old])[2]["task_mean_accuracy"] == 0.1
    # a stored summary (metrics.json, a task file) and its task results, from the accuracy matrix
    summ = {k: v for k, v in summary(_record()).items() if "task_mean" not in k}
    tasks = [dict(r) for r in old]
    fill_task_mean(summ, tasks)
    assert summ["final_accuracy_task_mean"] == pytest.approx(2.3 / 3)
    assert summ["average_incremental_accuracy_task_mean"] == pytest.approx((0.9 + 0.7 + 2.3 / 3) / 3)
    assert [t["average_incremental_accuracy_task_mean"] for t in tasks] == pytest.approx(
        [r["average_incremental_accuracy_task_mean"] for r in filled])
    damaged = {"accuracy_matrix": [[0.5], "x"]}
    fill_task_mean(damaged, [])
    assert damaged == {"accuracy_matrix": [[0.5], "x"]}  # left without: the report shows '-'


def test_task_metrics_send_both_definitions():
    r = with_task_mean([{"task": 0, "accuracy": [0.9], "own_head_accuracy": [1.0], "pooled_accuracy": 0.9,
                         "average_incremental_accuracy": 0.9, "forgetting": math.nan, "backward_transfer": math.nan,
                         "train_loss": 0.1, "task_seconds": 1.0, "images_per_second": 5.0, "peak_memory_mb": 0.0}])[0]
    m = task_metrics(r)
    assert m["task_mean_accuracy"] == m["average_incremental_accuracy_task_mean"] == pytest.approx(0.9)
    assert m["pooled_accuracy"] == m["average_incremental_accuracy"] == pytest.approx(0.9)


def test_a_checkpoint_saved_without_the_task_mean_fields_resumes():
    """A checkpoint written before the task-mean fields existed (its task results lack them) loads, its
    results get them from their accuracies, and the run finishes with both definitions."""
    import io

    import torch
    from helpers import tiny_overrides

    from inflora_ray.presets import load_config
    from inflora_ray.training.checkpoint import CHECKPOINT_VERSION
    from inflora_ray.training.learner import ContinualLearner

    cfg = load_config("quickstart", tiny_overrides(**{"data.num_tasks": 3}))
    learner = ContinualLearner(cfg, device=torch.device("cpu"))
    learner.run(stop_after_task=1)
    state = learner.state_dict()
    state["task_results"] = _old_format(state["task_results"])
    assert state["version"] == CHECKPOINT_VERSION  # the same version: old checkpoints stay loadable
    buf = io.BytesIO()
    torch.save(state, buf)
    resumed = ContinualLearner(cfg, device=torch.device("cpu"))
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    done = resumed.task_results
    assert [r.task_mean_accuracy for r in done] == pytest.approx([sum(r.accuracy) / len(r.accuracy) for r in done])
    assert done[1].average_incremental_accuracy_task_mean == pytest.approx(
        learner.task_results[1].average_incremental_accuracy_task_mean)
    resumed.run()
    s = summary(resumed.counts)
    last = resumed.task_results[-1]
    assert last.task == 2 and last.task_mean_accuracy == pytest.approx(s["final_accuracy_task_mean"])
    assert last.average_incremental_accuracy_task_mean == pytest.approx(s["average_incremental_accuracy_task_mean"])
    assert last.pooled_accuracy == pytest.approx(s["final_accuracy"])
