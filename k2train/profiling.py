"""``trainer.profile``: torch.profiler over a window of training steps, and CUDA memory snapshots;
:class:`TensorMemoryTrace`: what a step's tensors occupy, on any device, fake tensors included.

    python -m k2train.train trainer.profile.enable=true trainer.profile.start_step=10 trainer.profile.steps=2

On each rank of ``trainer.profile.ranks`` (default: rank 0), into ``<run dir>/profile/``:

    rank0_steps10-11.json            Chrome / Perfetto trace (ui.perfetto.dev, chrome://tracing)
    rank0_steps10-11.txt             the ops by self time (device time on GPUs, else CPU time)
    rank0_steps10-11_memory.pickle   with memory_snapshot=true (CUDA): the caching allocator's history
                                     over those steps, for pytorch.org/memory_viz

The window starts before the first profiled step is launched and ends after the last one has run
on the device (one synchronization, there), so the trace holds whole steps; each phase of a step
is a ``k2train.*`` range in it (docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
import weakref
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils._python_dispatch import TorchDispatchMode

# source files whose frames name an allocation (the innermost of them), before any other frame
OUR_DIRS = ("/k2train/", "/kernels/", "/optim/")


def check_profile_config(cfg, world_size: int, device: torch.device) -> None:
    """What :meth:`ProfileConfig.validate` cannot know: the ranks and the device of the run."""
    if not cfg.enable:
        return
    bad = [r for r in cfg.ranks if not 0 <= r < world_size]
    if bad:
        processes = f"{world_size} process{'es' if world_size != 1 else ''}"
        raise ValueError(f"trainer.profile.ranks={list(cfg.ranks)}: ranks {bad} do not exist in a run of {processes} "
                         f"(ranks 0..{world_size - 1}; [] profiles every rank)")
    if cfg.memory_snapshot and device.type != "cuda":
        raise ValueError("trainer.profile.memory_snapshot=true records the CUDA caching allocator: it needs a GPU "
                         f"(this run is on {device.type}); set it to false")


class StepProfiler:
    """Starts and stops the profiler around steps ``[start_step, start_step + steps)`` of a run
    (``cfg``: a :class:`k2train.config.ProfileConfig`); does nothing on the other ranks, or when
    ``cfg.enable`` is false. The trainer calls :meth:`before_launch` with the step it is about to
    launch, :meth:`after_launch` with the one it launched, :meth:`close` when the run ends (which
    writes what a window cut short by the end of the run or a preemption holds) and
    :meth:`discard` when it fails."""

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, out_dir: Path):
        check_profile_config(cfg, world_size, device)
        self.cfg, self.device, self.out_dir = cfg, device, out_dir
        self.active = cfg.enable and (not cfg.ranks or rank in cfg.ranks)
        self.rank = rank
        self._prof: Optional[profile] = None
        self._first = 0
        self._window = ExitStack()

    @property
    def last_step(self) -> int:
        return self.cfg.start_step + self.cfg.steps - 1

    def before_launch(self, step: int) -> None:
        """``step`` (1-based) is about to be launched: the window opens before its first step
        (or at the first step of a run resumed inside the window)."""
        if not self.active or self._prof is not None or not self.cfg.start_step <= step <= self.last_step:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.cfg.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            # recomputes run to their end while the history records Python stacks: an early stop
            # raises out of torch's C++ ops, and the stacks gathered as it unwinds lose the exception
            self._window.enter_context(set_checkpoint_early_stop(False))
        self._prof = profile(activities=activities, record_shapes=True, with_stack=self.cfg.with_stack)
        self._prof.__enter__()
        self._first = step

    def after_launch(self, step: int) -> Optional[str]:
        """After launching ``step``: at the window's last step, wait for the device, stop and write
        the files; returns a line saying where (None otherwise)."""
        if self._prof is None or step < self.last_step:
            return None
        return self._finish(step)

    def close(self, step: int) -> Optional[str]:
        """The run ended at ``step`` (its last step, or a preemption) inside the window: write what
        the window holds; returns the line saying where (None if no window is open)."""
        return self._finish(step) if self._prof is not None else None

    def discard(self) -> None:
        """Stop an open window without writing anything (the run failed)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            prof.__exit__(None, None, None)
            if self.cfg.memory_snapshot:
                torch.cuda.memory._record_memory_history(enabled=None)
            self._window.close()

    def _finish(self, step: int) -> str:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels belong in the trace
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self._first}-{step}"
        prof.export_chrome_trace(f"{stem}.json")
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        Path(f"{stem}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=50) + "\n")
        written = [f"{stem}.json", f"{stem}.txt"]
        if self.cfg.memory_snapshot:
            torch.cuda.memory._dump_snapshot(f"{stem}_memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(f"{stem}_memory.pickle")
        self._window.close()
        return f"profiled steps {self._first}-{step} on rank {self.rank}: " + ", ".join(written)


class TensorMemoryTrace(TorchDispatchMode):
    """Every tensor storage the ops run under it create, counted from creation until it is freed:
    the live bytes, their peak in each ``record_function`` range (the trainer's ``k2train.*``
    phases: ``k2train.forward_backward``, ``k2train.optimizer``, ...) and what was alive at each
    peak, by the source line that allocated it (the innermost frame in k2train, kernels or optim;
    in a backward, the autograd node that ran it).

    It sees tensors, not an allocator: no rounding, no cache, no workspace a kernel allocates
    inside itself. It works on any device and under ``FakeTensorMode``, where a step of a GPU-sized
    model runs on the CPU as shapes only (``scripts/trace_memory.py``: seconds for the K2-width
    proxy at 32K tokens); on an H200 its forward/backward peak agreed with ``max_memory_allocated``
    within 1% (docs/planner.md). Storages made before the trace (weights, optimizer states) are
    counted with :meth:`track` (one seen only through a view or an in-place op during the trace
    is not counted: it was not allocated there). A storage resized in place
    (``untyped_storage().resize_``) keeps the size it was created with."""

    def __init__(self, stacks: bool = True):
        super().__init__()
        self.stacks = stacks
        self.live = 0
        self._sizes: dict[int, int] = {}  # storage id -> bytes, while alive
        self._finalizers: dict[int, weakref.finalize] = {}  # storage id -> its callback, while alive
        self._events: list[tuple[int, int, int]] = []  # (storage id, +bytes or -bytes, label index)
        self._labels: dict[str, int] = {}
        self._ranges: list[tuple[object, str]] = []  # open record_function ranges: (handle, name)
        self.peaks: dict[str, tuple[int, int]] = {}  # phase -> (peak bytes, events recorded at it)
        self.at_exit: dict[str, int] = {}  # phase -> live bytes when its range last closed

    @property
    def phase(self) -> str:
        """The innermost open ``k2train.*`` range (any other range, e.g. an optimizer's own, is
        part of the phase that opened it)."""
        return next((n for _, n in reversed(self._ranges) if n.startswith("k2train.")), "(outside k2train.* ranges)")

    @property
    def peak(self) -> int:
        return max((b for b, _ in self.peaks.values()), default=0)

    def track(self, tensors: Iterable[Optional[torch.Tensor]], label: str = "before the trace") -> None:
        """Count storages that exist already (each once, views and repeats ignored)."""
        for t in tensors:
            if t is not None:
                self._add(t, label)

    def composition(self, phase: Optional[str] = None, top: int = 16) -> list[tuple[int, str]]:
        """(bytes, label) of what was alive at the peak of ``phase`` (default: the highest of all),
        largest first."""
        if not self.peaks:
            return []
        phase = phase or max(self.peaks, key=lambda k: self.peaks[k][0])
        upto = self.peaks[phase][1]
        alive: dict[int, tuple[int, int]] = {}
        for key, n, label in self._events[:upto]:
            if n > 0:
                alive[key] = (n, label)
            else:
                alive.pop(key, None)
        names = {i: name for name, i in self._labels.items()}
        groups: dict[str, int] = {}
        for n, label in alive.values():
            groups[names[label]] = groups.get(names[label], 0) + n
        return sorted(((n, k) for k, n in groups.items()), reverse=True)[:top]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.profiler._record_function_enter_new.default:
            self._ranges.append((out, args[0]))
        elif func is torch.ops.profiler._record_function_exit._RecordFunction and self._ranges:
            self.at_exit[self._ranges.pop()[1]] = self.live  # ranges close in the order they nest
        else:
            # an output on an input's storage (a view, an in-place op) allocated nothing
            inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            where = None
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                    if where is None:
                        where = self._where(func) if self.stacks else str(func)
                    self._add(t, f"{where}, {str(t.dtype).removeprefix('torch.')})" if self.stacks else where)
        return out

    def _add(self, t: torch.Tensor, label: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self._events.append((key, n, self._labels.setdefault(label, len(self._labels))))
        self.live += n
        self._finalizers[key] = weakref.finalize(storage, self._free, key)
        phase = self.phase
        if self.live > self.peaks.get(phase, (-1, 0))[0]:
            self.peaks[phase] = (self.live, len(self._events))

    def __exit__(self, *exc):
        # what outlives the trace (weights, gradients) no longer calls back into it
        for f in self._finalizers.values():
            f.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)

    def _free(self, key: int) -> None:
        self._finalizers.pop(key, None)
        n = self._sizes.pop(key)
        self._events.append((key, -n, -1))
        self.live -= n

    @staticmethod
    def _where(func) -> str:
        frame, first = sys._getframe(2), None
        while frame is not None:
            name = frame.f_code.co_filename
            # (another dispatch mode's frame, e.g. selective recompute's, is not where it was asked for)
            if "/torch/" not in name and frame.f_code.co_name != "__torch_dispatch__":
                if any(d in name for d in OUR_DIRS):
                    break
                first = first or frame  # the innermost frame outside torch, if none is ours
            frame = frame.f_back
        frame = frame or first
        line = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}" if frame else "?"
        node = torch._C._current_autograd_node()
        where = f"{line} ({func.__name__}"  # the caller closes it with the tensor's dtype
        return f"backward of {node.name()}: {where}" if node is not None else where
