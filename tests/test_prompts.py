"""The prompt-based baselines (L2P, DualPrompt, CODA-Prompt) on a real tiny timm ViT: the prompted forward,
the frozen query, and each method's defining invariant."""
import io

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_overrides, tiny_vit
from inflora_ray.core.methods.coda_prompt import orthogonal_complement_rows
from inflora_ray.core.methods import build_method
from inflora_ray.core.model import ContinualViT
from inflora_ray.core.methods.prompting import cls_feature, prefix_attention, prompted_tokens
from inflora_ray.presets import load_config
from inflora_ray.config import ConfigError

# Tiny-ViT settings (2 blocks of width 48): every method's layers exist and CODA's keys fit in 48 dimensions.
SMALL = {"l2p": {"method.l2p_pool_size": 6, "method.l2p_length": 2, "method.l2p_top_k": 3},
         "l2p-pp": {"method.l2p_pool_size": 6, "method.l2p_length": 4, "method.l2p_top_k": 3,
                    "method.l2p_prefix_layers": "[0, 1]"},
         "dualprompt": {"method.dualprompt_g_layers": "[0]", "method.dualprompt_e_layers": "[1]",
                        "method.dualprompt_g_length": 4, "method.dualprompt_e_length": 6},
         "coda-prompt": {"method.coda_pool_size": 9, "method.coda_length": 4, "method.coda_layers": "[0, 1]",
                         "method.coda_ortho_mu": 0.1}}


def _setup(name, num_tasks=3, seed=0):
    torch.manual_seed(0)
    cfg = load_config("quickstart", tiny_overrides(**{"method.name": name, "data.num_tasks": num_tasks,
                                                      **SMALL[name]}))
    model = ContinualViT(tiny_vit(), rank=None)
    method = build_method(cfg.method, num_tasks, seed)
    method.build(model)
    model.add_head(2)
    return model, method


def _images(n=5, seed=1):
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))


def _backbone_state(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_unprompted_forward_equals_the_backbone():
    vit, x = tiny_vit(), _images()
    plain = vit.forward_features(x)
    torch.testing.assert_close(prompted_tokens(vit, x), plain, rtol=0, atol=1e-6)
    empty = torch.zeros((len(x), 0, vit.embed_dim))
    torch.testing.assert_close(prompted_tokens(vit, x, prefixes={0: (empty, empty), 1: (empty, empty)},
                                               prompts=empty), plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(cls_feature(vit, x), vit(x), rtol=0, atol=1e-6)


def test_prefix_attention_is_attention_over_prefix_and_tokens():
    vit, x = tiny_vit(), _images()
    attn = vit.blocks[0].attn
    tokens = vit.blocks[0].norm1(vit._pos_embed(vit.patch_embed(x)))
    pk, pv = torch.randn(len(x), 3, vit.embed_dim), torch.randn(len(x), 3, vit.embed_dim)
    got = prefix_attention(attn, tokens, (pk, pv))
    B, N, D = tokens.shape
    H = attn.num_heads
    q, k, v = attn.qkv(tokens).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.reshape(B, 3, H, D // H).transpose(1, 2), k], 2)
    v = torch.cat([pv.reshape(B, 3, H, D // H).transpose(1, 2), v], 2)
    w = (q @ k.transpose(-1, -2) * (D // H) ** -0.5).softmax(-1)
    want = attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, attn(tokens), atol=1e-3)  # the prefix changes the output


@pytest.mark.parametrize("name", ["l2p", "l2p-pp", "dualprompt", "coda-prompt"])
def test_query_forward_gets_no_gradient_and_backbone_never_changes(name):
    model, method = _setup(name)
    method.prepare_task(model, 0, covariance=None)
    before, x = _backbone_state(model), _images()
    query = model.features(x)
    params = method.trainable_parameters(model) + list(model.heads[0].parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(2):
        feats, aux = method.features(model, x)
        assert feats.shape == (len(x), model.embed_dim)
        loss = F.cross_entropy(model.logits(feats), torch.zeros(len(x), dtype=torch.long), reduction="sum") + aux
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable_parameters(model))
        opt.step()
    after = _backbone_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(model.features(x), query, rtol=0, atol=0)
    # checkpoint round trip (weights_only, as the learner loads it) restores the prompts exactly
    blob = io.BytesIO()
    torch.save(method.state_dict(), blob)
    model2, method2 = _setup(name)
    method2.load_state_dict(torch.load(io.BytesIO(blob.getvalue()), weights_only=True), model2)
    assert all(torch.equal(a, b) for a, b in zip(model.extras.parameters(), model2.extras.parameters()))
    torch.testing.assert_close(method2.features(model2, x)[0], method.features(model, x)[0], rtol=0, atol=0)


def test_l2p_pool_shapes_top_n_selection_and_surrogate_loss():
    model, method = _setup("l2p")
    method.prepare_task(model, 0, covariance=None)
    keys, prompts = model.extras["l2p"]["pool_keys"], model.extras["l2p"]["pool_prompts"]
    assert keys.shape == (6, 48) and prompts.shape == (6, 2, 48)
    x = _images()
    sim = F.normalize(model.features(x), dim=1) @ F.normalize(keys, dim=1).T
    idx, chosen = method.select(model, x)
    assert idx.shape == (5, 3)
    torch.testing.assert_close(chosen, sim.topk(3, dim=1).values)
    feats, aux = method.features(model, x)
    torch.testing.assert_close(aux, 0.1 * (1 - sim.topk(3, dim=1).values).sum())
    # the head reads the mean of the selected prompt tokens' outputs (tokens 1..1+N*L after the CLS token);
    # the prompt positions carry the CLS token's position embedding, as in the L2P references
    cls_pos = model.backbone.pos_embed[:, :1]
    tokens = prompted_tokens(model.backbone, x, prompts=prompts[idx].flatten(1, 2) + cls_pos)
    torch.testing.assert_close(feats, tokens[:, 1:7].mean(1))
    aux.backward()  # keys unselected by every image receive no gradient from the surrogate loss
    unused = sorted(set(range(6)) - set(idx.flatten().tolist()))
    assert all(keys.grad[j].abs().sum() == 0 for j in unused)
    assert all(keys.grad[j].abs().sum() > 0 for j in set(idx.flatten().tolist()))


def test_l2p_pp_pools_per_block_prefix_shapes_and_settings():
    model, method = _setup("l2p-pp")
    p, x = model.extras["l2p-pp"], _images()
    assert p["keys_1"].shape == (6, 48) and p["prompts_0"].shape == (6, 4, 48)
    idx, sim = method.select(model.features(x), 1)
    assert idx.shape == (5, 3) and sim.shape == (5, 6)
    pk, pv = method.prefix(idx, 1)  # N prompts of length 4: 3 x 2 key and 3 x 2 value vectors
    assert pk.shape == pv.shape == (5, 6, 48)
    torch.testing.assert_close(pk[0, 2:4], p["prompts_1"][idx[0, 1], :2])
    torch.testing.assert_close(pv[0, 2:4], p["prompts_1"][idx[0, 1], 2:])
    with pytest.raises(ConfigError, match=r"method.l2p_length: must be even for l2p-pp"):
        load_config("quickstart", ["method.name=l2p-pp", "method.l2p_length=5"])
    with pytest.raises(ConfigError, match=r"method.l2p_prefix_layers: must name at least one block"):
        load_config("quickstart", ["method.name=l2p-pp", "method.l2p_length=4", "method.l2p_prefix_layers=[]"])
    assert load_config("quickstart", ["method.name=l2p", "method.l2p_length=5"]).method.l2p_length == 5
    cfg = load_config("quickstart", ["method.name=l2p-pp", "method.l2p_length=4", "method.l2p_prefix_layers=[0, 3]"])
    with pytest.raises(ValueError, match=r"method.l2p_prefix_layers: blocks \[3\] do not exist"):
        build_method(cfg.method, 5, 0).build(ContinualViT(tiny_vit(), rank=None))


def test_dualprompt_uses_task_key_in_training_and_matches_keys_at_inference():
    model, method = _setup("dualprompt")
    p, x = model.extras["dualprompt"], _images()
    assert p["g"].shape == (1, 4, 48) and p["e_0"].shape == (1, 6, 48) and p["key_2"].shape == (48,)
    method.prepare_task(model, 0, covariance=None)
    method.finish_task(model, 0, covariance=None)
    method.prepare_task(model, 1, covariance=None)
    assert {n for n, q in p.items() if q.requires_grad} == {"g", "key_1", "e_1"}
    with torch.no_grad():
        p["key_0"].copy_(model.features(x)[0])  # image 0 matches task 0's key best
    idx, aux = method.expert_index(model, x)
    assert idx.tolist() == [1] * 5  # training task 1: its E-prompt, whatever the keys say
    q = F.normalize(model.features(x), dim=1)
    torch.testing.assert_close(aux, (1 - q @ F.normalize(p["key_1"], dim=0)).sum())
    forced = cls_feature(model.backbone, x, method.prefixes(torch.ones(5, dtype=torch.long)))
    torch.testing.assert_close(method.features(model, x)[0], forced)
    method.finish_task(model, 1, covariance=None)
    idx, aux = method.expert_index(model, x)
    assert aux is None and idx[0] == 0
    want = (q @ F.normalize(torch.stack([p["key_0"], p["key_1"]]), dim=1).T).argmax(1)
    assert torch.equal(idx, want)  # inference: best key among the two seen tasks only


def test_coda_components_orthogonal_new_to_old_and_frozen_across_tasks():
    model, method = _setup("coda-prompt")
    p, x = model.extras["coda-prompt"], _images()
    assert p["p_0_0"].shape == (3, 4, 48) and p["k_1_2"].shape == (3, 48) and method.per_task == 3
    params = []
    for task in range(3):
        method.prepare_task(model, task, covariance=None)
        for layer in (0, 1):
            for kind in ("p", "k", "a"):
                new = p[f"{kind}_{layer}_{task}"].flatten(1)
                torch.testing.assert_close(new @ new.T, torch.eye(3), atol=1e-5, rtol=0)
                if task:  # orthogonal to every earlier task's components, as trained
                    old = torch.cat([p[f"{kind}_{layer}_{t}"].flatten(1) for t in range(task)])
                    assert (old @ new.T).abs().max() < 1e-5
        assert {n for n, q in p.items() if q.requires_grad} == set(method.task_parameter_names(task))
        frozen = {n: q.detach().clone() for n, q in p.items() if not n.endswith(f"_{task}")}
        start = p[f"k_0_{task}"].detach().clone()
        params = method.trainable_parameters(model) + list(model.heads[0].parameters())
        opt = torch.optim.Adam(params, lr=0.05)
        for _ in range(2):
            feats, aux = method.features(model, x)
            opt.zero_grad()
            (model.logits(feats)[:, 0].sum() + aux).backward()
            opt.step()
        assert all(torch.equal(p[n], v) for n, v in frozen.items())  # earlier (and later) tasks untouched
        assert not torch.equal(p[f"k_0_{task}"], start)  # the current task's components do train
        method.finish_task(model, task, covariance=None)


def test_coda_prompt_is_the_attention_weighted_sum_of_components():
    model, method = _setup("coda-prompt")
    method.prepare_task(model, 0, covariance=None)
    p, x = model.extras["coda-prompt"], _images()
    q = model.features(x)
    prefixes = {}
    for layer in (0, 1):
        P, K, A = p[f"p_{layer}_0"], p[f"k_{layer}_0"], p[f"a_{layer}_0"]
        alpha = torch.stack([F.cosine_similarity(q * A[m], K[m][None], dim=1) for m in range(3)], 1)
        prompt = (alpha[:, :, None, None] * P[None]).sum(1)
        prefixes[layer] = (prompt[:, :2], prompt[:, 2:])
    feats, aux = method.features(model, x)
    torch.testing.assert_close(feats, cls_feature(model.backbone, x, prefixes), rtol=1e-5, atol=1e-5)
    assert aux.item() >= 0


def test_orthogonal_complement_rows_are_orthonormal_and_orthogonal_to_any_old_rows():
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(5, 12, dtype=torch.float64, generator=gen)  # not orthogonal: trained components
    new = orthogonal_complement_rows(old, 4, gen)
    torch.testing.assert_close(new @ new.T, torch.eye(4, dtype=torch.float64))
    assert (old @ new.T).abs().max() < 1e-12
    with pytest.raises(ValueError, match="dimension 12"):
        orthogonal_complement_rows(old, 8, gen)


@pytest.mark.parametrize("override, message", [
    ("method.l2p_top_k=11", r"method.l2p_top_k: must be <= method.l2p_pool_size \(10\)"),
    ("method.coda_length=7", r"method.coda_length: must be even"),
    ("method.dualprompt_e_layers=[2, 2]", r"method.dualprompt_e_layers: must be distinct block indices"),
    ("method.coda_layers=[]", r"method.coda_layers: must name at least one block"),
])
def test_prompt_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


def test_prompt_layers_must_exist_and_coda_pool_must_cover_the_tasks():
    with pytest.raises(ConfigError, match=r"method.dualprompt_e_layers: blocks \[4\] do not exist: "
                                          r"model.kwargs.depth is 4"):
        load_config("quickstart", ["method.name=dualprompt"])
    with pytest.raises(ConfigError, match=r"method.coda_pool_size: must be >= data.num_tasks \(5\)"):
        load_config("quickstart", ["method.name=coda-prompt", "method.coda_pool_size=4",
                                   "method.coda_layers=[0, 1]"])
    cfg = load_config("quickstart", ["method.name=coda-prompt", "method.coda_pool_size=60", "method.coda_layers=[0]"])
    model, method = ContinualViT(tiny_vit(), rank=None), build_method(cfg.method, 5, 0)
    with pytest.raises(ValueError, match="do not fit in the embedding width 48"):
        method.build(model)
    cfg = load_config("quickstart", ["method.name=dualprompt", "method.dualprompt_e_layers=[2, 3]"])
    with pytest.raises(ValueError, match=r"method.dualprompt_e_layers: blocks \[2, 3\] do not exist"):
        build_method(cfg.method, 5, 0).build(ContinualViT(tiny_vit(), rank=None))
