"""The routed-expert path of a MoE layer: permute, grouped GEMMs, fused SwiGLU, weighted combine.

Legend: T tokens, D hidden, E experts, I expert hidden, K experts per token, N = T*K routed rows
(in expert order).

    route   = build_routing(topk_idx_TK, E)      # stable sort of the (token, slot) pairs by expert
    x_ND    = permute(x_TD, route.pos_TK)        # Triton: each token row read once, written K times
    gate/up = grouped_linear(x_ND, w_{gate,up}_EID, route.offs_E)   # torch._grouped_mm (CUTLASS); one backward
                                                 # with the permute: their dx summed in its gather
    h_NI    = swiglu(gate, up)                   # Triton, fused fwd/bwd
    y_ND    = grouped_linear(h_NI, w_down_EDI, route.offs_E)
    y_TD    = combine(y_ND, topk_w_TK, route.pos_TK)  # Triton: sum_k w[t,k] * y[pos[t,k]], no atomics

Backward of permute is a gather-sum (combine with unit weights); backward of combine writes
dy[pos[t,k]] = w[t,k] * dout[t] and dw[t,k] = <dout[t], y[pos[t,k]]>. Every index map is a
permutation, so no kernel needs atomics and results are deterministic.

Without Triton (or CPU tensors outside TRITON_INTERPRET=1) permute/combine run as torch gathers;
without a usable torch._grouped_mm (CUDA needs bf16 on sm90+, CPU needs torch >= 2.13) the GEMMs
run as a per-expert loop.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .fp8 import E4M3, TILE, dequantize_tiles, quantize_tiles
from .swiglu import swiglu, swiglu_bwd_from_tiles, swiglu_grads

from ._triton import interpreted as _interpreted, runs_on, tl, triton


if triton is not None:

    @triton.jit
    def _scatter_rows_kernel(X, POS, XP, D, s_x, s_xp, K: tl.constexpr, BLOCK: tl.constexpr):
        """XP[pos[t, k]] = X[t] for every k: the permute forward."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + t * s_x + cols, mask=mask)
        for k in tl.static_range(K):
            p = tl.load(POS + t * K + k).to(tl.int64)
            tl.store(XP + p * s_xp + cols, x, mask=mask)

    @triton.jit
    def _gather_sum_kernel(Y, Y2, POS, W, OUT, D, s_y, s_y2, s_out, K: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_Y2: tl.constexpr, BLOCK: tl.constexpr):
        """OUT[t] = sum_k w[t, k] * (Y[pos[t, k]] (+ Y2[pos[t, k]])) (fp32 sum): combine forward,
        permute backward (with Y2: of two GEMMs that read the permuted rows, summed here)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            p = tl.load(POS + t * K + k).to(tl.int64)
            y = tl.load(Y + p * s_y + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_Y2:
                y += tl.load(Y2 + p * s_y2 + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                y = y * tl.load(W + t * K + k).to(tl.float32)
            acc += y
        tl.store(OUT + t * s_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(DOUT, Y, POS, W, DY, DW, D, s_dout, s_y, s_dy,
                            K: tl.constexpr, BLOCK: tl.constexpr):
        """DY[pos[t,k]] = w[t,k] * DOUT[t];  DW[t,k] = <DOUT[t], Y[pos[t,k]]>, one token per program.

        The token's dout row is re-read once per k; at D = 7168 it stays in L1/L2 between reads."""
        t = tl.program_id(0).to(tl.int64)
        for k in tl.static_range(K):
            p = tl.load(POS + t * K + k).to(tl.int64)
            w = tl.load(W + t * K + k).to(tl.float32)
            dot = tl.zeros((BLOCK,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK):
                cols = d0 + tl.arange(0, BLOCK)
                mask = cols < D
                g = tl.load(DOUT + t * s_dout + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.load(Y + p * s_y + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DY + p * s_dy + cols, (w * g).to(DY.dtype.element_ty), mask=mask)
                dot += g * y
            tl.store(DW + t * K + k, tl.sum(dot, axis=0))


class Routing(NamedTuple):
    """Where each (token, slot) pair goes: pos_TK[t, k] is its row in expert order; offs_E the
    cumulative row counts per expert (int32, torch._grouped_mm's offs); order_N the (token, slot)
    pair (flat index t*K + k) of each expert-ordered row, the inverse of pos_TK."""
    pos_TK: torch.Tensor
    offs_E: torch.Tensor
    order_N: torch.Tensor

    @property
    def token_N(self) -> torch.Tensor:
        """The source token of each expert-ordered row."""
        return self.order_N // self.pos_TK.shape[1]


def build_routing(topk_idx_TK: torch.Tensor, num_experts: int) -> Routing:
    """Stable sort of the T*K pairs by expert (tokens keep their order inside an expert)."""
    T, K = topk_idx_TK.shape
    flat_N = topk_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    pos_N = torch.empty_like(order_N)
    pos_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device)
    # searchsorted, not bincount: CUDA bincount syncs with the host to size its output
    sorted_N = flat_N[order_N]
    experts_E = torch.arange(num_experts, device=flat_N.device, dtype=sorted_N.dtype)
    offs_E = torch.searchsorted(sorted_N, experts_E, right=True).to(torch.int32)
    return Routing(pos_N.view(T, K).to(torch.int32), offs_E, order_N)


def triton_moe_available(t: torch.Tensor) -> bool:
    """Whether the permute/combine kernels run on ``t``'s device here (CUDA, or CPU under
    TRITON_INTERPRET=1)."""
    return triton is not None and runs_on(t, _gather_sum_kernel)


def _block(D: int, kernel) -> tuple[int, int]:
    if _interpreted(kernel):
        return triton.next_power_of_2(min(D, 64)), 1
    block = min(triton.next_power_of_2(D), 2048)
    return block, max(1, min(8, block // 256))


def _gather_sum(y_ND, pos_TK, w_TK, y2_ND=None):
    """out[t] = sum_k w[t, k] * (y + y2)[pos[t, k]] (unit weights without w, no y2 without it) in
    y's dtype, [T, D]."""
    has_y2 = y2_ND is not None
    y_ND = y_ND.contiguous()
    y2_ND = y2_ND.contiguous() if has_y2 else y_ND
    T, K = pos_TK.shape
    D = y_ND.shape[1]
    out = torch.empty(T, D, device=y_ND.device, dtype=y_ND.dtype)
    block, warps = _block(D, _gather_sum_kernel)
    if T > 0:
        _gather_sum_kernel[(T, triton.cdiv(D, block))](
            y_ND, y2_ND, pos_TK, w_TK if w_TK is not None else pos_TK, out, D, y_ND.stride(0), y2_ND.stride(0),
            out.stride(0), K=K, HAS_W=w_TK is not None, HAS_Y2=has_y2, BLOCK=block, num_warps=warps)
    return out


# The kernels run as torch.library custom ops so that torch.compile keeps each launch as one opaque
# node (dynamo cannot trace a Triton launch inside an autograd.Function). All index maps are
# [T, K] and every output has a shape known from the inputs' shapes, so nothing here syncs with
# the host or gives a compiled graph a data-dependent shape.
@torch.library.custom_op("k2kernels::moe_permute", mutates_args=())
def _permute_op(x_TD: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    K = pos_TK.shape[1]
    x_ND = torch.empty(T * K, D, device=x_TD.device, dtype=x_TD.dtype)
    block, warps = _block(D, _scatter_rows_kernel)
    if T > 0:
        _scatter_rows_kernel[(T, triton.cdiv(D, block))](
            x_TD, pos_TK, x_ND, D, x_TD.stride(0), x_ND.stride(0), K=K, BLOCK=block, num_warps=warps)
    return x_ND


@torch.library.custom_op("k2kernels::moe_permute_bwd", mutates_args=())
def _permute_bwd_op(dx_ND: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """dx_TD: each token's K row gradients summed (a gather, no atomics)."""
    return _gather_sum(dx_ND, pos_TK, None)


@torch.library.custom_op("k2kernels::moe_permute_bwd_sum", mutates_args=())
def _permute_bwd_sum_op(dx_a_ND: torch.Tensor, dx_b_ND: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """dx_TD of permuted rows read by two GEMMs (the experts' gate and up projections): each
    token's K row gradients of both summed in one pass, without their sum [N, D] in between."""
    return _gather_sum(dx_a_ND, pos_TK, None, dx_b_ND)


@torch.library.custom_op("k2kernels::moe_combine", mutates_args=())
def _combine_op(y_ND: torch.Tensor, w_TK: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    return _gather_sum(y_ND, pos_TK, w_TK.contiguous())


@torch.library.custom_op("k2kernels::moe_combine_bwd", mutates_args=())
def _combine_bwd_op(dout_TD: torch.Tensor, y_ND: torch.Tensor, w_TK: torch.Tensor,
                    pos_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_ND, dw_TK): dy[pos[t,k]] = w[t,k] * dout[t], dw[t,k] = <dout[t], y[pos[t,k]]>."""
    dout_TD, y_ND, w_TK = dout_TD.contiguous(), y_ND.contiguous(), w_TK.contiguous()
    T, K = pos_TK.shape
    N, D = y_ND.shape
    dy_ND = torch.empty(N, D, device=y_ND.device, dtype=y_ND.dtype)
    dw_TK = torch.empty(T, K, device=y_ND.device, dtype=torch.float32)
    block, warps = _block(D, _combine_bwd_kernel)
    if T > 0:
        _combine_bwd_kernel[(T,)](dout_TD, y_ND, pos_TK, w_TK, dy_ND, dw_TK, D,
                                  dout_TD.stride(0), y_ND.stride(0), dy_ND.stride(0),
                                  K=K, BLOCK=block, num_warps=warps)
    return dy_ND, dw_TK.to(w_TK.dtype)


@_permute_op.register_fake
def _permute_fake(x_TD, pos_TK):
    return x_TD.new_empty(pos_TK.shape[0] * pos_TK.shape[1], x_TD.shape[1])


@_permute_bwd_op.register_fake
def _permute_bwd_fake(dx_ND, pos_TK):
    return dx_ND.new_empty(pos_TK.shape[0], dx_ND.shape[1])


@_permute_bwd_sum_op.register_fake
def _permute_bwd_sum_fake(dx_a_ND, dx_b_ND, pos_TK):
    return dx_a_ND.new_empty(pos_TK.shape[0], dx_a_ND.shape[1])


@_combine_op.register_fake
def _combine_fake(y_ND, w_TK, pos_TK):
    return y_ND.new_empty(pos_TK.shape[0], y_ND.shape[1])


@_combine_bwd_op.register_fake
def _combine_bwd_fake(dout_TD, y_ND, w_TK, pos_TK):
    return y_ND.new_empty(y_ND.shape), w_TK.new_empty(pos_TK.shape)


def _save_pos(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, dx_ND):
    (pos_TK,) = ctx.saved_tensors
    return _permute_bwd_op(dx_ND, pos_TK), None


def _save_combine_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, dout_TD):
    y_ND, w_TK, pos_TK = ctx.saved_tensors
    dy_ND, dw_TK = _combine_bwd_op(dout_TD, y_ND, w_TK, pos_TK)
    return dy_ND, dw_TK, None


_permute_op.register_autograd(_permute_backward, setup_context=_save_pos)
_combine_op.register_autograd(_combine_backward, setup_context=_save_combine_inputs)


def permute(x_TD: torch.Tensor, routing: Routing, impl: str = "auto") -> torch.Tensor:
    """Rows of x in expert order [N, D] (row pos_TK[t, k] is a copy of token t); differentiable.
    ``impl``: "auto" (Triton where it runs), "torch". Both are deterministic: the torch version
    gathers each of the K copies once (a permutation), so its backward has no colliding writes
    and sums a token's K gradients in slot order."""
    if impl == "auto" and triton_moe_available(x_TD):
        return _permute_op(x_TD, routing.pos_TK)
    K = routing.pos_TK.shape[1]
    return x_TD.repeat_interleave(K, dim=0)[routing.order_N]


def combine(y_ND: torch.Tensor, topk_w_TK: torch.Tensor, routing: Routing, impl: str = "auto") -> torch.Tensor:
    """out[t] = sum_k w[t, k] * y[pos[t, k]] in y's dtype (fp32 sum); differentiable in y and w.
    Deterministic, as :func:`permute` (``impl`` likewise)."""
    if impl == "auto" and triton_moe_available(y_ND):
        return _combine_op(y_ND, topk_w_TK, routing.pos_TK)
    T, K = routing.pos_TK.shape
    y_TKD = y_ND[routing.pos_TK.reshape(-1).long()].view(T, K, -1)
    return (y_TKD.float() * topk_w_TK.float().unsqueeze(-1)).sum(1).to(y_ND.dtype)


def grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """Row block e of x (rows offs[e-1]:offs[e]) times w[e]^T: [N, I] x [E, O, I] -> [N, O].
    ``use_grouped_mm``: whether ``torch._grouped_mm`` runs these operands here (the caller's rule;
    otherwise a per-expert loop)."""
    if use_grouped_mm:
        return torch._grouped_mm(x_ND, w_EOI.transpose(1, 2), offs=offs_E)
    return _grouped_linear_loop(x_ND, w_EOI, offs_E)


def grouped_weight_grad(x_NI: torch.Tensor, dy_NO: torch.Tensor, offs_E: torch.Tensor, num_experts: int,
                        use_grouped_mm: bool) -> torch.Tensor:
    """Per expert e, dy_e^T x_e over its rows (offs[e-1]:offs[e]): the weight gradient [E, O, I] of
    :func:`grouped_linear`."""
    if use_grouped_mm:
        return torch._grouped_mm(dy_NO.t(), x_NI, offs=offs_E)
    return _grouped_weight_grad_loop(x_NI, dy_NO, offs_E, num_experts)


# The per-expert loops are the fallback for machines without grouped_mm, not a fast path: each call
# reads the offsets back to the host (a sync). As custom ops they keep that sync and the
# data-dependent slice sizes out of a compiled graph, which then sees one node of known shape
# instead of breaking at the ``tolist``.
@torch.library.custom_op("k2kernels::grouped_linear_loop", mutates_args=())
def _grouped_linear_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    bounds = [0] + offs_E.tolist()
    return torch.cat([x_NI[bounds[e]:bounds[e + 1]] @ w_EOI[e].T for e in range(w_EOI.shape[0])])


@torch.library.custom_op("k2kernels::grouped_weight_grad_loop", mutates_args=())
def _grouped_weight_grad_loop(x_NI: torch.Tensor, dy_NO: torch.Tensor, offs_E: torch.Tensor,
                              num_experts: int) -> torch.Tensor:
    bounds = [0] + offs_E.tolist()
    return torch.stack([dy_NO[bounds[e]:bounds[e + 1]].t() @ x_NI[bounds[e]:bounds[e + 1]] for e in range(num_experts)])


@_grouped_linear_loop.register_fake
def _grouped_linear_loop_fake(x_NI, w_EOI, offs_E):
    return x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])


@_grouped_weight_grad_loop.register_fake
def _grouped_weight_grad_loop_fake(x_NI, dy_NO, offs_E, num_experts):
    return x_NI.new_empty(num_experts, dy_NO.shape[1], x_NI.shape[1])


def _save_loop_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_linear_loop_backward(ctx, dy_NO):
    x_NI, w_EOI, offs_E = ctx.saved_tensors
    dx = _grouped_linear_loop(dy_NO, w_EOI.transpose(1, 2), offs_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_weight_grad_loop(x_NI, dy_NO, offs_E, w_EOI.shape[0]) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_linear_loop.register_autograd(_grouped_linear_loop_backward, setup_context=_save_loop_inputs)


# The routed experts' SwiGLU MLP on expert-ordered rows, keeping for the backward only the expert
# input and the SwiGLU inputs (gate, up), as FP8 in 1 x 128 tiles (kernels.fp8), and the weights
# themselves (not their compute-dtype copies). The backward dequantizes them and recomputes the
# SwiGLU. Compute stays in the input's dtype; only what is stored is FP8.
#
# Custom ops, forward and backward each opaque to torch.compile: what the backward keeps is then
# exactly this, not what the compiler's partitioner would choose. An op returns no alias of its
# inputs, so the forward returns what is kept as extra outputs (y, qx, sx, qg, sg, qu, su): the FP8
# tiles and their scales with ``fp8``; without, gate and up as they are, empty placeholders for the
# scales and for x, which the autograd keeps as the input itself.
@torch.library.custom_op("k2kernels::expert_mlp_saved_fwd", mutates_args=())
def _expert_mlp_fwd(x_ND: torch.Tensor, w_gate_EID: torch.Tensor, w_up_EID: torch.Tensor, w_down_EDI: torch.Tensor,
                    offs_E: torch.Tensor, use_grouped_mm: bool, fp8: bool,
                    pos_TK: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    if pos_TK is not None:  # x is x_TD: the permute runs here (and its backward with this op's)
        x_ND = _permute_op(x_ND, pos_TK)
    dt = x_ND.dtype
    wg, wu, wd = (w.to(dt) for w in (w_gate_EID, w_up_EID, w_down_EDI))
    gate = grouped_linear(x_ND, wg, offs_E, use_grouped_mm)
    up = grouped_linear(x_ND, wu, offs_E, use_grouped_mm)
    # contiguous, as the fake says: torch._grouped_mm pads its output rows to 16 bytes
    y = grouped_linear(swiglu(gate, up), wd, offs_E, use_grouped_mm).contiguous()
    if fp8:
        return (y, *quantize_tiles(x_ND), *quantize_tiles(gate), *quantize_tiles(up))
    empty = x_ND.new_empty(0)
    kept_x = x_ND if pos_TK is not None else empty  # else the autograd keeps the input x_ND itself
    return y, kept_x, empty.clone(), gate.contiguous(), empty.clone(), up.contiguous(), empty.clone()


@torch.library.custom_op("k2kernels::expert_mlp_saved_bwd", mutates_args=())
def _expert_mlp_bwd(dy_ND: torch.Tensor, x: torch.Tensor, x_scale: Optional[torch.Tensor], gate: torch.Tensor,
                    gate_scale: Optional[torch.Tensor], up: torch.Tensor, up_scale: Optional[torch.Tensor],
                    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offs_E: torch.Tensor,
                    use_grouped_mm: bool,
                    pos_TK: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate, dw_up, dw_down); x, gate and up are FP8 tiles where their scales are given.
    With ``pos_TK`` (the forward permuted x_TD itself) dx is x_TD's: the gate and up input
    gradients summed where each token's K rows are gathered, with no [N, D] sum in between.

    Under autocast the weights are fp32 and the compute bf16: each weight's bf16 copy lives only
    around its own GEMM and each weight gradient leaves in the weight's dtype as soon as it is made,
    so one copy and one bf16 gradient exist at a time (not three of each beside the fp32 ones)."""
    dt, ugm = dy_ND.dtype, use_grouped_mm
    dy_ND = dy_ND.contiguous()
    E = w_gate.shape[0]
    dh = grouped_linear(dy_ND, w_down.to(dt).transpose(1, 2), offs_E, ugm)
    if gate_scale is not None:  # FP8 tiles: dequantize, SwiGLU and its gradients in one pass
        h, dgate, dup = swiglu_bwd_from_tiles(gate, gate_scale, up, up_scale, dh)
    else:
        h = swiglu(gate, up)
        dgate, dup = swiglu_grads(gate, up, dh)
    del dh
    dw_down = grouped_weight_grad(h, dy_ND, offs_E, E, ugm).to(w_down.dtype)
    del h
    if x_scale is not None:
        x = dequantize_tiles(x, x_scale, dt)
    dw_gate = grouped_weight_grad(x, dgate, offs_E, E, ugm).to(w_gate.dtype)
    dw_up = grouped_weight_grad(x, dup, offs_E, E, ugm).to(w_up.dtype)
    del x
    dx_gate = grouped_linear(dgate, w_gate.to(dt).transpose(1, 2), offs_E, ugm)
    dx_up = grouped_linear(dup, w_up.to(dt).transpose(1, 2), offs_E, ugm)
    dx = _gather_sum(dx_gate, pos_TK, None, dx_up) if pos_TK is not None else dx_gate + dx_up
    return tuple(t.contiguous() for t in (dx, dw_gate, dw_up, dw_down))


@_expert_mlp_fwd.register_fake
def _expert_mlp_fwd_fake(x_ND, w_gate_EID, w_up_EID, w_down_EDI, offs_E, use_grouped_mm, fp8, pos_TK=None):
    N, D = (pos_TK.numel(), x_ND.shape[1]) if pos_TK is not None else x_ND.shape
    I = w_gate_EID.shape[1]
    y = x_ND.new_empty(N, D)
    if not fp8:
        kept_x = x_ND.new_empty(N, D) if pos_TK is not None else x_ND.new_empty(0)
        return y, kept_x, x_ND.new_empty(0), x_ND.new_empty(N, I), x_ND.new_empty(0), x_ND.new_empty(N, I), \
            x_ND.new_empty(0)
    kept = []
    for width in (D, I, I):
        kept += [x_ND.new_empty(N, width, dtype=E4M3), x_ND.new_empty(N, -(-width // TILE), dtype=torch.float32)]
    return (y, *kept)


@_expert_mlp_bwd.register_fake
def _expert_mlp_bwd_fake(dy_ND, x, x_scale, gate, gate_scale, up, up_scale, w_gate, w_up, w_down, offs_E,
                         use_grouped_mm, pos_TK=None):
    rows = pos_TK.shape[0] if pos_TK is not None else dy_ND.shape[0]
    return (dy_ND.new_empty(rows, w_gate.shape[2]), w_gate.new_empty(w_gate.shape),
            w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape))


def _save_expert_mlp(ctx, inputs, output):
    x_ND, w_gate, w_up, w_down, offs_E, use_grouped_mm, fp8, pos_TK = inputs
    _, qx, sx, qg, sg, qu, su = output
    if not fp8 and pos_TK is None:
        qx = x_ND
    ctx.save_for_backward(qx, sx, qg, sg, qu, su, w_gate, w_up, w_down, offs_E, pos_TK)
    ctx.use_grouped_mm, ctx.fp8 = use_grouped_mm, fp8
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for what is kept


def _expert_mlp_backward(ctx, dy_ND, *_kept):
    qx, sx, qg, sg, qu, su, w_gate, w_up, w_down, offs_E, pos_TK = ctx.saved_tensors
    if not ctx.fp8:
        sx = sg = su = None
    dx, dw_gate, dw_up, dw_down = _expert_mlp_bwd(dy_ND, qx, sx, qg, sg, qu, su, w_gate, w_up, w_down, offs_E,
                                                  ctx.use_grouped_mm, pos_TK)
    return dx, dw_gate, dw_up, dw_down, None, None, None, None


_expert_mlp_fwd.register_autograd(_expert_mlp_backward, setup_context=_save_expert_mlp)


def expert_mlp_saved(x_ND: torch.Tensor, w_gate_EID: torch.Tensor, w_up_EID: torch.Tensor, w_down_EDI: torch.Tensor,
                     offs_E: torch.Tensor, use_grouped_mm: bool, fp8: bool = True,
                     pos_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """down_e(silu(gate_e(x)) * up_e(x)) on expert-ordered rows [N, D] (rows offs[e-1]:offs[e] of
    expert e), differentiable in x and the three weights, keeping only x, gate and up for the
    backward: as FP8 tiles with ``fp8`` (``parallel.fp8_moe_inputs``), else as they are. With
    ``pos_TK`` (Triton only) x is the tokens [T, D] and the op permutes them itself (``permute``),
    so that its backward sums the gate and up input gradients in the permute's gather."""
    return _expert_mlp_fwd(x_ND, w_gate_EID, w_up_EID, w_down_EDI, offs_E, use_grouped_mm, fp8, pos_TK)[0]


def moe_experts_forward(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                        w_gate_EID: torch.Tensor, w_up_EID: torch.Tensor,
                        w_down_EDI: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_idx[t,k]; returns [T, D].

    Same function as the per-expert loop `k2train.model.moe.experts_reference`; differentiable in
    x, topk_w and the three weights (stacked nn.Linear-style, out x in). ``use_grouped_mm``: the
    expert GEMMs as ``torch._grouped_mm`` (the model decides where that runs: CUDA bf16 on sm90+,
    CPU with torch >= 2.13), else a loop over experts."""
    E, I, D = w_gate_EID.shape
    if x_TD.dim() != 2 or x_TD.shape[1] != D or w_up_EID.shape != (E, I, D) or w_down_EDI.shape != (E, D, I):
        raise ValueError(f"moe_experts_forward: x {tuple(x_TD.shape)} must be [T, {D}] and w_up "
                         f"{tuple(w_up_EID.shape)} / w_down {tuple(w_down_EDI.shape)} must be [E, I, D] / [E, D, I]")
    if topk_idx_TK.shape != topk_w_TK.shape or topk_idx_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"moe_experts_forward: topk_idx {tuple(topk_idx_TK.shape)} and topk_w "
                         f"{tuple(topk_w_TK.shape)} must both be [T={x_TD.shape[0]}, K]")
    if torch.is_autocast_enabled(x_TD.device.type):
        # autocast does not cover torch._grouped_mm: cast as it would for F.linear
        dt = torch.get_autocast_dtype(x_TD.device.type)
        x_TD, w_gate_EID, w_up_EID, w_down_EDI = (t.to(dt) for t in (x_TD, w_gate_EID, w_up_EID, w_down_EDI))
    with torch.no_grad():
        routing = build_routing(topk_idx_TK, E)
    if triton_moe_available(x_TD):
        gate, up = _PermuteGateUp.apply(x_TD, routing.pos_TK, routing.offs_E, w_gate_EID, w_up_EID, use_grouped_mm)
    else:
        x_ND = permute(x_TD, routing)
        gate = grouped_linear(x_ND, w_gate_EID, routing.offs_E, use_grouped_mm)
        up = grouped_linear(x_ND, w_up_EID, routing.offs_E, use_grouped_mm)
    y_ND = grouped_linear(swiglu(gate, up), w_down_EDI, routing.offs_E, use_grouped_mm)
    return combine(y_ND, topk_w_TK, routing)


class _PermuteGateUp(torch.autograd.Function):
    """(gate, up) = (x_ND w_gate_e^T, x_ND w_up_e^T) with x_ND = permute(x_TD): the same ops as
    :func:`permute` and two :func:`grouped_linear` (each still seen by selective recompute's policy
    and by torch.compile), with one backward for the three. The input gradients of the two GEMMs
    are summed where the permute's backward gathers each token's K rows (``moe_permute_bwd_sum``),
    instead of autograd adding them into an [N, D] tensor first: one pass over 3 x [N, D] less."""

    @staticmethod
    def forward(ctx, x_TD, pos_TK, offs_E, w_gate_EID, w_up_EID, use_grouped_mm):
        x_ND = _permute_op(x_TD, pos_TK)
        gate = grouped_linear(x_ND, w_gate_EID, offs_E, use_grouped_mm)
        up = grouped_linear(x_ND, w_up_EID, offs_E, use_grouped_mm)
        ctx.save_for_backward(x_ND, pos_TK, offs_E, w_gate_EID, w_up_EID)
        ctx.use_grouped_mm = use_grouped_mm
        return gate, up

    @staticmethod
    def backward(ctx, dgate_NI, dup_NI):
        x_ND, pos_TK, offs_E, w_gate, w_up = ctx.saved_tensors
        ugm, E = ctx.use_grouped_mm, w_gate.shape[0]
        dgate_NI, dup_NI = dgate_NI.contiguous(), dup_NI.contiguous()
        dw_gate = grouped_weight_grad(x_ND, dgate_NI, offs_E, E, ugm) if ctx.needs_input_grad[3] else None
        dw_up = grouped_weight_grad(x_ND, dup_NI, offs_E, E, ugm) if ctx.needs_input_grad[4] else None
        dx_TD = None
        if ctx.needs_input_grad[0]:
            dx_TD = _permute_bwd_sum_op(grouped_linear(dgate_NI, w_gate.transpose(1, 2), offs_E, ugm),
                                        grouped_linear(dup_NI, w_up.transpose(1, 2), offs_E, ugm), pos_TK)
        return dx_TD, None, None, dw_gate, dw_up, None
