"""MuonClip: Muon + AdamW with QK-Clip for MLA (Kimi K2; docs/muonclip.md), LR schedules, ZeRO-1 sharding.

Trainer usage (any layout: tp-sharded DTensor params, ep-local experts, ZeRO-1 when cfg.optim.zero1)::

    opt = build_optimizer(model_parts, cfg.optim, dims=dims)   # dims: ParallelDims, mesh built
    print(describe_param_groups(opt))
    sched = build_lr_scheduler(opt, cfg.optim, total_steps)
    attn = attention_modules(model_parts)    # once, at build time
    ...  # forward/backward over the micro-batches (MLA records max_logit), reduce_gradients_, clip
    opt.step(); sched.step(); opt.zero_grad()
    tau = cfg.optim.qk_clip_tau if cfg.optim.qk_clip else None
    metrics = apply_qk_clip(attn, tau, group=dims.dense_dp_mesh.get_group() if dims.dp_size > 1 else None,
                            optimizer=opt, tp_group=dims.tp_mesh.get_group() if dims.tp > 1 else None)
"""

from .grouping import build_optimizer, build_param_groups, describe_param_groups, is_muon_param
from .muon import MuonClip
from .newton_schulz import zeropower_via_newtonschulz
from .qk_clip import apply_qk_clip, attention_modules, qk_clip_
from .schedule import build_lr_scheduler

__all__ = [
    "MuonClip",
    "apply_qk_clip",
    "attention_modules",
    "qk_clip_",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "describe_param_groups",
    "is_muon_param",
    "zeropower_via_newtonschulz",
]
