"""Muon's elementwise passes, fused: momentum + Nesterov + scale + half-precision cast into the
Newton-Schulz batch, and the decoupled-weight-decay update from the NS output.

Shapes: a Muon parameter is ``[R, C]`` or a stack ``[E, R, C]``; "matrix" is one ``[R, C]``. The NS
batch holds each matrix in its wide orientation (``[C, R]`` for a tall one), so the momentum kernel
writes through a strided (possibly transposed) view of the batch and the update kernel reads one.

Unfused (k2train.optim.muon), the same work reads and writes the fp32 tensors about 11 times
(lerp_, lerp, norm, scale, cast, concatenate; mul_, add_); fused, 3.5 times for the momentum side
(grad and buffer read, buffer written, the half NS input written: the input's scale, a power of two,
is predicted from the previous step, so no second pass waits for this step's norm) and 2.5 times for
the update, which is what an H200 sees at 1.2B parameters per layer slice.
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted, runs_on, tl, triton
from .adamw import skippable
from .newton_schulz import ns_input_target_norm, pow2_scale

if triton is not None:

    @triton.jit
    def _matrix_tile(R, C, BR: tl.constexpr, BC: tl.constexpr):
        """Grid (row tiles, column tiles, matrices): this program's matrix, rows, columns, mask."""
        m = tl.program_id(2).to(tl.int64)
        rr = tl.program_id(0) * BR + tl.arange(0, BR)
        rc = tl.program_id(1) * BC + tl.arange(0, BC)
        return m, rr, rc, (rr[:, None] < R) & (rc[None, :] < C)

    @triton.jit
    def _momentum_kernel(G, Buf, SumSq, Out, Hint, Skip, R, C, mu,
                         s_om, s_or, s_oc, NESTEROV: tl.constexpr, SKIP: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr):
        """Buf <- Buf + (1 - mu) (G - Buf); U = G + mu (Buf - G) (Nesterov) or Buf; SumSq[m] += sum U^2;
        and, when the matrix has a scale hint (Hint[m] > 0, a power of two), Out[m] = U * Hint[m] in
        Out's dtype. Out is addressed through strides (a transposed view for a tall matrix). With
        SKIP and Skip[0] set, every program returns at once."""
        if SKIP:
            if tl.load(Skip) != 0:
                return
        m, rr, rc, mask = _matrix_tile(R, C, BR, BC)
        src = m * R * C + rr[:, None] * C + rc[None, :]
        g = tl.load(G + src, mask=mask, other=0.0).to(tl.float32)
        buf = tl.load(Buf + src, mask=mask, other=0.0)
        buf = buf + (1.0 - mu) * (g - buf)
        tl.store(Buf + src, buf, mask=mask)
        if NESTEROV:
            u = g + mu * (buf - g)
        else:
            u = buf
        tl.atomic_add(SumSq + m, tl.sum(tl.sum(u * u, axis=1), axis=0))
        s = tl.load(Hint + m)
        dst = Out + m * s_om + rr[:, None] * s_or + rc[None, :] * s_oc
        if s > 0:
            tl.store(dst, (u * s).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _ns_input_fixup_kernel(G, Buf, Scale, Out, Hint, R, C, mu,
                               s_om, s_or, s_oc, NESTEROV: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """For a matrix whose hint is not this step's power of two Scale[m] (missing, changed, or not
        finite): Out[m] = U * Scale[m], U recomputed from G and the updated Buf. Every other program
        returns at once."""
        m = tl.program_id(2).to(tl.int64)
        p2 = tl.load(Scale + m)
        if tl.load(Hint + m) == p2:
            return
        m, rr, rc, mask = _matrix_tile(R, C, BR, BC)
        src = m * R * C + rr[:, None] * C + rc[None, :]
        buf = tl.load(Buf + src, mask=mask, other=0.0)
        if NESTEROV:
            g = tl.load(G + src, mask=mask, other=0.0).to(tl.float32)
            u = g + mu * (buf - g)
        else:
            u = buf
        dst = Out + m * s_om + rr[:, None] * s_or + rc[None, :] * s_oc
        tl.store(dst, (u * p2).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _update_kernel(W, O, P, Skip, R, C, decay, step,
                       s_om, s_or, s_oc, HAS_P: tl.constexpr, SKIP: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr):
        """W <- W * decay - step * O (fp32 W, O read through strides); P (the low-precision param
        whose master W is) <- W. With SKIP and Skip[0] set, every program returns at once."""
        if SKIP:
            if tl.load(Skip) != 0:
                return
        m, rr, rc, mask = _matrix_tile(R, C, BR, BC)
        dst = m * R * C + rr[:, None] * C + rc[None, :]
        o = tl.load(O + m * s_om + rr[:, None] * s_or + rc[None, :] * s_oc, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + dst, mask=mask, other=0.0)
        w = w * decay - step * o
        tl.store(W + dst, w, mask=mask)
        if HAS_P:
            tl.store(P + dst, w.to(P.dtype.element_ty), mask=mask)


def fused_muon_available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and runs_on(t, _momentum_kernel)


def _tiles(interp: bool) -> tuple[int, int]:
    return (16, 16) if interp else (32, 128)


def momentum_to_ns_input_(grad: torch.Tensor, buf: torch.Tensor, out: torch.Tensor, momentum: float,
                          nesterov: bool, scale_hint: torch.Tensor | None = None,
                          skip: torch.Tensor | None = None) -> None:
    """Update ``buf`` (fp32, ``grad``'s shape) in place with ``grad``, and write the NS input of every
    matrix, U scaled by a power of two and cast to ``out``'s dtype, into ``out`` (same shape, any
    strides, e.g. a transposed view of the NS batch). For fp16 the result is
    :func:`k2train.optim.muon.muon_momentum_` followed by :func:`k2train.optim.muon.ns_input_cast`
    (the same power of two; values up to fp32 rounding order); for bf16, where ns_input_cast is a plain
    cast, it differs from that by the power of two, which NS's own normalisation removes exactly.

    The power of two depends on this step's norm, which is known only once every entry has been
    read. ``scale_hint`` (fp32 ``[matrices]``, kept by the caller across steps; updated in place)
    predicts it with the last step's: the first kernel writes U times the hint while it updates the
    buffer, and a second kernel rewrites only the matrices whose power of two changed (or had none:
    zeros, the default), at one early exit per program for the rest: when the prediction holds, the
    grad and the buffer are read once. Whatever the hint, ``out`` is the same.

    ``skip`` (a bool scalar on the device): where set, ``buf`` keeps every bit (``out`` and the hint
    are scratch: what they then hold is not used)."""
    if not (grad.is_contiguous() and buf.is_contiguous() and buf.dtype == torch.float32):
        raise ValueError("momentum_to_ns_input_ needs a contiguous grad and a contiguous fp32 momentum buffer")
    if grad.shape != buf.shape or out.shape != grad.shape or grad.ndim not in (2, 3):
        raise ValueError(f"shapes differ or are not [R, C] / [E, R, C]: grad {tuple(grad.shape)}, "
                         f"buffer {tuple(buf.shape)}, out {tuple(out.shape)}")
    R, C = grad.shape[-2:]
    n = grad.numel() // (R * C)
    if scale_hint is None:
        scale_hint = torch.zeros(n, device=grad.device, dtype=torch.float32)
    if tuple(scale_hint.shape) != (n,) or scale_hint.dtype != torch.float32:
        raise ValueError(f"scale_hint must be fp32 [{n}] (one per matrix), got {scale_hint.dtype} {tuple(scale_hint.shape)}")
    interp = _interpreted(_momentum_kernel)
    sumsq = torch.zeros(n, device=grad.device, dtype=torch.float32)
    o3 = out if out.ndim == 3 else out.unsqueeze(0)
    BR, BC = _tiles(interp)
    grid = (triton.cdiv(R, BR), triton.cdiv(C, BC), n)
    _momentum_kernel[grid](grad, buf, sumsq, o3, scale_hint, skip.view(torch.uint8) if skip is not None else sumsq, R, C,
                           float(momentum), *o3.stride(), NESTEROV=nesterov, SKIP=skip is not None, BR=BR, BC=BC)
    scale = pow2_scale(sumsq.sqrt(), ns_input_target_norm(R, C))  # what ns_input_cast computes
    _ns_input_fixup_kernel[grid](grad, buf, scale, o3, scale_hint, R, C, float(momentum), *o3.stride(),
                                 NESTEROV=nesterov, BR=BR, BC=BC)
    scale_hint.copy_(scale)


def apply_update_(weight: torch.Tensor, ortho: torch.Tensor, lr: float, weight_decay: float, lr_scale: float,
                  param: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> None:
    """``W <- W (1 - lr wd) - lr lr_scale O`` in one pass (W contiguous fp32, O any strides and
    dtype), and ``param <- W`` in param's dtype when W is param's fp32 master copy. ``skip`` (a bool
    scalar on the device): where set, nothing is written."""
    if not weight.is_contiguous() or weight.dtype != torch.float32 or ortho.shape != weight.shape:
        raise ValueError(f"apply_update_ needs a contiguous fp32 weight and an update of its shape, got "
                         f"{tuple(weight.shape)} {weight.dtype} and {tuple(ortho.shape)}")
    if param is not None and (not param.is_contiguous() or param.shape != weight.shape):
        raise ValueError("the low-precision param must be contiguous and of the master's shape")
    R, C = weight.shape[-2:]
    n = weight.numel() // (R * C)
    o3 = ortho if ortho.ndim == 3 else ortho.unsqueeze(0)
    interp = _interpreted(_update_kernel)
    # the interpreter truncates fp32 -> bf16 instead of rounding to nearest: copy with torch there
    in_kernel = param is not None and not interp
    BR, BC = _tiles(interp)
    _update_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC), n)](
        weight, o3, param if in_kernel else weight, skip.view(torch.uint8) if skip is not None else weight, R, C,
        float(1 - lr * weight_decay), float(lr * lr_scale), *o3.stride(), HAS_P=in_kernel, SKIP=skip is not None,
        BR=BR, BC=BC)
    if param is not None and not in_kernel:
        with skippable(skip, param):
            param.copy_(weight)
