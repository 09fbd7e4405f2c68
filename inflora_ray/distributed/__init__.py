"""The Ray layer: preflight checks, the Ray Train driver and worker, multi-seed runs and Ray Tune sweeps.

Calls into :mod:`inflora_ray.training` and :mod:`inflora_ray.core`; nothing below imports from here.
"""
