"""Grouped GEMMs of the routed experts in Triton, for the few rows per expert of one GPU's layer.

Legend: N expert-ordered rows (rows offs[e-1]:offs[e] belong to expert e), E experts, K the
reduced width, J the output width.

    y_NJ  = grouped_mm(x_NK, w_EJK, offs_E)                 # y[rows e] = x[rows e] @ w[e]^T
    y_NJ  = grouped_mm(x_NK, w_EKJ.transpose(1, 2), offs_E)  # any strides: the input's gradient
    y_NJ  = grouped_mm(a, wa, offs_E, x2=b, w2=wb)           # a @ wa^T + b @ wb^T in one accumulator
    dw_EOI = grouped_wgrad(dy_NO, x_NI, offs_E, E)           # dw[e] = dy[rows e]^T @ x[rows e]

Why not torch._grouped_mm (CUTLASS) everywhere: with ~171 rows per expert (K2's 384 experts, one
GPU, 2 x 4096 tokens) a grouped GEMM does about 171 FLOPs per byte of weight, below the H100's
ridge (~295), so it is bound by reading the weights (forward, input's gradient) and writing their
gradient. The best it can do is to touch each weight byte once. Here one program owns one
(expert, column tile) pair and walks all of that expert's rows, BLOCK_M at a time: with BLOCK_M
at or above the rows per expert, each weight tile is read from memory exactly once, and the
expert's input rows, shared by all its column tiles, come from L2 (programs are numbered expert
by expert, so those of one expert run together). The weight gradient's programs own one output
tile each and reduce over the expert's rows, writing the tile once, in the weight's own dtype
(fp32 under autocast: no bf16 copy to convert afterwards).

With many rows per expert (EP: each rank's experts see the tokens of all ranks) the GEMMs are
bound by the tensor cores and CUTLASS's warp-specialized kernels win; kernels.moe picks by rows
per expert (:func:`prefer_triton`).

Everything accumulates in fp32, in a fixed order: results do not depend on the launch (no split
over rows, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import interpreted as _interpreted, runs_on, tl, triton

# Rows per expert up to which the Triton kernels beat torch._grouped_mm (measured on an H100 at
# K2's widths, docs/performance.md); above, the GEMMs are compute bound and CUTLASS is faster.
TRITON_MAX_ROWS_PER_EXPERT = 512

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first is the deterministic-mode and
# untuned launch; the interpreter takes small blocks.
MM_CONFIGS = [(256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (256, 64, 64, 8, 4), (128, 256, 64, 8, 3)]
WGRAD_CONFIGS = [(128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4)]
_INTERP_CONFIG = (16, 16, 16, 1, 1)


if triton is not None:

    @triton.jit
    def _grouped_mm_kernel(X, W, X2, W2, Y, OFFS, J, K, K2, n_tiles_j,
                           s_xn, s_xk, s_we, s_wj, s_wk, s_x2n, s_x2k, s_w2e, s_w2j, s_w2k, s_yn, s_yj,
                           HAS_SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        e = pid // n_tiles_j
        jt = pid % n_tiles_j
        start = tl.load(OFFS + e - 1, mask=e > 0, other=0).to(tl.int64)
        end = tl.load(OFFS + e).to(tl.int64)
        cols = jt * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < J
        w_e = W + e.to(tl.int64) * s_we
        w2_e = W2 + e.to(tl.int64) * s_w2e
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(X + rows[:, None] * s_xn + ks[None, :] * s_xk,
                            mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
                b = tl.load(w_e + ks[:, None] * s_wk + cols[None, :] * s_wj,
                            mask=(ks < K)[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
            if HAS_SECOND:
                for k0 in range(0, K2, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    a = tl.load(X2 + rows[:, None] * s_x2n + ks[None, :] * s_x2k,
                                mask=row_ok[:, None] & (ks < K2)[None, :], other=0.0)
                    b = tl.load(w2_e + ks[:, None] * s_w2k + cols[None, :] * s_w2j,
                                mask=(ks < K2)[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(a, b, acc)
            tl.store(Y + rows[:, None] * s_yn + cols[None, :] * s_yj, acc.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_wgrad_kernel(A, B, DW, OFFS, O, I, n_tiles_o, n_tiles_i,
                              s_an, s_ao, s_bn, s_bi, s_de, s_do, s_di,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # dw[e] tile (BLOCK_M of O) x (BLOCK_N of I) = sum over the expert's rows, BLOCK_K at a time
        pid = tl.program_id(0)
        per_expert = n_tiles_o * n_tiles_i
        e = pid // per_expert
        t = pid % per_expert
        ot = t // n_tiles_i
        it = t % n_tiles_i
        start = tl.load(OFFS + e - 1, mask=e > 0, other=0).to(tl.int64)
        end = tl.load(OFFS + e).to(tl.int64)
        outs = ot * BLOCK_M + tl.arange(0, BLOCK_M)
        ins = it * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rs = r0 + tl.arange(0, BLOCK_K)
            r_ok = rs < end
            a = tl.load(A + rs[None, :] * s_an + outs[:, None] * s_ao,
                        mask=r_ok[None, :] & (outs < O)[:, None], other=0.0)
            b = tl.load(B + rs[:, None] * s_bn + ins[None, :] * s_bi,
                        mask=r_ok[:, None] & (ins < I)[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(DW + e.to(tl.int64) * s_de + outs[:, None] * s_do + ins[None, :] * s_di,
                 acc.to(DW.dtype.element_ty), mask=(outs < O)[:, None] & (ins < I)[None, :])


def available(t: torch.Tensor) -> bool:
    """Whether the Triton grouped GEMMs run on ``t``'s device (CUDA, or the CPU interpreter)."""
    return triton is not None and runs_on(t, _grouped_mm_kernel)


def prefer_triton(x_NK: torch.Tensor, num_experts: int) -> bool:
    """The rule kernels.moe follows on CUDA: Triton at or below TRITON_MAX_ROWS_PER_EXPERT rows per
    expert on average (bound by memory: one read of each weight), CUTLASS above (bound by compute)."""
    return (x_NK.is_cuda and available(x_NK) and x_NK.dtype in (torch.bfloat16, torch.float16)
            and x_NK.shape[0] <= TRITON_MAX_ROWS_PER_EXPERT * num_experts)


def _pick(configs, tuned_ok: bool):
    if _interpreted(_grouped_mm_kernel):
        return _INTERP_CONFIG
    return configs[0]


def _check(x_NK: torch.Tensor, w_EJK: torch.Tensor, offs_E: torch.Tensor, name: str) -> None:
    if x_NK.dim() != 2 or w_EJK.dim() != 3 or x_NK.shape[1] != w_EJK.shape[2]:
        raise ValueError(f"grouped_mm: {name} {tuple(x_NK.shape)} must be [N, K] against weights "
                         f"{tuple(w_EJK.shape)} [E, J, K]")
    if offs_E.shape != (w_EJK.shape[0],) or offs_E.dtype != torch.int32:
        raise ValueError(f"grouped_mm: offs {tuple(offs_E.shape)} {offs_E.dtype} must be int32 [E={w_EJK.shape[0]}] "
                         "cumulative row ends")


def grouped_mm(x_NK: torch.Tensor, w_EJK: torch.Tensor, offs_E: torch.Tensor, x2: Optional[torch.Tensor] = None,
               w2: Optional[torch.Tensor] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """y[rows e] = x[rows e] @ w[e]^T (+ x2[rows e] @ w2[e]^T), in x's dtype; w in any strides.
    Rows past offs[-1] are left as zeros. ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    overrides the launch (benchmarks)."""
    _check(x_NK, w_EJK, offs_E, "x")
    if x2 is not None:
        _check(x2, w2, offs_E, "x2")
        if x2.shape[0] != x_NK.shape[0] or w2.shape[:2] != w_EJK.shape[:2]:
            raise ValueError(f"grouped_mm: x2 {tuple(x2.shape)} / w2 {tuple(w2.shape)} must match x's rows and "
                             f"w's [E, J] {tuple(w_EJK.shape[:2])}")
    N, K = x_NK.shape
    E, J, _ = w_EJK.shape
    y = x_NK.new_zeros(N, J) if N else x_NK.new_empty(0, J)
    if N == 0 or E == 0:
        return y
    bm, bn, bk, warps, stages = config or _pick(MM_CONFIGS, True)
    n_tiles = triton.cdiv(J, bn)
    x2_, w2_ = (x2, w2) if x2 is not None else (x_NK, w_EJK)
    _grouped_mm_kernel[(E * n_tiles,)](
        x_NK, w_EJK, x2_, w2_, y, offs_E, J, K, x2_.shape[1], n_tiles,
        x_NK.stride(0), x_NK.stride(1), w_EJK.stride(0), w_EJK.stride(1), w_EJK.stride(2),
        x2_.stride(0), x2_.stride(1), w2_.stride(0), w2_.stride(1), w2_.stride(2), y.stride(0), y.stride(1),
        HAS_SECOND=x2 is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


def grouped_wgrad(dy_NO: torch.Tensor, x_NI: torch.Tensor, offs_E: torch.Tensor, num_experts: int,
                  out_dtype: Optional[torch.dtype] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """dw[e] = dy[rows e]^T @ x[rows e]: [E, O, I] in ``out_dtype`` (default x's), accumulated in
    fp32 and written once; an expert without rows gets zeros."""
    if dy_NO.dim() != 2 or x_NI.dim() != 2 or dy_NO.shape[0] != x_NI.shape[0]:
        raise ValueError(f"grouped_wgrad: dy {tuple(dy_NO.shape)} and x {tuple(x_NI.shape)} must be [N, O] and [N, I]")
    if offs_E.shape != (num_experts,) or offs_E.dtype != torch.int32:
        raise ValueError(f"grouped_wgrad: offs {tuple(offs_E.shape)} {offs_E.dtype} must be int32 [E={num_experts}]")
    O, I = dy_NO.shape[1], x_NI.shape[1]
    dw = x_NI.new_empty(num_experts, O, I, dtype=out_dtype or x_NI.dtype)
    if num_experts == 0 or O == 0 or I == 0:
        return dw
    bm, bn, bk, warps, stages = config or _pick(WGRAD_CONFIGS, True)
    n_o, n_i = triton.cdiv(O, bm), triton.cdiv(I, bn)
    _grouped_wgrad_kernel[(num_experts * n_o * n_i,)](
        dy_NO, x_NI, dw, offs_E, O, I, n_o, n_i, dy_NO.stride(0), dy_NO.stride(1), x_NI.stride(0), x_NI.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)
    return dw


__all__ = ["grouped_mm", "grouped_wgrad", "prefer_triton", "available", "TRITON_MAX_ROWS_PER_EXPERT"]
