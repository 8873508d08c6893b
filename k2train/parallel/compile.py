"""``trainer.compile``: ``torch.compile`` on each transformer block, from outside the model.

Per block rather than the whole model (as TorchTitan does): every block of a kind has the same
code, so one compiled graph serves them all (dynamo guards on the module's attributes, not its
identity), compile time does not grow with depth, and the pieces that cannot be traced break the
graph only inside their own block. ``Module.compile`` keeps the block object, its class, its
parameter names and its state-dict keys.

The Triton kernels (``model.*_impl=triton``) are ``torch.library`` custom ops, one opaque node each
(k2train/kernels), and the Triton experts route without a host sync: with every switch on Triton a
block compiles as one graph, no break (tests/test_compile_kernels.py). What still breaks the graph:
the per-expert reference loop (``torch.where`` sizes its rows from the data; the experts take it for
``model.moe_impl=loop``, and for ``grouped_mm`` where ``torch._grouped_mm`` cannot run, e.g. fp32
on CPU once compiled), expert parallelism's all-to-all (its split sizes are read on the host) and
collectives outside the functional API.

With ``parallel.recompute=full`` the block's own forward is compiled and the checkpoint stays
around it in eager mode: only the eager checkpoint can undo a recompute's second count of the
routed tokens (k2train/parallel/recompute.py). With ``selective`` the checkpoint is compiled with
the block inside it: the policy tags the traced graph, the partitioner recomputes inside the
compiled backward, and a compiled backward recomputes only what the gradients need, so the
forward's state updates run once (``RecomputedBlock.compile_inner``).

``trainer.compile_mode`` is torch.compile's mode for every block; the CUDA-graph modes
(``reduce-overhead``, ``max-autotune``) have the config check's conditions (docs/parallelism.md).
"""

from torch import nn

from .recompute import RecomputedBlock


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """Compile every block in ``model.layers`` in place; returns ``model``. ``mode``: torch.compile's
    (``trainer.compile_mode``)."""
    mode = None if mode == "default" else mode
    for block in model.layers.values():
        if isinstance(block, RecomputedBlock):
            block.compile_inner(backend, mode)
        else:
            block.compile(backend=backend, mode=mode)
    return model
