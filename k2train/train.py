"""The k2train entry point.

    python -m k2train.train                                   # k2_tiny on the embedded corpus
    python -m k2train.train model=k2_small optim.lr=3e-4 trainer.steps=100
    python -m k2train.train --cfg job                         # print the resolved config

Hydra composes conf/ into a typed, validated :class:`~k2train.config.JobConfig`; from there on
nothing sees Hydra: :class:`~k2train.trainer.Trainer` builds the run and trains it.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .cli import user_errors
from .config import JobConfig, register_configs, to_job_config
from .runtime import prepare_hydra_argv
from .trainer import DataFactory, Trainer


def run(
    cfg: JobConfig,
    run_dir: Optional[Path] = None,
    checkpoint_dir: Optional[Path] = None,
    data: Optional[DataFactory] = None,
) -> list[dict]:
    """Train according to ``cfg`` (see :class:`~k2train.trainer.Trainer` for the arguments);
    returns the metrics of every step trained. Everything is torn down at the end, also on error."""
    with Trainer(cfg, run_dir=run_dir, checkpoint_dir=checkpoint_dir, data=data) as trainer:
        return trainer.run()


def main() -> None:
    """``python -m k2train.train`` / ``k2train-train``: a config or user error (a bad value, path,
    checkpoint or dataset) ends with one line and exit code 2 (k2train.cli)."""
    register_configs()
    # One run folder name for every rank (K2TRAIN_RUN_ID), and Hydra's .hydra/ + log file on rank 0 only.
    sys.argv = prepare_hydra_argv(sys.argv)
    # Hydra's errors (an unknown key, a value of the wrong type, a missing preset) come to us as
    # exceptions, instead of its own report and exit code 1.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")

    @hydra.main(config_path="pkg://k2train.conf", config_name="config", version_base=None)
    def _main(dcfg) -> None:
        with user_errors(errors=(ValueError,), prefix="config error"):
            cfg = to_job_config(dcfg).validate()
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        # Each job of a multirun sweep keeps its own checkpoints (else job 1 would resume job 0).
        sweep = hc.mode is not None and hc.mode.name == "MULTIRUN"
        with user_errors():
            run(cfg, run_dir=run_dir, checkpoint_dir=run_dir / "checkpoints" if sweep else None)

    with user_errors(errors=(HydraException, OmegaConfBaseException), prefix="config error"):
        _main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched by torchrun and done: checkpoints drained, logs and the process group closed.
        # The interpreter's own teardown then rarely aborts a rank in gloo's C++ threads
        # ("terminate called without an active exception", SIGABRT after the last checkpoint),
        # which torchrun and Slurm report as a failed job: leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
