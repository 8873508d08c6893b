"""``trainer.profile``: torch.profiler over a window of training steps, and CUDA memory snapshots.

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

from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile


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
        return f"profiled steps {self._first}-{step} on rank {self.rank}: " + ", ".join(written)
