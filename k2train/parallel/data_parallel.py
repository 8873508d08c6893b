"""Data-parallel gradient reduction and the global gradient norm, for every layout of ParallelDims.

The loss of one step is the mean over the dp x ep data streams of each stream's mean loss, so the
gradient of a parameter is (1 / (dp*ep)) x the SUM of the local gradients over the ranks that hold
a replica of it and saw different tokens:
- dense parameters: replicated over dp x ep -> sum over ``dp_ep``. Tensor-parallel DTensor
  parameters first get their tp reduction from DTensor (Partial -> the param's placements); plain
  replicated ones inside the attention see the full sequence and already agree over tp;
- the router weight under sequence parallelism sees only its S/tp tokens -> sum over ``dp_ep_tp``;
- routed experts: held by one ep rank, replicated over dp (and tp under sequence parallelism,
  where tp ranks route different tokens) -> sum over ``dp`` (``dp_tp``). Their local gradient
  already sums the tokens that all ep ranks sent them, hence the same 1/(dp*ep) factor.
The pipeline axis holds different layers and takes no part.
"""

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .dims import ParallelDims
from .expert_parallel import is_expert_param


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _is_router_weight(name: str) -> bool:
    return name.endswith("mlp.gate.weight")


def grad_reduction_meshes(dims: ParallelDims) -> dict[str, object]:
    """Which 1-D mesh each kind of parameter is summed over (see the module docstring)."""
    sp_local = dims.tp > 1
    return {
        "dense": dims.dense_dp_mesh,
        "router": dims.token_mesh if sp_local else dims.dense_dp_mesh,
        "expert": dims.expert_dp_mesh if sp_local else dims.dp_mesh,
    }


def param_kind(name: str) -> str:
    return "expert" if is_expert_param(name) else "router" if _is_router_weight(name) else "dense"


@torch.no_grad()
def reduce_gradients_(model_parts: Iterable[nn.Module], dims: ParallelDims) -> None:
    """Average gradients in place after the last backward of a step, before clipping and the
    optimizer. One all-reduce per kind of parameter (flat buckets). Parameters without a gradient
    take part with zeros so that every rank issues the same collectives."""
    meshes = grad_reduction_meshes(dims)
    scale = 1.0 / dims.dp_size
    buckets: dict[str, list[tuple[nn.Parameter, torch.Tensor]]] = defaultdict(list)
    for part in model_parts:
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
            if _is_dtensor(g):
                if tuple(g.placements) != tuple(p.placements):
                    g = g.redistribute(p.device_mesh, p.placements)
                    p.grad = g
                g = g.to_local()
            buckets[param_kind(name)].append((p, g))
    for kind in ("dense", "router", "expert"):
        items = buckets.get(kind)
        mesh = meshes[kind]
        if not items or mesh.size() == 1 and dims.dp_size == 1:
            continue
        flat = torch.cat([g.reshape(-1) for _, g in items])
        if mesh.size() > 1:
            dist.all_reduce(flat, group=mesh.get_group())
        flat.mul_(scale)
        for (_, g), part in zip(items, flat.split([g.numel() for _, g in items])):
            g.copy_(part.view_as(g))


@torch.no_grad()
def clip_grad_norm_(model_parts: Iterable[nn.Module], max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """The global L2 norm of the (already reduced) gradients, equal to the single-process one, and
    clip to ``max_norm`` (``inf``: measure only). Returns the norm before clipping.

    Sums of squares: tp-sharded DTensors over tp, expert slices over ep; replicated tensors once.
    """
    parts = list(model_parts)
    device = next(p.device for part in parts for p in part.parameters())
    dense_sq, tp_sq, expert_sq = (torch.zeros((), dtype=torch.float32, device=device) for _ in range(3))
    grads = []
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is None:
                continue
            g = p.grad
            if _is_dtensor(g):
                local = g.to_local()
                sharded = any(pl.is_shard() for pl in g.placements)
                sq = local.float().pow(2).sum()
                if sharded:
                    tp_sq += sq
                else:
                    dense_sq += sq
                grads.append(local)
            else:
                sq = g.float().pow(2).sum()
                if is_expert_param(name):
                    expert_sq += sq
                else:
                    dense_sq += sq
                grads.append(g)
    if dims.tp > 1:
        dist.all_reduce(tp_sq, group=dims.tp_mesh.get_group())
    if dims.ep > 1:
        dist.all_reduce(expert_sq, group=dims.ep_mesh.get_group())
    total = (dense_sq + tp_sq + expert_sq).sqrt()
    if dims.pp > 1:
        sq = total.pow(2)
        dist.all_reduce(sq, group=dims.pp_mesh.get_group())
        total = sq.sqrt()
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
    return total


def zero1_param_groups(param_groups: list[dict], dims: ParallelDims) -> list[dict]:
    """Copies of optimizer param groups (``k2train.optim.build_param_groups``) whose ``dp_groups``
    list gives, per param, the process group over which it is replicated, for ZeRO-1
    (DistributedMuonClip shards each param's state over it): dense params over ``dp_ep``; routed
    experts over their replicas (``dp``, or ``dp_tp`` with tp > 1). The groups and their param
    order are unchanged, so the optimizer's state dict lines up with an unsharded one.
    ``k2train.optim.build_optimizer(..., dims=dims)`` calls this."""
    meshes = grad_reduction_meshes(dims)
    groups = {kind: meshes[kind].get_group() for kind in ("dense", "expert")}
    return [
        {**g, "dp_groups": [groups["expert" if is_expert_param(n) else "dense"] for n in g["names"]]}
        for g in param_groups
    ]
