"""ZeRO-1 MuonClip: optimizer state sharded over the data-parallel ranks, whole tensors per rank.

Scheme (docs/muonclip.md explains the choice over Moonlight's gather-NS-scatter): every parameter
is owned by exactly one rank of its data-parallel group. The owner keeps the parameter's state
(Muon momentum or AdamW moments, fp32 master), runs the whole update on the full matrix (Newton-
Schulz once per matrix in the whole group, never redundantly) and then broadcasts the updated
parameter; the other ranks only receive. Ownership is a longest-processing-time-first assignment:
Muon tensors balanced by Newton-Schulz FLOPs, AdamW tensors by element count. It depends only on
the parameter list and the group size, so every rank computes the same plan without communicating.

Plumbing only: the update math is :class:`~k2train.optim.muon.MuonClip`'s, which calls the
:meth:`_owns` / :meth:`_after_update` hooks overridden here.

Gradients must be identical on all ranks of a group when ``step`` runs (averaged by the trainer).
Every param group carries ``"dp_groups"``, one process group per param: the ranks holding replicas
of it (expert params under expert parallelism have another data-parallel group than dense ones).
``build_optimizer(..., replica_group=k2train.parallel.replica_groups(dims))`` attaches them.

With tensor parallelism, a dense data-parallel group holds one tp coordinate: its ranks hold the same
shard of each DTensor param, and the groups of the other tp coordinates compute the same owner plan
(costs use global shapes). So the owner of a tp-sharded matrix is a whole tp row: its ranks
all-gather the matrix over tp, each runs Newton-Schulz on the full matrix, keeps its shard
(:mod:`k2train.optim.sharded`), and broadcasts that shard over its own dp group.
"""

import heapq
from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .muon import MuonClip
from .sharded import full_tensor, local


def newton_schulz_flops(shape: torch.Size, steps: int = 5) -> float:
    """FLOPs of ``steps`` NS iterations on a matrix (or each matrix of a stack [n, r, c]):
    per iteration X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n), m = min(r, c), n = max(r, c)."""
    r, c = shape[-2], shape[-1]
    m, n = min(r, c), max(r, c)
    count = 1
    for d in shape[:-2]:
        count *= d
    return float(count * steps * (4 * m * m * n + 2 * m**3))


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each item: the largest cost first, each to the currently least-loaded rank
    (ties: lowest rank; equal costs keep input order). Deterministic, so every rank agrees."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def merge_state_dicts(shards: Iterable[dict]) -> dict:
    """The state dicts of all ranks (each holding only its owned params' state) -> one full state
    dict, loadable by a :class:`DistributedMuonClip` of any data-parallel size or by a plain MuonClip."""
    shards = list(shards)
    merged = {"state": {}, "param_groups": shards[0]["param_groups"]}
    for sd in shards:
        overlap = merged["state"].keys() & sd["state"].keys()
        if overlap:
            raise ValueError(f"state shards overlap on param ids {sorted(overlap)[:5]}: not from one ZeRO-1 run")
        merged["state"].update(sd["state"])
    return merged


class DistributedMuonClip(MuonClip):
    """:class:`MuonClip` with ZeRO-1 sharding over each parameter's ``dp_groups`` entry (see the module docstring).

    ``state_dict()`` returns this rank's shard (torch's format; param ids are global, so shards of
    different ranks have disjoint keys). ``full_state_dict()`` gathers the full one on every rank.
    ``load_state_dict()`` accepts a full state dict (e.g. :func:`merge_state_dicts` of the shards of
    a run with another DP size) and keeps only what this rank owns: that is the resharding.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._owner_rank: dict[Tensor, int] = {}  # param -> owner's rank within its group
        self._group_of: dict[Tensor, object] = {}
        by_group: dict[object, list[tuple[Tensor, str]]] = defaultdict(list)
        for g in self.param_groups:
            pgs = g.get("dp_groups")
            if pgs is None or len(pgs) != len(g["params"]):
                raise ValueError(f"param group {g.get('name')!r}: needs one entry of 'dp_groups' per param "
                                 f"({len(g['params'])} params)")
            for p, pg in zip(g["params"], pgs):
                by_group[pg].append((p, g["kind"]))
                self._group_of[p] = pg
        # For each process group: its params in a fixed order, and who owns each.
        self._plan: list[tuple[object, list[Tensor]]] = []
        for pg, items in by_group.items():
            world = dist.get_world_size(pg)
            for kind in ("muon", "adamw"):
                ps = [p for p, k in items if k == kind]
                costs = [newton_schulz_flops(p.shape) if kind == "muon" else float(p.numel()) for p in ps]
                for p, r in zip(ps, assign_owners(costs, world)):
                    self._owner_rank[p] = r
            self._plan.append((pg, [p for p, _ in items]))

    def _owns(self, p: Tensor) -> bool:
        return self._owner_rank[p] == dist.get_rank(self._group_of[p])

    def owner_of(self, p: Tensor) -> int:
        """Rank (within the param's data-parallel group) that holds ``p``'s state."""
        return self._owner_rank[p]

    @torch.no_grad()
    def _after_update(self) -> None:
        # Each owner sends its params as one flat buffer per dtype: world_size broadcasts per group,
        # not one per tensor. DTensor params send their local shard: the dp group is orthogonal to
        # tp, so every rank of the group holds the same shard of it.
        for pg, params in self._plan:
            world = dist.get_world_size(pg)
            if world == 1:
                continue
            me = dist.get_rank(pg)
            for r in range(world):
                by_dtype: dict[tuple, list[Tensor]] = defaultdict(list)
                for p in params:
                    if self._owner_rank[p] == r:
                        by_dtype[(p.dtype, p.device)].append(local(p))
                for (dtype, device), ps in by_dtype.items():
                    sizes = [p.numel() for p in ps]
                    if me == r:
                        flat = torch.cat([p.detach().reshape(-1) for p in ps])
                    else:
                        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
                    dist.broadcast(flat, src=dist.get_global_rank(pg, r), group=pg)
                    if me != r:
                        for p, chunk in zip(ps, flat.split(sizes)):
                            p.copy_(chunk.view_as(p))

    def full_state_dict(self) -> dict:
        """The full optimizer state on every rank: the shards all-gathered over each param's
        data-parallel group, DTensor (tp-sharded) state as full tensors. Fine for small models and
        tests; at scale the checkpoint saves the shards through DCP. With expert parallelism the
        expert entries are this ep rank's experts (their slice), as the params themselves."""
        params = [p for g in self.param_groups for p in g["params"]]
        own = _to_cpu(self.state_dict(), full=True)
        merged: dict = {"state": {}, "param_groups": own["param_groups"]}
        for pg, members in self._plan:
            ids = {i for i, p in enumerate(params) if any(p is m for m in members)}
            mine = {"state": {i: s for i, s in own["state"].items() if i in ids}, "param_groups": own["param_groups"]}
            shards: list[Optional[dict]] = [None] * dist.get_world_size(pg)
            dist.all_gather_object(shards, mine, group=pg)
            merged["state"].update(merge_state_dicts(shards)["state"])
        return merged

    def state_dict(self) -> dict:
        """This rank's shard in torch's format; state of DTensor params stays DTensor (what DCP wants)."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("dp_groups", None)  # process groups are neither picklable nor portable
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        dp_groups = [g["dp_groups"] for g in self.param_groups]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"state dict has {len(ids)} params, this optimizer {len(params)}: not the same model")
        owned = {i for i, p in zip(ids, params) if self._owns(p)}
        mine = {"state": {i: s for i, s in state_dict["state"].items() if i in owned}, "param_groups": state_dict["param_groups"]}
        super().load_state_dict(mine)
        for g, pgs in zip(self.param_groups, dp_groups):
            g["dp_groups"] = pgs


def _to_cpu(obj, full: bool = False):
    """Tensors of a state dict on the CPU; with ``full`` DTensors become full tensors (a collective
    over their mesh, in the dict's deterministic order)."""
    if torch.is_tensor(obj):
        return (full_tensor(obj) if full else obj).detach().to("cpu", copy=True)  # never alias live state
    if isinstance(obj, dict):
        return {k: _to_cpu(v, full) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, full) for v in obj)
    return obj
