"""DTensor (tensor-parallel) parameters in the optimizer: local views, whole-matrix gathers, reshards.

Tensor parallelism (``k2train.parallel.apply_tp``) turns some block matrices into DTensors sharded
by rows (``q_b_proj``, ``kv_b_proj``, FFN gate/up: ``Shard(0)``) or columns (``o_proj``, FFN down:
``Shard(1)``), and the embedding / head into vocab shards. Elementwise optimizer math (momentum,
AdamW moments, weight decay, the update itself) runs on each rank's local shard; only Newton-Schulz
needs the whole matrix, because NS of a sharded matrix is not the concatenation of NS of its shards.

The scheme here: every rank of the tp group all-gathers the momentum-updated matrices it needs (one
collective per bucket of same-shape, same-layout matrices, not one per matrix), runs NS on the full
matrices redundantly, and keeps its own shard of the result. Redundant NS costs each tp rank what
an unsharded (tp=1) rank pays anyway, needs one collective instead of a gather plus a scatter, and
every rank keeps a bit-identical full result, so the shards agree by construction.

Legend: N matrices stacked, r x c one matrix, tp ranks of the mesh.
"""

from typing import Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage, so in-place ops land in the DTensor), or
    ``t`` itself. Optimizer math runs on these: cheaper than DTensor dispatch, same numbers."""
    return t.to_local() if is_dtensor(t) else t


def like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` laid out like ``param``: a Partial or otherwise differently placed DTensor gradient
    is redistributed to the parameter's placements (a collective over the param's mesh)."""
    if is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad


def matrix_shard_dims(x: Tensor) -> Optional[tuple]:
    """For a DTensor ``x`` ``[..., r, c]``: the placements in the stacked ``[N, r, c]`` frame if a
    matrix dim (r or c) is sharded, None if only the stack dims are (then each rank holds whole
    matrices and NS runs locally). Raises for layouts we do not orthogonalise (Partial, or stack
    and matrix dims sharded together)."""
    nd = x.ndim
    out, matrix_sharded, batch_sharded = [], False, False
    for pl in x.placements:
        if isinstance(pl, Replicate):
            out.append(pl)
        elif isinstance(pl, Shard):
            d = pl.dim % nd
            if d >= nd - 2:
                matrix_sharded = True
                out.append(Shard(d - (nd - 2) + 1))
            else:
                batch_sharded = True
        else:
            raise ValueError(
                f"Newton-Schulz input with placements {x.placements}: reduce the gradient to the parameter's "
                "placements first (k2train.parallel.reduce_gradients_)"
            )
    if matrix_sharded and batch_sharded:
        raise ValueError(f"DTensor with placements {x.placements} shards both stack and matrix dims: not supported")
    return tuple(out) if matrix_sharded else None


def gather_matrices(xs: list[Tensor], placements: tuple) -> Tensor:
    """The full ``[N, r, c]`` stack of the DTensors ``xs`` (same mesh, global matrix shape and
    layout ``placements`` in the stacked frame, see :func:`matrix_shard_dims`): one all-gather."""
    x0 = xs[0]
    r, c = x0.shape[-2:]
    locals_ = [local(x) for x in xs]
    stack = torch.cat([t.reshape(-1, *t.shape[-2:]) for t in locals_])
    n = sum(x.numel() // (r * c) for x in xs)
    shape = torch.Size((n, r, c))
    stride = (r * c, c, 1)
    return DTensor.from_local(stack, x0.device_mesh, placements, run_check=False, shape=shape, stride=stride).full_tensor()


def shard_matrices(full: Tensor, like: list[Tensor], placements: tuple) -> list[Tensor]:
    """Inverse of :func:`gather_matrices`: this rank's shards of the full ``[N, r, c]`` stack, as
    DTensors shaped and placed like ``like``. Local slicing only (Replicate -> Shard), no collective."""
    mesh = like[0].device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    stack = replicated.redistribute(mesh, placements).to_local()
    out, start = [], 0
    for x in like:
        lx = local(x)
        n = lx.numel() // (lx.shape[-2] * lx.shape[-1])
        piece = stack[start : start + n].reshape(lx.shape)
        out.append(DTensor.from_local(piece, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()))
        start += n
    return out


def wrap_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a local shard) as a DTensor placed like ``like``; ``t`` itself if ``like`` is plain."""
    if not is_dtensor(like):
        return t
    return DTensor.from_local(t, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def full_tensor(t: Tensor) -> Tensor:
    """The unsharded tensor of a DTensor (a collective over its mesh), or ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A full (global-shape) plain tensor cut to ``param``'s layout: this rank's shard as a DTensor
    if ``param`` is one, else ``full`` (no collective). Used to load gathered optimizer state."""
    if not is_dtensor(param) or is_dtensor(full):
        return full
    mesh = param.device_mesh
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"state of shape {tuple(full.shape)} for a DTensor param of global shape {tuple(param.shape)}")
    rep = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    mine = rep.redistribute(mesh, param.placements).to_local().clone()  # own storage, not a view of full
    return DTensor.from_local(mine, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())


def sharded_newton_schulz(inputs: list[Tensor], batched_ns, max_elements: int, **ns_kwargs) -> list[Tensor]:
    """``batched_ns(inputs, **ns_kwargs)`` (a batched NS on plain tensors) for a list that holds
    DTensors too; results have the inputs' types, shapes and placements.

    A DTensor holding whole matrices (replicated, or sharded on stack dims only) runs on its local
    tensor. DTensors sharded on a matrix dim are bucketed by (mesh, layout, matrix shape); each
    bucket, in chunks of at most ``max_elements`` full-matrix elements (bounding the gathered
    memory), is all-gathered in one collective, orthogonalised whole and cut back to the local
    shards. Every rank of a mesh must pass the same DTensors in the same order (true for the
    optimizer: the param lists agree over tp).
    """
    out: list[Optional[Tensor]] = [None] * len(inputs)
    plain_idx: list[int] = []
    buckets: dict[tuple, list[int]] = {}
    layouts: dict[int, tuple] = {}
    for i, x in enumerate(inputs):
        layout = matrix_shard_dims(x) if is_dtensor(x) else None
        if layout is None:
            plain_idx.append(i)
        else:
            layouts[i] = layout
            buckets.setdefault((id(x.device_mesh), layout, tuple(x.shape[-2:])), []).append(i)
    for (_, layout, (r, c)), idx in buckets.items():
        chunk: list[int] = []
        count = 0
        for j, i in enumerate(idx):
            chunk.append(i)
            count += inputs[i].numel()
            if j + 1 == len(idx) or count + r * c > max_elements:
                xs = [inputs[k] for k in chunk]
                (ortho,) = batched_ns([gather_matrices(xs, layout)], **ns_kwargs)
                for k, o in zip(chunk, shard_matrices(ortho, xs, layout)):
                    out[k] = o
                chunk, count = [], 0
    if plain_idx:
        results = batched_ns([local(inputs[i]) for i in plain_idx], **ns_kwargs)
        for i, o in zip(plain_idx, results):
            out[i] = wrap_like(o, inputs[i])
    return out  # type: ignore[return-value]
