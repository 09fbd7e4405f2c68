"""SD-LoRA (``sd-lora``) as its official code runs it (github.com/WuYichen-97/SD-Lora-CL at 8bacded): the
forward against a transcription of that code's equations, what trains at each task, how each task starts,
fixed finished directions, an untouched backbone, resume; the variant's presets (``sd-lora-kv``)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import full_and_stopped_state, tiny_overrides, tiny_vit
from inflora_ray.config import MethodConfig
from inflora_ray.core.methods import build_method
from inflora_ray.core.methods.sd_lora import INIT_MAGNITUDE
from inflora_ray.core.model import ContinualViT, meta_backbone
from inflora_ray.presets import load_config
from inflora_ray.training.learner import ContinualLearner, _CurrentTask

RANK = 3


def _cfg(**extra):
    return load_config("sd-lora-quickstart", tiny_overrides(**{"data.num_tasks": 3, "train.lr": 0.05, **extra}))


def _model(num_tasks=4, seed=0, dtype=torch.float64):
    """A tiny ViT (2 blocks of width 48) with sd-lora built on it, and the method."""
    torch.manual_seed(0)
    model = ContinualViT(tiny_vit(), rank=None)
    method = build_method(MethodConfig(name="sd-lora", rank=RANK), num_tasks, seed)
    method.build(model)
    return model.to(dtype), method


def _plain():
    """The tiny ViT of :func:`_model` (the same seeded weights), without hooks, in float64."""
    torch.manual_seed(0)
    return tiny_vit().double()


def _images(n=4, seed=1, dtype=torch.float64):
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------- the official forward, transcribed
class OfficialQKV(nn.Module):
    """backbone/lora.py ``_LoRA_qkv_timm_train.forward``, written from its equations: the frozen qkv, then
    ``new_q = sum_i m_i * B_q,i(A_q,i x) / (||B_q,i|| ||A_q,i||) + s * B_q(A_q x)`` added to the query third and
    the same with the value matrices to the value third."""

    def __init__(self, qkv: nn.Linear, old: list[dict], magnitudes: list[float], current: dict, scale: float):
        super().__init__()
        self.qkv, self.old, self.magnitudes, self.current, self.scale = qkv, old, magnitudes, current, scale
        self.dim = qkv.in_features

    def forward(self, x):
        new = {}
        for p in ("q", "v"):
            total = 0
            for i, ab in enumerate(self.old):
                a, b = ab[f"A_{p}"], ab[f"B_{p}"]
                total = total + self.magnitudes[i] * ((x @ a.T) @ b.T) / (torch.norm(b) * torch.norm(a))
            a, b = self.current[f"A_{p}"], self.current[f"B_{p}"]
            new[p] = total + self.scale * ((x @ a.T) @ b.T)
        qkv = self.qkv(x).clone()
        qkv[..., :self.dim] += new["q"]
        qkv[..., -self.dim:] += new["v"]
        return qkv


def _official_features(plain_vit, x, old, magnitudes, current, scale):
    """The official model's CLS feature: ``plain_vit`` (the same weights, no hooks) with every block's qkv
    replaced by :class:`OfficialQKV` on that block's recorded adapters."""
    for i, block in enumerate(plain_vit.blocks):
        block.attn.qkv = OfficialQKV(block.attn.qkv, [o[i] for o in old], magnitudes, current[i], scale)
    return plain_vit(x)


def _random_adapters(model, gen, scale=0.3):
    """Write random current adapters (as if task training had moved them) and return a copy per block."""
    out = []
    with torch.no_grad():
        for layer in model.extras["sd_lora"].layers:
            rec = {}
            for p in ("q", "v"):
                for m in ("A", "B"):
                    t = getattr(layer, f"lora_{m}_{p}")
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * scale)
                    rec[f"{m}_{p}"] = t.detach().clone()
            out.append(rec)
    return out


def test_forward_equals_the_official_code_reference():
    """Tasks 0, 1 and 2 (two finished), with adapters, magnitudes and scale set: each model's features equal the
    transcription of the official forward (float64; the low-rank forward folds each factor into B's columns
    instead of dividing the product, so equal to rounding)."""
    model, method = _model()
    x, gen = _images(), torch.Generator().manual_seed(7)
    sd = model.extras["sd_lora"]
    old = []
    for task in range(3):
        model.add_head(2)
        method.prepare_task(model, task, covariance=None)
        current = _random_adapters(model, gen)
        with torch.no_grad():
            sd.magnitude.copy_(torch.rand(sd.magnitude.shape, generator=gen, dtype=torch.float64) * 2)
            sd.scale.fill_(0.3 + task)
        magnitudes = sd.magnitude.detach().clone().tolist()[:task]
        got = model.features(x)
        ref = _official_features(_plain(), x, old, magnitudes, current, 0.3 + task)
        # the adapters matter: the model is far from the plain backbone
        assert (got - _plain()(x)).abs().max() > 0.1
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        method.finish_task(model, task, covariance=None)
        # the evaluation after the task sees the model it trained (the adapter stays live, scale s)
        torch.testing.assert_close(model.features(x), got, rtol=0, atol=0)
        old.append(current)


def test_each_task_starts_as_the_official_code_builds_it():
    """At every task: every magnitude and the scale 0.8, A_t Kaiming-uniform (bound 1/sqrt(d)), B_t zero, the
    head U(-sqrt(3/d), sqrt(3/d)) with zero bias; the previous task's A and B kept with their normaliser."""
    model, method = _model(dtype=torch.float32)
    sd, d = model.extras["sd_lora"], 48
    gen = torch.Generator().manual_seed(3)
    previous = None  # the adapters trained on the task before
    for task in range(3):
        model.add_head(20)
        method.prepare_task(model, task, covariance=None)
        assert sd.count == method.stored == task
        # backbone/lora.py LoRA_ViT_timm.__init__: nn.Parameter(torch.Tensor([0.8])) for each
        assert torch.equal(sd.magnitude, torch.full_like(sd.magnitude, 0.8))
        assert float(sd.scale.detach()) == pytest.approx(0.8)
        for layer in sd.layers:
            for p in ("q", "v"):
                a, b = getattr(layer, f"lora_A_{p}"), getattr(layer, f"lora_B_{p}")
                assert a.shape == (RANK, d) and a.abs().max() <= 1 / math.sqrt(d) and a.abs().max() > 0.5 / math.sqrt(d)
                assert not b.count_nonzero()
        head = model.heads[task]
        assert head.weight.abs().max() <= math.sqrt(3 / d) and head.weight.abs().max() > 0.8 * math.sqrt(3 / d)
        assert not head.bias.count_nonzero()
        trained = _random_adapters(model, gen)
        with torch.no_grad():
            sd.magnitude.fill_(1.7)
        method.finish_task(model, task, covariance=None)
        if task:  # the previous task's adapter became component task - 1, with ||B||_F ||A||_F
            for layer, rec in zip(sd.layers, previous):
                for p in ("q", "v"):
                    a, b = rec[f"A_{p}"].float(), rec[f"B_{p}"].float()
                    assert torch.equal(getattr(layer, f"old_A_{p}")[(task - 1) * RANK:task * RANK], a)
                    assert torch.equal(getattr(layer, f"old_B_{p}")[:, (task - 1) * RANK:task * RANK], b)
                    assert float(getattr(layer, f"old_norm_{p}")[task - 1]) == pytest.approx(
                        float(torch.norm(b) * torch.norm(a)), rel=1e-6)
        previous = trained


def test_ranks_draw_the_same_initialisation():
    """Ray Train workers build and prepare their models separately: A_t and the head depend only on the seed
    and the task, never on the global RNG."""
    states = []
    for noise in (0, 1):
        model, method = _model(dtype=torch.float32)
        torch.manual_seed(100 + noise)
        model.add_head(2)
        method.prepare_task(model, 0, covariance=None)
        states.append({**model.extras.state_dict(), **model.heads[0].state_dict()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other, method = _model(seed=1, dtype=torch.float32)
    other.add_head(2)
    method.prepare_task(other, 0, covariance=None)
    assert not torch.equal(other.extras["sd_lora"].layers[0].lora_A_q, states[0]["sd_lora.layers.0.lora_A_q"])


def test_nothing_added_before_a_task_and_a_zero_direction_adds_nothing():
    model, method = _model()
    x = _images()
    assert torch.equal(model.features(x), _plain()(x))  # bit for bit: the hook adds exact zeros
    model.add_head(2)
    method.prepare_task(model, 0, covariance=None)  # B_0 zero: task 0 stored with normaliser 0
    method.finish_task(model, 0, covariance=None)
    model.add_head(2)
    method.prepare_task(model, 1, covariance=None)
    out = model.features(x)
    assert torch.isfinite(out).all() and torch.equal(out, _plain()(x))


# ----------------------------------------------------------------------- what trains
def test_trained_set_and_loss_equal_the_official_code_at_each_task():
    """models/sdlora.py trains (SGD over the network's parameters, the backbone frozen) the current task's A and
    B of q and v in every block, the current scale and the finished tasks' magnitudes, and the head, on the
    cross-entropy of the current task's classes (logits[:, known:]); nothing else receives a gradient."""
    learner = ContinualLearner(_cfg(**{"train.epochs": 1}))
    model, method, sd = learner.model, learner.method, learner.model.extras["sd_lora"]
    for task in range(3):
        head, _ = learner._begin_task(task, covariance=None)
        current = [p for layer in sd.layers for p in layer.current().values()]
        expected = current + [sd.scale] + ([sd.magnitude] if task else [])
        assert [id(p) for p in method.trainable_parameters(model)] == [id(p) for p in expected]
        # ... and the task's head, which the loop adds to the optimizer; nothing else can train
        head.requires_grad_(True)
        assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in expected + [*head.parameters()]}
        with torch.no_grad():
            for layer in sd.layers:  # B away from zero so that A gets a gradient too
                for p in ("q", "v"):
                    getattr(layer, f"lora_B_{p}").normal_(0, 0.1)
        x = torch.stack([learner.train_set[(int(i), -1)][0] for i in learner.benchmark.task_indices("train", task)[:8]])
        y = torch.tensor([learner.train_set[(int(i), -1)][1] for i in learner.benchmark.task_indices("train", task)[:8]])
        offset = learner.benchmark.task_offset(task)
        logits, aux = _CurrentTask(model, method, [task])(x)
        assert aux is None
        all_logits = model(x)
        torch.testing.assert_close(logits, all_logits[:, offset:offset + logits.shape[1]], rtol=0, atol=0)
        F.cross_entropy(logits, y - offset).backward()
        for p in expected + list(head.parameters()):
            assert p.grad is not None and p.grad.count_nonzero(), p.shape
        if task:
            assert sd.magnitude.grad[:task].count_nonzero() == task and not sd.magnitude.grad[task:].count_nonzero()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is None for h in model.heads[:task] for p in h.parameters())
        for p in expected + list(head.parameters()):
            p.grad = None
        head.requires_grad_(False)
        method.finish_task(model, task, covariance=None)
        assert not any(p.requires_grad for p in model.parameters())


def test_trained_tensors_on_vit_b16_match_the_official_log():
    """On ViT-B/16 at rank 10 the official log counts 368,661 trainable parameters (logs/InR-T5.log, before
    task 0): 12 blocks x (A, B of q and v) = 368,640, plus the current scale and its 20 magnitude slots."""
    from inflora_ray.config import ModelConfig

    backbone = meta_backbone(ModelConfig(name="vit_base_patch16_224", pretrained=False, img_size=224))
    model = ContinualViT(backbone, rank=None)
    method = build_method(MethodConfig(name="sd-lora", rank=10), 10, 0)
    method.build(model)
    adapters = sum(p.numel() for p in method.trainable_parameters(model)) - 1  # at task 0: A, B and the scale
    assert adapters == 368_640 == 368_661 - 1 - 20


# ----------------------------------------------------------------------- trained runs
def test_finished_directions_stay_fixed_and_the_backbone_untouched():
    learner = ContinualLearner(_cfg())
    sd = learner.model.extras["sd_lora"]
    backbone = {k: v.clone() for k, v in learner.model.backbone.state_dict().items()}
    learner.run(stop_after_task=0)
    trained0 = [{k: v.detach().clone() for k, v in layer.current().items()} for layer in sd.layers]
    assert all(torch.count_nonzero(t["lora_B_v"]) for t in trained0)
    learner.run(stop_after_task=1)
    stored = [{k: v.clone() for k, v in layer.state_dict().items() if k.startswith("old_")} for layer in sd.layers]
    mags_after_1 = sd.magnitude[:1].detach().clone()
    learner.run(stop_after_task=2)
    assert float(mags_after_1) != INIT_MAGNITUDE  # learned during task 1
    for layer, t0, before in zip(sd.layers, trained0, stored):
        r = layer.rank
        for p in ("q", "v"):
            # task 0's A and B, exactly as trained, kept bit for bit through task 2
            assert torch.equal(getattr(layer, f"old_A_{p}")[:r], t0[f"lora_A_{p}"])
            assert torch.equal(getattr(layer, f"old_B_{p}")[:, :r], t0[f"lora_B_{p}"])
        for k, v in before.items():  # and every stored tensor of task 0 unchanged by task 2
            now = getattr(layer, k)
            first = (slice(0, r),) if k.startswith("old_A") else (slice(0, 1),) if "norm" in k else (slice(None), slice(0, r))
            assert torch.equal(now[first], v[first]), k
    assert sd.count == 2 and learner.method.stored == 2
    assert all(torch.equal(v, backbone[k]) for k, v in learner.model.backbone.state_dict().items())
    infos = [r.info for r in learner.task_results]
    assert [len(i["magnitudes"]) for i in infos] == [0, 1, 2]


def test_resume_mid_task_equals_uninterrupted():
    cfg = _cfg(**{"train.epochs": 2})
    full, state = full_and_stopped_state(cfg, task=1, epoch=0)
    resumed = ContinualLearner(cfg)
    resumed.load_state_dict(state)
    assert resumed.next_task == 1 and resumed.method.stored == 1
    resumed.run()
    assert resumed.counts.to_dict() == full.counts.to_dict()
    ext_r, ext_f = resumed.model.extras.state_dict(), full.model.extras.state_dict()
    assert ext_r.keys() == ext_f.keys() and all(torch.equal(ext_r[k], ext_f[k]) for k in ext_f)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(resumed.model.heads, full.model.heads))


def test_resume_at_a_task_boundary_equals_uninterrupted():
    """After task 0 the task's adapter is still live; the resumed run stores it when task 1 starts."""
    cfg = _cfg(**{"data.num_tasks": 2})
    full = ContinualLearner(cfg)
    full.run()
    first = ContinualLearner(cfg)
    first.run(stop_after_task=0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    second = ContinualLearner(cfg)
    second.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    second.run()
    assert second.counts.to_dict() == full.counts.to_dict()
    ext_s, ext_f = second.model.extras.state_dict(), full.model.extras.state_dict()
    assert all(torch.equal(ext_s[k], ext_f[k]) for k in ext_f)


def test_a_checkpoint_with_an_impossible_stored_count_is_refused():
    learner = ContinualLearner(_cfg())
    state = learner.method.state_dict()
    with pytest.raises(ValueError, match="sd-lora has 7 stored tasks, the run has 3 tasks"):
        learner.method.load_state_dict({**state, "stored": 7}, learner.model)


# ----------------------------------------------------------------------- presets
BENCHMARKS = ("quickstart", "cifar100-10", "domainnet-5", "imagenet-r-5", "imagenet-r-10", "imagenet-r-20")


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_the_variant_presets_are_the_published_recipe_on_the_kv_variant(benchmark, tmp_path):
    over = [] if benchmark == "quickstart" else [f"data.root={tmp_path}"]
    published = load_config(f"sd-lora-{benchmark}", over).to_dict()
    variant = load_config(f"sd-lora-kv-{benchmark}", over).to_dict()
    assert (published["method"]["name"], variant["method"]["name"]) == ("sd-lora", "sd-lora-kv")
    variant["method"]["name"] = "sd-lora"
    assert variant == published


def test_quickstart_lr_is_the_official_imagenet_r_rate_scaled_to_its_batch(tmp_path):
    quick = load_config("sd-lora-quickstart")
    inr = load_config("sd-lora-imagenet-r-10", [f"data.root={tmp_path}"])
    assert (inr.train.lr, inr.data.batch_size, inr.train.optimizer, inr.method.rank) == (0.01, 128, "sgd", 10)
    assert quick.train.lr == pytest.approx(inr.train.lr * quick.data.batch_size / inr.data.batch_size)
