"""L2P (Wang et al., CVPR 2022) and the CODA-Prompt code base's re-implementation of it, L2P++.

Both keep a pool of ``M`` prompts ``P_j`` (``L`` x ``D``) with learnable keys ``k_j``, shared by all tasks and
trained throughout; the query ``q(x)`` is the frozen pre-trained model's CLS feature, and each image uses the
``N`` prompts whose keys are closest to it in cosine similarity, among the whole pool (no task identity at
training or at inference). The keys receive gradients only from a surrogate loss that pulls them toward the
queries.

- ``l2p`` (prompt tuning, L2P Sec. 4.1-4.3): the ``N*L`` chosen prompt tokens are inserted after the CLS token
  and travel through every block; like the CLS token they carry the CLS token's position embedding (both
  reference implementations give the prompt positions a copy of it). The classifier reads the average of the
  prompt tokens' outputs (the references' ``prompt`` head). Surrogate loss (eq. 5):
  ``coef * sum_i sum_{j in top-N(x_i)} (1 - cos(q(x_i), k_j))``.
- ``l2p-pp`` (L2P++, prefix tuning, CODA-Prompt Sec. 5): in each block of ``l2p_prefix_layers`` (block 0 in the
  CODA-Prompt scripts) a pool of its own with its own keys; each chosen prompt gives its first ``L/2`` rows as
  key prefixes and its last ``L/2`` rows as value prefixes of the attention (``N*L/2`` of each). The classifier
  reads the CLS token. The CODA-Prompt code indexes the similarity matrix with the whole batch's top-N indices,
  so its pull loss pairs every image's query with every key chosen by any image of the batch:
  ``coef * sum_i sum_b sum_{j in top-N(x_b)} (1 - cos(q(x_i), k_j))``; that is the loss used here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .prompting import (
    PromptMethod,
    check_layers,
    cls_feature,
    cosine,
    frozen_query,
    prompted_tokens,
    split_prefix,
    uniform_,
)
from .registry import register_method


def fp32_cosine(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """:func:`cosine` in float32 even under autocast: the top-N choice and the surrogate loss are computed as
    the fp32 references compute them (a low-precision matmul can reorder close keys)."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return cosine(queries.float(), keys.float())


def cls_position(vit: nn.Module) -> torch.Tensor:
    """The position embedding the timm ViT ``vit`` adds to its CLS token, ``(1, 1, D)``; zeros when it gives the
    CLS token none (no CLS token, no position embedding, or ``no_embed_class``)."""
    pos = getattr(vit, "pos_embed", None)
    if pos is None or getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", False):
        return torch.zeros((1, 1, int(vit.embed_dim)), device=next(vit.parameters()).device)
    return pos[:, :1]


@register_method
class L2P(PromptMethod):
    """Prompt pool with key-query matching, prompts inserted at the input, prompt-token-average head."""
    name = "l2p"

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # method.l2p_init "jax": U[0, 0.01), flax's default uniform initialiser, which the official JAX code uses
        # for both; "port": U(-1, 1), its PyTorch port's (docs/baselines.md#l2p).
        c, d = self.cfg, model.embed_dim
        low, high = (0.0, 0.01) if c.l2p_init == "jax" else (-1.0, 1.0)
        return {"pool_keys": uniform_((c.l2p_pool_size, d), self.generator(0), low, high),
                "pool_prompts": uniform_((c.l2p_pool_size, c.l2p_length, d), self.generator(1), low, high)}

    def task_parameter_names(self, task: Optional[int]) -> list[str]:
        return ["pool_keys", "pool_prompts"]

    def select(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(B, N)`` of the top-N keys for each image and their cosine similarities ``(B, N)``
        (differentiable in the keys only; the query comes from a forward without gradients)."""
        sim = fp32_cosine(frozen_query(model, images), self.params["pool_keys"])
        idx = sim.detach().topk(self.cfg.l2p_top_k, dim=1).indices
        return idx, sim.gather(1, idx)

    def features(self, model: nn.Module, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mean output of the selected prompt tokens, and the key-query surrogate loss summed over the batch's
        samples (``valid``: see :meth:`Method.features`)."""
        idx, sim = self.select(model, images)
        prompts = self.params["pool_prompts"][idx].flatten(1, 2) + cls_position(model.backbone)  # (B, N*L, D)
        tokens = prompted_tokens(model.backbone, images, prompts=prompts)
        start = model.backbone.num_prefix_tokens
        feats = tokens[:, start:start + prompts.shape[1]].mean(dim=1)
        pull = 1.0 - sim  # (B, N)
        if valid is not None:
            pull = pull * valid[:, None].to(pull.dtype)
        return feats, self.cfg.l2p_pull_coef * pull.sum()


@register_method
class L2PPlusPlus(PromptMethod):
    """L2P++: a prompt pool per prefixed block, top-N prompts as key/value prefixes, CLS head."""
    name = "l2p-pp"

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # U[0, 1) for prompts and keys: torch's nn.init.uniform_ default, as the CODA-Prompt code base draws them.
        c, d = self.cfg, model.embed_dim
        if c.l2p_length % 2:
            raise ValueError(f"method.l2p_length={c.l2p_length}: l2p-pp splits each prompt into L/2 key and L/2 "
                             "value prefixes; use an even length")
        check_layers(model.backbone, c.l2p_prefix_layers, "l2p_prefix_layers")
        params = {}
        for j, layer in enumerate(c.l2p_prefix_layers):
            params[f"keys_{layer}"] = uniform_((c.l2p_pool_size, d), self.generator(2 * j), 0.0, 1.0)
            params[f"prompts_{layer}"] = uniform_((c.l2p_pool_size, c.l2p_length, d), self.generator(2 * j + 1),
                                                  0.0, 1.0)
        return params

    def task_parameter_names(self, task: Optional[int]) -> list[str]:
        return [f"{kind}_{layer}" for layer in self.cfg.l2p_prefix_layers for kind in ("keys", "prompts")]

    def select(self, query: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For block ``layer``: the indices ``(B, N)`` of each query's top-N keys, and the cosine similarities
        ``(B, M)`` of every query with every key of the pool (differentiable in the keys)."""
        sim = fp32_cosine(query, self.params[f"keys_{layer}"])
        return sim.detach().topk(self.cfg.l2p_top_k, dim=1).indices, sim

    def prefix(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prefixes ``(B, N*L/2, D)`` of block ``layer`` from the chosen prompts ``idx``: each
        prompt's first ``L/2`` rows are keys, its last ``L/2`` rows values, prompts in the order of ``idx``."""
        chosen = self.params[f"prompts_{layer}"][idx]  # (B, N, L, D)
        B, N, L, D = chosen.shape
        pk, pv = split_prefix(chosen.flatten(0, 1))
        return pk.reshape(B, N * (L // 2), D), pv.reshape(B, N * (L // 2), D)

    def features(self, model: nn.Module, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The CLS feature of the prefixed forward, and the pull loss (summed over the prefixed blocks).

        Pull loss of one block on a batch: ``S = sum_i sum_b sum_{j in top-N(x_b)} (1 - cos(q_i, k_j))``
        ``= sum_i sum_j n_j (1 - cos(q_i, k_j))`` with ``n_j`` the number of the batch's images that chose key
        ``j``. The reference adds ``S`` to the batch-mean cross-entropy; the loop divides the returned loss by
        the global batch size, hence the factor ``len(images)``: on one worker the step's loss is the
        reference's. With several workers the pairs are formed within each worker's share of the batch, as the
        reference forms them within each GPU's share (``nn.DataParallel``). Padding rows (``valid`` 0, see
        :meth:`Method.features`) count neither as images that chose a key nor as queries nor in ``len(images)``."""
        query = frozen_query(model, images)
        prefixes, pull = {}, None
        for layer in self.cfg.l2p_prefix_layers:
            idx, sim = self.select(query, layer)
            prefixes[layer] = self.prefix(idx, layer)
            # n_j by comparison rather than bincount, whose output size depends on the data (a compiled
            # step needs static shapes); the counts are small integers, exact in floating point.
            chosen = (idx[..., None] == torch.arange(sim.shape[1], device=idx.device)).to(sim.dtype)  # (B, N, M)
            if valid is None:
                term = ((1.0 - sim) * chosen.sum(dim=(0, 1))).sum()
            else:
                w = valid.to(sim.dtype)
                term = ((1.0 - sim) * w[:, None] * (chosen * w[:, None, None]).sum(dim=(0, 1))).sum()
            pull = term if pull is None else pull + term
        n = len(images) if valid is None else valid.sum()
        return cls_feature(model.backbone, images, prefixes), self.cfg.l2p_pull_coef * n * pull
