"""Triton kernels of k2train, each with a torch fallback; they import nothing else of k2train.

``set_deterministic(True)`` makes every kernel run with fixed configurations and no atomic
accumulation (the trainer's ``trainer.deterministic``).

The model's kernels (norms, SwiGLU, attention, the MoE path with its FP8 storage) launch inside
``torch.library`` custom ops (namespace ``k2kernels``: the forward and the backward each an op with
a fake-tensor rule, the autograd registered on the forward), so ``torch.compile`` keeps each as one
opaque node: no graph break, no tracing into Triton. The ops return fresh tensors and read the
deterministic switch when they run, not when they are traced. The optimizer's kernels
(Newton-Schulz, AdamW) run outside compiled code and launch directly.
"""

from ._triton import is_deterministic, set_deterministic

__all__ = ["is_deterministic", "set_deterministic"]
