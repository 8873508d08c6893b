"""Data-parallel gradient reduction and the global gradient norm, for every layout of ParallelDims.

The loss of one step is the mean over the dp x ep data streams and over each stream's micro-batches
of the micro-batch mean loss (under context parallelism each cp rank's loss is its part of that
mean). The backward passes leave in each ``.grad`` the SUM over this rank's micro-batches; the true
gradient of a parameter is ``1 / (dp*ep*micro-batches)`` times the SUM of those over the ranks that
hold a replica of it and saw different tokens:
- dense parameters: replicated over dp x ep x cp -> sum over ``dp_ep_cp``. Tensor-parallel DTensor
  parameters first get their tp reduction from DTensor (Partial -> the param's placements); plain
  replicated ones inside the attention see the full sequence of their cp part and agree over tp;
- the router weight sees only its rank's tokens (S/(cp*tp)) -> sum over every rank of the stage,
  ``dp_ep_cp_tp``;
- routed experts: held by one ep rank, replicated over dp, cp and tp (whose ranks route different
  tokens) -> sum over ``dp_cp_tp``. Their local gradient already sums the tokens that all ep ranks
  sent them, hence the same 1/(dp*ep) factor.
The pipeline axis holds different layers and takes no part.

:func:`reduce_gradients_` sums; :func:`clip_grad_norm_` applies the ``1 / (dp*ep*micro-batches)``
factor and the clipping coefficient in the same pass over the gradients. Every layout (one
process included) goes through both, so they all round alike.
"""

from collections import defaultdict
from typing import Callable, Iterable

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
    return {"dense": dims.dense_dp_mesh, "router": dims.token_mesh, "expert": dims.expert_dp_mesh}


def param_kind(name: str) -> str:
    return "expert" if is_expert_param(name) else "router" if _is_router_weight(name) else "dense"


# Gradients are all-reduced in flat buckets of at most this many bytes (a larger tensor is its own
# bucket): one collective per bucket, and no more transient memory than one bucket.
BUCKET_BYTES = 256 * 2**20


def buckets_of(grads: list[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``grads`` of at most ``limit`` bytes each (same dtype and device)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not out or size + nbytes > limit or out[-1][0].dtype != g.dtype or out[-1][0].device != g.device:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


@torch.no_grad()
def reduce_gradients_(model_parts: Iterable[nn.Module], dims: ParallelDims) -> None:
    """Sum gradients in place over the ranks holding replicas of each parameter, after the last
    backward of a step (no scaling: :func:`clip_grad_norm_` applies the mean's factor). One
    all-reduce per bucket of :data:`BUCKET_BYTES` per kind of parameter. Parameters without a
    gradient take part with zeros so that every rank issues the same collectives. DTensor gradients
    are laid out like their parameters first (tp reduction), also in one process."""
    meshes = grad_reduction_meshes(dims) if dims.world_size > 1 else {}
    buckets: dict[str, list[torch.Tensor]] = defaultdict(list)
    for part in model_parts:
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # bf16 weights take fp32 gradients (k2train.parallel.precision)
                fp32 = p.dtype == torch.bfloat16 and getattr(p, "grad_dtype", p.dtype) is None
                p.grad = torch.zeros_like(p, dtype=torch.float32 if fp32 else p.dtype)
            g = p.grad
            if _is_dtensor(g):
                if tuple(g.placements) != tuple(p.placements):
                    g = g.redistribute(p.device_mesh, p.placements)
                    p.grad = g
                g = g.to_local()
            buckets[param_kind(name)].append(g)
    for kind, grads in buckets.items():
        mesh = meshes.get(kind)
        if mesh is None or mesh.size() == 1:
            continue
        for bucket in buckets_of(grads):
            if len(bucket) == 1:  # reduce a lone (large) gradient where it is
                dist.all_reduce(bucket[0], group=mesh.get_group())
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=mesh.get_group())
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))


@torch.no_grad()
def clip_grad_norm_(
    model_parts: Iterable[nn.Module], max_norm: float, dims: ParallelDims, scale: float = 1.0
) -> torch.Tensor:
    """The gradients are ``1 / scale`` times the true ones (sums over micro-batches and replicas, see
    the module docstring): return the global L2 norm of the true gradient, equal to the
    single-process one, and multiply every gradient by ``scale x min(1, max_norm / norm)`` in one
    pass (``max_norm=inf``: scale only). Returns a device tensor (no host sync).

    Sums of squares: tp-sharded DTensors over tp, expert slices over ep, stages over pp; replicated
    tensors once.
    """
    parts = list(model_parts)
    device = next(p.device for part in parts for p in part.parameters())
    grads: dict[str, list[torch.Tensor]] = defaultdict(list)  # "dense", "tp" (sharded), "expert"
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is None:
                continue
            g = p.grad
            if _is_dtensor(g):
                kind = "tp" if any(pl.is_shard() for pl in g.placements) else "dense"
                g = g.to_local()
            else:
                kind = "expert" if is_expert_param(name) else "dense"
            grads[kind].append(g)
    sq = {kind: torch.zeros((), dtype=torch.float32, device=device) for kind in ("dense", "tp", "expert")}
    for kind, gs in grads.items():
        norms = torch._foreach_norm(gs, 2, dtype=torch.float32)
        sq[kind] = torch.stack(norms).pow(2).sum().to(device)
    if dims.tp > 1:
        dist.all_reduce(sq["tp"], group=dims.tp_mesh.get_group())
    if dims.ep > 1:
        dist.all_reduce(sq["expert"], group=dims.ep_mesh.get_group())
    total_sq = sq["dense"] + sq["tp"] + sq["expert"]
    if dims.pp > 1:
        dist.all_reduce(total_sq, group=dims.pp_mesh.get_group())
    total = total_sq.sqrt() * scale
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) * scale if max_norm != float("inf") else total.new_tensor(scale)
    for gs in grads.values():
        torch._foreach_mul_(gs, coef.to(gs[0].device))
    return total


def replica_groups(dims: ParallelDims) -> Callable[[str], object]:
    """``fqn -> process group`` of the ranks holding replicas of a parameter, for ZeRO-1
    (``k2train.optim.build_optimizer(..., replica_group=replica_groups(dims))`` shards each
    parameter's optimizer state over its group): dense params over ``dp_ep_cp``; routed experts
    over their replicas (``dp_cp_tp``)."""
    meshes = grad_reduction_meshes(dims)
    dense, expert = meshes["dense"].get_group(), meshes["expert"].get_group()
    return lambda name: expert if is_expert_param(name) else dense
