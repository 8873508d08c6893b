"""Context parallelism (``parallel.cp``) with DeepSpeed Ulysses, applied from outside the model.

Each rank of a cp group holds ``S/cp`` consecutive tokens of every sequence (rank r the r-th
chunk). Everything outside the attention core runs on those local tokens: the projections, RoPE
(with the tokens' global positions), the MoE (cp folds into the token dimension, as data
parallelism does: each rank routes its own tokens), the head and the loss. Around the attention
core, DeepSpeed's ``DistributedAttention`` all-to-alls q, k and v from ``[B, S/cp, H, D]`` to
``[B, S, H/cp, D]`` (the sequence split becomes a head split), the model's own core (eager, sdpa
or the Triton kernel with its per-head max logit) runs on whole sequences for ``H/cp`` heads, and
an all-to-all swaps the output back. q/k (head dim 192) and v (128) travel separately.

What else sees cp (k2train/parallel/data_parallel.py, the trainer):
- gradients of parameters replicated over cp are summed over it (the loss of each cp rank is its
  share of the sequence's mean: the sum over its labelled tokens divided by the whole sequence's
  count);
- the MoE's sequence-wise aux loss counts the whole sequence (tp x cp ranks; see
  :func:`install_sequence_aux_loss`); router load sums and the bias update run over every rank
  that routed tokens;
- QK-Clip's max logit: each rank computes its H/cp heads over the whole sequence; the MAX over
  the data-parallel x cp group gives every rank all heads;
- document masks: the attention core gets the whole sequence's document ids.

DeepSpeed is an optional dependency (``pip install "k2train[longctx]"``); only ``cp > 1`` imports it.
"""

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from k2train.model.attention import MLA
from k2train.model.moe import MoE

from .expert_parallel import moe_modules


def init_deepspeed(backend: str) -> None:
    """DeepSpeed's communication layer over the existing torch process group (it needs its own
    init even then). Its CPU shared-memory collective is switched off: it only serves inference and
    would be compiled at the first init (~40 s)."""
    # say which accelerator: else DeepSpeed guesses, and says so on stdout at import
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if backend == "nccl" else "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError(
            f"parallel.cp > 1 needs DeepSpeed's Ulysses attention, which failed to import ({e}): "
            'pip install "deepspeed==0.19.8" (the longctx extra), or set parallel.cp=1'
        ) from None
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


class _LocalAttention(nn.Module):
    """What runs between the all-to-alls: the MLA core on whole sequences of this rank's heads, in
    DeepSpeed's ``[B, S, H, D]`` layout. ``DistributedAttention`` passes one tensor back, so the
    per-head max logit leaves through ``last_max_logit``."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core
        self.last_max_logit: Optional[torch.Tensor] = None

    def forward(self, q_BSHD, k_BSHD, v_BSHD, doc_ids=None):
        out_BHSD, max_logit_H = self.core(q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), doc_ids)
        self.last_max_logit = max_logit_H
        return out_BHSD.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """A drop-in for :class:`~k2train.model.attention.AttentionCore` under context parallelism:
    ``(q, k, v [B, H, S/cp, D], doc_ids [B, S]) -> (out [B, H, S/cp, dv], max_logit [H])``, the
    max logit -inf for the heads other cp ranks computed."""

    def __init__(self, core: nn.Module, cp_mesh):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.cp, self.cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()
        self.local = _LocalAttention(core)
        # [b, s, h, d]: scatter the heads (dim 2), gather the sequence (dim 1)
        self.attention = DistributedAttention(self.local, cp_mesh.get_group(), scatter_idx=2, gather_idx=1)

    def forward(self, q, k, v, doc_ids=None):
        H = q.shape[1]
        # batch_dim_idx=0; doc_ids by keyword (the fifth positional argument is DeepSpeed's rotary_pos_emb)
        out_BSHD = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, doc_ids=doc_ids)
        heads = H // self.cp
        max_logit = torch.full((H,), float("-inf"), device=q.device, dtype=torch.float32)
        max_logit[self.cp_rank * heads : (self.cp_rank + 1) * heads] = self.local.last_max_logit.float()
        self.local.last_max_logit = None
        return out_BSHD.transpose(1, 2), max_logit


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Wrap every MLA's attention core in :class:`UlyssesAttention` (no-op for one cp rank). The
    caller passes each rank's token shard with its global ``position_ids`` and the whole
    sequence's ``doc_ids``. Call after TP (the core then sees the tp rank's H/tp heads)."""
    if cp_mesh.size() == 1:
        return
    init_deepspeed(dist.get_backend(cp_mesh.get_group()))
    for m in model.modules():
        if isinstance(m, MLA):
            m.core = UlyssesAttention(m.core, cp_mesh)


def install_sequence_aux_loss(model: nn.Module, group) -> None:
    """Make every MoE's sequence-wise aux loss (:func:`k2train.model.moe.sequence_aux_loss`) count
    whole sequences whose tokens are spread over ``group`` (the tp x cp ranks of a sequence).

    aux = alpha * mean_b sum_e f_be P_be with f from the token counts of the whole sequence
    (all-reduced, no gradient) and P_be = (1/S) sum_t p_bte, a sum over the ranks' token shards.
    Each rank differentiates only its own shard's share, and the value is replaced by the
    all-reduced total so every rank reports the same number.
    """
    for moe in moe_modules(model):
        _install(moe, group)


def _install(moe: MoE, group) -> None:
    captured = {}

    def grab_router(_mod, _inputs, outputs):
        captured["scores_TE"], captured["topk_idx_TK"] = outputs[0], outputs[1]

    def fix_aux(mod: MoE, inputs, _output):
        scores_TE, topk_idx_TK = captured.pop("scores_TE"), captured.pop("topk_idx_TK")
        if not (mod.training and mod.aux_loss_alpha > 0):
            return
        B, S_local, _ = inputs[0].shape
        n = dist.get_world_size(group)
        E, K = scores_TE.shape[-1], topk_idx_TK.shape[-1]
        S = S_local * n
        counts_BE = torch.zeros(B, E, device=scores_TE.device).scatter_add_(
            1, topk_idx_TK.view(B, -1), torch.ones(B, S_local * K, device=scores_TE.device)
        )
        dist.all_reduce(counts_BE, group=group)
        f_BE = counts_BE * (E / (K * S))
        p_sum_BE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(B, S_local, E).sum(dim=1)
        part = mod.aux_loss_alpha * (f_BE * p_sum_BE / S).sum(dim=-1).mean()
        total = part.detach().clone()
        dist.all_reduce(total, group=group)
        mod.aux_loss = part + (total - part.detach())

    moe.gate.register_forward_hook(grab_router)
    moe.register_forward_hook(fix_aux)


def shard_sequence(batch: dict, cp: int, cp_rank: int) -> dict:
    """This cp rank's part of a micro-batch: tokens, labels and position_ids cut to the rank's
    S/cp consecutive tokens (global positions kept), doc_ids whole (the attention core sees the
    whole sequence)."""
    S = batch["tokens"].shape[1]
    n = S // cp
    cut = slice(cp_rank * n, (cp_rank + 1) * n)
    out = {k: batch[k][:, cut].contiguous() for k in ("tokens", "labels")}
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(S, device=batch["tokens"].device).expand(batch["tokens"].shape[0], S)
    out["position_ids"] = positions[:, cut].contiguous()
    if batch.get("doc_ids") is not None:
        out["doc_ids"] = batch["doc_ids"]
    return out


__all__ = ["apply_cp", "install_sequence_aux_loss", "shard_sequence", "UlyssesAttention", "init_deepspeed"]
