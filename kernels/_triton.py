"""Triton, if installed, whether a kernel runs in its CPU interpreter (TRITON_INTERPRET=1), and
the deterministic switch every kernel module reads.

Every kernel module imports triton from here, so a machine without it falls back to the torch
reference paths instead of failing at import.

Deterministic mode (:func:`set_deterministic`, the trainer's ``trainer.deterministic``): autotuned
kernels launch with one fixed configuration (autotuning keeps whichever config timed fastest,
which can change from run to run and with it the order of floating-point sums), and no kernel
accumulates with atomics whose order varies.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without the test extra
    triton = None
    tl = None


_DETERMINISTIC = [False]


def interpreted(kernel) -> bool:
    """True when ``kernel`` was built by the interpreter (CPU tensors work then, slowly)."""
    return type(kernel).__name__ == "InterpretedFunction"


def runs_on(t, kernel) -> bool:
    """Whether ``kernel`` runs on ``t``'s device: CUDA, or the CPU when the kernel was built by the
    interpreter. Callers test ``triton is not None`` first (without triton the kernel is undefined)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(kernel))


def set_deterministic(flag: bool) -> None:
    """Switch deterministic mode on or off for every kernel (see the module docstring)."""
    _DETERMINISTIC[0] = bool(flag)


def is_deterministic() -> bool:
    return _DETERMINISTIC[0]


def launch_tuned(tuned, kernel, config, grid, *args, **kwargs):
    """``tuned[grid](*args, **kwargs)`` (a ``triton.autotune`` wrapper of ``kernel``), or, in
    deterministic mode, ``kernel`` with the fixed ``config``. Returns the config that ran."""
    if not _DETERMINISTIC[0]:
        tuned[grid](*args, **kwargs)
        return tuned.best_config
    kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return config
