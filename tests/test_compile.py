"""``train.compile``: one graph for a whole run, and the same training as eager (pure PyTorch, no Ray).

The runs compile with the ``aot_eager`` backend: Dynamo captures the graph and AOTAutograd builds its forward
and backward exactly as for inductor, but no kernel is generated, so a compile takes about a second on the
tiny ViT instead of half a minute. What is counted, Dynamo's compilations, does not depend on the backend.
"""
import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from helpers import tiny_overrides
from inflora_ray.data.loader import train_batches
from inflora_ray.presets import load_config
from inflora_ray.training import collective
from inflora_ray.training.learner import ContinualLearner, Hooks
from inflora_ray.training.step import largest_rank_share

# The quickstart's digits as 3 tasks: 4, 3 and 3 classes (heads of different widths), 574, 433 and 426
# training samples: with batches of 64 every epoch of every task ends with a short batch (62, 49, 42).
_RUN = {"data.num_tasks": 3, "train.epochs": 1, "data.batch_size": 64, "train.compile_backend": "aot_eager"}
_L2P_PP = {"method.l2p_length": 2, "method.l2p_top_k": 2}


def test_compile_static_batch_is_the_largest_rank_share():
    for world in (1, 2, 3):
        for sizes, batch in (([103, 40, 7], 16), ([574, 433], 64), ([30], 64)):
            want = max(len(b) for task, n in enumerate(sizes) for epoch in range(3) for rank in range(world)
                       for b in train_batches(np.arange(n) + 11, batch, 5, task, epoch, rank, world))
            assert largest_rank_share(sizes, batch, 5, 3, world) == want


class _FramesPerTask(Hooks):
    """Dynamo's count of compiled frames at the end of each task."""

    def __init__(self):
        self.frames = []

    def on_task_end(self, learner, result):
        self.frames.append(counters["frames"]["ok"])


def _run(cfg, compiled: bool, hooks=None) -> ContinualLearner:
    learner = ContinualLearner(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": compiled})}),
                               hooks=hooks)
    learner.run()
    return learner


@pytest.mark.parametrize("method,world", [("inflora", 1), ("joint", 3), ("l2p-pp", 1)])
def test_compile_once_per_run_and_training_equals_eager(method, world, monkeypatch):
    """One Dynamo compilation for a 3-task run (a recompile raises), with short last batches, heads of 4, 3, 3
    classes (joint: 4, 7, 10 concatenated) and, as rank 1 of 3 (its peers absent, collectives the identity),
    a share of each global batch that changes from step to step; and the compiled run trains as the eager one
    does: padding rows change no loss (cross-entropy, l2p-pp's pull loss) and no gradient."""
    if world > 1:
        monkeypatch.setattr(collective, "world_size", lambda: world)
        monkeypatch.setattr(collective, "rank", lambda: 1)
    cfg = load_config("quickstart", tiny_overrides(**_RUN, **{"method.name": method},
                                                   **(_L2P_PP if method == "l2p-pp" else {})))
    eager = _run(cfg, compiled=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        frames = _FramesPerTask()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _run(cfg, compiled=True, hooks=frames)
        # One graph for the run (the features), compiled in the first task's first step, and nothing compiled
        # after it. (In a fresh process Dynamo may also convert a frame without tensor work: no graph.)
        assert frames.frames[0] >= 1 and frames.frames == [frames.frames[0]] * 3, frames.frames
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
    for c, e in zip(compiled.task_results, eager.task_results):
        assert c.train_loss == pytest.approx(e.train_loss, rel=1e-5)
    modules = [compiled.model.heads, compiled.model.extras] + compiled.model.adapters
    for module, reference in zip(modules, [eager.model.heads, eager.model.extras] + eager.model.adapters):
        ref = reference.state_dict()
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # The trained models compute the same logits (joint trains the backbone: its key biases, whose gradient is
    # zero in exact arithmetic, take Adam steps on rounding noise, which differ, and cancel in the softmax).
    images = torch.stack([eager.test_set[(int(i), -1)][0] for i in eager.benchmark.task_indices("test", 2)[:32]])
    with torch.no_grad():
        got, want = (learner.model.logits(learner.method.features(learner.model, images)[0])
                     for learner in (compiled, eager))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

def test_compile_graph_per_task_methods_do_not_fall_back_to_eager():
    """sd-lora's forward depends on how many tasks it has finished: one graph per task, and the learner lifts
    Dynamo's recompile limit so that a long run never silently trains eager from the limit on (here the limit
    is 1, as if a 3-task run were a 10-task run against the default limit of 8)."""
    cfg = load_config("quickstart", tiny_overrides(**{**_RUN, "train.compile_backend": "eager",
                                                      "method.name": "sd-lora", "train.compile": "true"}))
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            ContinualLearner(cfg).run()
        assert counters["frames"]["ok"] == 3, dict(counters["frames"])
    finally:
        torch._dynamo.reset()
