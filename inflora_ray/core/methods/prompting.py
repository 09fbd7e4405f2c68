"""Prompted forward passes through a frozen timm ViT, shared by the prompt-based methods.

Two ways of conditioning a frozen ViT on learned prompts:

- prompt tuning (L2P): prompt tokens are inserted into the token sequence after the CLS token, before the
  first block, and travel through every block like image tokens;
- prefix tuning (DualPrompt, CODA-Prompt): in chosen blocks, prompt vectors are prepended to the attention's
  keys and values only (``p = [p_k; p_v]``, DualPrompt Sec. 4.2, eq. 3); the sequence length is unchanged.

The backbone's own parameters are never changed; the blocks are run one by one so that a block with a
prefix uses :func:`prefix_attention` instead of its own attention.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Method

Prefix = tuple[torch.Tensor, torch.Tensor]


def split_prefix(prompt: torch.Tensor) -> Prefix:
    """Split prompts ``(B, L, D)`` along the length into key and value halves ``(B, L/2, D)`` each."""
    half = prompt.shape[1] // 2
    return prompt[:, :half], prompt[:, half:]


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm ``Attention.forward`` with ``prefix = (p_k, p_v)``, each ``(B, P, D)``, prepended to the keys and
    values of every head (the prefix lives in the projected key/value space, so it bypasses ``qkv``)."""
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = (p.to(k.dtype).reshape(B, -1, heads, head_dim).transpose(1, 2) for p in prefix)
    k = torch.cat([pk, k], dim=2)
    v = torch.cat([pv, v], dim=2)
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                       scale=attn.scale)
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def prefix_block(block: nn.Module, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
    """timm ``Block.forward`` with the attention given a key/value prefix."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prompted_tokens(vit: nn.Module, images: torch.Tensor, prefixes: Optional[Mapping[int, Prefix]] = None,
                    prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All output tokens ``(B, T, D)`` after the final norm of the timm ViT ``vit`` on ``images``.

    ``prompts`` ``(B, P, D)``: tokens inserted after the CLS (prefix) tokens, after the position embedding
    (prompt tuning). ``prefixes``: block index -> ``(p_k, p_v)`` key/value prefixes (prefix tuning).
    With neither, this equals the backbone's own ``forward_features``.
    """
    prefixes = prefixes or {}
    bad = sorted(i for i in prefixes if not 0 <= i < len(vit.blocks))
    if bad:
        raise ValueError(f"prompt layers {bad} do not exist: the backbone has {len(vit.blocks)} blocks")
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    if prompts is not None:
        n = vit.num_prefix_tokens
        x = torch.cat([x[:, :n], prompts.to(x.dtype), x[:, n:]], dim=1)
    for i, block in enumerate(vit.blocks):
        x = prefix_block(block, x, prefixes[i]) if i in prefixes else block(x)
    return vit.norm(x)


def cls_feature(vit: nn.Module, images: torch.Tensor, prefixes: Optional[Mapping[int, Prefix]] = None) -> torch.Tensor:
    """The CLS token after the final norm of a prefix-tuned forward (what the heads read in DualPrompt and
    CODA-Prompt; equals ``vit(images)`` for a ViT built with ``global_pool='token'`` and no prefixes)."""
    return prompted_tokens(vit, images, prefixes=prefixes)[:, 0]


@torch.no_grad()
def frozen_query(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The query of the key-query matching: the frozen pre-trained model's CLS feature (an extra forward
    without prompts and without gradients; L2P Sec. 4.2, DualPrompt Sec. 4.3, CODA-Prompt Sec. 4.1)."""
    return model.features(images).detach()


def check_layers(vit: nn.Module, layers: list[int], key: str) -> None:
    """Raise ``ValueError`` naming the config key ``key`` if a prompt block index is not a block of ``vit``."""
    bad = [i for i in layers if not 0 <= i < len(vit.blocks)]
    if bad:
        raise ValueError(f"method.{key}: blocks {bad} do not exist (the backbone has {len(vit.blocks)} blocks, "
                         "counted from 0)")


def uniform_(shape: tuple[int, ...], gen: torch.Generator, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """A tensor drawn uniformly from ``[low, high)`` with ``gen`` (prompt and key initialisation of the L2P and
    DualPrompt reference implementations)."""
    return torch.rand(shape, generator=gen) * (high - low) + low


def cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(B, M)`` of queries ``(B, D)`` and keys ``(M, D)``."""
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T


class PromptMethod(Method):
    """What the prompt-based methods share: no adapters (the backbone stays exactly as pre-trained), their
    parameters registered once as ``model.extras[name]`` (a ``ParameterDict``), the parameters trained on a
    task chosen by :meth:`task_parameter_names`, and checkpointing of those parameters with the method."""
    uses_adapters = False

    def __init__(self, cfg, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.params: Optional[nn.ParameterDict] = None
        self.seen = 0  # tasks whose training has begun: their prompts/keys are used by the forward
        self.training_task: Optional[int] = None  # the task being trained (between prepare and finish)

    def generator(self, salt: int) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``salt``: the same draws on every worker."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * salt + 17)

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's parameters (name -> initial value) for ``model``; names contain no '.'."""
        raise NotImplementedError

    def task_parameter_names(self, task: int) -> list[str]:
        """Names of the parameters trained on ``task``."""
        raise NotImplementedError

    def build(self, model: nn.Module) -> None:
        """Register the method's parameters on ``model.extras`` (frozen until a task trains them)."""
        self.params = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False)
                                        for k, v in self.init_parameters(model).items()})
        model.extras[self.name] = self.params

    def prepare_task(self, model: nn.Module, task: int, covariance) -> dict:
        self.seen = task + 1
        self.training_task = task
        self.set_task_trainable(model)
        return {}

    def set_task_trainable(self, model: nn.Module) -> None:
        trained = set(self.task_parameter_names(self.training_task)) if self.training_task is not None else set()
        for name, p in self.params.items():
            p.requires_grad_(name in trained)

    def trainable_parameters(self, model: nn.Module) -> list[torch.nn.Parameter]:
        return [self.params[n] for n in self.task_parameter_names(self.training_task)]

    def finish_task(self, model: nn.Module, task: int, covariance) -> dict:
        self.training_task = None
        self.set_task_trainable(model)
        return {}

    def state_dict(self) -> dict:
        return {"name": self.name, "history": [], "seen": self.seen, "training_task": self.training_task,
                "params": {k: v.detach().cpu().clone() for k, v in self.params.items()}}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Restore the counters and copy the checkpointed prompts/keys into ``model.extras``."""
        if state["name"] != self.name:
            raise ValueError(f"checkpoint was made by method {state['name']!r}, config says {self.name!r}")
        params = model.extras[self.name]
        if set(state["params"]) != set(params.keys()):
            raise ValueError(f"checkpoint of {self.name!r} holds parameters {sorted(state['params'])}, the "
                             f"config builds {sorted(params.keys())}: resume with the same method settings")
        with torch.no_grad():
            for k, v in state["params"].items():
                if tuple(v.shape) != tuple(params[k].shape):
                    raise ValueError(f"checkpoint of {self.name!r}: {k} has shape {tuple(v.shape)}, the config "
                                     f"builds {tuple(params[k].shape)}: resume with the same method settings")
                params[k].copy_(v)
        self.seen = int(state["seen"])
        self.training_task = state["training_task"]
        self.set_task_trainable(model)
