"""The k2train entry point.

    python -m k2train.train                                   # k2_tiny on the embedded corpus
    python -m k2train.train model=k2_small optim.lr=3e-4 trainer.steps=100
    python -m k2train.train --cfg job                         # print the resolved config

Hydra composes conf/ into a typed, validated :class:`~k2train.config.JobConfig`; from there on
nothing sees Hydra: :class:`~k2train.trainer.Trainer` builds the run and trains it.
"""

import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig

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
    register_configs()
    # One run folder name for every rank (K2TRAIN_RUN_ID), and Hydra's .hydra/ + log file on rank 0 only.
    sys.argv = prepare_hydra_argv(sys.argv)

    @hydra.main(config_path="pkg://k2train.conf", config_name="config", version_base=None)
    def _main(dcfg) -> None:
        try:
            cfg = to_job_config(dcfg).validate()
        except ValueError as e:
            raise SystemExit(f"config error: {e}") from None
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        # Each job of a multirun sweep keeps its own checkpoints (else job 1 would resume job 0).
        sweep = hc.mode is not None and hc.mode.name == "MULTIRUN"
        run(cfg, run_dir=run_dir, checkpoint_dir=run_dir / "checkpoints" if sweep else None)

    _main()


if __name__ == "__main__":
    main()
