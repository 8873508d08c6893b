"""FP8 (E4M3) storage of activations: 1 x 128 tiles along the last dim, an fp32 scale per tile.

    q, scale = quantize_tiles(x)              # x [..., D] -> q [..., D] float8_e4m3fn, scale [..., ceil(D/128)]
    x_hat = dequantize_tiles(q, scale, dtype)

Each tile is divided by its largest magnitude / 448 (E4M3's largest finite number), so its largest
element lands on 448 and every element keeps E4M3's relative precision (3 mantissa bits: within
2^-4 relative, 6.25%) down to 2^-9 of the tile's largest, whatever the tile's range: 470, 500,
1e4 and -1e4 come back within that precision, where an unscaled cast turns anything above 448 into
NaN. A tile of zeros gets scale 1. Non-finite inputs stay non-finite (the trainer's guard skips
such steps).

On CUDA the work is one Triton kernel per direction (one read, one write; each program a block of
32 rows by one tile); elsewhere plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128

ROWS = 32  # rows per program: a [32, 128] block (one tile of 32 rows), 32 elements per thread

if triton is not None:

    @triton.jit
    def _quantize_kernel(X, Q, S, N, D, NT, s_x, s_q, ROWS_: tl.constexpr, TILE_: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS_ + tl.arange(0, ROWS_)
        tile = tl.program_id(1)
        cols = tile * TILE_ + tl.arange(0, TILE_)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        # IEEE-rounded divisions (Triton's `/` is the approximate one): the same bits as torch
        scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
        q = tl.div_rn(x, scale[:, None]).to(Q.dtype.element_ty)
        tl.store(Q + rows[:, None] * s_q + cols[None, :], q, mask=mask)
        tl.store(S + rows * NT + tile, scale, mask=rows < N)

    @triton.jit
    def _dequantize_kernel(Q, S, X, N, D, NT, s_q, s_x, ROWS_: tl.constexpr, TILE_: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS_ + tl.arange(0, ROWS_)
        tile = tl.program_id(1)
        cols = tile * TILE_ + tl.arange(0, TILE_)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        q = tl.load(Q + rows[:, None] * s_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(S + rows * NT + tile, mask=rows < N, other=1.0)
        tl.store(X + rows[:, None] * s_x + cols[None, :], (q * scale[:, None]).to(X.dtype.element_ty), mask=mask)


def _triton_ok(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and t.numel() > 0


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(q [..., D] float8_e4m3fn, scale [..., ceil(D / 128)] fp32)``."""
    D = x.shape[-1]
    nt = -(-D // TILE)
    if _triton_ok(x):
        x2 = x.reshape(-1, D)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        q = torch.empty(x2.shape, device=x.device, dtype=E4M3)
        scale = torch.empty(x2.shape[0], nt, device=x.device, dtype=torch.float32)
        n = x2.shape[0]
        _quantize_kernel[(triton.cdiv(n, ROWS), nt)](x2, q, scale, n, D, nt, x2.stride(0), q.stride(0),
                                                      ROWS_=ROWS, TILE_=TILE, num_warps=4)
        return q.view(x.shape), scale.view(*x.shape[:-1], nt)
    t = F.pad(x.float(), (0, nt * TILE - D)).view(*x.shape[:-1], nt, TILE)
    amax = t.abs().amax(-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (t / scale.unsqueeze(-1)).to(E4M3).view(*x.shape[:-1], nt * TILE)[..., :D].contiguous()
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize_tiles`, in ``dtype``."""
    D = q.shape[-1]
    nt = scale.shape[-1]
    if _triton_ok(q):
        q2 = q.reshape(-1, D)
        x = torch.empty(q2.shape, device=q.device, dtype=dtype)
        n = q2.shape[0]
        _dequantize_kernel[(triton.cdiv(n, ROWS), nt)](q2, scale.reshape(-1, nt), x, n, D, nt, q2.stride(0), x.stride(0),
                                                        ROWS_=ROWS, TILE_=TILE, num_warps=4)
        return x.view(q.shape)
    t = F.pad(q.float(), (0, nt * TILE - D)).view(*q.shape[:-1], nt, TILE)
    return (t * scale.unsqueeze(-1)).view(*q.shape[:-1], nt * TILE)[..., :D].to(dtype)
