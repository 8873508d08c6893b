"""Triton, if installed, and whether a kernel runs in its CPU interpreter (TRITON_INTERPRET=1).

Every kernel module imports triton from here, so a machine without it falls back to the torch
reference paths instead of failing at import.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without the test extra
    triton = None
    tl = None


def interpreted(kernel) -> bool:
    """True when ``kernel`` was built by the interpreter (CPU tensors work then, slowly)."""
    return type(kernel).__name__ == "InterpretedFunction"
