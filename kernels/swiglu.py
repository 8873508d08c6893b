"""Fused SwiGLU activation: h = silu(gate) * up, forward and backward in one pass each.

gate and up are [..., I] with unit stride in the last dim and any row stride, so the two halves of a
fused gate/up projection output ([N, 2I] sliced into [:, :I] and [:, I:]) need no copy. Math in
fp32, one rounding to the input dtype. Backward recomputes silu from the saved inputs instead of
saving h (the activation memory of the unfused version is three tensors, here two).

Without Triton, or for CPU tensors when Triton is not in interpreter mode (TRITON_INTERPRET=1),
the same math runs in plain torch (`swiglu_torch`).

`swiglu_bwd_from_tiles` serves the routed experts' backward under FP8 storage (kernels.moe,
``expert_mlp_saved``): from gate and up kept as FP8 tiles (kernels.fp8) and dh it makes h (for the
down projection's weight gradient), d gate and d up in one pass, where the unfused path
dequantizes both, recomputes h and runs the gradient formula as a dozen elementwise ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import interpreted as _interpreted, runs_on, tl, triton
from .fp8 import TILE, dequantize_tiles


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, H, C, s_g, s_u, s_h, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(H + row * s_h + cols, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(G, U, DH, DG, DU, C, s_g, s_u, s_dh, s_dg, s_du, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        g = tl.load(G + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + row * s_dh + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        # d silu/dg = sig * (1 + g * (1 - sig))
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(DG + row * s_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * s_du + cols, (dh * silu).to(DU.dtype.element_ty), mask=mask)


    @triton.jit
    def _swiglu_bwd_tiles_kernel(QG, SG, QU, SU, DH, H, DG, DU, C, NT, s_q, s_dh, s_h, s_dg, s_du,
                                 TILE_: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        tiles = row * NT + cols // TILE_
        # dequantized and rounded to the compute dtype, as dequantize_tiles gives them
        g = tl.load(QG + row * s_q + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(SG + tiles, mask=mask, other=1.0)
        u = tl.load(QU + row * s_q + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(SU + tiles, mask=mask, other=1.0)
        g = g.to(H.dtype.element_ty).to(tl.float32)
        u = u.to(H.dtype.element_ty).to(tl.float32)
        dh = tl.load(DH + row * s_dh + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(H + row * s_h + cols, (silu * u).to(H.dtype.element_ty), mask=mask)
        tl.store(DG + row * s_dg + cols, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * s_du + cols, (dh * silu).to(DU.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, C] with unit column stride, copying only if no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()


def _launch_cfg(C: int, kernel) -> tuple[int, int]:
    if _interpreted(kernel):
        return triton.next_power_of_2(min(C, 64)), 1
    block = min(triton.next_power_of_2(C), 2048)
    return block, max(1, min(8, block // 256))


# The kernels run as torch.library custom ops so that torch.compile keeps each launch as one opaque
# node (dynamo cannot trace a Triton launch inside an autograd.Function). Outputs are contiguous
# in gate's shape; the autograd saves gate and up as they came.
@torch.library.custom_op("k2kernels::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = _as_rows(gate), _as_rows(up)
    R, C = g2.shape
    h = torch.empty(R, C, device=gate.device, dtype=gate.dtype)
    block, warps = _launch_cfg(C, _swiglu_fwd_kernel)
    if R > 0:
        _swiglu_fwd_kernel[(R, triton.cdiv(C, block))](
            g2, u2, h, C, g2.stride(0), u2.stride(0), h.stride(0), BLOCK=block, num_warps=warps)
    return h.view(gate.shape)


@torch.library.custom_op("k2kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g2, u2, dh2 = _as_rows(gate), _as_rows(up), _as_rows(dh)
    R, C = g2.shape
    dg = torch.empty(R, C, device=gate.device, dtype=gate.dtype)
    du = torch.empty_like(dg)
    block, warps = _launch_cfg(C, _swiglu_bwd_kernel)
    if R > 0:
        _swiglu_bwd_kernel[(R, triton.cdiv(C, block))](
            g2, u2, dh2, dg, du, C, g2.stride(0), u2.stride(0), dh2.stride(0), dg.stride(0), du.stride(0),
            BLOCK=block, num_warps=warps)
    return dg.view(gate.shape), du.view(gate.shape)


@_swiglu_fwd.register_fake
def _swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


@_swiglu_bwd.register_fake
def _swiglu_bwd_fake(gate, up, dh):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    return _swiglu_bwd(*ctx.saved_tensors, dh)


_swiglu_fwd.register_autograd(_backward, setup_context=_save_inputs)


def triton_swiglu_available(t: torch.Tensor) -> bool:
    return triton is not None and runs_on(t, _swiglu_fwd_kernel)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference: silu(gate) * up in fp32, rounded once to gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused; differentiable in both. Same shape and dtype required."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if not triton_swiglu_available(gate):
        return swiglu_torch(gate, up)
    return _swiglu_fwd(gate, up)


def swiglu_grads_torch(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: d/dgate and d/dup of silu(gate) * up, in fp32, rounded once to gate's dtype."""
    g, u, d = gate.float(), up.float(), dh.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    return (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * silu).to(up.dtype)


def swiglu_grads(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dgate and d/dup of silu(gate) * up (no autograd: for backward functions of our own), fused
    where Triton runs."""
    if not triton_swiglu_available(gate):
        return swiglu_grads_torch(gate, up, dh)
    return _swiglu_bwd(gate, up, dh)


def swiglu_bwd_from_tiles(q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor, s_up: torch.Tensor,
                          dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, d gate, d up)`` in dh's dtype from gate and up as FP8 tiles (``kernels.fp8.quantize_tiles``:
    ``q [N, C]`` E4M3, ``s [N, ceil(C/128)]`` fp32) and ``dh [N, C]``: one pass where Triton runs,
    else :func:`kernels.fp8.dequantize_tiles`, :func:`swiglu_torch` and :func:`swiglu_grads_torch`."""
    if q_gate.shape != q_up.shape or dh.shape != q_gate.shape or s_gate.shape != s_up.shape:
        raise ValueError(f"swiglu_bwd_from_tiles: gate {tuple(q_gate.shape)}, up {tuple(q_up.shape)} and dh "
                         f"{tuple(dh.shape)} must match, and so must the scales {tuple(s_gate.shape)} / {tuple(s_up.shape)}")
    if triton is None or not runs_on(dh, _swiglu_bwd_tiles_kernel) or dh.dim() != 2:
        gate, up = dequantize_tiles(q_gate, s_gate, dh.dtype), dequantize_tiles(q_up, s_up, dh.dtype)
        return (swiglu_torch(gate, up), *swiglu_grads_torch(gate, up, dh))
    qg, qu, sg, su, dh = (t.contiguous() for t in (q_gate, q_up, s_gate, s_up, dh))
    R, C = dh.shape
    h, dg, du = (torch.empty_like(dh) for _ in range(3))
    block, warps = _launch_cfg(C, _swiglu_bwd_tiles_kernel)
    if R > 0:
        _swiglu_bwd_tiles_kernel[(R, triton.cdiv(C, block))](
            qg, sg, qu, su, dh, h, dg, du, C, sg.shape[1], qg.stride(0), dh.stride(0), h.stride(0), dg.stride(0),
            du.stride(0), TILE_=TILE, BLOCK=block, num_warps=warps)
    return h, dg, du
