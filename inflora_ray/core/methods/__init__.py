"""The continual-learning methods, each a small strategy object around the task loop (:class:`Method`).

Importing this package imports every method's module, and each registers itself by name
(:func:`~.registry.register_method`): ``inflora`` (:mod:`.inflora`); ``seq-lora``, ``linear-probe``, ``joint``,
``joint-lora`` (:mod:`.baselines`); ``sd-lora``, ``sd-lora-kv`` (:mod:`.sd_lora`); ``l2p``, ``l2p-pp``,
``dualprompt``, ``coda-prompt`` (:mod:`.l2p`, :mod:`.dualprompt`, :mod:`.coda_prompt`, on the shared prompting
code of :mod:`.prompting`).
"""
from . import baselines, coda_prompt, dualprompt, inflora, l2p, sd_lora  # noqa: F401  (each registers its methods)
from .registry import METHODS, AgreeFn, CovarianceFn, Method, agree_locally, build_method, register_method

__all__ = ["METHODS", "AgreeFn", "CovarianceFn", "Method", "agree_locally", "build_method", "register_method"]
