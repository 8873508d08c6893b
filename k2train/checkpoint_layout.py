"""The on-disk layout of a k2train checkpoint, shared by the trainer's checkpointing
(:mod:`k2train.checkpoint`) and the converters (:mod:`k2train.convert`)::

    <root>/step-00000100/
        .metadata, __0_0.distcp ...   DCP: "model.<fqn>" and "optimizer.state.<fqn>.<key>"
        extra/rank00000.pt            one rank's small state (scheduler, data loader, RNG, ...)
        meta.json                     step, tokens seen, resolved config, git revision, wandb run id
        COMPLETE                      written last: the checkpoint is whole
    <root>/latest                     "step-00000100"

Names, atomic small-file writes, and the checks that tell a whole checkpoint from a cut-off one.
"""

import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

from torch.distributed.checkpoint import FileSystemReader

log = logging.getLogger(__name__)

MODEL_KEY = "model"
OPTIM_KEY = "optimizer"
META_FILE = "meta.json"
DONE_FILE = "COMPLETE"
LATEST_FILE = "latest"
EXTRA_DIR = "extra"
STEP_RE = re.compile(r"^step-(\d+)$")




def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename), so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def mark_complete(folder: Path) -> None:
    (Path(folder) / DONE_FILE).write_text("ok\n")


def git_revision() -> str:
    """``<sha>`` (``+dirty`` with uncommitted changes) of the source tree, or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def validate_checkpoint(folder: Path) -> Optional[str]:
    """None if ``folder`` is a whole checkpoint, else why not (missing marker, metadata, bytes)."""
    folder = Path(folder)
    if not (folder / DONE_FILE).exists():
        return f"no {DONE_FILE} marker (the save did not finish)"
    if not (folder / ".metadata").exists():
        return "no DCP .metadata file"
    try:
        md = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a truncated pickle raises anything from EOFError to UnpicklingError
        return f"unreadable .metadata ({type(e).__name__}: {e})"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, nbytes in need.items():
        path = folder / rel
        if not path.exists():
            return f"shard {rel} is missing"
        if path.stat().st_size < nbytes:
            return f"shard {rel} is truncated ({path.stat().st_size} of {nbytes} bytes)"
    meta = folder / META_FILE
    if meta.exists():
        try:
            world = json.loads(meta.read_text()).get("world_size", 0)
        except ValueError:
            return f"corrupt {META_FILE}"
        for r in range(world):
            if not (folder / EXTRA_DIR / extra_name(r)).exists():
                return f"per-rank state {EXTRA_DIR}/{extra_name(r)} is missing"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder under ``root``, oldest first (valid or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(out)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest valid checkpoint under a checkpoint root."""
    path = Path(path)
    if (path / ".metadata").exists() or (path / DONE_FILE).exists():
        reason = validate_checkpoint(path)
        if reason:
            raise ValueError(f"checkpoint {path} is not usable: {reason}")
        return path
    found = latest_valid(path)
    if found is None:
        raise ValueError(f"no valid checkpoint in {path} (expected a step-N folder or a root holding them)")
    return found[1]


def latest_valid(root: Path) -> Optional[tuple[int, Path]]:
    """The newest valid checkpoint under ``root``; invalid ones are reported and skipped."""
    for step, folder in reversed(list_checkpoints(root)):
        reason = validate_checkpoint(folder)
        if reason is None:
            return step, folder
        log.warning("skipping checkpoint %s: %s", folder, reason)
    return None


def extra_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"
