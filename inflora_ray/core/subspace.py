"""The InfLoRA math: input covariances, the design of ``A_t``, and the DualGPM memory.

Pure PyTorch (no Ray, no MLflow). Notation follows Liang & Li, CVPR 2024 and GPM (Saha et al., 2021):
``C`` is a layer's input covariance on a task's data, ``M`` the memory basis (orthonormal columns).
"""
from __future__ import annotations

import contextlib
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

# The reference implementation scales the designed rows by 1/sqrt(3); it sets B_t's effective step size.
A_SCALE = 1.0 / math.sqrt(3.0)


class CovariancePass(enum.IntEnum):
    """The two covariance passes over a task's training data. The values double as the passes' augmentation
    streams (training epochs are streams 0..K-1), so each pass sees its own seeded augmentation."""
    BEFORE_TASK = -1  # current model, new B_t = 0: design A_t
    AFTER_TASK = -2  # trained model: update the DualGPM memory

Mode = Literal["remove", "retain"]


# ---------------------------------------------------------------------------------------------
# Covariance accumulation
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """Full fp32 inside the block, whatever the training precision: autocast off on ``device_type``, and no
    reduced-precision fp32 matmuls (TF32 on CUDA matmuls and cuDNN, bf16 in oneDNN on CPUs); the previous
    settings are restored on exit, errors included.

    ``torch.set_float32_matmul_precision("highest")`` is what ``torch.backends.cuda.matmul.allow_tf32 = False``
    sets (one setting behind both names), so restoring the previous precision restores ``allow_tf32`` too.
    """
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


class CovarianceRecorder:
    """Accumulates ``sum_tokens x x^T`` (fp32, on the layer's device) and the token count of each layer's
    input while active. Every token counts (class token and patches)."""

    def __init__(self, layers: Iterable[nn.Module]):
        self.layers = list(layers)
        self.sums: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.counts: list[int] = [0] * len(self.layers)
        self._handles = []

    def _hook(self, index: int):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            # Full fp32 even when the recorder is used inside an autocast region or with TF32 enabled.
            with full_fp32(x.device.type):
                s = x.T @ x
            if self.sums[index] is None:
                self.sums[index] = s
            else:
                self.sums[index] += s
            self.counts[index] += x.shape[0]
        return hook

    def __enter__(self) -> "CovarianceRecorder":
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def covariance_sums(model: nn.Module, layers: list[nn.Module], batches: Iterable[torch.Tensor],
                    forward: Optional[Callable[[torch.Tensor], object]] = None
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``model`` (eval, no grad) over ``batches`` and return per-layer ``sum x x^T`` and token counts.

    The whole forward runs in fp32 (:func:`full_fp32`: no autocast, no TF32) whatever the caller's precision:
    the memory dimensions chosen at energy thresholds near 1 depend on the covariance's small eigenvalues,
    which a bf16 forward would perturb. Returns unnormalised sums so that partial results from several
    processes can be all-reduced and divided afterwards: ``C = sum / count`` equals the one-process
    covariance over all the data.
    """
    forward = forward or model
    was_training = model.training
    device_type = next(model.parameters()).device.type
    model.eval()
    try:
        with torch.no_grad(), full_fp32(device_type), CovarianceRecorder(layers) as rec:
            for images in batches:
                forward(images)
    finally:
        model.train(was_training)
    sums = []
    for s, layer in zip(rec.sums, layers):
        if s is None:  # this process saw no data (an empty block)
            d = layer.in_features
            s = torch.zeros(d, d, device=layer.weight.device, dtype=torch.float32)
        sums.append(s)
    counts = torch.tensor(rec.counts, dtype=torch.float64, device=sums[0].device if sums else "cpu")
    return sums, counts


# ---------------------------------------------------------------------------------------------
# Threshold schedule and the DualGPM memory
# ---------------------------------------------------------------------------------------------

def threshold_schedule(lamb: float, lame: float, task: int, num_tasks: int) -> float:
    """DualGPM energy threshold for 0-based task index ``task`` of ``num_tasks``: rises from lamb to lame."""
    return lamb + (lame - lamb) * task / num_tasks


def _left_singular(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, _ = torch.linalg.svd(mat, full_matrices=False)
    return u, s


def _complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the orthogonal complement of span(basis) (basis has orthonormal columns)."""
    d, k = basis.shape
    if k == 0:
        return torch.eye(d, dtype=basis.dtype, device=basis.device)
    u, _, _ = torch.linalg.svd(basis, full_matrices=True)
    return u[:, k:].contiguous()


@dataclass
class LayerMemory:
    """DualGPM memory of one layer.

    ``mode == "remove"``: ``basis`` spans the protected space (the old tasks' inputs);
    ``mode == "retain"``: ``basis`` spans its orthogonal complement (the space new tasks may still use).
    The memory stores whichever is smaller; both give the same projector.
    """
    dim: int
    basis: torch.Tensor = field(default=None)  # (dim, k), float64
    mode: Mode = "remove"
    representation: Literal["auto", "remove", "retain"] = "auto"

    def __post_init__(self):
        if self.basis is None:
            self.basis = torch.zeros(self.dim, 0, dtype=torch.float64)

    @property
    def protected_dim(self) -> int:
        k = self.basis.shape[1]
        return k if self.mode == "remove" else self.dim - k

    @property
    def free_dim(self) -> int:
        return self.dim - self.protected_dim

    @property
    def is_empty(self) -> bool:
        return self.protected_dim == 0

    def protected_projector(self) -> torch.Tensor:
        """``P`` (dim x dim), the orthogonal projector onto the protected space."""
        m = self.basis
        mmt = m @ m.T
        return mmt if self.mode == "remove" else torch.eye(self.dim, dtype=m.dtype, device=m.device) - mmt

    def project_free(self, mat: torch.Tensor) -> torch.Tensor:
        """``(I - P) mat``: the part of ``mat``'s columns outside the protected space (one-sided)."""
        m = self.basis.to(mat.dtype)
        if self.mode == "remove":
            return mat - m @ (m.T @ mat)
        return m @ (m.T @ mat)

    def protected_basis(self) -> torch.Tensor:
        """Orthonormal basis of the protected space, whichever representation is stored."""
        return self.basis if self.mode == "remove" else _complement(self.basis)

    def _set_protected(self, protected: torch.Tensor) -> None:
        """Store a protected basis in the representation the policy asks for."""
        k = protected.shape[1]
        want_retain = (self.representation == "retain"
                       or (self.representation == "auto" and k > self.dim / 2))
        if want_retain:
            self.mode, self.basis = "retain", _complement(protected)
        else:
            self.mode, self.basis = "remove", protected.contiguous()

    def update(self, cov: torch.Tensor, threshold: float) -> int:
        """Grow the protected space with task data of covariance ``cov`` (GPM energy criterion).

        Returns the number of directions added to the protected space.
        """
        r_mat = cov.detach().to(dtype=torch.float64, device="cpu")
        u_all, s_all = _left_singular(r_mat)
        energy_total = float((s_all ** 2).sum())
        if energy_total == 0.0:
            return 0
        if self.is_empty:
            # First task: keep the leading directions whose cumulative energy ratio is below the threshold.
            ratio = torch.cumsum(s_all ** 2, 0) / energy_total
            r = max(1, int((ratio < threshold).sum()))
            self._set_protected(u_all[:, :r])
            return r
        free_part = self.project_free(r_mat)  # R_hat
        u, s = _left_singular(free_part)
        ratios = (s ** 2) / energy_total
        free_energy = float((s ** 2).sum()) / energy_total
        if self.mode == "remove":
            covered = 1.0 - free_energy  # energy of R already inside the protected space
            r = 0
            while covered < threshold and r < min(ratios.numel(), self.free_dim):
                covered += float(ratios[r])
                r += 1
            if r == 0:
                return 0
            protected = torch.cat([self.basis, u[:, :r]], dim=1)[:, : self.dim]
            self._set_protected(protected)
            return r
        # Retain mode: shrink the free complement until the energy left in it falls below 1 - threshold.
        k = self.basis.shape[1]
        r = 0
        while free_energy >= 1.0 - threshold and r < min(ratios.numel(), k):
            free_energy -= float(ratios[r])
            r += 1
        if r == 0:
            return 0
        ur = u[:, :r]
        remaining = self.basis - ur @ (ur.T @ self.basis)
        if k - r > 0:
            u_rem, _ = _left_singular(remaining)
            self.basis = u_rem[:, : k - r].contiguous()
        else:
            self.basis = torch.zeros(self.dim, 0, dtype=torch.float64)
        if self.representation == "remove":
            self._set_protected(self.protected_basis())
        return r

    def state_dict(self) -> dict:
        return {"dim": self.dim, "basis": self.basis.clone(), "mode": self.mode,
                "representation": self.representation}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LayerMemory":
        return cls(dim=int(state["dim"]), basis=state["basis"].to(torch.float64), mode=state["mode"],
                   representation=state.get("representation", "auto"))


# ---------------------------------------------------------------------------------------------
# Design of A_t
# ---------------------------------------------------------------------------------------------

@dataclass
class Design:
    """A designed down-projection and how many of its rows carry a direction."""
    lora_A: torch.Tensor  # (rank, d_in), rows orthonormal up to A_SCALE; unused rows are zero
    used_rank: int
    free_dim: int


def design_lora_A(cov: torch.Tensor, memory: Optional[LayerMemory], rank: int) -> Design:
    """Top-``rank`` left singular vectors of the covariance with the old subspace projected out.

    ``C' = (I - P) C`` (one-sided, as the reference does); ``A_t`` = leading left singular vectors of ``C'``
    as rows, scaled by ``A_SCALE``. If fewer than ``rank`` directions are left outside the protected space
    (or carry energy), only those are used and the remaining rows are zero, so the branch never writes
    into the old tasks' subspace.
    """
    c = cov.detach().to(dtype=torch.float64, device="cpu")
    d = c.shape[0]
    if memory is not None and not memory.is_empty:
        c = memory.project_free(c)
        free_dim = memory.free_dim
    else:
        free_dim = d
    u, s = _left_singular(c)
    # Directions with no energy in C' are arbitrary (they may lie in the protected space): do not use them.
    tol = (float(s[0]) if s.numel() else 0.0) * d * torch.finfo(torch.float64).eps
    energetic = int((s > tol).sum()) if float(s.max() if s.numel() else 0.0) > 0 else 0
    used = min(rank, free_dim, energetic)
    a = torch.zeros(rank, d, dtype=torch.float64)
    a[:used] = u[:, :used].T * A_SCALE
    if used < rank:
        log.warning("design: rank %d requested but only %d direction(s) are free of the old tasks' subspace "
                    "(free dim %d, directions with energy %d); the other %d row(s) of A_t are zero",
                    rank, used, free_dim, energetic, rank - used)
    return Design(lora_A=a.to(cov.dtype), used_rank=used, free_dim=free_dim)


def random_lora_A(rank: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform init of a plain LoRA down-projection (as in the LoRA reference code)."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) weight
    return (torch.rand(rank, d_in, generator=generator) * 2.0 - 1.0) * bound
