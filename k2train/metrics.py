"""Metrics: one logger writes the same numbers to the console, a JSONL file and wandb.

Only the logging rank (the first rank of the last pipeline stage) creates a logger that writes;
the others get a silent one, so the step loop never branches on the rank.
"""

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import LoggingConfig


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Optional[Path],
        enabled: bool,
        config_dict: Optional[dict] = None,
        wandb_run_id: Optional[str] = None,
    ):
        self.cfg = cfg
        self.enabled = enabled
        self.jsonl = None
        self.wandb_run = None
        if not enabled:
            return
        if cfg.jsonl and run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if cfg.wandb and mode != "disabled":
            try:  # imported only when asked for: it takes seconds, and a run never fails for it
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self.wandb_run = wandb.init(
                    project=cfg.wandb_project,
                    entity=cfg.wandb_entity,
                    name=cfg.run_name,
                    mode=mode,
                    dir=str(run_dir) if run_dir is not None else None,
                    config=config_dict,
                    id=wandb_run_id,
                    resume="allow" if wandb_run_id else None,
                )

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def console(self, msg: str) -> None:
        if self.enabled and self.cfg.console:
            print(msg, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def format_step(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
    parts.append(f"tok/s {m['tokens_per_s']:,.0f}")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "max_logit" in m:
        parts.append(f"max_logit {m['max_logit']:.1f}")
    if "expert_load_max_over_mean" in m:
        parts.append(f"load max/mean {m['expert_load_max_over_mean']:.2f}")
    if m.get("clipped_heads_total"):
        parts.append(f"clipped {m['clipped_heads_total']}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


# Per-layer metric names (``<name>/layer_<i>``) and how their whole-model summary is formed.
LAYER_SUMMARIES = {
    "max_logit": max,
    "clipped_heads": sum,
    "expert_load_max_over_mean": max,
}


def layer_metrics(stage_metrics: dict[str, Any], group=None) -> dict[str, Any]:
    """Per-layer metrics of every pipeline stage, and their summaries, on every rank of ``group``.

    Each pp rank measures only its own layers (max logit, clipped heads, expert load, dead experts);
    the logging rank holds the last stage. With a pp ``group`` (None: one stage) the per-layer
    entries are gathered in one ``all_gather_object`` and the summaries (``max_logit``,
    ``clipped_heads``, ``expert_load_max_over_mean``) recomputed over all layers.
    """
    per_layer = {k: v for k, v in stage_metrics.items() if "/layer_" in k}
    if group is not None:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, per_layer, group=group)
        per_layer = {k: v for part in gathered for k, v in part.items()}
    out = {**stage_metrics, **per_layer}
    for name, combine in LAYER_SUMMARIES.items():
        values = [v for k, v in per_layer.items() if k.startswith(f"{name}/layer_")]
        if values:
            out[name] = combine(values)
    return out
