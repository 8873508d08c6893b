"""Activation recompute (``parallel.recompute``), applied to the transformer blocks from outside.

- ``none``: every op keeps what its backward needs (the planner's ``layer_activation_bytes``
  counts those tensors one by one).
- ``full``: a block keeps only its input; its forward runs again inside the backward.
- ``selective`` (K2's recipe, after the K2 report: cheap, memory-heavy stages recomputed): the block
  keeps the outputs of its matmuls (the low-rank down-projections, ``o_proj``, the routed experts'
  grouped GEMMs, the router and the dense/shared FFN's gate and up projections), of the fused
  attention, and of the collectives; RMSNorms, SwiGLU, RoPE, the MLA up-projections (``q_b_proj``,
  ``kv_b_proj``), casts and element-wise ops are recomputed from them in the backward. The FFN's
  ``down_proj``, the block's last matmul, is not kept: no recompute gets that far. Our Triton kernels are
  custom ops (``k2kernels::*``) that the policy sees whole: the MLA attention is kept like the
  fused SDPA kernels, and with ``parallel.fp8_moe_inputs`` the routed experts' MLP is one op whose
  kept outputs are the FP8 tiles (its GEMMs inside are neither cached in bf16 nor recomputed).

How: each block's class is swapped for a subclass whose ``forward`` runs the original one under
non-reentrant :func:`torch.utils.checkpoint.checkpoint` (the same trick ``fully_shard`` uses, so
parameter names, state-dict keys and ``block.self_attn``-style access stay unchanged). Selective
mode adds a pair of dispatch modes with the policy below, as torch's selective checkpoint does
(``create_selective_checkpoint_contexts``), but ours keep what the policy saves through the
block's activation offloader when it has one (``parallel.offload_activations``): the kept outputs
go to pinned host memory and come back ahead of the block's recompute.

A recompute re-runs the forward, and the forward also updates module state: the MoE's routed-token
counts (summed), the attention's max logit (a max), the MoE's ``aux_loss`` attribute. The wrapper
snapshots the block's buffers and tensor attributes before a recompute and restores them after, so
the statistics count every token exactly once whatever the mode (tests/test_recompute.py).
"""

import functools
import threading
import weakref
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator, Optional

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map, tree_map_only
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ..kernels import attention, moe  # noqa: F401  (they register the k2kernels ops the policy names)

MODES = ("none", "selective", "full")
# Linear layers whose matmuls selective recompute runs again: K2's MLA up-projections, and the
# dense/shared FFN's down-projection, the block's last matmul: a recompute stops once the last
# tensor the backward saved is back (down_proj's input, saved before down_proj runs), so it never
# reaches that matmul, and keeping its output only held memory (and, with offload, crossed PCIe
# both ways) for nothing.
RECOMPUTED_LINEARS = ("q_b_proj", "kv_b_proj", "down_proj")


def _ops(*names: str) -> set:
    """aten overload packets that exist in this torch build (some are CUDA- or version-specific)."""
    found = set()
    for name in names:
        ns, _, op = name.partition(".")
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None:
            found.add(packet)
    return found


# Outputs kept by selective recompute: matmuls and fused attention (expensive to recompute).
_SAVED = _ops(
    "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._grouped_mm",
    "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._flash_attention_forward", "aten._efficient_attention_forward",
    "_c10d_functional.all_to_all_single", "_c10d_functional.all_gather_into_tensor",
    "_c10d_functional.reduce_scatter_tensor", "_c10d_functional.all_reduce",
    "k2kernels.mla_attention_fwd", "k2kernels.expert_mlp_saved_fwd", "k2kernels.grouped_linear_loop",
)  # fmt: skip

_region = threading.local()


def _in_recomputed_linear() -> bool:
    return getattr(_region, "depth", 0) > 0


def _enter_region(module, args):
    _region.depth = getattr(_region, "depth", 0) + 1


def _leave_region(module, args, output):
    _region.depth -= 1


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op.overloadpacket in _SAVED and not _in_recomputed_linear():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _traced_in_recomputed_linear() -> bool:
    """While torch.compile traces a checkpointed block (the eager forward hooks do not run then):
    is the op at hand inside one of :data:`RECOMPUTED_LINEARS`? The tracer hands each op the
    metadata of the graph node it comes from, whose module stack ends with the innermost module
    (``...self_attn.q_b_proj``)."""
    stack = fx_traceback.get_current_meta().get("nn_module_stack") or {}
    return bool(stack) and str(list(stack.values())[-1][0]).rsplit(".", 1)[-1] in RECOMPUTED_LINEARS


def _traced_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """:func:`_policy` for a compiled block: the same ops kept, the recomputed linears found by the
    traced node's module stack."""
    if op.overloadpacket in _SAVED and not _traced_in_recomputed_linear():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _compiled_selective_contexts(block_ref: "weakref.ref[nn.Module]") -> Callable:
    """The ``context_fn`` of a block compiled with its checkpoint (one per block, made once: the
    compiler takes it as a constant). Traced (the compiler runs the checkpoint over the graph's
    nodes, their metadata preserved): torch's selective contexts, which tag each node for the
    partitioner. Where the block did not compile as one graph (a graph break inside, e.g. the
    per-expert loop or EP's all-to-all), the checkpoint runs eagerly: then the eager contexts,
    with the recompute's state restore."""

    def contexts():
        if fx_traceback.should_preserve_node_meta:  # set while the compiler runs the checkpoint (torch >= 2.11)
            return create_selective_checkpoint_contexts(_traced_policy)
        fwd, rec = _selective_contexts()
        return _pass(block_ref, fwd, recompute=False), _pass(block_ref, rec, recompute=True)

    return contexts


@contextmanager
def uncached_autocast() -> Iterator[None]:
    """A recompute's casts, not cached. On a GPU the backward runs on autograd's device thread,
    where a recompute's autocast region is the outermost one, so the weights it casts again leave
    autocast's cache when the region ends (and each copy goes with the op that saved it). On the
    CPU the backward runs in the forward's thread, inside the trainer's step-long autocast region:
    cached, every weight a recompute casts (the LM head's too, 2.2 GiB at K2's width) would stay
    to the end of the step."""
    with ExitStack() as stack:
        for device in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False))
        yield


@contextmanager
def _pass(block_ref: "weakref.ref[nn.Module]", inner, recompute: bool) -> Iterator[None]:
    """One pass over a checkpointed block: the forward, or its recompute (which must leave the
    block's state as the forward left it). A recompute may stop early, by an exception once every
    needed tensor is back, before region hooks close: every pass starts and ends with none open.
    ``block_ref``: a weak reference (see :class:`RecomputedBlock`), read when the pass starts."""
    _region.depth = 0
    try:
        with _state_restored(_alive(block_ref)) if recompute else nullcontext(), \
                uncached_autocast() if recompute else nullcontext(), inner:
            yield
    finally:
        _region.depth = 0


@contextmanager
def _state_restored(block: nn.Module) -> Iterator[None]:
    """Undo whatever a recomputed forward does to ``block``'s buffers and tensor attributes."""
    with torch.no_grad():
        buffers = [(b, b.clone()) for b in block.buffers()]
    attrs = [
        (m, k, v) for m in block.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor) and not k.startswith("_")
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, k, v in attrs:
            setattr(m, k, v)


def _alive(block_ref: "weakref.ref[nn.Module]") -> nn.Module:
    block = block_ref()
    if block is None:
        raise RuntimeError("a recomputed block's backward ran after its model was freed: keep the model alive "
                           "until the backward of its forward is done")
    return block


def _run_block(block_ref: "weakref.ref[nn.Module]", *args, **kwargs):
    """The block's own forward (compiled if ``compile_inner`` made one), looked up when it runs."""
    block = _alive(block_ref)
    inner = getattr(block, "_compiled_forward", None) or super(RecomputedBlock, block).forward
    return inner(*args, **kwargs)


class RecomputedBlock:
    """Mixin placed in front of a block's class by :func:`apply_recompute`.

    What the checkpoint keeps for the backward (the function to run again, its recompute's
    context) reaches the block only through a weak reference. The saved tensors' hooks hold the
    checkpoint, and the block holds tensors of its own graph (the MoE's ``aux_loss``): a strong
    reference would close a cycle through autograd's C++ graph, which Python's garbage collector
    cannot see. A step's backward breaks it, but a forward that fails (out of memory, say) would
    keep the whole model and its activations alive for good."""

    recompute_mode: str = "full"

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
            return super().forward(*args, **kwargs)
        compiled = getattr(self, "_compiled_checkpoint", None)
        if compiled is not None:  # selective recompute compiled whole (compile_inner)
            with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
                return compiled(*args, **kwargs)
        block_ref = weakref.ref(self)
        mode, offload = self.recompute_mode, getattr(self, "offload", None)  # offload: activation_memory.apply_offload

        def contexts():
            if mode == "selective":
                fwd, rec = _selective_contexts(*((offload.pack, offload.unpack) if offload is not None else ()))
            else:
                fwd, rec = nullcontext(), nullcontext()
            return _pass(block_ref, fwd, recompute=False), _pass(block_ref, rec, recompute=True)

        return checkpoint(functools.partial(_run_block, block_ref), *args, use_reentrant=False, context_fn=contexts,
                          **kwargs)

    def compile_inner(self, backend: str = "inductor", mode: Optional[str] = None) -> None:
        """trainer.compile with recompute. Full: compile the block's own forward and keep the
        checkpoint around it in eager mode, where the recompute's state restore runs. Selective:
        compile the checkpoint with the block inside it (:meth:`_checkpointed`), so that the
        policy tags the traced graph's nodes and the compiler's partitioner keeps what it saves and
        recomputes the rest inside the compiled backward. There the recompute is only the ops the
        gradients need: the forward's updates of module state (routed-token counts, max logits,
        ``aux_loss``) run once, in the forward, and nothing needs restoring."""
        if self.recompute_mode == "selective":
            self._checkpoint_contexts = _compiled_selective_contexts(weakref.ref(self))
            self._compiled_checkpoint = torch.compile(self._checkpointed, backend=backend, mode=mode)
        else:
            self._compiled_forward = torch.compile(super().forward, backend=backend, mode=mode)

    def _checkpointed(self, *args, **kwargs):
        return checkpoint(super().forward, *args, use_reentrant=False,
                          context_fn=self._checkpoint_contexts, **kwargs)


def _same(x):
    return x


def _versions(out) -> list:
    return [t._version if isinstance(t, torch.Tensor) else None for t in tree_leaves(out)]


def _detached(t):
    """``t`` without autograd history, as an alias that shares its version counter (so an in-place
    change after it was kept is still seen). Called below autograd, where a plain ``detach`` would
    make an alias with a counter of its own: the in-place/view key is switched back on for it."""
    if not isinstance(t, torch.Tensor):
        return t
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return t.detach()


class _Keep(TorchDispatchMode):
    """Selective recompute's forward: the outputs of the ops the policy saves go into ``kept``, in
    order, each through ``pack``, with their version counters. What stays on the device is kept
    detached (the same storage and version counter): the output itself gets its ``grad_fn`` once
    this op returns, and its graph's saved tensors hold the checkpoint that holds ``kept``, a cycle
    through autograd's C++ graph that Python's garbage collector cannot break (after a forward that
    fails, it would keep every activation and weight alive)."""

    def __init__(self, kept: deque, pack: Callable):
        super().__init__()
        self.kept, self.pack = kept, pack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _policy(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs) == CheckpointPolicy.MUST_SAVE:
            kept = tree_map_only(torch.Tensor, lambda t: _detached(self.pack(t)), out)
            self.kept.append((func, kept, _versions(out)))
        return out


class _Replay(TorchDispatchMode):
    """Its recompute: those ops hand back what the forward kept (through ``unpack``), in the same
    order; every other op runs again. The recompute stops once the backward has what it needs, so
    a block's last kept outputs (its last matmul's, which no backward reads) may never be asked for."""

    def __init__(self, kept: deque, unpack: Callable):
        super().__init__()
        self.kept, self.unpack = kept, unpack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _policy(SelectiveCheckpointContext(is_recompute=True), func, *args, **kwargs) != CheckpointPolicy.MUST_SAVE:
            return func(*args, **kwargs)
        if not self.kept or self.kept[0][0] != func:
            raise RuntimeError(f"selective recompute: the recompute ran {func} where the forward kept "
                               f"{self.kept[0][0] if self.kept else 'nothing more'}; the block's forward must run "
                               "the same ops each time (no data- or state-dependent branches)")
        _, kept, versions = self.kept.popleft()
        # what stayed on the device is the forward's tensor itself: an in-place op after it was kept
        # would hand the recompute another value (what went to the host was copied when kept)
        if any(isinstance(t, torch.Tensor) and t._version != v for t, v in zip(tree_leaves(kept), versions)):
            raise RuntimeError(f"selective recompute: the output of {func} that the forward kept was modified in "
                               "place afterwards; the recompute would read the modified value (make that op "
                               "out of place)")
        return tree_map(self.unpack, kept)


def _selective_contexts(pack: Callable = _same, unpack: Callable = _same) -> tuple[TorchDispatchMode, TorchDispatchMode]:
    kept: deque = deque()
    return _Keep(kept, pack), _Replay(kept, unpack)


_CLASSES: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Recomputed{cls.__name__}", (RecomputedBlock, cls), {})
    return _CLASSES[cls]


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Turn on ``mode`` (``none``/``selective``/``full``) for every block in ``model.layers``
    (a whole model or a pipeline stage's part). Idempotent; ``none`` undoes a previous call."""
    if mode not in MODES:
        raise ValueError(f"parallel.recompute={mode!r}: choose one of {', '.join(MODES)}")
    for block in model.layers.values():
        base = block.__class__.__mro__[2] if isinstance(block, RecomputedBlock) else block.__class__
        handles = getattr(block, "_recompute_hooks", [])
        for h in handles:
            h.remove()
        block._recompute_hooks = []
        if mode == "none":
            block.__class__ = base
            continue
        block.__class__ = _recomputed_class(base)
        block.recompute_mode = mode
        if mode == "selective":
            for name, m in block.named_modules():
                if name.rsplit(".", 1)[-1] in RECOMPUTED_LINEARS:
                    block._recompute_hooks += [m.register_forward_pre_hook(_enter_region), m.register_forward_hook(_leave_region)]
    return model
