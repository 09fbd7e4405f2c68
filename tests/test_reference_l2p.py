"""L2P and L2P++ against independent transcriptions of their reference implementations, on a seeded tiny timm ViT.

The transcriptions below are written from the references' equations and code structure, not with the
platform's prompting helpers: a ViT forward from the module's weights (patch embedding, position embedding,
pre-norm blocks with multi-head attention, final norm), then

- L2P (google-research/l2p and its PyTorch port JH-LEE-KR/l2p-pytorch): the sequence
  ``[CLS, prompts of the top-N keys, patches]``, the prompt positions given a copy of the CLS position
  embedding; the head reads the mean of the prompt outputs; the loss is
  ``CE - coef * sum_i sum_{j in top-N(i)} cos(q_i, k_j) / B``;
- L2P++ (GT-RIPL/CODA-Prompt models/zoo.py ``L2P``/``DualPrompt`` and ``ViTZoo``): in each prefixed block the
  chosen prompts' first halves prepended to the attention keys and second halves to its values; the head
  reads the CLS token; the loss is ``CE + sum_i sum_b sum_{j in top-N(b)} (1 - cos(q_i, k_j))``.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_overrides, tiny_vit

from inflora_ray.core.methods import build_method
from inflora_ray.core.model import ContinualViT
from inflora_ray.presets import load_config

SMALL = {"l2p": {"method.l2p_pool_size": 6, "method.l2p_length": 2, "method.l2p_top_k": 3,
                 "method.l2p_pull_coef": 0.1},
         "l2p-pp": {"method.l2p_pool_size": 6, "method.l2p_length": 4, "method.l2p_top_k": 3,
                    "method.l2p_pull_coef": 1.0, "method.l2p_prefix_layers": "[0, 1]"}}
TOP_N = 3


def _setup(name, num_tasks=3, **method_settings):
    torch.manual_seed(0)
    cfg = load_config("quickstart", tiny_overrides(**{"method.name": name, "data.num_tasks": num_tasks,
                                                      **SMALL[name],
                                                      **{f"method.{k}": v for k, v in method_settings.items()}}))
    model = ContinualViT(tiny_vit(), rank=None)
    method = build_method(cfg.method, num_tasks, seed=0)
    method.build(model)
    model.add_head(4, torch.Generator().manual_seed(3))
    return model, method


def _images(n=5, seed=1):
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def _spread(method):
    """Overwrite the prompts and keys with seeded Gaussian values: every token and key differs clearly, so the
    comparisons below are sensitive (the initial values of the L2P pool are all within 0.01 of each other)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in method.params.values():
            p.copy_(torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------ the reference ViT, from the weights
def _layer_norm(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _embed(vit, images):
    """Patch embedding (a strided convolution) flattened to ``(B, P, D)``; no position embedding yet."""
    conv = vit.patch_embed.proj
    x = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)
    return x.flatten(2).transpose(1, 2)


def _block(blk, x, prefix=None):
    """Pre-norm transformer block; ``prefix = (pk, pv)`` ``(B, P, D)`` prepended to the keys and values."""
    B, T, D = x.shape
    H = blk.attn.num_heads
    h = _layer_norm(blk.norm1, x)
    q, k, v = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(D, dim=-1)
    if prefix is not None:
        k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
    heads = [t.reshape(B, -1, H, D // H).transpose(1, 2) for t in (q, k, v)]
    weights = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
    att = (weights @ heads[2]).transpose(1, 2).reshape(B, T, D)
    x = x + att @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = _layer_norm(blk.norm2, x)
    h = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def _encode(vit, tokens, prefixes=None):
    """Blocks and final norm over an embedded sequence (position embedding already added)."""
    for i, blk in enumerate(vit.blocks):
        tokens = _block(blk, tokens, (prefixes or {}).get(i))
    return _layer_norm(vit.norm, tokens)


def _plain_sequence(vit, images):
    patches = _embed(vit, images)
    cls = vit.cls_token.expand(len(images), -1, -1)
    return torch.cat([cls, patches], dim=1) + vit.pos_embed


def _query(vit, images):
    """The frozen pre-trained CLS feature: the unprompted forward's CLS token after the final norm."""
    with torch.no_grad():
        return _encode(vit, _plain_sequence(vit, images))[:, 0]


def _cos(q, keys):
    return torch.stack([torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for b in keys]) for a in q])


def _top_n(sim, n):
    return torch.argsort(sim.detach(), dim=1, descending=True)[:, :n]


# ------------------------------------------------------------------ L2P (prompt tuning)
def _l2p_reference(vit, images, keys, prompts, coef, targets, head):
    """Feature, chosen ids, pull term and training loss of the L2P references (batch-mean loss)."""
    q = _query(vit, images)
    sim = _cos(q, keys)
    idx = _top_n(sim, TOP_N)
    B, L = len(images), prompts.shape[1]
    chosen = torch.cat([torch.cat([prompts[j] for j in row]) for row in idx]).reshape(B, TOP_N * L, -1)
    pos = vit.pos_embed
    pos_new = torch.cat([pos[:, :1], pos[:, :1].expand(-1, TOP_N * L, -1), pos[:, 1:]], dim=1)
    seq = torch.cat([vit.cls_token.expand(B, -1, -1), chosen, _embed(vit, images)], dim=1) + pos_new
    feats = _encode(vit, seq)[:, 1:1 + TOP_N * L].mean(dim=1)
    reduce_sim = sum(sim[i, j] for i in range(B) for j in idx[i]) / B
    loss = F.cross_entropy(head(feats), targets) - coef * reduce_sim
    return feats, idx, -coef * reduce_sim, loss


def test_l2p_forward_selection_pull_loss_and_gradients_match_the_reference():
    model, method = _setup("l2p")
    method.prepare_task(model, 0, covariance=None)
    _spread(method)
    x, y = _images(), torch.tensor([0, 1, 2, 3, 1])
    keys, prompts = method.params["pool_keys"], method.params["pool_prompts"]
    ref_feats, ref_idx, ref_pull, ref_loss = _l2p_reference(model.backbone, x, keys, prompts, 0.1, y, model.heads[0])
    idx, _ = method.select(model, x)
    assert torch.equal(idx, ref_idx)  # the same top-N keys, in the same order
    feats, aux = method.features(model, x)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    # per sample (1 - cos) instead of -cos: the same loss up to the constant coef * N
    torch.testing.assert_close(aux / len(x) - 0.1 * TOP_N, ref_pull, rtol=1e-5, atol=1e-6)
    loss = (F.cross_entropy(model.logits(feats), y, reduction="sum") + aux) / len(x)
    trained = [keys, prompts, *model.heads[0].parameters()]
    for got, want in zip(torch.autograd.grad(loss, trained), torch.autograd.grad(ref_loss, trained)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ L2P++ (prefix tuning)
def _l2p_pp_reference(vit, images, pools, length, targets, head):
    """CLS feature, chosen ids per block, pull term and training loss of the CODA-Prompt code base's L2P."""
    q = _query(vit, images)
    B, half = len(images), length // 2
    prefixes, chosen_ids, pull = {}, {}, 0.0
    for layer, (keys, prompts) in pools.items():
        sim = _cos(q, keys)
        idx = _top_n(sim, TOP_N)
        pk = torch.stack([torch.cat([prompts[j][:half] for j in row]) for row in idx])
        pv = torch.stack([torch.cat([prompts[j][half:] for j in row]) for row in idx])
        prefixes[layer], chosen_ids[layer] = (pk, pv), idx
        # every query paired with every key chosen by any image of the batch
        pull = pull + sum(1 - sim[i, j] for i in range(B) for b in range(B) for j in idx[b])
    feats = _encode(vit, _plain_sequence(vit, images), prefixes)[:, 0]
    loss = F.cross_entropy(head(feats), targets) + pull
    return feats, chosen_ids, pull, loss


def test_l2p_pp_forward_selection_pull_loss_and_gradients_match_the_reference():
    model, method = _setup("l2p-pp")
    method.prepare_task(model, 0, covariance=None)
    _spread(method)
    x, y = _images(), torch.tensor([0, 1, 2, 3, 1])
    p = method.params
    pools = {layer: (p[f"keys_{layer}"], p[f"prompts_{layer}"]) for layer in (0, 1)}
    ref_feats, ref_idx, ref_pull, ref_loss = _l2p_pp_reference(model.backbone, x, pools, 4, y, model.heads[0])
    query = model.features(x)
    for layer in (0, 1):
        assert torch.equal(method.select(query, layer)[0], ref_idx[layer])
    feats, aux = method.features(model, x)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux / len(x), ref_pull, rtol=1e-5, atol=1e-5)  # the reference's value, one worker
    loss = (F.cross_entropy(model.logits(feats), y, reduction="sum") + aux) / len(x)
    trained = [t for pair in pools.values() for t in pair] + list(model.heads[0].parameters())
    for got, want in zip(torch.autograd.grad(loss, trained), torch.autograd.grad(ref_loss, trained)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_l2p_pp_selects_among_all_pool_keys_in_training_and_at_inference_as_the_reference():
    model, method = _setup("l2p-pp")
    _spread(method)
    x = _images(8, seed=4)
    p = method.params
    pools = {layer: (p[f"keys_{layer}"], p[f"prompts_{layer}"]) for layer in (0, 1)}
    with torch.no_grad():
        ref_feats = _l2p_pp_reference(model.backbone, x, pools, 4, torch.zeros(8, dtype=torch.long),
                                      model.heads[0])[0]
        for task in range(3):  # no task identity: the same prompts whichever task trains, and after training
            method.prepare_task(model, task, covariance=None)
            torch.testing.assert_close(method.features(model, x)[0], ref_feats, rtol=1e-5, atol=1e-5)
            method.finish_task(model, task, covariance=None)
            torch.testing.assert_close(method.features(model, x)[0], ref_feats, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ what trains, how it starts
@pytest.mark.parametrize("name, trained", [
    ("l2p", {"pool_keys", "pool_prompts"}),  # JAX freeze_part / port --freeze: all but the pool, keys and head
    ("l2p-pp", {"keys_0", "prompts_0", "keys_1", "prompts_1"}),  # CODA: prompt.parameters() and the head
])
def test_trainable_parameters_at_each_task_are_the_references(name, trained):
    model, method = _setup(name)
    for task in range(3):
        method.prepare_task(model, task, covariance=None)
        assert {n for n, q in method.params.items() if q.requires_grad} == trained
        assert {id(q) for q in method.trainable_parameters(model)} == {id(method.params[n]) for n in trained}
        assert not any(q.requires_grad for q in model.backbone.parameters())
        method.finish_task(model, task, covariance=None)
        assert not any(q.requires_grad for q in method.params.values())


@pytest.mark.parametrize("name, high", [("l2p", 0.01), ("l2p-pp", 1.0)])
def test_prompts_and_keys_start_as_in_the_reference(name, high):
    """L2P: flax's default uniform initialiser, U[0, 0.01) (official JAX code); L2P++: torch's
    nn.init.uniform_, U[0, 1) (CODA-Prompt's tensor_prompt)."""
    _, method = _setup(name)
    for value in method.params.values():
        assert value.min() >= 0 and value.max() < high and value.max() > 0.9 * high


def test_l2p_init_port_draws_prompts_and_keys_from_the_ports_symmetric_range():
    """``method.l2p_init=port``: U(-1, 1), as JH-LEE-KR/l2p-pytorch draws them (``nn.init.uniform_(-1, 1)``), from
    the same generator draws as the default, rescaled."""
    _, jax = _setup("l2p")
    _, port = _setup("l2p", l2p_init="port")
    for name, value in port.params.items():
        assert value.min() >= -1 and value.max() < 1 and value.min() < -0.9 and value.max() > 0.9
        torch.testing.assert_close(value, jax.params[name] * 200 - 1, rtol=0, atol=1e-5)
