"""``trainer.compile``: ``torch.compile`` on each transformer block, from outside the model.

Per block rather than the whole model (as TorchTitan does): every block of a kind has the same
code, so one compiled graph serves them all (dynamo guards on the module's attributes, not its
identity), compile time does not grow with depth, and the pieces that cannot be traced (the MoE's
data-dependent token counts, collectives outside the functional API) break the graph only
inside their own block. ``Module.compile`` keeps the block object, its class, its parameter names
and its state-dict keys.

With ``parallel.recompute=full`` the block's own forward is compiled and the checkpoint stays
around it in eager mode: the MoE's token counts are data-dependent graph breaks, and only the
eager checkpoint can undo a recompute's second count (k2train/parallel/recompute.py). Selective
recompute with compile is refused by the config check (its op policy runs on eager ops).
"""

from torch import nn

from .recompute import RecomputedBlock


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every block in ``model.layers`` in place; returns ``model``."""
    for block in model.layers.values():
        if isinstance(block, RecomputedBlock):
            block.compile_inner(backend)
        else:
            block.compile(backend=backend)
    return model
