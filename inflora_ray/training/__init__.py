"""One worker's continual loop (design A_t -> train -> update memory -> evaluate), in plain PyTorch.

Runs the same in a single process and as one data-parallel rank; the only cross-process step is
:mod:`inflora_ray.training.collective` (``torch.distributed``, the identity without a process group).
"""
