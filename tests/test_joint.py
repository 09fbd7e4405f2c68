"""Joint training, the upper bound (pure PyTorch): full fine-tuning of the pre-trained backbone and all heads on
the union of the tasks seen so far, from the pre-trained weights at every task; its checkpoints carry the
backbone and resume exactly; its presets carry the reference recipe. joint-lora (the LoRA variant) has its own
presets on the benchmark's InfLoRA recipe."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import Interrupt, full_and_stopped_state, tiny_overrides, tiny_vit

from inflora_ray.presets import load_config
from inflora_ray.training import learner as learner_module
from inflora_ray.training.checkpoint import checkpoint_problems, config_architecture, learner_architecture
from inflora_ray.training.learner import ContinualLearner, Hooks

BENCHMARKS = ["cifar100-10", "imagenet-r-5", "imagenet-r-10", "imagenet-r-20", "domainnet-5"]


def _cfg(method="joint", **extra):
    return load_config("quickstart", tiny_overrides(**{"method.name": method, "data.num_tasks": 3,
                                                       "train.lr": 0.001, **extra}))


def _backbone(learner) -> dict:
    return {k: p.detach().clone() for k, p in learner.model.backbone.named_parameters()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _StopAt(Hooks):
    """Kills the run (raises :class:`Interrupt`) before step ``step`` of ``epoch`` of ``task``."""

    def __init__(self, task: int, epoch: int, step: int):
        self.at = (task, epoch, step)

    def on_step(self, learner, task, epoch, step):
        if (task, epoch, step) == self.at:
            raise Interrupt


# ------------------------------------------------------------------------------ what trains (the reference's)
def test_joint_reference_full_fine_tuning_trains_the_whole_backbone_and_the_seen_heads(monkeypatch):
    """The CODA-Prompt code base's upper bound (learners/default.py NormalNN with --upper_bound_flag) puts every
    parameter of its ViT and its classifier over all classes seen into one Adam group and takes the mean
    cross-entropy. At each task the learner's optimizer holds exactly the backbone and heads 0..t (nothing else
    requires a gradient), and its first step at task 1 equals that step written out by hand on the same weights
    and batch."""
    cfg = _cfg()
    optimized, trainable, steps = {}, {}, []
    real_make_optimizer, real_train_step = learner_module.make_optimizer, learner_module.train_step

    def recording_optimizer(cfg_train, adapter_params, head):
        opt = real_make_optimizer(cfg_train, adapter_params, head)
        task = learner.in_progress.task
        optimized[task] = [p for g in opt.param_groups for p in g["params"]]
        trainable[task] = [p for p in learner.model.parameters() if p.requires_grad]
        return opt

    def recording_step(module, images, targets, global_size, optimizer, *args):
        before = copy.deepcopy(learner.model) if not steps and learner.in_progress.task == 1 else None
        loss = real_train_step(module, images, targets, global_size, optimizer, *args)
        if before is not None:
            steps.append((before, images.clone(), targets.clone(), global_size))
        return loss

    monkeypatch.setattr(learner_module, "make_optimizer", recording_optimizer)
    monkeypatch.setattr(learner_module, "train_step", recording_step)
    # one step of task 1, then stop: the learner's weights are then the weights after that step
    learner = ContinualLearner(cfg, hooks=_StopAt(task=1, epoch=0, step=1))
    with pytest.raises(Interrupt):
        learner.run()

    reference_names = set(dict(tiny_vit().named_parameters()))  # the reference ViT's parameters, no classifier
    assert set(dict(learner.model.backbone.named_parameters())) == reference_names
    for task in (0, 1):
        expected = list(learner.model.backbone.parameters()) + [p for h in learner.model.heads[:task + 1]
                                                                 for p in h.parameters()]
        assert {id(p) for p in optimized[task]} == {id(p) for p in expected}, task
        assert len(optimized[task]) == len(expected)
        assert {id(p) for p in trainable[task]} == {id(p) for p in expected}, task

    # the hand-written step: one linear classifier over the seen classes, one Adam group, mean cross-entropy
    before, images, targets, global_size = steps[0]
    assert global_size == len(targets)  # one process: the whole global batch
    start = {k: p.detach().clone() for k, p in before.backbone.named_parameters()}
    backbone = before.backbone.train()  # the reference trains in train mode: the same here (no dropout)
    classifier = torch.nn.Linear(before.embed_dim, sum(h.out_features for h in before.heads[:2]))
    with torch.no_grad():
        classifier.weight.copy_(torch.cat([h.weight for h in before.heads[:2]]))
        classifier.bias.copy_(torch.cat([h.bias for h in before.heads[:2]]))
    params = list(backbone.parameters()) + list(classifier.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=(0.9, 0.999), weight_decay=0)
    F.cross_entropy(classifier(backbone(images)), targets).backward()
    opt.step()
    # Adam's first step moves each element by lr g / (|g| + eps): about lr, unless |g| is near eps (1e-8). Such
    # elements (the key biases, whose gradient is 0 in exact arithmetic: softmax ignores a shift shared by all
    # keys; a few near-cancelling sums) take rounding noise as their sign, so they are left out of the
    # comparison; elsewhere the summation order (sum / batch size here, a mean there) shows in lr / 1000 at most.
    tol = cfg.train.lr * 1e-3
    after = dict(learner.model.backbone.named_parameters())
    compared = total = 0
    for k, p in backbone.named_parameters():
        defined = p.grad.abs() > 1e-6
        assert torch.allclose(after[k][defined], p[defined], rtol=0, atol=tol), k
        assert (after[k] - start[k]).abs().max() > 0.5 * cfg.train.lr, k  # every backbone tensor took the step
        compared, total = compared + int(defined.sum()), total + p.numel()
    assert compared > 0.95 * total
    heads = learner.model.heads[:2]
    assert torch.allclose(torch.cat([h.weight for h in heads]), classifier.weight, rtol=0, atol=tol)
    assert torch.allclose(torch.cat([h.bias for h in heads]), classifier.bias, rtol=0, atol=tol)


class _BackboneAtTaskStart(Hooks):
    """Records the backbone's weights before the first step of every task."""

    def __init__(self):
        self.seen = {}

    def on_step(self, learner, task, epoch, step):
        if (epoch, step) == (0, 0):
            self.seen[task] = _backbone(learner)


def test_joint_starts_every_task_from_the_pretrained_backbone_and_freezes_it_after():
    cfg = _cfg(**{"train.epochs": 2})
    pretrained = _backbone(ContinualLearner(cfg))  # a freshly built model: the pre-trained weights
    hook = _BackboneAtTaskStart()
    learner = ContinualLearner(cfg, hooks=hook)
    after = []
    for task in range(3):
        learner.run(stop_after_task=task)
        after.append(_backbone(learner))
        assert not any(p.requires_grad for p in learner.model.backbone.parameters())
    assert sorted(hook.seen) == [0, 1, 2]
    for task in range(3):
        assert _equal(hook.seen[task], pretrained), task  # bit for bit, not the previous task's model
        assert not any(torch.equal(after[task][k], pretrained[k]) for k in pretrained), task  # all trained
    assert not _equal(after[1], after[2])


# ------------------------------------------------------------------------------ checkpoints
def test_joint_resume_mid_task_equals_uninterrupted():
    """A checkpoint after epoch 0 of task 1 carries the backbone being trained and the optimizer's state; the
    resumed run ends with the same backbone, heads and accuracy counts, bit for bit."""
    cfg = _cfg(**{"train.epochs": 2, "data.num_tasks": 2})
    full, state = full_and_stopped_state(cfg, task=1, epoch=0)
    pretrained = ContinualLearner(cfg).method.pretrained
    assert not _equal(state["method"]["backbone"], pretrained)  # mid-task: the backbone being trained
    assert state["in_task"]["optimizer"]["state"]  # and its Adam moments
    resumed = ContinualLearner(cfg)
    resumed.load_state_dict(state)
    assert resumed.in_progress.task == 1
    assert all(p.requires_grad for p in resumed.model.backbone.parameters())
    resumed.run()
    assert resumed.counts.to_dict() == full.counts.to_dict()
    assert _equal(_backbone(resumed), _backbone(full))
    for hr, hf in zip(resumed.model.heads, full.model.heads):
        assert torch.equal(hr.weight, hf.weight) and torch.equal(hr.bias, hf.bias)


def test_joint_task_checkpoint_restores_the_joint_model_of_the_tasks_seen():
    cfg = _cfg()
    learner = ContinualLearner(cfg)
    learner.run(stop_after_task=1)
    restored = ContinualLearner(cfg)
    restored.load_state_dict(learner.state_dict())
    assert _equal(_backbone(restored), _backbone(learner))
    assert restored.evaluate(1) == learner.evaluate(1)


def test_checkpoint_refuses_a_joint_state_that_does_not_fit():
    cfg = _cfg()
    learner = ContinualLearner(cfg)
    learner.run(stop_after_task=0)
    state = learner.state_dict()
    arch = learner_architecture(learner)
    assert checkpoint_problems(state, arch) == []
    assert config_architecture(cfg) == arch  # the config's backbone, built on the meta device, has its shapes

    no_backbone = {**state, "method": {k: v for k, v in state["method"].items() if k != "backbone"}}
    assert checkpoint_problems(no_backbone, arch) == [
        "method 'joint' trains the backbone, but the checkpoint holds no backbone weights (a checkpoint of the "
        "LoRA joint, which is method.name=joint-lora now?)"]
    backbone = dict(state["method"]["backbone"])
    backbone["pos_embed"] = backbone["pos_embed"][:, :-1]
    wrong_shape = {**state, "method": {**state["method"], "backbone": backbone}}
    (problem,) = checkpoint_problems(wrong_shape, arch)
    assert problem.startswith("its backbone weight 'pos_embed' has shape (1, 16, 48), the config's model has "
                              "(1, 17, 48)")
    missing = {**state, "method": {**state["method"], "backbone": {k: v for k, v in backbone.items()
                                                                     if k != "norm.weight"}}}
    assert "missing ['norm.weight']" in checkpoint_problems(missing, arch)[0]
    with pytest.raises(ValueError, match="no backbone weights"):
        ContinualLearner(cfg).load_state_dict(no_backbone)

    wider = _cfg(**{"model.kwargs": "{patch_size: 4, depth: 2, embed_dim: 96, num_heads: 3}"})
    assert any("backbone weight" in p for p in checkpoint_problems(state, config_architecture(wider)))
    lora = ContinualLearner(_cfg("joint-lora"))
    lora.run(stop_after_task=0)
    assert checkpoint_problems(lora.state_dict(), arch) == [
        "it was made by method 'joint-lora', the config says method.name='joint'"]


# ------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_joint_presets_are_the_benchmark_with_the_reference_upper_bound_recipe(benchmark, tmp_path):
    over = [f"data.root={tmp_path}"]
    bench, joint, lora = (load_config(p, over) for p in (benchmark, f"joint-{benchmark}", f"joint-lora-{benchmark}"))
    t = joint.train
    assert joint.method.name == "joint"
    assert (t.optimizer, t.lr, t.head_lr, list(t.betas), t.weight_decay, t.schedule) == (
        "adam", 5e-5, None, [0.9, 0.999], 0.0, "cosine-repeat-first")
    assert (t.epochs, joint.data, joint.model) == (bench.train.epochs, bench.data, bench.model)
    assert lora.method.name == "joint-lora"  # and otherwise the benchmark's InfLoRA recipe
    assert lora.to_dict() == {**bench.to_dict(), "method": {**bench.to_dict()["method"], "name": "joint-lora"}}


def test_quickstart_presets():
    qs = load_config("quickstart")
    joint, lora = load_config("joint-quickstart"), load_config("joint-lora-quickstart")
    assert (joint.method.name, joint.train.optimizer, joint.train.lr, joint.train.schedule) == (
        "joint", "adam", 2e-4, "cosine")  # 4x the reference lr with the quickstart's cosine, as the other methods
    assert (joint.train.epochs, joint.data.batch_size) == (qs.train.epochs, qs.data.batch_size)
    assert lora.to_dict() == {**qs.to_dict(), "method": {**qs.to_dict()["method"], "name": "joint-lora"}}
