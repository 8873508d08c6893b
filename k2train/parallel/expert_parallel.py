"""Expert parallelism: routed experts sharded over the ``ep`` mesh axis, tokens moved by all-to-all.

Legend: T tokens on this rank, K experts per token, N = T*K routed rows, D hidden, E experts in
total, El = E / ep experts held here (global ids ``[ep_rank*El, (ep_rank+1)*El)``), M rows received.

Each ep rank routes its own tokens over all E experts (the router is replicated), then:
1. sorts its N rows by global expert id, so the rows for each destination rank are contiguous;
2. exchanges per-expert row counts (one small all-to-all), giving the uneven split sizes;
3. sends the rows (all-to-all, uneven splits), runs its El experts on the M received rows;
4. sends the outputs back (the reverse all-to-all) and, on the source rank, multiplies by the gate
   weights and adds them into their tokens, exactly as the single-process path does.
Both all-to-alls are differentiable, so expert gradients accumulate on the rank that holds the
expert, over the tokens of every ep rank. The routing weights never leave their rank.

The expert weights stay plain tensors of the local shape ``[El, out, in]`` (parameter names
unchanged), so the optimizer orthogonalizes each local expert on its own rank.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from k2train.kernels.moe import build_routing, combine, permute
from k2train.model.moe import (GroupedExperts, MoE, experts_fp8_saved, experts_grouped_mm, experts_reference,
                               grouped_mm_supported)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """Drop-in for :class:`GroupedExperts` holding only this rank's experts; built by :func:`apply_ep`."""

    def __init__(self, experts: GroupedExperts, ep_mesh):
        super().__init__()
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.ep_rank = ep_mesh.get_local_rank()
        self.num_experts = experts.w_gate.shape[0]
        assert self.num_experts % self.ep_size == 0, "ParallelDims.validate checks the experts"
        self.num_local_experts = self.num_experts // self.ep_size
        self.impl = experts.impl
        self.fp8_saved = experts.fp8_saved
        lo = self.ep_rank * self.num_local_experts
        hi = lo + self.num_local_experts
        # Global id of local expert 0: K2Model.init_weights draws each expert from its global id.
        self.expert_offset = lo
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(experts, name)
            # detach().clone(): the slice must own its storage (the full stack is dropped).
            local = full.detach()[lo:hi].clone() if full.device.type != "meta" else full.detach()[lo:hi]
            self.register_parameter(name, nn.Parameter(local, requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        lo = self.ep_rank * self.num_local_experts
        return f"experts {lo}..{lo + self.num_local_experts - 1} of {self.num_experts}, ep={self.ep_size}"

    def _local_experts(self, x_MD: torch.Tensor, local_id_M: torch.Tensor) -> torch.Tensor:
        """The El local experts on received rows, unweighted (gate weight 1.0 is exact)."""
        ones = torch.ones(x_MD.shape[0], 1, dtype=torch.float32, device=x_MD.device)
        args = (x_MD, local_id_M[:, None], ones, self.w_gate, self.w_up, self.w_down)
        if self.fp8_saved and torch.is_grad_enabled():
            return experts_fp8_saved(*args, impl=self.impl)
        if x_MD.shape[0] > 0 and self.impl != "loop" and grouped_mm_supported(x_MD):
            return experts_grouped_mm(*args)
        return experts_reference(*args)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
        El, ep = self.num_local_experts, self.ep_size
        # Rows in global expert order (so each destination rank's rows are contiguous); permute and
        # combine are the MoE path's own (the Triton kernels with moe_impl=triton), deterministic,
        # no scatter-add.
        routing = build_routing(topk_idx_TK, self.num_experts)
        impl = "auto" if self.impl == "triton" else "torch"
        counts_E = torch.diff(routing.offs_E, prepend=routing.offs_E.new_zeros(1))
        # recv_counts[src, e]: rows that rank src sends to my local expert e.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_counts = recv_counts.view(ep, El)
        # Host sync: the split sizes must be Python ints.
        in_splits = counts_E.view(ep, El).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()

        x_recv_MD = all_to_all(permute(x_TD, routing, impl), out_splits, in_splits, self.group)
        local_id_M = torch.repeat_interleave(
            torch.arange(El, device=x_TD.device).repeat(ep), recv_counts.reshape(-1)
        )
        y_recv_MD = self._local_experts(x_recv_MD, local_id_M)
        y_ND = all_to_all(y_recv_MD, in_splits, out_splits, self.group)
        return combine(y_ND, topk_w_TK, routing, impl)


def apply_ep(model: nn.Module, ep_mesh) -> None:
    """Replace every ``MoE.experts`` by an :class:`ExpertParallelExperts` holding this rank's slice.

    Call on a model whose full expert stacks are already initialized (identical on every rank), or
    on the meta device before materialization. A no-op when ``ep_mesh`` has one rank.
    """
    if ep_mesh.size() == 1:
        return
    for moe in moe_modules(model):
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (sharded over ep, replicated over dp); everything else is dense."""
    return ".experts.w_" in f".{name}"


def gather_experts(local: torch.Tensor, ep_mesh) -> torch.Tensor:
    """The full ``[E, ...]`` stack from every ep rank's ``[El, ...]`` slice (checks and export)."""
    if ep_mesh is None or ep_mesh.size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ep_mesh.size())]
    dist.all_gather(parts, local.contiguous(), group=ep_mesh.get_group())
    return torch.cat(parts)


def sum_expert_load_(model: nn.Module, group: Optional[object]) -> None:
    """Sum every ``MoE.tokens_per_expert`` over ``group`` in place (one collective), so that the
    aux-loss-free bias update sees the global load and every rank computes the same bias.

    ``group``: all ranks of this pipeline stage that routed different tokens (``ParallelDims.token_mesh``
    under sequence parallelism, else ``dense_dp_mesh``); None = single process.
    """
    moes = moe_modules(model)
    if group is None or not moes:
        return
    flat = torch.cat([m.tokens_per_expert for m in moes])
    dist.all_reduce(flat, group=group)
    for m, part in zip(moes, flat.split([m.tokens_per_expert.numel() for m in moes])):
        m.tokens_per_expert.copy_(part)
