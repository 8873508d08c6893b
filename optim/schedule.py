"""Learning-rate schedules as a multiplier of the peak lr (``torch.optim.lr_scheduler.LambdaLR``).

WSD (K2): linear warmup over ``warmup_steps``, constant at the peak, then a cosine decay to
``min_lr`` over the last ``decay_steps`` (or ``decay_fraction * total_steps``) steps. ``cosine``
decays over everything after warmup; ``constant`` is warmup then flat. Every param group (Muon and
AdamW) follows the same multiplier, as in K2.
"""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from k2train.config import OptimConfig


def lr_multiplier(
    step: int, schedule: str, peak_lr: float, min_lr: float, warmup_steps: int, decay_start: int, total_steps: int
) -> float:
    """lr(step) / peak_lr, where ``step`` counts finished optimizer steps (0 before the first).

    Warmup: ``(step + 1) / warmup_steps`` so the first step already trains. Decay: from the peak at
    ``decay_start`` to ``min_lr`` at ``total_steps``, half a cosine; it stays at ``min_lr`` after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or step < decay_start:
        return 1.0
    span = max(1, total_steps - decay_start)
    progress = min(1.0, (step - decay_start) / span)
    floor = min_lr / peak_lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_start_step(cfg: OptimConfig, total_steps: int) -> int:
    """First step of the decay phase: right after warmup for cosine, ``total - decay`` for WSD."""
    if cfg.schedule == "cosine":
        return cfg.warmup_steps
    decay = cfg.decay_steps if cfg.decay_steps is not None else round(cfg.decay_fraction * total_steps)
    return max(cfg.warmup_steps, total_steps - decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR on every param group; call ``scheduler.step()`` once after each ``optimizer.step()``.

    Peak lr is each group's lr when the scheduler is built (``cfg.lr`` from build_optimizer).
    ``warmup_steps >= total_steps`` is allowed (a short run that never leaves warmup).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    if cfg.schedule not in ("wsd", "cosine", "constant"):
        raise ValueError(f"optim.schedule={cfg.schedule!r} must be one of wsd, cosine, constant")
    if cfg.decay_steps is not None and not 0 <= cfg.decay_steps <= total_steps:
        raise ValueError(f"optim.decay_steps={cfg.decay_steps} must be in [0, total_steps={total_steps}]")
    decay_start = decay_start_step(cfg, total_steps)

    def fn(step: int) -> float:
        return lr_multiplier(step, cfg.schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps, decay_start, total_steps)

    return LambdaLR(optimizer, fn)


# Keys of a param group that are not settings: its tensors, their names, and the lr, which the
# schedule sets every step (its settings are the schedule's base lrs and multiplier).
_NOT_SETTINGS = ("params", "names", "lr", "initial_lr")
_VALUES = (bool, int, float, str, tuple)  # not the process groups a ZeRO-1 group carries


def training_settings(optimizer: torch.optim.Optimizer, scheduler: LambdaLR) -> dict:
    """What the config made of the optimizer and its schedule, as opposed to their progress: each
    param group's hyperparameters and the schedule's base lrs. Take it before a resume, hand it to
    :func:`restore_training_settings` after."""
    groups = [{k: v for k, v in g.items() if k not in _NOT_SETTINGS and (v is None or isinstance(v, _VALUES))}
              for g in optimizer.param_groups]
    return {"groups": groups, "base_lrs": list(scheduler.base_lrs)}


def restore_training_settings(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, settings: dict) -> list[str]:
    """After a resume, put back the config's settings where the checkpoint's differ (a checkpoint
    restores the hyperparameters of the run that saved it), and the lr the config's schedule gives
    at the resumed step. Returns one line per change, "group.key: checkpoint -> config"."""
    changes = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, settings["groups"])):
        name = group.get("name", f"group{i}")
        for k, v in wanted.items():
            if group.get(k) != v:
                changes.append(f"{name}.{k}: {group.get(k)} -> {v}")
                group[k] = v
    lr_changes = {}
    for i, (group, base) in enumerate(zip(optimizer.param_groups, settings["base_lrs"])):
        lr = base * scheduler.lr_lambdas[i](scheduler.last_epoch)
        if scheduler.base_lrs[i] != base or group["lr"] != lr:
            what = (f"at step {scheduler.last_epoch}: {group['lr']:.6g} -> {lr:.6g} "
                    f"(peak {scheduler.base_lrs[i]:.6g} -> {base:.6g})")
            lr_changes.setdefault(what, []).append(group.get("name", f"group{i}"))
            scheduler.base_lrs[i] = group["initial_lr"] = base
            group["lr"] = lr
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    every = len(optimizer.param_groups)
    changes += [f"lr{' of ' + ', '.join(names) if len(names) < every else ''} {what}" for what, names in lr_changes.items()]
    return changes
