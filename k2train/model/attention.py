"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2) with per-head max-logit tracking.

Legend: B batch, S sequence, D hidden, H heads (held locally), dn/dr/dv nope/rope/value head dims.
Queries go through a low-rank bottleneck (q_a -> norm -> q_b). Keys and values come from one
compressed latent (kv_a -> norm -> kv_b) plus a single rope key of dr dims shared by every head,
produced by the last dr rows of kv_a_proj_with_mqa.

QK-Clip needs S_h = max over all (query, key) pairs of the scaled logit, per head: every forward
folds its maximum into the ``max_logit`` buffer, which the optimizer reads and resets each step.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.attention import mla_attention
from .norms import RMSNorm
from .rope import apply_rope, softmax_scale


def attention_mask(seq_len: int, doc_ids: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, S, S], True where a query may attend (causal, same document)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, doc_ids: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with explicit logits; returns (out [B,H,S,dv], max_logit [H] fp32)."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    mask = attention_mask(q.shape[2], doc_ids, q.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    max_logit = logits.detach().amax(dim=(0, 2, 3))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.matmul(probs, v), max_logit


@torch.no_grad()
def max_logit_chunked(
    q: torch.Tensor, k: torch.Tensor, scale: float, doc_ids: Optional[torch.Tensor] = None, chunk: int = 1024
) -> torch.Tensor:
    """Per-head max scaled logit without materializing [S, S] for all queries at once."""
    S = q.shape[2]
    out = torch.full((q.shape[1],), float("-inf"), device=q.device)
    for start in range(0, S, chunk):
        end = min(start + chunk, S)
        logits = torch.matmul(q[:, :, start:end], k[:, :, :end].transpose(-1, -2)).float() * scale
        mask = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(diagonal=start)[None, None]
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, start:end, None] == doc_ids[:, None, None, :end])
        out = torch.maximum(out, logits.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3)))
    return out


class AttentionCore(nn.Module):
    """softmax(q k^T * scale) v under the causal (and document) mask, and the per-head max scaled
    logit QK-Clip needs: q, k [B, H, S, dqk], v [B, H, S, dv] -> (out [B, H, S, dv], max_logit [H]
    fp32). A module of its own (no parameters) so that context parallelism can wrap it from outside
    (k2train/parallel/context_parallel.py); ``doc_ids`` [B, S] covers the whole sequence."""

    def __init__(self, impl: str, softmax_scale: float):
        super().__init__()
        self.impl = impl
        self.softmax_scale = softmax_scale

    def forward(self, q, k, v, doc_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.impl == "triton":
            return mla_attention(q, k, v, self.softmax_scale, causal=True, doc_ids=doc_ids)
        if self.impl == "sdpa":
            mask = None if doc_ids is None else attention_mask(q.shape[2], doc_ids, q.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=doc_ids is None, scale=self.softmax_scale
            )
            return out, max_logit_chunked(q, k, self.softmax_scale, doc_ids)
        return attention_reference(q, k, v, self.softmax_scale, doc_ids)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, scale={self.softmax_scale:.4g}"


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = softmax_scale(cfg)
        self.core = AttentionCore(cfg.attn_impl, self.softmax_scale)
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        D, H = cfg.hidden_size, cfg.num_attention_heads

        self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.norm_impl)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, cfg.norm_impl)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.register_buffer("max_logit", torch.full((H,), float("-inf")), persistent=False)

    def reset_max_logit(self) -> None:
        self.max_logit.fill_(float("-inf"))

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim

        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        # -1 heads: under tensor parallelism q_b/kv_b hold only this rank's heads.
        q = q.view(B, S, -1, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)

        kv_latent, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent))
        kv = kv.view(B, S, -1, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        # the attention keeps v for its backward: a view would keep kv_b's whole output (k_nope too)
        v = v.contiguous()
        H = q.shape[1]

        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.view(B, 1, S, dr), cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, dr)), dim=-1)

        out, max_logit = self.core(q, k, v, doc_ids)

        with torch.no_grad():
            torch.maximum(self.max_logit, max_logit.to(self.max_logit.dtype), out=self.max_logit)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * dv))
