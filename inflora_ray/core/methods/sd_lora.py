"""SD-LoRA (Wu et al., ICLR 2025): finished tasks' LoRA directions kept fixed and normalised, their
magnitudes learned. Two methods:

``sd-lora`` (:class:`SDLoRA`), the published algorithm as its official code runs it: the query and value
projections of every block carry their own LoRA (separate ``A`` per projection, rank 10). At task t each
adapted projection computes

    W x + sum_{k<t} m_k * B_k A_k x / (||B_k||_F ||A_k||_F) + s * B_t A_t x

with one magnitude ``m_k`` per finished task shared by all blocks and both projections, and one scale ``s``
of the current task. At every new task ``m_k`` and ``s`` start again at 0.8, ``A_t`` Kaiming-uniform and
``B_t`` zero; ``A_t``, ``B_t``, every ``m_k``, ``s`` and the task's head are trained. The backbone is not
touched: :class:`SDLoRAQV` adds its output to each block's ``attn.qkv`` through a forward hook.

``sd-lora-kv`` (:class:`SDLoRAKV`), a variant on the platform's built-in k/v adapters (one ``A`` shared by
k and v, :class:`~inflora_ray.core.lora.KVLoRAQKV`): one magnitude per task, block and projection,
initialised at ``||B_k A_k||_F`` when task k ends and carried over, normaliser ``||B_k A_k||_F``, current
task at scale 1 (:class:`SDLoRAComponents`).

Both forwards stay low-rank: ``x -> x [A_1; ...; A_k]^T`` (k*r columns) then one up-projection whose
columns are the ``B``s scaled by their task's magnitude over its normaliser, ``O(k r d)`` per token, never a
dense ``d x d`` delta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import MethodConfig
from ..lora import check_rank
from ..model import ContinualViT
from ..subspace import random_lora_A
from .baselines import SeqLoRA
from .registry import CovarianceFn, Method, register_method

# What the official code gives every magnitude and the current scale when it builds a task's network
# (backbone/lora.py, LoRA_ViT_timm.__init__: nn.Parameter(torch.Tensor([0.8])) for both).
INIT_MAGNITUDE = 0.8


class SDLoRAQV(nn.Module):
    """One block's SD-LoRA branches on the query and value thirds of its fused ``qkv`` output.

    The current task's ``A_q``, ``B_q``, ``A_v``, ``B_v`` are parameters (trained during the task); the finished
    tasks' are buffers with room for ``max_tasks`` of them (fixed shapes, so the state loads into a freshly
    built model), together with each one's normaliser ``||B||_F ||A||_F``. The magnitudes and the current
    scale are shared by every block and passed in (:class:`SDLoRAModel`).
    """

    def __init__(self, max_tasks: int, rank: int, in_features: int, dim: int):
        super().__init__()
        self.rank = rank
        self.in_features = in_features
        self.dim = dim
        for p in ("q", "v"):
            setattr(self, f"lora_A_{p}", nn.Parameter(torch.zeros(rank, in_features), requires_grad=False))
            setattr(self, f"lora_B_{p}", nn.Parameter(torch.zeros(dim, rank), requires_grad=False))
            self.register_buffer(f"old_A_{p}", torch.zeros(max_tasks * rank, in_features))
            self.register_buffer(f"old_B_{p}", torch.zeros(dim, max_tasks * rank))
            self.register_buffer(f"old_norm_{p}", torch.zeros(max_tasks))

    def current(self) -> dict[str, nn.Parameter]:
        """The current task's ``A`` and ``B`` of both projections, by name."""
        return {f"lora_{m}_{p}": getattr(self, f"lora_{m}_{p}") for p in ("q", "v") for m in ("A", "B")}

    @torch.no_grad()
    def store(self, slot: int) -> None:
        """Keep the current ``A``, ``B`` of both projections as finished task ``slot`` (with the normaliser
        ``||B||_F ||A||_F`` the official code divides by, backbone/lora.py ``_LoRA_qkv_timm_train.forward``)."""
        r = self.rank
        for p in ("q", "v"):
            a, b = getattr(self, f"lora_A_{p}"), getattr(self, f"lora_B_{p}")
            getattr(self, f"old_A_{p}")[slot * r:(slot + 1) * r] = a
            getattr(self, f"old_B_{p}")[:, slot * r:(slot + 1) * r] = b
            getattr(self, f"old_norm_{p}")[slot] = torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a)

    def _projection(self, p: str, magnitude: torch.Tensor, scale: torch.Tensor, count: int):
        """(A, B) of projection ``p`` with every task's factor folded into the columns of B: ``s`` for the
        current task, ``m_k / (||B_k|| ||A_k||)`` for finished task k (0 where a normaliser is 0: a direction
        that never left zero carries nothing)."""
        a, b = getattr(self, f"lora_A_{p}"), getattr(self, f"lora_B_{p}") * scale
        if not count:
            return a, b
        n = count * self.rank
        norm = getattr(self, f"old_norm_{p}")[:count]
        factor = torch.where(norm > 0, magnitude[:count] / torch.where(norm > 0, norm, 1.0), 0.0)
        old_b = getattr(self, f"old_B_{p}")[:, :n] * factor.repeat_interleave(self.rank)
        return torch.cat([a, getattr(self, f"old_A_{p}")[:n]]), torch.cat([b, old_b], dim=1)

    def forward(self, x: torch.Tensor, magnitude: torch.Tensor, scale: torch.Tensor, count: int) -> torch.Tensor:
        """The 3d-wide addition ``[dq; 0; dv]`` to the block's qkv output for input ``x`` (``count`` finished
        tasks in use)."""
        a_q, b_q = self._projection("q", magnitude, scale, count)
        a_v, b_v = self._projection("v", magnitude, scale, count)
        h = F.linear(x, torch.cat([a_q, a_v]))  # one down-projection for both: (..., 2 (count + 1) r)
        m = a_q.shape[0]
        dq = F.linear(h[..., :m], b_q.to(h.dtype))
        dv = F.linear(h[..., m:], b_v.to(h.dtype))
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


class SDLoRAModel(nn.Module):
    """All blocks' :class:`SDLoRAQV` and what they share: ``magnitude`` (one per finished task, room for
    ``max_tasks``) and ``scale`` (the current task's). ``count``: finished tasks in use (set by the method)."""

    def __init__(self, num_layers: int, max_tasks: int, rank: int, in_features: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(SDLoRAQV(max_tasks, rank, in_features, dim) for _ in range(num_layers))
        self.magnitude = nn.Parameter(torch.zeros(max_tasks), requires_grad=False)
        self.scale = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.count = 0

    def delta(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s addition to its qkv output for input ``x``."""
        return self.layers[layer](x, self.magnitude, self.scale, self.count)

    def attach(self, backbone: nn.Module) -> None:
        """Add each block's branches to its ``attn.qkv`` output with a forward hook (the weights stay as built)."""
        for i, block in enumerate(backbone.blocks):
            block.attn.qkv.register_forward_hook(
                lambda module, inputs, output, i=i: output + self.delta(i, inputs[0]))


@register_method
class SDLoRA(Method):
    """SD-LoRA as its official code runs it (module docstring; docs/baselines.md#sd-lora): a new q/v LoRA per
    task; at the next task it becomes a fixed direction with a magnitude shared by all blocks and projections,
    every magnitude and the current scale re-initialised to 0.8 at every task."""
    name = "sd-lora"

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.stored = 0  # finished tasks kept as fixed components (the last one joins at the next task)

    def build(self, model: ContinualViT) -> None:
        qkv = model.backbone.blocks[0].attn.qkv
        if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
            raise ValueError("sd-lora adapts timm ViTs with a fused attn.qkv Linear of 3*d outputs")
        check_rank(self.cfg.rank, qkv.in_features)
        sd = SDLoRAModel(len(model.backbone.blocks), self.num_tasks, self.cfg.rank, qkv.in_features,
                         qkv.out_features // 3)
        model.extras["sd_lora"] = sd
        sd.attach(model.backbone)

    @staticmethod
    def modules(model: ContinualViT) -> SDLoRAModel:
        """The method's branches, magnitudes and scale on ``model``."""
        return model.extras["sd_lora"]

    def prepare_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        sd = self.modules(model)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 10_007)
        with torch.no_grad():
            if task > 0:  # the previous task's adapter becomes a fixed component (the official update_network)
                for layer in sd.layers:
                    layer.store(task - 1)
                self.stored = sd.count = task
            for layer in sd.layers:
                # A: kaiming_uniform_(a=sqrt(5)), B: zeros (backbone/lora.py reset_parameters)
                for p in ("q", "v"):
                    getattr(layer, f"lora_A_{p}").copy_(random_lora_A(layer.rank, layer.in_features, gen))
                    getattr(layer, f"lora_B_{p}").zero_()
            sd.magnitude.fill_(INIT_MAGNITUDE)
            sd.scale.fill_(INIT_MAGNITUDE)
            # The official head (backbone/linears.py SimpleLinear): kaiming_uniform_(nonlinearity="linear"),
            # i.e. U(-sqrt(3 / d), sqrt(3 / d)), and a zero bias.
            head = model.heads[task]
            bound = (3.0 / head.in_features) ** 0.5
            head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
            head.bias.zero_()
        self.set_task_trainable(model)
        return {}

    def _trained(self, model: ContinualViT) -> list[nn.Parameter]:
        sd = self.modules(model)
        params = [p for layer in sd.layers for p in layer.current().values()] + [sd.scale]
        # The magnitudes of finished tasks; at task 0 there are none (the official code gives them no gradient).
        return params + ([sd.magnitude] if sd.count else [])

    def set_task_trainable(self, model: ContinualViT) -> None:
        for p in self._trained(model):
            p.requires_grad_(True)

    def trainable_parameters(self, model: ContinualViT) -> list[nn.Parameter]:
        return self._trained(model)

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        # The task's adapter stays live (scale s, unnormalised) for the evaluation that follows, as in the
        # official code; it becomes a stored component when the next task starts.
        sd = self.modules(model)
        for p in self._trained(model):
            p.requires_grad_(False)
        return {"scale": round(float(sd.scale), 5),
                "magnitudes": [round(float(m), 5) for m in sd.magnitude[:sd.count]]}

    def state_dict(self) -> dict:
        # The branches, magnitudes and scale are model.extras tensors, saved by the loop with the model.
        return {**super().state_dict(), "stored": self.stored}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        stored = state.get("stored")
        if not isinstance(stored, int) or not 0 <= stored <= self.num_tasks:
            raise ValueError(f"checkpoint: sd-lora has {stored!r} stored tasks, the run has {self.num_tasks} tasks")
        self.stored = self.modules(model).count = stored


# ------------------------------------------------------------------------------------------------------------
# sd-lora-kv: the variant on the built-in k/v adapters
# ------------------------------------------------------------------------------------------------------------

class SDLoRAComponents(nn.Module):
    """The finished tasks' fixed directions and learned magnitudes of one k/v-adapted layer (``sd-lora-kv``).

    Room for ``max_tasks`` components is allocated up front (fixed shapes, so the state loads into a freshly
    built model); ``count`` of them are in use. Directions are buffers (never trained); ``magnitude`` is a
    ``(max_tasks, 2)`` parameter: alpha of the key and of the value direction of each task.
    """

    def __init__(self, max_tasks: int, rank: int, in_features: int, dim: int):
        super().__init__()
        self.rank = rank
        self.dim = dim
        self.count = 0
        self.register_buffer("lora_A", torch.zeros(max_tasks * rank, in_features))
        self.register_buffer("dir_B_k", torch.zeros(dim, max_tasks * rank))  # B_k / ||B_k A||_F per task
        self.register_buffer("dir_B_v", torch.zeros(dim, max_tasks * rank))
        self.magnitude = nn.Parameter(torch.zeros(max_tasks, 2), requires_grad=False)

    @property
    def max_tasks(self) -> int:
        return self.magnitude.shape[0]

    @torch.no_grad()
    def add(self, lora_A: torch.Tensor, lora_B_k: torch.Tensor, lora_B_v: torch.Tensor) -> None:
        """Store a finished task's adapter as a normalised direction per projection, with magnitude
        ``||B A||_F`` so that the layer computes exactly what it computed with the unnormalised adapter."""
        k, r = self.count, self.rank
        if k >= self.max_tasks:
            raise ValueError(f"SD-LoRA: room for {self.max_tasks} tasks, all used")
        a = lora_A.detach().to(self.lora_A)
        for j, (b, out) in enumerate(((lora_B_k, self.dir_B_k), (lora_B_v, self.dir_B_v))):
            b = b.detach().to(out)
            norm = float(torch.linalg.matrix_norm(b.double() @ a.double()))
            # A direction of norm 0 (B never left zero) carries nothing: keep it zero with magnitude 0.
            out[:, k * r:(k + 1) * r] = b / norm if norm > 0 else 0.0
            self.magnitude[k, j] = norm
        self.lora_A[k * r:(k + 1) * r] = a
        self.count = k + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stored components' contribution ``[0; sum_k a_k^K D_k^K x; sum_k a_k^V D_k^V x]`` (3d wide)."""
        n = self.count * self.rank
        h = F.linear(x, self.lora_A[:n])
        scale = self.magnitude[:self.count].repeat_interleave(self.rank, dim=0)  # (n, 2)
        b_full = torch.cat([torch.zeros_like(self.dir_B_k[:, :n]), self.dir_B_k[:, :n] * scale[:, 0],
                            self.dir_B_v[:, :n] * scale[:, 1]], dim=0)
        return F.linear(h, b_full.to(h.dtype))

    def extra_repr(self) -> str:
        return f"count={self.count}, max_tasks={self.max_tasks}, rank={self.rank}, dim={self.dim}"


def attach(layer: nn.Module, components: SDLoRAComponents) -> torch.utils.hooks.RemovableHandle:
    """Add ``components``' output to ``layer``'s (a k/v-adapted qkv projection) with a forward hook; a layer
    without stored components computes as before."""
    def hook(module, inputs, output):
        return output + components(inputs[0]) if components.count else output
    return layer.register_forward_hook(hook)


@register_method
class SDLoRAKV(SeqLoRA):
    """SD-LoRA on the platform's k/v adapters (docs/baselines.md#sd-lora-kv): each task trains a new LoRA
    (random A_t shared by k and v, zero B_t, both trained, as seq-lora); when it finishes, its update is kept
    as a fixed, normalised direction per projection with a learned magnitude starting at ``||B_t A_t||_F``
    (:class:`SDLoRAComponents`), and later tasks train all earlier magnitudes together with their own A_t,
    B_t. Nothing is merged into W."""
    name = "sd-lora-kv"

    def __init__(self, cfg: MethodConfig, num_tasks: int, seed: int):
        super().__init__(cfg, num_tasks, seed)
        self.num_components = 0  # finished tasks stored as components (the same on every layer)

    def build(self, model: ContinualViT) -> None:
        comps = nn.ModuleList(SDLoRAComponents(self.num_tasks, layer.rank, layer.in_features, layer.dim)
                              for layer in model.adapters)
        model.extras["sd_lora"] = comps
        for layer, c in zip(model.adapters, comps):
            attach(layer, c)

    @staticmethod
    def components(model: ContinualViT) -> list[SDLoRAComponents]:
        """Each adapted layer's stored components."""
        return list(model.extras["sd_lora"])

    def set_task_trainable(self, model: ContinualViT) -> None:
        super().set_task_trainable(model)
        for c in self.components(model):
            c.magnitude.requires_grad_(True)

    def trainable_parameters(self, model: ContinualViT) -> list[torch.nn.Parameter]:
        comps = self.components(model)
        # Task 0 has no stored component: its magnitudes take no part in the forward (plain LoRA).
        return super().trainable_parameters(model) + ([c.magnitude for c in comps] if comps[0].count else [])

    def finish_task(self, model: ContinualViT, task: int, covariance: CovarianceFn) -> dict:
        with torch.no_grad():
            for layer, c in zip(model.adapters, self.components(model)):
                c.add(layer.lora_A, layer.lora_B_k, layer.lora_B_v)
                c.magnitude.requires_grad_(False)
                for p in layer.adapter_params().values():
                    p.zero_()
                layer.set_trainable(a=False, b=False)
        self.num_components += 1
        mags = torch.stack([c.magnitude[:task + 1].detach().cpu() for c in self.components(model)])
        return {"magnitude_mean": [round(float(m), 5) for m in mags.mean(dim=(0, 2))]}

    def state_dict(self) -> dict:
        # The directions and magnitudes are model.extras tensors, saved by the loop with the model.
        return {**super().state_dict(), "components": self.num_components}

    def load_state_dict(self, state: dict, model: ContinualViT) -> None:
        super().load_state_dict(state, model)
        self.num_components = int(state["components"])
        if not 0 <= self.num_components <= self.num_tasks:
            raise ValueError(f"checkpoint: sd-lora-kv has {self.num_components} stored tasks, the run has "
                             f"{self.num_tasks} tasks")
        for c in self.components(model):
            c.count = self.num_components
