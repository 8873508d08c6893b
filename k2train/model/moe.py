"""SwiGLU feed-forward and K2's Mixture-of-Experts layer.

Legend: T tokens, D hidden, E experts, I expert hidden, K experts per token, N = T*K routed rows.

Routing (DeepSeek-V3 ``noaux_tc`` with one group, as K2): sigmoid scores; the aux-loss-free bias is
added only to choose the top-K experts; the gate weights are the unbiased scores of the chosen
experts, normalized to sum 1 and scaled by ``routed_scaling_factor``. A small sequence-wise
auxiliary loss (coefficient ``aux_loss_alpha``) complements the bias, which is nudged after every
step towards balanced load by :func:`update_router_bias_`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.moe import build_routing, combine, expert_mlp_saved, moe_experts_forward, permute, triton_moe_available
from ..kernels.split_matmul import linear_fp32
from ..kernels.swiglu import swiglu


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Layer 0's dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden_dim: int, impl: str = "torch"):
        super().__init__()
        self.impl = impl
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.impl == "triton":
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # fp32 like the released checkpoints; a buffer, since no gradient ever reaches it.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns scores [T, E] (fp32), chosen experts [T, K] and their gate weights [T, K] (fp32)."""
        # fp32 scores, also under autocast (which would run this matmul in bf16); on CUDA as split
        # bf16 GEMMs summed in fp32 (k2train.kernels.split_matmul)
        scores_TE = linear_fp32(x_TD, self.weight).sigmoid()
        with torch.no_grad():
            topk_idx_TK = torch.topk(scores_TE + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False)[1]
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            topk_w_TK = topk_w_TK / (topk_w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return scores_TE, topk_idx_TK, topk_w_TK * self.routed_scaling_factor


def experts_reference(x_TD, topk_idx_TK, topk_w_TK, w_gate_EID, w_up_EID, w_down_EDI) -> torch.Tensor:
    """Per-expert loop: the readable reference every faster expert path is tested against."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(w_gate_EID.shape[0]):
        token, slot = torch.where(topk_idx_TK == e)
        if token.numel() == 0:
            continue
        x = x_TD[token]
        h = F.silu(x @ w_gate_EID[e].T) * (x @ w_up_EID[e].T)
        y = (h @ w_down_EDI[e].T) * topk_w_TK[token, slot, None].to(x.dtype)
        out_TD = out_TD.index_add(0, token, y)
    return out_TD


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's CPU backward rejects non-contiguous (e.g. expanded) output gradients.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def experts_grouped_mm(x_TD, topk_idx_TK, topk_w_TK, w_gate_EID, w_up_EID, w_down_EDI) -> torch.Tensor:
    """Permute rows into expert order, three grouped GEMMs, weighted sum back per token (in plain
    torch: the gathers of k2train.kernels.moe's torch path, deterministic, no scatter-add)."""
    dt = compute_dtype(x_TD)
    x_TD, w_gate_EID, w_up_EID, w_down_EDI = (t.to(dt) for t in (x_TD, w_gate_EID, w_up_EID, w_down_EDI))
    routing = build_routing(topk_idx_TK, w_gate_EID.shape[0])
    x_ND = permute(x_TD, routing, impl="torch")
    gate = _contiguous_grad(torch._grouped_mm(x_ND, w_gate_EID.transpose(1, 2), offs=routing.offs_E))
    up = _contiguous_grad(torch._grouped_mm(x_ND, w_up_EID.transpose(1, 2), offs=routing.offs_E))
    y_ND = _contiguous_grad(torch._grouped_mm(F.silu(gate) * up, w_down_EDI.transpose(1, 2), offs=routing.offs_E))
    return combine(y_ND, topk_w_TK, routing, impl="torch")


def experts_fp8_saved(x_TD, topk_idx_TK, topk_w_TK, w_gate_EID, w_up_EID, w_down_EDI, impl: str) -> torch.Tensor:
    """The routed experts keeping for the backward only their input and the SwiGLU inputs, as FP8
    tiles (``parallel.fp8_moe_inputs``; k2train.kernels.moe.expert_mlp_saved); permute and combine
    on the Triton kernels for ``impl="triton"``."""
    dt = compute_dtype(x_TD)
    routing = build_routing(topk_idx_TK, w_gate_EID.shape[0])
    order_impl = "auto" if impl == "triton" else "torch"
    x_TD = x_TD.to(dt)
    if order_impl == "auto" and triton_moe_available(x_TD):  # the op permutes (one backward with the permute's)
        y_ND = expert_mlp_saved(x_TD, w_gate_EID, w_up_EID, w_down_EDI, routing.offs_E, grouped_mm_supported(x_TD),
                                pos_TK=routing.pos_TK)
    else:
        x_ND = permute(x_TD, routing, order_impl)
        y_ND = expert_mlp_saved(x_ND, w_gate_EID, w_up_EID, w_down_EDI, routing.offs_E, grouped_mm_supported(x_ND))
    return combine(y_ND, topk_w_TK, routing, order_impl)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's (which does not cover torch._grouped_mm), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    # CPU support for torch._grouped_mm arrived in torch 2.13, for fp32 too in eager; its
    # fake-tensor rule (torch.compile) still demands bf16, so compiled fp32 CPU code takes the loop.
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13) and (compute_dtype(x) == torch.bfloat16 or not torch.compiler.is_compiling())


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked [E, out, in] tensors, so they shard by expert."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, impl: str = "grouped_mm"):
        super().__init__()
        self.impl = impl
        # Set from outside (k2train.parallel.activation_memory.apply_fp8_storage): keep the
        # experts' input and SwiGLU inputs for the backward as FP8 tiles.
        self.fp8_saved = False
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
        args = (x_TD, topk_idx_TK, topk_w_TK, self.w_gate, self.w_up, self.w_down)
        if self.fp8_saved and torch.is_grad_enabled():
            return experts_fp8_saved(*args, impl=self.impl)
        if self.impl == "triton":
            return moe_experts_forward(*args, use_grouped_mm=grouped_mm_supported(x_TD))
        if self.impl == "grouped_mm" and grouped_mm_supported(x_TD):
            return experts_grouped_mm(*args)
        return experts_reference(*args)


def sequence_aux_loss(scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: alpha * mean_b sum_e f_be * P_be.

    f_be = E / (K*S) * (tokens of sequence b routed to e); P_be = mean over the sequence of the
    scores normalized over experts.
    """
    B, S, E = scores_BSE.shape
    K = topk_idx_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(
        1, topk_idx_BSK.reshape(B, -1), torch.ones(B, S * K, device=scores_BSE.device)
    )
    f_BE = counts_BE * (E / (K * S))
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_impl)
        self.shared_experts = (
            FeedForward(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_impl)
            if cfg.n_shared_experts > 0
            else None
        )
        # Routed-token counts since the last bias update (global expert ids), for balancing and metrics.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        scores_TE, topk_idx_TK, topk_w_TK = self.gate(x_TD)
        with torch.no_grad():
            # scatter_add_, not bincount: CUDA's bincount reads the max id back to the host (a sync)
            idx_N = topk_idx_TK.reshape(-1)
            self.tokens_per_expert.scatter_add_(0, idx_N, torch.ones_like(idx_N, dtype=self.tokens_per_expert.dtype))
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = sequence_aux_loss(
                scores_TE.view(B, S, -1), topk_idx_TK.view(B, S, -1), self.aux_loss_alpha
            )
        else:
            self.aux_loss = scores_TE.new_zeros(())
        out_TD = self.experts(x_TD, topk_idx_TK, topk_w_TK)
        out_BSD = out_TD.view(B, S, D)
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(x_BSD)
        return out_BSD


@torch.no_grad()
def update_router_bias_(moe: MoE, rate: float, tokens_per_expert: torch.Tensor | None = None) -> None:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones.

    ``tokens_per_expert`` is the load to balance (default: this module's own count); under data or
    expert parallelism the caller passes the count summed over ranks so that every rank agrees.
    """
    load = moe.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
    if rate > 0:  # a layer that routed nothing has load.mean() - load == 0: no change (and no sync to ask)
        moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
    moe.tokens_per_expert.zero_()
