"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang et al., ECCV 2022).

A G(eneral)-prompt shared by all tasks, attached to the first blocks, and one E(xpert)-prompt per task with a
learnable key, attached to later blocks; both by prefix tuning (Sec. 4.2: a prompt of length ``L`` is split into
``L/2`` key and ``L/2`` value prefixes of the attention). Training task ``t`` uses E-prompt ``t`` (the task
identity) and pulls its key toward the queries: ``coef * sum_i (1 - cos(q(x_i), k_t))`` (Sec. 4.3, eq. 4). At
inference the E-prompt is the one whose key best matches the query (the frozen pre-trained model's CLS
feature), among the tasks trained so far. The classifier reads the CLS token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .prompting import Prefix, PromptMethod, check_layers, cls_feature, cosine, frozen_query, split_prefix, uniform_
from .registry import register_method


@register_method
class DualPrompt(PromptMethod):
    """G-prompt (shared) + task-keyed E-prompts, prefix tuning, task identity at training, key match at test."""
    name = "dualprompt"

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        c, d = self.cfg, model.embed_dim
        check_layers(model.backbone, c.dualprompt_g_layers, "dualprompt_g_layers")
        check_layers(model.backbone, c.dualprompt_e_layers, "dualprompt_e_layers")
        params = {}
        if c.dualprompt_g_layers:
            params["g"] = uniform_((len(c.dualprompt_g_layers), c.dualprompt_g_length, d), self.generator(0))
        for t in range(self.num_tasks):
            params[f"key_{t}"] = uniform_((d,), self.generator(1 + 2 * t))
            params[f"e_{t}"] = uniform_((len(c.dualprompt_e_layers), c.dualprompt_e_length, d),
                                        self.generator(2 + 2 * t))
        return params

    def task_parameter_names(self, task: Optional[int]) -> list[str]:
        shared = ["g"] if "g" in self.params else []
        return shared + [f"key_{task}", f"e_{task}"]

    def keys(self) -> torch.Tensor:
        """Keys ``(seen, D)`` of the tasks trained so far."""
        return torch.stack([self.params[f"key_{t}"] for t in range(max(self.seen, 1))])

    def expert_index(self, model: nn.Module, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Which E-prompt each image uses, and the pull loss: the task identity while training a task (its key
        pulled toward the queries of the batch's samples, ``valid``: see :meth:`Method.features`), the
        best-matching key of the seen tasks otherwise (no loss)."""
        query = frozen_query(model, images)
        if self.training_task is not None:
            sim = cosine(query, self.params[f"key_{self.training_task}"][None])[:, 0]
            idx = torch.full((len(images),), self.training_task, dtype=torch.long, device=images.device)
            pull = 1.0 - sim
            if valid is not None:
                pull = pull * valid.to(pull.dtype)
            return idx, self.cfg.dualprompt_pull_coef * pull.sum()
        return cosine(query, self.keys()).argmax(dim=1), None

    def prefixes(self, idx: torch.Tensor) -> dict[int, Prefix]:
        """Block index -> (p_k, p_v) for images using E-prompts ``idx``; a block with both prompts gets the
        E-prefix followed by the G-prefix."""
        c = self.cfg
        experts = torch.stack([self.params[f"e_{t}"] for t in range(int(idx.max()) + 1)])[idx]  # (B, nE, L, D)
        out = {layer: split_prefix(experts[:, j]) for j, layer in enumerate(c.dualprompt_e_layers)}
        for j, layer in enumerate(c.dualprompt_g_layers):
            gk, gv = split_prefix(self.params["g"][j].expand(len(idx), -1, -1))
            if layer in out:
                ek, ev = out[layer]
                gk, gv = torch.cat([ek, gk], dim=1), torch.cat([ev, gv], dim=1)
            out[layer] = (gk, gv)
        return out

    def features(self, model: nn.Module, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The CLS feature of the G/E-prefixed forward, and the key pull loss (training) or None."""
        idx, aux = self.expert_index(model, images, valid)
        return cls_feature(model.backbone, images, self.prefixes(idx)), aux
