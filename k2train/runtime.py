"""Process and run-directory facts for a job launched by torchrun, Slurm, or by hand: the run's
folder name, the logging rank, the device, deterministic mode, garbage collection.

Hydra picks the run directory before any process group exists, so every rank must already agree on
its name when ``main()`` starts. The name comes from the environment, in this order:

1. ``K2TRAIN_RUN_ID`` (the launch scripts in ``launch/`` set it once for all ranks);
2. ``SLURM_JOB_ID`` (``<array job>_<task>`` for array jobs): a requeued job keeps its id, so it
   keeps its folder and appends to its logs;
3. under torchrun: a timestamp that rank 0 writes to the launcher's TCP store and the others read;
4. a timestamp (one process).

:func:`prepare_hydra_argv` then keeps the other ranks from writing Hydra's ``.hydra/`` folder and
log file. Only rank 0 writes the config and git revision; metrics come from :func:`logging_rank`.
"""

import datetime
import gc
import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from torch.distributed import TCPStore

from .kernels import is_deterministic as kernels_deterministic, set_deterministic as set_kernels_deterministic

RUN_ID_ENV = "K2TRAIN_RUN_ID"
_STORE_KEY = "k2train/run_id"


def rank_from_env(env: Optional[Mapping[str, str]] = None) -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as torchrun sets them; ``(0, 0, 1)`` in a plain process."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def is_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    return rank_from_env(env)[0] == 0


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def slurm_job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    env = os.environ if env is None else env
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def _agreed_timestamp(env: Mapping[str, str], timeout_s: float = 300.0) -> Optional[str]:
    """Rank 0's timestamp, shared through the TCP store that torchrun's agent hosts.

    Only when torchrun says its agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE=True``): the
    workers then connect as clients, and nothing binds MASTER_PORT before ``init_process_group``.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env:
        return None
    rank, _, world = rank_from_env(env)
    store = TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    # One key per torchrun invocation; a restarted worker group (--max-restarts) keeps the name.
    key = f"{_STORE_KEY}/{env.get('TORCHELASTIC_RUN_ID', 'none')}"
    if rank == 0:
        store.compare_set(key, "", timestamp())
    return store.get(key).decode()


def resolve_run_id(env: Optional[Mapping[str, str]] = None) -> str:
    """The run's folder name under ``<trainer.output_dir>/logs``, identical on every rank."""
    env = os.environ if env is None else env
    if env.get(RUN_ID_ENV):
        return env[RUN_ID_ENV]
    job = slurm_job_id(env)
    if job:
        return job
    if rank_from_env(env)[2] > 1:
        agreed = _agreed_timestamp(env)
        if agreed:
            return agreed
        raise ValueError(
            f"{rank_from_env(env)[2]} processes but no shared run id: set {RUN_ID_ENV} for all ranks "
            "(launch/*.sh do), run under Slurm, or launch with torchrun"
        )
    return timestamp()


def hydra_overrides_for_rank(argv: list[str], rank: int) -> list[str]:
    """Hydra overrides that stop ranks > 0 from writing ``.hydra/`` and ``<job>.log``.

    Rank 0 keeps Hydra's defaults. Warnings from other ranks still reach stderr (Python's
    last-resort handler); only the log file and the config copies are rank 0's alone.
    """
    if rank == 0:
        return []
    extra = []
    if not any(a.startswith("hydra.output_subdir=") for a in argv):
        extra.append("hydra.output_subdir=null")
    if not any(a.startswith(("hydra/job_logging=", "override hydra/job_logging=")) for a in argv):
        extra.append("hydra/job_logging=disabled")
    return extra


def prepare_hydra_argv(argv: list[str], env: Optional[dict] = None) -> list[str]:
    """Call first thing in ``main()``: fixes ``K2TRAIN_RUN_ID`` in the environment (the Hydra
    config reads it for ``hydra.run.dir`` and ``hydra.sweep.dir``) and returns ``argv`` with the
    per-rank overrides added; ``sys.argv = prepare_hydra_argv(sys.argv)``.
    """
    env = os.environ if env is None else env
    env[RUN_ID_ENV] = resolve_run_id(env)
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i") or a.startswith("--info=") for a in argv[1:]):
        return list(argv)
    return list(argv) + hydra_overrides_for_rank(argv, rank_from_env(env)[0])


def logging_rank(world_size: int, pp: int) -> int:
    """The rank that logs metrics: the first rank of the last pipeline stage.

    The mesh is ``("pp", "dp", "ep", "tp")``, outermost first, so the last stage holds the last
    ``world_size / pp`` ranks; that stage computes the loss, hence it logs.
    """
    if pp < 1 or world_size % pp:
        raise ValueError(f"world size {world_size} is not divisible by parallel.pp={pp}")
    return world_size - world_size // pp


def default_wandb_run_id(run_dir: Path) -> str:
    """A wandb run id that every rank derives alike from the run directory.

    A requeued Slurm job keeps its run directory, so it continues the same wandb run even before
    its first checkpoint; a new job resuming from a checkpoint takes the id stored there instead.
    """
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()
    return f"k2-{digest[:12]}"


class GarbageCollector:
    """``trainer.gc_interval``: Python's garbage collector off while the loop runs (:meth:`start`
    to :meth:`stop`), and collecting at step boundaries instead: generation 1 every ``interval``
    steps, everything every 20th time (what survived the young collections). A collection at a
    random point of a step pauses that rank alone, and every rank's next collective waits for it;
    :meth:`after_launch` runs right after a step is queued, while the device works. ``interval=0``:
    Python's own schedule (every method does nothing)."""

    def __init__(self, interval: int):
        self.interval = interval
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect(1)

    def after_launch(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect(2 if step % (20 * self.interval) == 0 else 1)

    def stop(self) -> None:
        if self.interval and self._was_enabled:
            gc.enable()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


@contextmanager
def deterministic_mode(device: torch.device) -> Iterator[None]:
    """``trainer.deterministic``: torch's deterministic algorithms (and cuDNN's), cuBLAS' fixed
    workspace, fixed configurations for our Triton kernels and no atomic accumulation in them.
    Restores the previous settings on exit (they are process-wide)."""
    if device.type == "cuda":
        workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if workspace not in (None, ":4096:8", ":16:8"):
            raise ValueError(f"trainer.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8), found "
                             f"{workspace!r}: unset it or set it to :4096:8")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace or ":4096:8"  # read when cuBLAS starts a handle
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, kernels_deterministic())
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    set_kernels_deterministic(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        set_kernels_deterministic(before[3])
