"""Rotary position embeddings for MLA's decoupled rope dims, with DeepSeek-V3 YaRN.

RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... of the 64 rope dims (the DeepSeek layout; HF
calls it ``rope_interleave=True``). YaRN (K2's long-context stage) blends interpolated and
extrapolated frequencies with a linear ramp between the beta_fast/beta_slow correction dims, and
changes the softmax scale by mscale(factor, mscale_all_dim)^2 (see :func:`softmax_scale`).
"""

import math

import torch

from ..config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs.type == "yarn" and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] (fp32) and the cos/sin magnitude (YaRN attention factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # extrapolate the high-frequency dims (ramp=0), interpolate the low-frequency ones (ramp=1)
    inv_freq = inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)
    attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return inv_freq, attention_factor


def rope_table(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_position_embeddings, dr/2] (fp32, YaRN's magnitude included) of every
    position the model accepts; the model gathers its positions' rows from them."""
    inv_freq, attention_factor = rope_inv_freq(cfg)
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim of x [B, H, S, dr] (or [B, 1, S, dr]); cos/sin [B, S, dr/2]
    (rows of :func:`rope_table`).

    The output lists the rotated even dims, then the rotated odd dims. q and k use the same
    permutation, so every dot product q.k equals the one of the interleaved layout.
    """
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
