"""The comparison methods' defining invariants (pure PyTorch): joint and joint-lora train on the union of the
tasks seen so far with all their heads; SD-LoRA keeps finished directions bit for bit and learns their magnitudes."""
from collections import Counter

import torch
from helpers import sd_lora_direction, tiny_overrides

from inflora_ray.core.methods.sd_lora import SDLoRAComponents
from inflora_ray.presets import load_config
from inflora_ray.data.loader import train_batches
from inflora_ray.training import learner as learner_module
from inflora_ray.training.learner import ContinualLearner


def _cfg(method, **extra):
    return load_config("quickstart", tiny_overrides(**{"method.name": method, "data.num_tasks": 3,
                                                       "train.lr": 0.01, **extra}))


def test_joint_trains_every_seen_sample_once_per_epoch_and_all_heads(monkeypatch):
    planned = {}

    def recording(indices, batch_size, seed, task, epoch, *args):
        batches = train_batches(indices, batch_size, seed, task, epoch, *args)
        planned[(task, epoch)] = [i for b in batches for i, _ in b]
        return batches

    monkeypatch.setattr(learner_module, "train_batches", recording)
    for method in ("joint", "joint-lora"):  # full fine-tuning and the LoRA variant
        planned.clear()
        learner = ContinualLearner(_cfg(method, **{"train.epochs": 2}))
        learner.run(stop_after_task=0)
        head0 = [p.detach().clone() for p in learner.model.heads[0].parameters()]
        learner.run(stop_after_task=1)
        for task in (0, 1):
            union = Counter(int(i) for t in range(task + 1) for i in learner.benchmark.task_indices("train", t))
            for epoch in (0, 1):
                assert Counter(planned[(task, epoch)]) == union, (method, task, epoch)
        # head 0 was trained again at task 1; joint-lora keeps its adapter unmerged, joint its trained backbone
        assert any(not torch.equal(a, b) for a, b in zip(head0, learner.model.heads[0].parameters()))
        if method == "joint-lora":
            assert all(torch.count_nonzero(layer.lora_B_k) for layer in learner.model.adapters)
        else:
            assert not learner.model.adapters
            pretrained = learner.method.pretrained
            assert all(not torch.equal(p, pretrained[k]) for k, p in learner.model.backbone.named_parameters())


def test_sd_lora_kv_components_forward_is_the_dense_normalised_sum():
    gen = torch.Generator().manual_seed(0)
    comps = SDLoRAComponents(max_tasks=3, rank=2, in_features=6, dim=4)
    adapters = [(torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen))
                for _ in range(2)]
    for a, bk, bv in adapters:
        comps.add(a, bk, bv)
    with torch.no_grad():
        comps.magnitude[:2] = torch.tensor([[0.5, 2.0], [1.5, -1.0]])
    x = torch.randn(5, 6, generator=gen)
    dense = torch.zeros(12, 6)
    for t, (a, bk, bv) in enumerate(adapters):
        for j, b in enumerate((bk, bv)):
            d = b @ a
            assert torch.allclose(sd_lora_direction(comps, t, j), d / d.norm(), atol=1e-6)
            dense[4 * (j + 1):4 * (j + 2)] += comps.magnitude[t, j] * d / d.norm()
    assert torch.allclose(comps(x), x @ dense.T, atol=1e-5)


def test_sd_lora_kv_task_0_is_plain_lora_and_old_directions_stay_fixed():
    seq = ContinualLearner(_cfg("seq-lora"))
    seq.run(stop_after_task=0)
    sd = ContinualLearner(_cfg("sd-lora-kv"))
    sd.run(stop_after_task=0)
    # task 0: the same training as seq-lora, bit for bit; its adapter is stored as magnitude x direction
    assert sd.task_results[0].train_loss == seq.task_results[0].train_loss
    comps = list(sd.model.extras["sd_lora"])
    for c, hist in zip(comps, seq.method.history[0]):
        assert torch.equal(c.lora_A[:c.rank], hist["lora_A"])
        assert torch.allclose(c.dir_B_k[:, :c.rank] * c.magnitude[0, 0], hist["lora_B_k"], atol=1e-6)
    before = [{k: v.clone() for k, v in c.state_dict().items()} for c in comps]
    sd.run(stop_after_task=1)
    for c, b in zip(comps, before):
        r = c.rank
        # the finished task's direction is unchanged bit for bit (and still of unit norm) ...
        for name in ("lora_A", "dir_B_k", "dir_B_v"):
            assert torch.equal(c.state_dict()[name][..., :r] if name != "lora_A" else c.lora_A[:r],
                               b[name][..., :r] if name != "lora_A" else b[name][:r]), name
        assert abs(float(sd_lora_direction(c, 0, 1).norm()) - 1) < 1e-5
        # ... its magnitudes were learned, and task 1 was stored as a second component
        assert not torch.equal(c.magnitude[0], b["magnitude"][0])
        assert c.count == 2 and torch.count_nonzero(c.dir_B_v[:, r:2 * r])


def test_train_step_adds_the_auxiliary_loss_before_dividing_by_the_global_batch():
    import torch.nn.functional as F
    from torch import nn

    from inflora_ray.training.step import train_step

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), (self.lin.weight ** 2).sum() * len(x)  # a per-sample term, summed

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    model = WithAux()
    ref = WithAux()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(model, x, y, 8, opt, scaler, lambda: torch.autocast("cpu", enabled=False))
    logits, aux = ref(x)
    expected = F.cross_entropy(logits, y, reduction="sum") + aux
    (expected / 8).backward()
    assert torch.allclose(loss, expected.detach())
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p, q - 0.1 * q.grad, atol=1e-6)
