"""Triton kernels of k2train, each with a torch fallback; they import nothing else of k2train.

``set_deterministic(True)`` makes every kernel run with fixed configurations and no atomic
accumulation (the trainer's ``trainer.deterministic``).
"""

from ._triton import is_deterministic, set_deterministic

__all__ = ["is_deterministic", "set_deterministic"]
