"""Fault handling for the step loop: non-finite guard, loss-spike detector, preemption signals,
collective timeouts. Small objects the loop calls directly (no callbacks)::

    guard = NonFiniteGuard(t.on_nonfinite)
    spikes = LossSpikeDetector(t.spike_factor, t.spike_window)
    preempt = PreemptionHandler()                       # SIGTERM / SIGUSR1 -> flag
    while step < t.steps:
        ...forward/backward, grad_norm = clip_grad_norm_(...)...
        skip = ~(isfinite(loss) & isfinite(grad_norm))  # on the device
        optimizer.step(skip=skip); ...                  # a no-op where skip is set
        ...later, the step's numbers on the host...
        if not guard.check(loss_val, gnorm_val, step):  # raises NonFiniteError under "stop"
            log("step skipped")
        if spikes.update(loss_val): log("loss spike")
        if preempt.should_stop(group, device):           # same answer (and reason) on every rank
            ckpt.save(step, state); exit 0

A NaN or Inf never reaches the weights or the optimizer state: the update is masked on the device
(k2train.optim.MuonClip.step's ``skip``), and the guard only counts, logs or stops, when the host
reads the step. Every rank must take the same decision: the loss and grad norm must be the globally
reduced ones (``clip_grad_norm_`` over DTensors already is), and
:meth:`PreemptionHandler.should_stop` all-reduces the flag (the trainer over a gloo group on the
CPU, after launching each step: k2train/trainer.py).
"""

import datetime
import logging
import math
import os
import signal
import time
from collections import deque
from typing import Iterable, Literal, Optional

import torch

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or grad norm under ``trainer.on_nonfinite=stop``."""


class NonFiniteGuard:
    """The host's verdict on a step read back: counts the skipped ones (the device has already
    made their update a no-op), or raises under ``stop``."""

    def __init__(self, policy: Literal["skip", "stop"] = "skip"):
        if policy not in ("skip", "stop"):
            raise ValueError(f"trainer.on_nonfinite={policy!r} must be 'skip' or 'stop'")
        self.policy = policy
        self.skipped = 0

    def check(self, loss: float, grad_norm: float, step: int) -> bool:
        """True if the step was finite (it updated the weights); False if it was skipped (counted)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: loss={loss}, grad norm={grad_norm} (trainer.on_nonfinite=stop; set it to skip "
                "to drop such steps instead)"
            )
        self.skipped += 1
        log.warning("step %d: non-finite loss=%s or grad norm=%s; step skipped (%d so far)", step, loss, grad_norm, self.skipped)
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])


class LossSpikeDetector:
    """Flags a loss above ``factor`` x the mean of the last ``window`` non-spike losses.

    Spikes are kept out of the running mean, so one spike does not hide the next; the first
    ``min_history`` steps only fill the window.
    """

    def __init__(self, factor: float = 3.0, window: int = 100, min_history: int = 10):
        if factor <= 1 or window < 1:
            raise ValueError(f"loss spike factor={factor} must be > 1 and window={window} >= 1")
        self.factor = factor
        self.history: deque = deque(maxlen=window)
        self.min_history = min(min_history, window)
        self.spikes = 0

    @property
    def mean(self) -> Optional[float]:
        return sum(self.history) / len(self.history) if self.history else None

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False  # the non-finite guard's business
        if len(self.history) >= self.min_history and loss > self.factor * self.mean:
            self.spikes += 1
            log.warning("loss spike: %.4f > %.1f x running mean %.4f", loss, self.factor, self.mean)
            return True
        self.history.append(loss)
        return False

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.spikes = int(state["spikes"])


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (Slurm's preemption and ``--signal`` warnings) into a flag.

    The handler only sets the flag; the loop polls :meth:`should_stop` after each step,
    checkpoints and exits 0. Install it in the main thread (Python's rule for signal handlers).
    The same vote carries a time limit (``trainer.exit_after_minutes``): ``time_limit_s`` after
    ``started`` (a ``time.monotonic()``; default: now), 0 for none.
    """

    _REASONS = (None, "time limit", "signal")  # by priority: the vote keeps the highest

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1), time_limit_s: float = 0.0,
                 started: Optional[float] = None):
        self.time_limit_s = time_limit_s
        self.started = time.monotonic() if started is None else started
        self.requested: Optional[int] = None
        self.reason: Optional[str] = None  # of the last stop decided: "signal" or "time limit"
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        log.warning("received %s: will checkpoint and exit at the next step boundary", signal.Signals(signum).name)

    def should_stop(self, process_group=None, device: Optional[torch.device] = None, vote: bool = True) -> bool:
        """Whether any rank was signalled or reached the time limit; every rank gets the same answer
        and the same :attr:`reason`, a signal first (one tiny all-reduce over ``process_group``, of
        a tensor on ``device``: the trainer asks a gloo group on the CPU). ``vote=False``: this
        process alone decides (a run that is not distributed)."""
        time_up = bool(self.time_limit_s) and time.monotonic() - self.started >= self.time_limit_s
        code = 2 if self.requested is not None else 1 if time_up else 0
        if vote and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(code)], device=device or "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=process_group)
            code = int(flag.item())  # a CPU tensor on a gloo group: waits for the other hosts, never a GPU
        self.reason = self._REASONS[code]
        return code > 0

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def collective_timeout(timeout_s: int) -> datetime.timedelta:
    """``ParallelConfig.timeout_s`` as the ``timeout`` of ``init_process_group`` / ``new_group``."""
    if timeout_s <= 0:
        raise ValueError(f"parallel.timeout_s={timeout_s} must be > 0 seconds")
    return datetime.timedelta(seconds=timeout_s)


def init_distributed(backend: str, timeout_s: int) -> None:
    """``init_process_group`` from the torchrun environment with the configured collective timeout.

    A hung collective (a dead rank, a deadlocked pipeline) then fails after ``timeout_s`` instead
    of hanging the job forever; NCCL needs async error handling for that, which we switch on.
    """
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    torch.distributed.init_process_group(backend=backend, timeout=collective_timeout(timeout_s))
