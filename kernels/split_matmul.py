"""An fp32-accurate ``x @ w.T`` on bf16 tensor cores: the router's matmul.

K2's router scores in fp32 (the sigmoid of 384 logits picks 8 experts: small differences flip a
choice). Run as an fp32 GEMM, its forward and backward took 3.0 ms of a 74 ms K2 MoE layer step
(B2 x S4096) on an H100, where the bf16 tensor cores are ~15x faster than fp32 FMA.

Each fp32 operand is split into two bf16 parts, ``t = hi + lo`` with ``hi`` its top 16 bits and
``lo = bf16(t - hi)`` (16 of fp32's 24 mantissa bits; a bf16 operand is its own ``hi``). The product is
the sum of ``hi.hi``, ``hi.lo`` and ``lo.hi`` (``lo.lo`` is below 2^-16 of it), each a bf16 GEMM
whose products are exact in fp32 and summed in fp32 (``out_dtype=torch.float32``). What is left
out is ~2^-17 relative per operand element, and Hopper's tensor cores sum with slightly less than
fp32's rounding: ~1e-5 relative against fp64 (an H100: 7.9e-6 for the logits), where an fp32 GEMM
is at ~3e-7 and one bf16 GEMM at ~2e-3 (tests/test_split_matmul.py; bench_kernels.py --only router).
Only a bf16 ``x`` takes the split by default (``auto``); with bf16 weights too (K2's setup) the
forward is one GEMM whose products are exact.

Saved for the backward: the operands as given (a bf16 input is not copied to fp32, as
``F.linear(x.float(), w.float())`` did: 4 bytes per element less), or the fp32 input's two parts
(the same bytes). On the CPU, or where torch lacks ``mm(..., out_dtype=)``, the same function
runs plain fp32 matmuls: the numbers of ``F.linear(x.float(), w.float())``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# torch's mm/addmm with ``out_dtype`` (bf16 in, fp32 out: CUDA kernels since torch 2.8)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads() and "dtype" in torch.ops.aten.addmm.overloads()


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``t`` as bf16 ``hi`` (+ ``lo`` for an fp32 ``t``; None for bf16). ``hi`` is ``t`` with its
    low 16 bits cleared (exact in bf16), by integer ops: a cast round trip ``t.to(bf16).float()``
    would be elided inside an inductor-fused kernel (it keeps bf16 intermediates in fp32), which
    made ``lo`` zero under torch.compile."""
    if t.dtype == torch.bfloat16:
        return t, None
    hi = (t.view(torch.int32) & -65536).view(torch.float32)
    return hi.to(torch.bfloat16), (t - hi).to(torch.bfloat16)


def _mm_parts(a: tuple, b: tuple, emulate: bool) -> torch.Tensor:
    """fp32 ``(a_hi + a_lo) @ (b_hi + b_lo)`` without ``lo @ lo``: bf16 GEMMs summed in fp32
    (``emulate``: the same products by fp32 matmuls, for the CPU tests of the split itself)."""
    terms = [(a[0], b[0])] + ([(a[0], b[1])] if b[1] is not None else []) + ([(a[1], b[0])] if a[1] is not None else [])
    if emulate:
        return sum(x.float() @ y.float() for x, y in terms)
    out = torch.mm(terms[0][0], terms[0][1], out_dtype=torch.float32)
    for x, y in terms[1:]:
        if torch.compiler.is_compiling():  # torch 2.11's addmm decomposition fails on out_dtype
            out = out + torch.mm(x, y, out_dtype=torch.float32)
        else:
            out = torch.addmm(out, x, y, out_dtype=torch.float32)
    return out


class _LinearFp32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.mode, ctx.x_dtype, ctx.w_dtype = mode, x_TD.dtype, w_ED.dtype
        if mode == "fp32":
            ctx.save_for_backward(x_TD, w_ED)
            return F.linear(x_TD.float(), w_ED.float())
        x_parts, w_parts = _split(x_TD), _split(w_ED)
        ctx.save_for_backward(*x_parts, *w_parts)
        return _mm_parts(x_parts, (w_parts[0].T, None if w_parts[1] is None else w_parts[1].T), mode == "emulate")

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        # the backward runs under the caller's autocast (a step's backward inside its region)
        with torch.autocast(g_TE.device.type, enabled=False):
            return _LinearFp32._backward(ctx, g_TE.float())

    @staticmethod
    def _backward(ctx, g_TE: torch.Tensor):
        dx = dw = None
        if ctx.mode == "fp32":
            x_TD, w_ED = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dx = (g_TE @ w_ED.float()).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                dw = (g_TE.T @ x_TD.float()).to(ctx.w_dtype)
            return dx, dw, None
        x_hi, x_lo, w_hi, w_lo = ctx.saved_tensors
        g_parts = _split(g_TE)
        emulate = ctx.mode == "emulate"
        if ctx.needs_input_grad[0]:
            dx = _mm_parts(g_parts, (w_hi, w_lo), emulate).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _mm_parts((g_parts[0].T, g_parts[1].T), (x_hi, x_lo), emulate).to(ctx.w_dtype)
        return dx, dw, None


def linear_fp32(x_TD: torch.Tensor, w_ED: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """``x @ w.T`` in fp32 (fp32 or bf16 operands, either), differentiable; ``mode``: ``auto`` (split
    on CUDA's bf16 tensor cores for a bf16 ``x`` where torch can, else fp32 matmuls), ``split``, ``fp32``, or
    ``emulate`` (the split's arithmetic by fp32 matmuls: tests). Autocast is off inside."""
    if mode not in ("auto", "split", "fp32", "emulate"):
        raise ValueError(f"linear_fp32 mode={mode!r}: use auto, split, fp32 or emulate")
    if mode == "auto":
        # a bf16 input only: splitting an fp32 input (autocast's fp32 norm output) costs two passes
        # over it, and the nine GEMMs of two split operands gain little (1.38x on an H100)
        split = x_TD.dtype == torch.bfloat16 and w_ED.dtype in (torch.float32, torch.bfloat16)
        mode = "split" if split and x_TD.is_cuda and _MM_OUT_DTYPE else "fp32"
    with torch.autocast(x_TD.device.type, enabled=False):
        return _LinearFp32.apply(x_TD, w_ED, mode)
