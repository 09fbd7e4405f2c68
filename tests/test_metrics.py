"""Metrics on hand-computed accuracy counts."""
import math

import pytest

from inflora_ray.core.metrics import (AccuracyCounts, average_incremental_accuracy, backward_transfer, final_accuracy,
                                 forgetting, format_matrix, summary)


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
