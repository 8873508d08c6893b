"""K2's activation-memory techniques, applied from outside the model like recompute.

``parallel.fp8_moe_inputs`` (:func:`apply_fp8_storage`): the routed experts keep for their
backward only their input and the SwiGLU inputs, as FP8 E4M3 in 1 x 128 tiles with an fp32 scale
per tile (k2train.kernels.fp8), and the weights themselves; compute stays in bf16/fp32 (the
dequantized values feed only the backward). Per routed token that is ``(D + 2 I)(1 + 4/128)``
bytes instead of the ``(3 D + 4 I) x 2`` (bf16) that autograd keeps for the same MLP.

``parallel.offload_activations`` (:class:`ActivationOffload`): what each transformer block saves
for its backward goes to pinned CPU memory, copied on a side CUDA stream while the next blocks and
micro-batches compute; when the backward reaches a block, the block before it (the next one the
backward needs) is copied back on that stream ahead of time. So the GPU holds about one block's
activations per micro-batch in flight instead of all of them. Weights (and their compute-dtype
copies) and small tensors stay on the GPU. On a CPU device there is nothing to offload: the hooks
pass every tensor through (the same results, tested).

Both act on what autograd saves, so they need ``parallel.recompute=none``: a recomputed block
keeps its activations in the checkpoint's own storage (the config check says so).
"""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from k2train.model.moe import GroupedExperts

from .expert_parallel import ExpertParallelExperts


def apply_fp8_storage(model: nn.Module) -> None:
    """Switch FP8 storage on for every routed-experts module of ``model`` (after EP)."""
    for m in model.modules():
        if isinstance(m, (GroupedExperts, ExpertParallelExperts)):
            m.fp8_saved = True


class _OnHost:
    """A saved tensor's copy in pinned CPU memory, and its way back to the GPU."""

    __slots__ = ("host", "device", "copied", "gpu", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: torch.cuda.Event):
        self.host, self.device, self.copied = host, device, copied
        self.gpu: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None


class ActivationOffload:
    """Saved-tensor hooks that move each block's activations to the CPU and back (see the module
    docstring). ``min_bytes``: smaller tensors stay on the GPU (their copies cost more than they
    free)."""

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.stream: Optional[torch.cuda.Stream] = None
        self._current: Optional[list] = None  # handles of the block running its forward

    # -- the hooks -----------------------------------------------------------------------------

    def pack(self, t: torch.Tensor):
        if (not t.is_cuda or t.numel() * t.element_size() < self.min_bytes or self._current is None
                or isinstance(t, nn.Parameter) or (t._base is not None and isinstance(t._base, nn.Parameter))):
            return t
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # the tensor is complete before it is copied
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        handle = _OnHost(host, t.device, copied)
        self._current.append(handle)
        return handle

    def unpack(self, saved):
        if not isinstance(saved, _OnHost):
            return saved
        if saved.gpu is None:
            self._fetch([saved])
        torch.cuda.current_stream(saved.device).wait_event(saved.ready)
        gpu, saved.gpu = saved.gpu, None  # each saved tensor is unpacked once
        return gpu

    def _fetch(self, handles: list) -> None:
        """Copy ``handles`` back to the GPU on the side stream (after their own copies out)."""
        with torch.cuda.stream(self.stream):
            for h in handles:
                if h.gpu is not None:
                    continue
                self.stream.wait_event(h.copied)
                h.gpu = h.host.to(h.device, non_blocking=True)
                h.ready = torch.cuda.Event()
                h.ready.record(self.stream)

    # -- per block -----------------------------------------------------------------------------

    @contextmanager
    def block(self, handles: list) -> Iterator[None]:
        """Offload what is saved inside (a block's forward) into ``handles``."""
        previous, self._current = self._current, handles
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._current = previous

    def prefetch(self, handles: list) -> None:
        if handles and self.stream is not None:
            self._fetch(handles)


class _OffloadedBlock:
    """Mixin placed in front of a block's class by :func:`apply_offload`: its forward runs inside
    the offload hooks; when the backward reaches its output, this block's tensors and the previous
    block's (whose backward comes next) start coming back. The handles travel on the tensors
    between blocks, so several micro-batches in flight (pipeline schedules) keep theirs apart."""

    offload: ActivationOffload

    def forward(self, x, *args, **kwargs):
        if not torch.is_grad_enabled() or not x.is_cuda:
            return super().forward(x, *args, **kwargs)
        handles: list = []
        with self.offload.block(handles):
            out = super().forward(x, *args, **kwargs)
        previous = getattr(x, "_offloaded", None)

        def backward_starts(grad):
            self.offload.prefetch(handles)
            if previous:
                self.offload.prefetch(previous)
            return grad

        if out.requires_grad:
            out.register_hook(backward_starts)
        out._offloaded = handles
        return out


_CLASSES: dict[type, type] = {}


def apply_offload(model: nn.Module, offload: Optional[ActivationOffload] = None) -> ActivationOffload:
    """Offload the activations of every block in ``model.layers`` (a whole model or a pipeline
    stage's part). Returns the offloader (one side stream per process)."""
    offload = offload or ActivationOffload()
    for block in model.layers.values():
        base = block.__class__
        if base not in _CLASSES:
            _CLASSES[base] = type(f"Offloaded{base.__name__}", (_OffloadedBlock, base), {})
        block.__class__ = _CLASSES[base]
        block.offload = offload
    return offload
