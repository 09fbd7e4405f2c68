"""CODA-Prompt: COntinual Decomposed Attention-based Prompting (Smith et al., CVPR 2023).

In each prompted block ``l`` a pool of ``M`` prompt components ``P_m`` (``L`` x ``D``) with keys ``K_m`` and
attention vectors ``A_m``. For the query ``q`` (the frozen pre-trained model's CLS feature) the prompt is the
weighted sum ``p = sum_m alpha_m P_m`` with ``alpha_m = cos(q * A_m, K_m)`` (Sec. 4.1-4.2, eqs. 3-5), used by
prefix tuning (``L/2`` key and ``L/2`` value prefixes). The pool is split evenly between the tasks
(``M // T`` components each): task ``t`` trains only its own components; earlier tasks' are frozen and still
take part in the weighted sum. A new task's components, keys and attention vectors are initialised
orthonormal and orthogonal to all earlier ones by Gram-Schmidt (Sec. 4.3; the reference implementation's
per-task re-initialisation), and an optional penalty ``mu * ||B B^T - I||^2`` (mean) keeps them so (eq. 7).
The classifier reads the CLS token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .prompting import PromptMethod, check_layers, cls_feature, frozen_query, split_prefix
from .registry import register_method

_KINDS = ("p", "k", "a")  # prompt components, keys, attention vectors


def orthogonal_complement_rows(old: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` orthonormal rows, orthogonal to every row of ``old`` ``(m, d)`` (Gram-Schmidt of random
    Gaussian vectors against ``old``, done as a Householder QR in float64 for stability)."""
    m, d = old.shape
    if m + count > d:
        raise ValueError(f"cannot draw {count} vectors orthogonal to {m} others in dimension {d}")
    fresh = torch.randn((count, d), generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([old.to(torch.float64), fresh]).T)  # columns: the GS sequence
    return basis[:, m:m + count].T.contiguous()


def ortho_penalty(rows: torch.Tensor) -> torch.Tensor:
    """``mean((B B^T - I)^2)`` for the rows ``B`` ``(m, d)``."""
    gram = rows @ rows.T
    return ((gram - torch.eye(len(rows), device=rows.device, dtype=rows.dtype)) ** 2).mean()


@register_method
class CodaPrompt(PromptMethod):
    """Attention-weighted prompt components per block, per-task component allotment, orthogonal init."""
    name = "coda-prompt"

    @property
    def per_task(self) -> int:
        """Components allotted to each task (the remainder of the pool is never used)."""
        return self.cfg.coda_pool_size // self.num_tasks

    def init_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        c, d = self.cfg, model.embed_dim
        if self.per_task < 1:
            raise ValueError(f"method.coda_pool_size={c.coda_pool_size} gives no component to each of "
                             f"{self.num_tasks} tasks; use at least {self.num_tasks}")
        if self.per_task * self.num_tasks > d:
            raise ValueError(f"method.coda_pool_size={c.coda_pool_size}: {self.per_task * self.num_tasks} "
                             f"orthogonal keys do not fit in the embedding width {d}; use at most {d}")
        check_layers(model.backbone, c.coda_layers, "coda_layers")
        shapes = {"p": (self.per_task, c.coda_length, d), "k": (self.per_task, d), "a": (self.per_task, d)}
        # Filled by prepare_task when the task starts (Gram-Schmidt against the earlier tasks' components).
        return {f"{kind}_{layer}_{t}": torch.zeros(shapes[kind]) for layer in c.coda_layers
                for t in range(self.num_tasks) for kind in _KINDS}

    def task_parameter_names(self, task: Optional[int]) -> list[str]:
        return [f"{kind}_{layer}_{task}" for layer in self.cfg.coda_layers for kind in _KINDS]

    def components(self, kind: str, layer: int) -> torch.Tensor:
        """The components (``kind`` p, k or a) of the tasks seen so far in block ``layer``, stacked."""
        return torch.cat([self.params[f"{kind}_{layer}_{t}"] for t in range(max(self.seen, 1))])

    def prepare_task(self, model: nn.Module, task: int, covariance) -> dict:
        with torch.no_grad():
            for j, layer in enumerate(self.cfg.coda_layers):
                for i, kind in enumerate(_KINDS):
                    new = self.params[f"{kind}_{layer}_{task}"]
                    old = [self.params[f"{kind}_{layer}_{t}"].flatten(1).cpu() for t in range(task)]
                    old = torch.cat(old) if old else torch.zeros((0, new[0].numel()))
                    rows = orthogonal_complement_rows(old, len(new), self.generator((task * 97 + j) * 3 + i))
                    new.copy_(rows.reshape(new.shape))
        return super().prepare_task(model, task, covariance)

    def features(self, model: nn.Module, images: torch.Tensor, valid: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The CLS feature of the prefixed forward, and ``mu * penalty`` counted once per sample (the
        penalty is per batch; summing it over samples and dividing by the global batch size gives it once;
        padding rows, ``valid`` 0, are no samples: see :meth:`Method.features`)."""
        query = frozen_query(model, images)
        prefixes, penalty = {}, None
        for layer in self.cfg.coda_layers:
            P, K, A = (self.components(kind, layer) for kind in _KINDS)
            attended = nn.functional.normalize(query[:, None, :] * A[None], dim=2)  # (B, M, D)
            alpha = torch.einsum("bmd,md->bm", attended, nn.functional.normalize(K, dim=1))
            prefixes[layer] = split_prefix(torch.einsum("bm,mld->bld", alpha, P))
            if self.cfg.coda_ortho_mu > 0:
                term = ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.flatten(1))
                penalty = term if penalty is None else penalty + term
        n = len(images) if valid is None else valid.sum()
        aux = None if penalty is None else self.cfg.coda_ortho_mu * penalty * n
        return cls_feature(model.backbone, images, prefixes), aux
