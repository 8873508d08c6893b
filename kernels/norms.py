"""Fused RMSNorm with residual add: one pass over the row forward, one backward.

Shapes: T = rows (tokens), D = normalized dim.

    s = x + residual            (the new residual stream, in x's dtype, as the unfused model has it)
    y = s * rsqrt(mean(s^2) + eps) * weight      (statistics in fp32, one rounding at the end)

`rmsnorm_residual(x, residual, w, eps) -> (y, s)`; `rmsnorm(x, w, eps) -> y` is the same kernel
without the add. Backward takes gradients for both y and s (s feeds the next residual add) and
returns dx = dresidual = ds + dnorm(dy), and dweight.

Without Triton, or for CPU tensors when Triton is not in interpreter mode (TRITON_INTERPRET=1),
the same math runs in plain torch (`rmsnorm_residual_torch`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import interpreted as _interpreted, launch_tuned, runs_on, tl, triton


if triton is not None:

    @triton.jit
    def _rmsnorm_fwd_kernel(X, R, W, Y, S, RSTD, D, s_x, s_r, s_y, s_s, eps,
                            HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * s_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            # round the sum to the stream dtype first: the model's residual stream is stored so
            s = (x + tl.load(R + row * s_r + cols, mask=mask, other=0.0)).to(S.dtype.element_ty)
            tl.store(S + row * s_s + cols, s, mask=mask)
        else:
            s = x
        sf = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
        tl.store(RSTD + row, rstd)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * s_y + cols, (sf * rstd * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, DS, S, W, RSTD, DX, DW_PART, T, D, s_dy, s_ds, s_s, s_dx,
                            HAS_DS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """Each program does ROWS consecutive rows and writes its partial dweight (fp32)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            if row < T:
                s = tl.load(S + row * s_s + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * s_dy + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                n = s * rstd
                dn = dy * w
                dw += dy * n
                ds = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
                if HAS_DS:
                    ds += tl.load(DS + row * s_ds + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * s_dx + cols, ds.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * D + cols, dw, mask=mask)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# dx needs a whole-row reduction and dweight a column sum over rows: each program keeps a dweight
# row in registers over ROWS rows. Few fat programs starve the memory system (one row in flight per
# SM: 47% of copy bandwidth on an H200), many thin ones write large partial sums; timed per D.
_BWD_CONFIGS = ([triton.Config({"ROWS": r}, num_warps=w) for r in (4, 8, 16, 32) for w in (4, 8, 16)]
                if triton is not None else [])
_bwd_tuned = (triton.autotune(_BWD_CONFIGS, key=["D", "HAS_DS"])(_rmsnorm_bwd_kernel)
              if triton is not None and not _interpreted(_rmsnorm_bwd_kernel) else None)


def _bwd_launch(dy, ds, s, w, rstd, dx, T, D):
    BLOCK_D = triton.next_power_of_2(D)
    min_rows = 4 if _bwd_tuned is not None else 2
    dw_part = torch.empty(triton.cdiv(T, min_rows), D, device=s.device, dtype=torch.float32)
    args = (dy, ds if ds is not None else dy, s, w, rstd, dx, dw_part, T, D,
            dy.stride(0), ds.stride(0) if ds is not None else 0, s.stride(0), dx.stride(0))
    if _bwd_tuned is None:
        rows = min_rows
        _rmsnorm_bwd_kernel[(triton.cdiv(T, rows),)](*args, HAS_DS=ds is not None, BLOCK_D=BLOCK_D,
                                                      ROWS=rows, num_warps=1)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["ROWS"]),)  # noqa: E731
        ran = launch_tuned(_bwd_tuned, _rmsnorm_bwd_kernel, _BWD_CONFIGS[0], grid, *args, HAS_DS=ds is not None,
                           BLOCK_D=BLOCK_D)
        rows = ran.kwargs["ROWS"]
    return dw_part[: triton.cdiv(T, rows)].sum(0)


def _fwd_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(y, s, rstd) as [T, D], [T, D], [T]; s is x's rows when there is no residual."""
    D = x.shape[-1]
    x2 = _rows(x, D)
    has_res = residual is not None
    r2 = _rows(residual, D) if has_res else x2
    T = x2.shape[0]
    y = torch.empty(T, D, device=x.device, dtype=x.dtype)
    s = torch.empty(T, D, device=x.device, dtype=x.dtype) if has_res else x2
    rstd = torch.empty(T, device=x.device, dtype=torch.float32)
    interpret = _interpreted(_rmsnorm_fwd_kernel)
    BLOCK_D = triton.next_power_of_2(D)
    _rmsnorm_fwd_kernel[(T,)](
        x2, r2, weight, y, s, rstd, D, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), eps,
        HAS_RES=has_res, BLOCK_D=BLOCK_D,
        num_warps=1 if interpret else min(16, max(4, BLOCK_D // 512)))
    return y, s, rstd


# The kernels run as torch.library custom ops so that torch.compile keeps each launch as one opaque
# node (dynamo cannot trace a Triton launch inside an autograd.Function). Ops return fresh tensors
# only: without a residual, s is x itself, so that variant returns (y, rstd) and its autograd saves
# the input x. rstd has x's leading shape, y and s are contiguous in x's shape.
@torch.library.custom_op("k2kernels::rmsnorm_residual_fwd", mutates_args=())
def _rmsnorm_residual_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _fwd_launch(x, residual, weight, eps)
    return y.view(x.shape), s.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.custom_op("k2kernels::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _fwd_launch(x, None, weight, eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.custom_op("k2kernels::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dx = dresidual = ds + dnorm(dy), in s's shape and dtype."""
    D = s.shape[-1]
    s2 = _rows(s, D)
    T = s2.shape[0]
    dx = torch.empty(T, D, device=s.device, dtype=s.dtype)
    dw = _bwd_launch(_rows(dy, D), _rows(ds, D) if ds is not None else None, s2, weight, rstd.reshape(T), dx, T, D)
    return dx.view(s.shape), dw.to(weight.dtype)


@_rmsnorm_residual_fwd.register_fake
def _rmsnorm_residual_fwd_fake(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rmsnorm_fwd.register_fake
def _rmsnorm_fwd_fake(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rmsnorm_bwd.register_fake
def _rmsnorm_bwd_fake(dy, ds, s, weight, rstd):
    return s.new_empty(s.shape), weight.new_empty(weight.shape)


def _save_residual(ctx, inputs, output):
    _, s, rstd = output
    ctx.save_for_backward(s, inputs[2], rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # an unused s gets no zero-filled gradient


def _backward_residual(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dw = _rmsnorm_bwd(dy if dy is not None else torch.zeros_like(s), ds, s, weight, rstd)
    return dx, dx, dw, None


def _save_plain(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward_plain(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rmsnorm_bwd(dy, None, x, weight, rstd)
    return dx, dw, None


_rmsnorm_residual_fwd.register_autograd(_backward_residual, setup_context=_save_residual)
_rmsnorm_fwd.register_autograd(_backward_plain, setup_context=_save_plain)


def triton_norms_available(t: torch.Tensor) -> bool:
    return triton is not None and runs_on(t, _rmsnorm_fwd_kernel)


def rmsnorm_residual_torch(x, residual, weight, eps: float = 1e-6):
    """Reference: s = x + residual (x's dtype); y = weight * s / rms(s), statistics in fp32."""
    s = x + residual if residual is not None else x
    sf = s.float()
    y = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return (y, s) if residual is not None else y


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual), fused; differentiable in all three tensors."""
    if x.shape != residual.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm_residual: x {tuple(x.shape)}, residual {tuple(residual.shape)} and "
                         f"weight {tuple(weight.shape)} must be [..., D], [..., D], [D]")
    if not triton_norms_available(x):
        return rmsnorm_residual_torch(x, residual, weight, eps)
    y, s, _ = _rmsnorm_residual_fwd(x, residual, weight, float(eps))
    return y, s


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm(x) * weight over the last dim, fused; differentiable in x and weight."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} must match x's last dim {x.shape[-1]}")
    if not triton_norms_available(x):
        return rmsnorm_residual_torch(x, None, weight, eps)
    return _rmsnorm_fwd(x, weight, float(eps))[0]
