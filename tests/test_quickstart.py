"""The quickstart shows what InfLoRA does: with the shipped pre-trained backbone, inflora beats sequential LoRA
and the linear probe on final pooled accuracy and forgets less than sequential LoRA (seed 0, full quickstart)."""
import pytest

from inflora_ray.config import load_config
from inflora_ray.metrics import summary
from inflora_ray.train_loop import ContinualLearner


@pytest.fixture(scope="module")
def results():
    out = {}
    for method in ("inflora", "seq-lora", "linear-probe"):
        learner = ContinualLearner(load_config("quickstart", [f"method.name={method}", "train.device=cpu"]))
        learner.run()
        own = learner.own_head_record.matrix()
        t = len(own)
        out[method] = {**summary(learner.record),
                       "own_head_drop": sum(own[j][j] - own[-1][j] for j in range(t - 1)) / (t - 1)}
    return out


def test_quickstart_uses_the_shipped_backbone():
    cfg = load_config("quickstart")
    assert cfg.model.weights_file == "builtin:quickstart_vit" and cfg.model.kwargs["patch_size"] == 8


def test_inflora_beats_the_baselines(results):
    inflora, seq, probe = (results[m] for m in ("inflora", "seq-lora", "linear-probe"))
    # Measured over seeds 0-4 (README): final accuracy inflora 0.761-0.830, seq-lora 0.555-0.761,
    # linear probe 0.615-0.725; the smallest per-seed gaps were 0.069 to either baseline. Seed 0 here:
    # 0.794 / 0.621 / 0.725. Require 0.03.
    assert inflora["final_accuracy"] > seq["final_accuracy"] + 0.03, results
    assert inflora["final_accuracy"] > probe["final_accuracy"] + 0.03, results
    # Forgetting: inflora 0.048-0.133 vs seq-lora 0.212-0.399 over seeds 0-4 (seed 0: 0.133 vs 0.399).
    assert inflora["forgetting"] < seq["forgetting"] - 0.1, results
    assert inflora["average_incremental_accuracy"] > seq["average_incremental_accuracy"]


def test_old_tasks_own_head_accuracy_drops_less_under_inflora(results):
    """DESIGN.md invariant 3 on real numbers: measured on each task's own head (task-incremental), old tasks
    lose less under inflora than under sequential LoRA."""
    # Measured, seeds 0/1/2: inflora 0.0/0.0/0.0, seq-lora 0.007/0.010/0.021 (2-class own heads are nearly
    # saturated, so the drops are small; inflora's is exactly zero on all three).
    inflora, seq = results["inflora"]["own_head_drop"], results["seq-lora"]["own_head_drop"]
    assert inflora <= 0.005 and inflora < seq, (inflora, seq)
