"""The per-epoch learning-rate schedules: the paper's cosine, and ``cosine-repeat-first``, the factors the
InfLoRA (and CODA-Prompt) reference code applies, checked against a transcription of how that code steps its
scheduler, and read back from the training loop's own per-epoch events, also across a mid-task resume."""
from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from helpers import Interrupt, SnapshotAndStop, tiny_overrides
from inflora_ray.config import TrainConfig
from inflora_ray.presets import load_config
from inflora_ray.training.learner import ContinualLearner
from inflora_ray.training.optim import lr_factor


class ReferenceStepping:
    """How the reference code's scheduler moves, written out: it is built with ``last_epoch = -1`` and at once
    steps to epoch 0 (setting the rate to ``f(0)``), then sets ``last_epoch`` back to -1; the training loop
    calls ``step()`` after every epoch, which sets ``last_epoch += 1`` and the rate to ``f(last_epoch)``. The
    rate in force during an epoch is the one set last."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.last_epoch = -1
        self.step(0)
        self.last_epoch = -1

    def factor(self) -> float:
        return math.cos(99 * math.pi * self.last_epoch / (200 * (self.epochs - 1)))

    def step(self, epoch=None) -> None:
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        self.rate = self.factor()

    def factors_in_force(self) -> list[float]:
        """The factor in force in each epoch of a run of ``epochs`` epochs."""
        out = []
        for _ in range(self.epochs):
            out.append(self.rate)
            self.step()
        return out


@pytest.mark.parametrize("epochs", [2, 5, 20, 50])
def test_cosine_repeat_first_is_the_reference_stepping(epochs):
    cfg = TrainConfig(epochs=epochs, schedule="cosine-repeat-first")
    assert [lr_factor(cfg, e) for e in range(epochs)] == pytest.approx(ReferenceStepping(epochs).factors_in_force(),
                                                                        abs=1e-15)


def test_at_one_epoch_the_reference_divides_by_zero_and_the_schedule_is_guarded():
    with pytest.raises(ZeroDivisionError):
        ReferenceStepping(1)
    for schedule in ("cosine", "cosine-repeat-first"):
        assert lr_factor(TrainConfig(epochs=1, schedule=schedule), 0) == 1.0


def test_the_two_cosines_differ_as_stated():
    five = [lr_factor(TrainConfig(epochs=5, schedule="cosine-repeat-first"), e) for e in range(5)]
    assert five == pytest.approx([1, 1, 0.925, 0.713, 0.394], abs=5e-4)
    cosine = [lr_factor(TrainConfig(epochs=5), e) for e in range(5)]
    assert cosine == pytest.approx([1, 0.925, 0.713, 0.394, 0.016], abs=5e-4)
    assert sum(five) / sum(cosine) == pytest.approx(1.32, abs=0.005)
    twenty = [lr_factor(TrainConfig(epochs=20, schedule=s), e) for s in ("cosine-repeat-first", "cosine")
              for e in range(20)]
    assert sum(twenty[:20]) / sum(twenty[20:]) == pytest.approx(1.077, abs=0.001)


class Events(logging.Handler):
    """Collects the ``inflora_ray`` logger's events (on that logger itself: it does not propagate)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def epoch_rates(self) -> list[tuple[int, int, float]]:
        """(task, epoch, lr) of every ``epoch_end`` event the loop logged, then forget them."""
        out = [(r._inflora_fields["task"], r._inflora_fields["epoch"], r._inflora_fields["lr"])
               for r in self.records if r.getMessage() == "epoch_end"]
        self.records.clear()
        return out


@pytest.fixture
def events():
    logger = logging.getLogger("inflora_ray")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_loop_applies_factor_k_in_epoch_k_also_across_a_mid_task_resume(events):
    lr, epochs = 0.002, 5
    cfg = load_config("quickstart", tiny_overrides(**{"data.num_tasks": 2, "train.epochs": epochs,
                                                      "train.lr": lr, "train.schedule": "cosine-repeat-first"}))
    expected = [round(lr * lr_factor(cfg.train, e), 8) for e in range(epochs)]
    hook = SnapshotAndStop(task=1, epoch=1)  # stopped after epoch 1 of task 1
    with pytest.raises(Interrupt):
        ContinualLearner(cfg, hooks=hook).run()
    first = events.epoch_rates()
    resumed = ContinualLearner(cfg)
    resumed.load_state_dict(torch.load(io.BytesIO(hook.blob), weights_only=True))
    resumed.run()
    after = events.epoch_rates()
    assert [r for t, _, r in first if t == 0] == expected
    assert [(e, r) for t, e, r in first if t == 1] == [(0, expected[0]), (1, expected[1])]
    assert [(t, e, r) for t, e, r in after] == [(1, e, expected[e]) for e in range(2, epochs)]
    assert expected[0] == expected[1] == lr  # the first factor, twice


def test_paper_presets_use_the_reference_factors_and_the_quickstarts_the_formula():
    """Every benchmark preset whose reference code steps the cosine as the InfLoRA code does (InfLoRA's Adam
    presets and joint-lora on them; joint, L2P++, DualPrompt and CODA-Prompt from the CODA-Prompt code base) runs
    cosine-repeat-first; the quickstart family keeps the formula its learning rate was chosen with."""
    from inflora_ray.presets import list_presets, load_config_data

    reference = {"inflora", "joint", "joint-lora", "l2p-pp", "dualprompt", "coda-prompt"}
    for preset in list_presets():
        data = load_config_data(preset)
        method, train = data.get("method", {}).get("name", "inflora"), data.get("train", {})
        if preset.endswith("quickstart"):
            assert train.get("schedule") in ("cosine", "constant"), preset
        elif method in reference and train.get("optimizer") == "adam":
            assert train["schedule"] == "cosine-repeat-first", preset
        else:  # SGD recipes (DomainNet's InfLoRA, SD-LoRA) and L2P's constant rate
            assert train["schedule"] in ("step", "constant"), preset
