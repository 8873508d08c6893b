"""QK-Clip for Multi-head Latent Attention (Kimi K2 report; docs/muonclip.md).

Legend: H heads held locally, dn/dr/dv nope/rope/value head dims, r_q / r_kv the q and kv lora ranks.
After the optimizer step, every head h whose max scaled logit S_h of the step exceeded tau gets
gamma_h = tau / S_h, and its weights are rescaled so that each of its logits scales by exactly gamma_h:

    q_b_proj   rows of head h: nope rows * sqrt(gamma_h), rope rows * gamma_h
    kv_b_proj  rows of head h: k_nope rows * sqrt(gamma_h), V rows untouched
    kv_a_proj_with_mqa (the shared rope key, used by every head): untouched

(q_nope . k_nope scales by sqrt(gamma) * sqrt(gamma); q_rope . k_rope by gamma * 1; RoPE is linear.)
"""

import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from k2train.model.attention import MLA

from .sharded import local

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def head_clip_scale(max_logit_H: Tensor, tau: float) -> Tensor:
    """gamma_h = tau / S_h where S_h > tau, else exactly 1 (also for -inf/NaN: heads that saw nothing)."""
    s = max_logit_H.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


@torch.no_grad()
def qk_clip_(
    q_b_weight: Tensor,
    kv_b_weight: Tensor,
    max_logit_H: Tensor,
    tau: float,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
) -> Tensor:
    """Apply the MLA QK-Clip rule in place to ``q_b_weight [H*(dn+dr), r_q]`` and
    ``kv_b_weight [H*(dn+dv), r_kv]`` (head-major rows, as in ``MLA``); returns the bool mask [H] of
    clipped heads.

    Unclipped heads are multiplied by exactly 1.0, so their rows stay bit-identical; there is no
    data-dependent branch, hence no host-device sync. The scale is computed in fp32 and cast to the
    weight's dtype (a bf16 weight is scaled by the bf16-rounded gamma).
    """
    H, dn, dr, dv = num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    if q_b_weight.shape[0] != H * (dn + dr):
        raise ValueError(f"q_b weight has {q_b_weight.shape[0]} rows, expected num_heads*(dn+dr) = {H}*({dn}+{dr})")
    if kv_b_weight.shape[0] != H * (dn + dv):
        raise ValueError(f"kv_b weight has {kv_b_weight.shape[0]} rows, expected num_heads*(dn+dv) = {H}*({dn}+{dv})")
    if max_logit_H.shape != (H,):
        raise ValueError(f"max_logit has shape {tuple(max_logit_H.shape)}, expected ({H},)")
    gamma_H = head_clip_scale(max_logit_H.to(q_b_weight.device), tau)
    scale_q_b_rows_(q_b_weight, gamma_H, dn, dr)
    scale_kv_b_rows_(kv_b_weight, gamma_H, dn, dv)
    return gamma_H < 1


def scale_q_b_rows_(q_b_weight: Tensor, gamma_H: Tensor, dn: int, dr: int) -> None:
    """Head h of ``q_b_weight [H*(dn+dr), r_q]``: nope rows * sqrt(gamma_h), rope rows * gamma_h."""
    q = q_b_weight.view(gamma_H.numel(), dn + dr, -1)
    q[:, :dn].mul_(gamma_H.sqrt().to(q.dtype)[:, None, None])
    q[:, dn:].mul_(gamma_H.to(q.dtype)[:, None, None])


def scale_kv_b_rows_(kv_b_weight: Tensor, gamma_H: Tensor, dn: int, dv: int) -> None:
    """Head h of ``kv_b_weight [H*(dn+dv), r_kv]``: k_nope rows * sqrt(gamma_h); V rows untouched."""
    kv = kv_b_weight.view(gamma_H.numel(), dn + dv, -1)
    kv[:, :dn].mul_(gamma_H.sqrt().to(kv.dtype)[:, None, None])


def attention_modules(model: Union[nn.Module, Sequence[nn.Module]]) -> dict[int, MLA]:
    """The MLA modules of ``model`` (or of several pipeline-stage parts), keyed by global layer index
    and in layer order. Found by type; the index comes from the ``layers.<i>.`` FQN component, so it
    survives wrappers (compile, checkpointing) and pipeline stages that hold only some layers."""
    parts = [model] if isinstance(model, nn.Module) else list(model)
    found: dict[int, MLA] = {}
    for part in parts:
        for name, m in part.named_modules():
            if isinstance(m, MLA):
                match = _LAYER_RE.search(name + ".")
                if match is None:
                    raise ValueError(f"MLA module {name!r} is not under layers.<index>: cannot tell its layer")
                found[int(match.group(1))] = m
    return dict(sorted(found.items()))


def _as_mapping(attn: Union[Mapping[int, MLA], Sequence[MLA]]) -> Mapping[int, MLA]:
    return attn if isinstance(attn, Mapping) else dict(enumerate(attn))


@torch.no_grad()
def apply_qk_clip(
    attn_modules: Union[Mapping[int, MLA], Sequence[MLA]],
    tau: Optional[float],
    group=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    reset: bool = True,
    tp_group=None,
) -> dict[str, float]:
    """Reduce, clip and report the max logits recorded since the last reset; call after ``optimizer.step()``.

    - ``attn_modules``: from :func:`attention_modules` (or a list, keyed by position).
    - ``tau``: the threshold; ``None`` only measures (plain Muon, or QK-Clip switched off).
    - ``group``: the process group whose ranks saw different data of the same layers (data and
      context parallel); the ``max_logit`` buffers are reduced with MAX over it in one collective.
      ``None``: no reduction (single process). Under tensor parallelism pass the dense
      data-parallel group of this tp coordinate (``dims.dense_dp_mesh``): each tp rank holds its
      H/tp local heads (``max_logit`` is per local head) and clips the rows of its local shards of
      ``q_b_proj`` / ``kv_b_proj`` (head-major, so whole heads per rank); nothing crosses tp.
    - ``optimizer``: if it keeps fp32 master copies of bf16 weights (:meth:`MuonClip.master_weight`),
      the masters get the same scaling, so that the next step does not undo the clip. ZeRO-1: only
      the rank owning a weight holds its master; every rank computes the same gamma, so each scales
      what it holds. tp-sharded masters are scaled on their local shard like the weights.
    - ``reset``: refill the buffers with -inf for the next step's forward passes.
    - ``tp_group``: under tensor parallelism, the tp group: only the returned metrics are combined
      over it (max over all heads, clipped heads summed), so every rank reports the whole layer.

    Returns ``{"max_logit": max over layers, "clipped_heads": heads clipped this step,
    "max_logit/layer_<i>": ..., "clipped_heads/layer_<i>": ...}``. Building it is the only host
    sync (one ``.tolist()``). The trainer calls the three parts (:func:`layer_max_logits`,
    :func:`qk_clip_layers_`, :func:`qk_clip_summary`) itself, to read the summary together with the
    step's other numbers, before the optimizer, in its one host sync.
    """
    attn = _as_mapping(attn_modules)
    if not attn:
        return {}
    logits_LH = layer_max_logits(attn, group)
    if tau is not None:
        qk_clip_layers_(attn, logits_LH, tau, optimizer)
    if reset:
        for m in attn.values():
            m.reset_max_logit()
    max_L, clipped = qk_clip_summary(logits_LH, tau, tp_group).tolist()
    return qk_clip_metrics(list(attn), max_L, clipped)


@torch.no_grad()
def layer_max_logits(attn_modules: Union[Mapping[int, MLA], Sequence[MLA]], group=None) -> Tensor:
    """The step's max logit per layer and local head, ``[L, H]`` (fp32; a layer with fewer heads is
    padded with -inf), reduced with MAX over ``group`` in one collective (see :func:`apply_qk_clip`)."""
    attn = _as_mapping(attn_modules)
    H = max(m.max_logit.numel() for m in attn.values())
    device = next(iter(attn.values())).max_logit.device
    logits_LH = torch.full((len(attn), H), float("-inf"), device=device)
    for row, m in enumerate(attn.values()):
        logits_LH[row, : m.max_logit.numel()] = m.max_logit
    if group is not None:
        dist.all_reduce(logits_LH, op=dist.ReduceOp.MAX, group=group)
    return logits_LH


@torch.no_grad()
def qk_clip_layers_(attn_modules: Union[Mapping[int, MLA], Sequence[MLA]], logits_LH: Tensor, tau: float,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Clip every layer's heads whose max logit in ``logits_LH`` (:func:`layer_max_logits`) exceeds
    ``tau``, weights and fp32 masters (see :func:`apply_qk_clip`). No host sync."""
    masters = (lambda p: optimizer.master_weight(p)) if hasattr(optimizer, "master_weight") else (lambda p: None)
    for row, m in enumerate(_as_mapping(attn_modules).values()):
        s_H = logits_LH[row, : m.max_logit.numel()]
        dims = (m.max_logit.numel(), m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)
        qk_clip_(local(m.q_b_proj.weight.detach()), local(m.kv_b_proj.weight.detach()), s_H, tau, *dims)
        # Masters get the fp32 gamma; under ZeRO-1 q_b and kv_b may live on different ranks.
        gamma_H = head_clip_scale(s_H, tau)
        mq, mkv = masters(m.q_b_proj.weight), masters(m.kv_b_proj.weight)
        if mq is not None:
            scale_q_b_rows_(local(mq), gamma_H.to(mq.device), m.qk_nope_head_dim, m.qk_rope_head_dim)
        if mkv is not None:
            scale_kv_b_rows_(local(mkv), gamma_H.to(mkv.device), m.qk_nope_head_dim, m.v_head_dim)


@torch.no_grad()
def qk_clip_summary(logits_LH: Tensor, tau: Optional[float], tp_group=None) -> Tensor:
    """``[2, L]`` on the device: each layer's max logit and its number of heads above ``tau`` (the
    heads :func:`qk_clip_layers_` clips; 0 with ``tau`` None), over all heads of the layer (combined
    over ``tp_group``, whose ranks hold different heads)."""
    clipped_L = (logits_LH > tau).sum(dim=1) if tau is not None else torch.zeros(len(logits_LH), device=logits_LH.device)
    summary_2L = torch.stack([logits_LH.amax(dim=1), clipped_L.to(logits_LH.dtype)])
    if tp_group is not None:
        parts = [torch.empty_like(summary_2L) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, summary_2L, group=tp_group)
        all_T2L = torch.stack(parts)
        summary_2L = torch.stack([all_T2L[:, 0].amax(dim=0), all_T2L[:, 1].sum(dim=0)])
    return summary_2L


def qk_clip_metrics(layers: list[int], max_L: list[float], clipped_L: list[float]) -> dict[str, float]:
    """The metrics of :func:`apply_qk_clip` from a read-back :func:`qk_clip_summary`."""
    metrics: dict[str, float] = {"max_logit": max(max_L), "clipped_heads": int(sum(clipped_L))}
    for i, mx, c in zip(layers, max_L, clipped_L):
        metrics[f"max_logit/layer_{i}"] = mx
        metrics[f"clipped_heads/layer_{i}"] = int(c)
    return metrics
