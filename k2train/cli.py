"""How every command-line entry point ends on a user's mistake: one clear line, exit code 2.

A bad value, path, checkpoint or dataset raises ValueError or OSError (a non-finite loss under
``trainer.on_nonfinite=stop`` a FloatingPointError) with a message that says what to change. The
entry points (``k2train-train``, ``-plan``, ``-convert``, ``-prepare``) print that message on
stderr and exit with code 2; the Python traceback only when asked for (``--traceback`` where a
command has it, or ``K2TRAIN_TRACEBACK=1``). Anything else (a bug) keeps its traceback.
"""

import os
import sys
from contextlib import contextmanager
from typing import Iterator

TRACEBACK_ENV = "K2TRAIN_TRACEBACK"
USER_ERRORS = (ValueError, OSError, FloatingPointError)
EXIT_USER_ERROR = 2


def traceback_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def report_error(message: str, prefix: str = "error") -> None:
    """``error: <message>`` on stderr; under torchrun with several processes, the rank first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
    print(f"{rank}{prefix}: {message}", file=sys.stderr, flush=True)


@contextmanager
def user_errors(show_traceback: bool = False, errors: tuple = USER_ERRORS, prefix: str = "error") -> Iterator[None]:
    """Turn ``errors`` raised inside into one line on stderr and ``SystemExit(2)`` (see the module
    docstring); ``show_traceback`` or ``K2TRAIN_TRACEBACK=1`` lets them through."""
    try:
        yield
    except errors as e:
        if traceback_requested(show_traceback):
            raise
        report_error(str(e).strip() or type(e).__name__, prefix)
        raise SystemExit(EXIT_USER_ERROR) from None
