"""``trainer.compile``: ``torch.compile`` on each transformer block, from outside the model.

Per block rather than the whole model (as TorchTitan does): every block of a kind has the same
code, so one compiled graph serves them all (dynamo guards on the module's attributes, not its
identity), compile time does not grow with depth, and the pieces that cannot be traced (the MoE's
data-dependent token counts, collectives outside the functional API) break the graph only
inside their own block. ``Module.compile`` keeps the block object, its class, its parameter names
and its state-dict keys; activation recompute (applied first) is traced with the block.
"""

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every block in ``model.layers`` in place; returns ``model``."""
    for block in model.layers.values():
        block.compile(backend=backend)
    return model
