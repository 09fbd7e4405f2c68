"""inflora-ray: InfLoRA continual learning (Liang & Li, CVPR 2024) on Ray Train, Ray Tune and MLflow.

The math lives in :mod:`inflora_ray.core.lora` (the adapted layer) and :mod:`inflora_ray.core.subspace` (covariance,
design of A_t, DualGPM memory); neither imports Ray or MLflow.
"""
__version__ = "0.1.0"
