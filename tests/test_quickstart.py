"""The quickstart shows what InfLoRA does: with the shipped pre-trained backbone, inflora beats sequential LoRA
and the linear probe on final pooled accuracy and forgets less than both (seed 0, full quickstart)."""
import pytest

from inflora_ray.presets import load_config
from inflora_ray.core.metrics import summary
from inflora_ray.training.learner import ContinualLearner


@pytest.fixture(scope="module")
def results():
    out = {}
    for method in ("inflora", "seq-lora", "linear-probe"):
        learner = ContinualLearner(load_config("quickstart", [f"method.name={method}", "train.device=cpu"]))
        learner.run()
        own = learner.own_head_counts.matrix()
        t = len(own)
        out[method] = {**summary(learner.counts),
                       "own_head_drop": sum(own[j][j] - own[-1][j] for j in range(t - 1)) / (t - 1)}
    return out


def test_quickstart_uses_the_shipped_backbone():
    cfg = load_config("quickstart")
    assert cfg.model.weights_file == "builtin:quickstart_vit" and cfg.model.kwargs["patch_size"] == 8


def test_inflora_beats_the_baselines(results):
    inflora, seq, probe = (results[m] for m in ("inflora", "seq-lora", "linear-probe"))
    # Measured over seeds 0-4 (docs/quickstart.md): final accuracy inflora 0.720-0.824, seq-lora 0.582-0.756,
    # linear probe 0.569-0.695; the smallest per-seed gaps were 0.041 (seq-lora) and 0.085 (probe).
    # Seed 0 here: 0.780 / 0.684 / 0.695. Require 0.03.
    assert inflora["final_accuracy"] > seq["final_accuracy"] + 0.03, results
    assert inflora["final_accuracy"] > probe["final_accuracy"] + 0.03, results
    # Forgetting over seeds 0-4: inflora 0.031-0.116, seq-lora 0.205-0.387, linear probe 0.133-0.208; the
    # smallest per-seed gap to the probe was 0.020 (seed 0: 0.116 vs 0.136, about 6 test images).
    assert inflora["forgetting"] < seq["forgetting"] - 0.1, results
    assert inflora["forgetting"] < probe["forgetting"], results
    assert inflora["average_incremental_accuracy"] > seq["average_incremental_accuracy"]


def test_old_tasks_own_head_accuracy_barely_drops_under_inflora(results):
    """Interference-freedom on real numbers: measured on each task's own head (task-incremental), old tasks
    lose (almost) nothing under inflora, and no more than under sequential LoRA."""
    # Measured (1 torch thread), seeds 0/1/2: inflora 0.003/0.0/0.0, seq-lora 0.003/0.010/0.0. The 2-class own
    # heads are nearly saturated, so this is a coarse check; tests/test_continual.py measures feature drift,
    # which separates the methods sharply.
    inflora, seq = results["inflora"]["own_head_drop"], results["seq-lora"]["own_head_drop"]
    assert inflora <= 0.005 and inflora <= seq, (inflora, seq)
