"""K2's activation-memory techniques, applied from outside the model like recompute.

``parallel.fp8_moe_inputs`` (:func:`apply_fp8_storage`): the routed experts keep for their
backward only their input and the SwiGLU inputs, as FP8 E4M3 in 1 x 128 tiles with an fp32 scale
per tile (k2train.kernels.fp8), and the weights themselves; compute stays in bf16/fp32 (the
dequantized values feed only the backward). Per routed token that is ``(D + 2 I)(1 + 4/128)``
bytes instead of the ``(3 D + 4 I) x 2`` (bf16) that autograd keeps for the same MLP.

``parallel.offload_activations`` (:class:`ActivationOffload`): what each transformer block saves
for its backward goes to pinned CPU memory, copied on a side CUDA stream while the next block
computes (a block's forward waits for the copies of the block two before it); when the backward
reaches a block, the block before it (the next one the backward needs) is copied back ahead of
time on a second side stream. So the GPU holds about two blocks' activations (the one computing,
the one crossing) instead of every block's of every micro-batch in flight. Weights (and their compute-dtype
copies) and small tensors stay on the GPU. On a CPU device there is nothing to offload: the hooks
pass every tensor through (the same results, tested).

FP8 storage composes with every recompute mode. Offload composes with selective recompute: what
its policy keeps for a block (k2train.parallel.recompute) goes through this offloader's
``pack``/``unpack``, so it crosses to the host and comes back for the block's recompute, prefetched
like the rest. With full recompute a block keeps only its input, and there is nothing to offload
(the config check says so).
"""

import weakref
from collections import deque
from contextlib import contextmanager, nullcontext
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


class BlockHandles(list):
    """The host storages of one block's forward (a list that can be weakly referenced)."""

    __slots__ = ("__weakref__",)


def _no_block() -> None:  # the place of a block that offloads nothing in ActivationOffload._recent
    return None


class _HostStorage:
    """One GPU storage's bytes in pinned CPU memory (several saved tensors may view it), and its
    way back: copied to the GPU once, handed to each view, dropped after the last one. ``src``: the
    GPU original, held until the compute stream has waited for the copy out (then its memory goes
    back to the allocator in stream order), or handed back as it is if the backward comes first."""

    __slots__ = ("host", "device", "copied", "src", "gpu", "ready", "views")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: torch.cuda.Event, src: torch.Tensor):
        self.host, self.device, self.copied, self.src = host, device, copied, src
        self.gpu: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None
        self.views = 0  # saved tensors not yet unpacked


class _OnHost:
    """A saved tensor: its storage on the host and where in it the tensor lies."""

    __slots__ = ("storage", "dtype", "offset", "size", "stride")

    def __init__(self, storage: _HostStorage, t: torch.Tensor, offset: int):
        self.storage, self.dtype, self.offset, self.size, self.stride = storage, t.dtype, offset, t.shape, t.stride()


# autograd nodes a parameter passes through to become a saved compute-dtype copy or view of itself
_CAST_OR_VIEW = {"ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0", "TBackward0", "TransposeBackward0",
                 "PermuteBackward0", "AliasBackward0", "ExpandBackward0", "ReshapeAliasBackward0"}


def _from_parameter(t: torch.Tensor) -> bool:
    """``t`` is a parameter (bf16 weights are saved as they are) or its cast or view (autocast's
    bf16 weight copies): the weights stay on the GPU anyway, and their copies are the same for
    every block and micro-batch."""
    fn = t.grad_fn
    if fn is None:  # a pipeline stage's received input is a leaf too, but an activation
        return isinstance(t, nn.Parameter)
    for _ in range(4):
        if fn is None:
            return False
        if type(fn).__name__ == "AccumulateGrad":
            return True
        if type(fn).__name__ not in _CAST_OR_VIEW:
            return False
        nxt = [f for f, _ in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn = nxt[0]
    return False


class ActivationOffload:
    """Saved-tensor hooks that move each block's activations to the CPU and back (see the module
    docstring). ``min_bytes``: smaller tensors stay on the GPU (their copies cost more than they
    free). A storage saved several times in a block (one input read by several matmuls, views of
    one tensor) crosses once. ``bytes_offloaded``: the total copied out, for benchmarks.

    At most two blocks' copies are in flight: when a block's forward starts (one that keeps its
    tensors too), the compute stream waits for the copies out of the block two before it, and that
    block's GPU originals are let go, their memory reused in stream order. Without that bound a
    forward that outruns PCIe kept every block's originals alive while their copies queued (the
    caching allocator frees a block used by a side stream only once the host sees its copy done,
    and the host runs ahead of the GPU)."""

    # the device whose tensors cross to pinned host memory (a test may set "cpu", with stand-in
    # streams and events, to run this logic without a GPU: tests/test_activation_memory.py)
    device_type = "cuda"

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        # one side stream per direction: PCIe copies both ways at once, so in a pipeline the copies
        # out of one micro-batch's forward and back for another's backward need not queue
        self.out_stream: Optional[torch.cuda.Stream] = None
        self.in_stream: Optional[torch.cuda.Stream] = None
        self._current: Optional[list] = None  # host storages of the block running its forward
        self._by_ptr: dict[int, tuple] = {}  # the same, by GPU address (this block only)
        # the last two blocks offloaded, as long as their autograd graphs live (a kept tensor that
        # no backward asks for, as selective recompute may leave, goes with its graph)
        self._recent: deque[weakref.ref] = deque(maxlen=2)
        self.bytes_offloaded = 0

    # -- the hooks -----------------------------------------------------------------------------

    def offloads(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives on the device this offloader empties."""
        return t.device.type == self.device_type

    def pack(self, t: torch.Tensor):
        if (not self.offloads(t) or t.numel() * t.element_size() < self.min_bytes or self._current is None
                or isinstance(t, nn.Parameter) or (t._base is not None and isinstance(t._base, nn.Parameter))
                or _from_parameter(t)):
            return t
        storage = t.untyped_storage()
        whole = storage.nbytes() <= 2 * t.numel() * t.element_size()  # else copy the view alone
        key = storage.data_ptr()
        entry = self._by_ptr[key][0] if whole and key in self._by_ptr else None
        if entry is None:
            if self.out_stream is None:
                self.out_stream, self.in_stream = torch.cuda.Stream(t.device), torch.cuda.Stream(t.device)
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage) if whole else t.contiguous()
            # src is complete before it is read (t.contiguous() may be a copy queued just now)
            self.out_stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.out_stream):
                host = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.device_type == "cuda")
                host.copy_(src, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.out_stream)
            entry = _HostStorage(host, t.device, copied, src)  # src lives on until the compute waited for the copy
            self._current.append(entry)
            self.bytes_offloaded += host.numel() * host.element_size()
            if whole:  # one entry per storage in this block
                self._by_ptr[key] = (entry, storage)
        entry.views += 1
        if whole:
            return _OnHost(entry, t, t.storage_offset())
        return _OnHost(entry, entry.host, 0)

    def unpack(self, saved):
        if not isinstance(saved, _OnHost):
            return saved
        entry = saved.storage
        if entry.gpu is None:
            self._fetch([entry])
        compute = torch.cuda.current_stream(entry.device)
        gpu = entry.gpu
        if entry.ready is not None:  # copied back on the side stream, used and freed on this one
            compute.wait_event(entry.ready)
            gpu.record_stream(compute)
        entry.views -= 1
        if entry.views == 0:  # the tensors handed out keep the GPU copy alive as long as autograd needs;
            entry.gpu = entry.host = entry.src = None  # the pinned buffer goes back to torch's host cache
        if gpu.dtype == saved.dtype and gpu.shape == saved.size and gpu.stride() == saved.stride:
            return gpu
        return torch.empty(0, dtype=saved.dtype, device=entry.device).set_(
            gpu.untyped_storage(), saved.offset, saved.size, saved.stride)

    def _fetch(self, entries: list) -> None:
        """Copy ``entries`` back to the GPU on the inbound side stream (after their own copies out);
        an entry whose GPU original is still held (one of the last two blocks) hands that back."""
        compute = torch.cuda.current_stream()  # the backward's (prefetch and unpack run on it)
        with torch.cuda.stream(self.in_stream):
            for e in entries:
                if e.gpu is not None or e.views == 0:
                    continue
                if e.src is not None:  # written on the compute stream, which reads it: no copy. Its
                    # memory is freed on that stream: ordered after the copy out, long done by now
                    compute.wait_event(e.copied)
                    e.gpu, e.src, e.ready = e.src, None, None
                    continue
                self.in_stream.wait_event(e.copied)
                e.gpu = e.host.to(e.device, non_blocking=True, copy=True)
                e.ready = torch.cuda.Event()
                e.ready.record(self.in_stream)

    # -- per block -----------------------------------------------------------------------------

    @contextmanager
    def block(self, handles: "BlockHandles") -> Iterator[None]:
        """Offload what is saved inside (a block's forward) into ``handles`` (after :meth:`advance`)."""
        self.advance(handles)
        previous, self._current, by_ptr, self._by_ptr = self._current, handles, self._by_ptr, {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._current, self._by_ptr = previous, by_ptr

    def advance(self, handles: Optional[BlockHandles]) -> None:
        """A block's forward starts (``handles``: what it offloads; None for a block that keeps its
        tensors): the compute waits for the copies out of the block two before and lets that
        block's GPU originals go."""
        if len(self._recent) == self._recent.maxlen and (block := self._recent[0]()) is not None:
            oldest = [e for e in block if e.src is not None]
            if oldest:
                torch.cuda.current_stream(oldest[-1].device).wait_event(oldest[-1].copied)  # the last: in order
                for e in oldest:
                    e.src = None
        self._recent.append(weakref.ref(handles) if handles is not None else _no_block)

    def prefetch(self, handles: list) -> None:
        if handles and self.in_stream is not None:
            self._fetch(handles)


class _OffloadedBlock:
    """Mixin placed in front of a block's class by :func:`apply_offload`: its forward runs inside
    the offload hooks; when the backward reaches its output, this block's tensors and the previous
    block's (whose backward comes next) start coming back. The handles travel on the tensors
    between blocks, so several micro-batches in flight (pipeline schedules) keep theirs apart.
    ``offload_saves=False`` (the last block before the loss, whose backward follows its forward at
    once): its tensors stay, and its backward still fetches the block before it."""

    offload: ActivationOffload
    offload_saves: bool = True

    def forward(self, x, *args, **kwargs):
        if not torch.is_grad_enabled() or not self.offload.offloads(x):
            return super().forward(x, *args, **kwargs)
        handles = BlockHandles()
        if not self.offload_saves:  # its tensors stay; the block two before can go
            self.offload.advance(None)
        with self.offload.block(handles) if self.offload_saves else nullcontext():
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


def offloaded_blocks(num_blocks: int, ends_in_head: bool, num_layers: int = -1) -> int:
    """How many of a part's first blocks offload (``parallel.offload_layers``: ``num_layers``, -1
    for all): never the last one of a part that ends in the LM head (its backward comes right after
    its forward: a round trip over PCIe would buy nothing)."""
    most = num_blocks - 1 if ends_in_head else num_blocks
    return max(0, most if num_layers < 0 else min(num_layers, most))


def apply_offload(model: nn.Module, offload: Optional[ActivationOffload] = None, num_layers: int = -1) -> ActivationOffload:
    """Offload the activations of the first ``num_layers`` blocks in ``model.layers`` (a whole model
    or a pipeline stage's part; -1: all of them), as :func:`offloaded_blocks` counts them; the others
    keep theirs and still fetch the previous block's ahead of its backward. Returns the offloader
    (one pair of side streams per process)."""
    offload = offload or ActivationOffload()
    blocks = list(model.layers.values())
    n = offloaded_blocks(len(blocks), getattr(model, "lm_head", None) is not None, num_layers)
    for i, block in enumerate(blocks):
        base = block.__class__
        if base not in _CLASSES:
            _CLASSES[base] = type(f"Offloaded{base.__name__}", (_OffloadedBlock, base), {})
        block.__class__ = _CLASSES[base]
        block.offload = offload
        block.offload_saves = i < n
    return offload
