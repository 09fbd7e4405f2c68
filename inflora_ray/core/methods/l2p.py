"""L2P: Learning to Prompt for Continual Learning (Wang et al., CVPR 2022).

A pool of ``M`` prompts ``P_j`` (``L`` tokens each) with learnable keys ``k_j``. The query ``q(x)`` is the frozen
pre-trained model's CLS feature; the ``N`` prompts whose keys are closest to it in cosine similarity are
inserted into the token sequence (prompt tuning, Sec. 4.1-4.2), and the classifier reads the average of the
prompt tokens' outputs (the reference implementation's ``prompt`` head). The surrogate loss (eq. 5) pulls the
selected keys toward the query: ``coef * sum_i sum_{j in top-N(x_i)} (1 - cos(q(x_i), k_j))``. The whole pool is
shared by all tasks and trained throughout; there is no task identity at training or inference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .prompting import PromptMethod, cosine, frozen_query, prompted_tokens, uniform_
from .registry import register_method


@register_method
class L2P(PromptMethod):
    """Prompt pool with key-query matching, prompts prepended at the input, prompt-token-average head."""
    name = "l2p"

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        c, d = self.cfg, model.embed_dim
        return {"pool_keys": uniform_((c.l2p_pool_size, d), self.generator(0)),
                "pool_prompts": uniform_((c.l2p_pool_size, c.l2p_length, d), self.generator(1))}

    def task_parameter_names(self, task: Optional[int]) -> list[str]:
        return ["pool_keys", "pool_prompts"]

    def select(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(B, N)`` of the top-N keys for each image and their cosine similarities ``(B, N)``
        (differentiable in the keys only; the query comes from a forward without gradients)."""
        sim = cosine(frozen_query(model, images), self.params["pool_keys"])
        idx = sim.detach().topk(self.cfg.l2p_top_k, dim=1).indices
        return idx, sim.gather(1, idx)

    def features(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mean output of the selected prompt tokens, and the key-query surrogate loss summed over the batch."""
        idx, sim = self.select(model, images)
        prompts = self.params["pool_prompts"][idx].flatten(1, 2)  # (B, N*L, D)
        tokens = prompted_tokens(model.backbone, images, prompts=prompts)
        start = model.backbone.num_prefix_tokens
        feats = tokens[:, start:start + prompts.shape[1]].mean(dim=1)
        return feats, self.cfg.l2p_pull_coef * (1.0 - sim).sum()
