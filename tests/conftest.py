"""Test-suite setup shared by every test file."""

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory first on sys.path. From the repository root that
# makes our top-level kernels/ folder importable as `kernels`, the name of a PyPI package that
# transformers probes for (and then fails to import). k2train itself is installed (`pip install
# -e .`), so the repository root is not needed on the path.
_REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _REPO]
# Triton kernels run on CPU only in the interpreter, and it must be switched on before anything
# imports triton. On a GPU machine the real kernels run.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Never let a test reach the network or a real wandb account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """CPU reductions split their work by thread count: hold it at one so that runs compare bitwise."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
