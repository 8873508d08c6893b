"""Metrics: one logger writes the same numbers to the console, a JSONL file, wandb and TensorBoard.

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
        self.tensorboard = None
        if cfg.tensorboard:  # on every rank: a missing package stops all of them, at the start
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                 f"(or logging.tensorboard=false) [{e}]") from None
        if not enabled:
            return
        if cfg.tensorboard and run_dir is not None:  # view: tensorboard --logdir <run dir>/tensorboard
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
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
        if self.tensorboard is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(k, v, global_step=step, walltime=record["time"])

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
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


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


class StepReadout:
    """The step's numbers, computed on the device and read back to the host in one transfer: the
    scalars (loss, aux loss, grad norm: the same on every rank) and, per layer, the max logit,
    the heads above QK-Clip's tau, the expert load (max / mean) and the experts that got no token.

    Each pipeline stage measures only its own layers; with a pp ``group`` the stages' vectors are
    all-gathered (one collective of fixed size per step, at :meth:`gather`, with the step's other
    collectives; the stages' layer ids are exchanged once, here) so that every rank, the logging
    one included, reports every layer. :meth:`decode` turns the rows into metrics on the host,
    whenever the trainer reads them.
    """

    def __init__(self, attn_layers: list[int], moe_layers: list[int], group=None):
        self.group = group
        stage = (list(attn_layers), list(moe_layers))
        if group is not None:
            stages: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(stages, stage, group=group)
        else:
            stages = [stage]
        self.stages = [(list(a), list(m)) for a, m in stages]
        self.width = max(2 * len(a) + 2 * len(m) for a, m in self.stages)

    def gather(self, scalars: torch.Tensor, clip_2L: Optional[torch.Tensor],
               load_2L: Optional[torch.Tensor]) -> torch.Tensor:
        """``[stages, len(scalars) + width]`` on the device, the same on every rank of the group:
        each stage's ``scalars`` [n], then ``clip_2L`` (:func:`k2train.optim.qk_clip.qk_clip_summary`)
        and ``load_2L`` (max/mean load, dead experts) for its layers (None where it has none). No
        host sync."""
        mine = [t.reshape(-1).float() for t in (clip_2L, load_2L) if t is not None]
        vec = torch.cat([scalars.float().reshape(-1), *mine])
        vec = torch.cat([vec, vec.new_zeros(len(scalars) + self.width - len(vec))])
        if self.group is None:
            return vec[None]
        parts = [torch.empty_like(vec) for _ in self.stages]
        dist.all_gather(parts, vec, group=self.group)
        return torch.stack(parts)

    def decode(self, rows: list[list[float]], num_scalars: int) -> tuple[list[list[float]], dict[str, Any]]:
        """:meth:`gather`'s rows, on the host: every stage's scalars (one list per stage) and the
        per-layer metrics with their summaries (LAYER_SUMMARIES)."""
        out: dict[str, Any] = {}
        for (attn, moe), row in zip(self.stages, rows):
            values = iter(row[num_scalars:])
            for name, layers in (("max_logit", attn), ("clipped_heads", attn),
                                 ("expert_load_max_over_mean", moe), ("dead_experts", moe)):
                for i in layers:
                    v = next(values)
                    out[f"{name}/layer_{i}"] = int(v) if name in ("clipped_heads", "dead_experts") else v
        for name, combine in LAYER_SUMMARIES.items():
            values = [v for k, v in out.items() if k.startswith(f"{name}/layer_")]
            if values:
                out[name] = combine(values)
        return [row[:num_scalars] for row in rows], out
