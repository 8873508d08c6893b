"""MLA attention: a Triton flash-attention kernel that also returns the per-head max logit.

`mla_attention(q, k, v, softmax_scale, causal=True, doc_ids=None) -> (out, max_logit_H)`

Shapes (legend): B batch, H heads, S sequence, Dqk = qk head dim (MLA: dn + dr = 128 + 64),
Dv = value head dim. q, k: [B, H, S, Dqk]; v: [B, H, S, Dv]; out: [B, H, S, Dv];
max_logit_H: fp32 [H], the max over the batch and every unmasked (causal, same-document) pair of
the scaled logit (q . k) * softmax_scale, as QK-Clip needs it. It carries no gradient.

The forward is an online-softmax flash attention that saves the log-sum-exp (base 2) per row;
its running row maximum *is* the max logit, so each program stores the max over its rows and a
tiny torch amax reduces them per head. The backward recomputes the probabilities from the LSE:
one kernel per key block accumulates dk and dv over query blocks, a second one per query block
accumulates dq over key blocks (recomputing, to avoid atomics).

Head dims need not be powers of two: the qk dot is split in two parts, D1 = the largest power of
two below Dqk (128 for 192) and D2 = the rest rounded up to a power of two (64), the padding
loaded as zeros; Dv is padded up to a power of two the same way. Inputs may be bf16, fp16 or
fp32 (fp32 dots run in IEEE fp32); accumulation is always fp32.

On CPU tensors the Triton path runs only under TRITON_INTERPRET=1 (set before this module is
imported; slow, for tests). Otherwise CPU inputs fall back to `mla_attention_reference`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton import is_deterministic, tl, triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def mla_attention_reference(q, k, v, softmax_scale, causal=True, doc_ids=None):
    """Explicit-logits attention in fp32 (memory O(B*H*S^2)): the test oracle and CPU fallback.

    Returns (out in q's dtype, max_logit_H fp32 [H]); same contract as `mla_attention`.
    """
    _check_shapes(q, k, v, doc_ids)
    S = q.shape[2]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * softmax_scale
    keep = torch.ones(S, S, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(q.shape[0], 1, S, S)
    if doc_ids is not None:
        keep = keep & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    logits = logits.masked_fill(~keep, float("-inf"))
    max_logit_H = logits.detach().amax(dim=(0, 2, 3))
    out = torch.matmul(torch.softmax(logits, dim=-1), v.float())
    return out.to(q.dtype), max_logit_H


def _check_shapes(q, k, v, doc_ids):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, S, Dqk] and v [B, H, S, Dv]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if doc_ids is not None and tuple(doc_ids.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"doc_ids must be [B, S] = {(q.shape[0], q.shape[2])}, got {tuple(doc_ids.shape)}")


def mla_attention(q, k, v, softmax_scale, causal=True, doc_ids=None):
    """Flash attention with per-head max logit; see the module docstring for the contract.

    doc_ids [B, S] (any integer dtype) restricts attention to pairs with equal ids (packed
    sequences); it combines with `causal`. Falls back to the reference on CPU tensors unless
    TRITON_INTERPRET=1.
    """
    _check_shapes(q, k, v, doc_ids)
    if triton is None or not (q.is_cuda or _INTERPRET):
        return mla_attention_reference(q, k, v, softmax_scale, causal, doc_ids)
    if q.shape[-1] <= 16 or v.shape[-1] < 16:
        raise ValueError(f"mla_attention needs Dqk > 16 and Dv >= 16, got {q.shape[-1]} and {v.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    out, _, max_logit_H = _mla_attention_fwd(q, k, v, doc_ids, float(softmax_scale), bool(causal))
    return out, max_logit_H


def _doc_spans(doc_ids: torch.Tensor) -> torch.Tensor:
    """int32 [B, 2, S]: for each position, the first position of its document's run and one past
    its last, so the kernels visit only the blocks that hold a row's own document. Packed
    documents have non-decreasing ids (each document one run); a row of the batch whose ids are
    not (an id that comes back later) gets (0, S) everywhere: no block skipped, only masked.
    Device ops only (no host sync)."""
    B, S = doc_ids.shape
    pos = torch.arange(S, device=doc_ids.device)
    new = torch.ones(B, S, dtype=torch.bool, device=doc_ids.device)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new, pos, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, pos + 1, S).flip(1).cummin(dim=1).values.flip(1)
    runs = (doc_ids[:, 1:] >= doc_ids[:, :-1]).all(dim=1, keepdim=True)
    return torch.stack([torch.where(runs, start, 0), torch.where(runs, end, S)], dim=1).to(torch.int32).contiguous()


def _split_dims(dqk: int, dv: int) -> tuple[int, int, int]:
    """D1 + D2 >= Dqk with both powers of two >= 16; block width for Dv."""
    d1 = 1 << (dqk - 1).bit_length() - 1  # largest power of two strictly below dqk
    d2 = max(16, triton.next_power_of_2(dqk - d1))
    return d1, d2, max(16, triton.next_power_of_2(dv))


def _common(q, v, causal: bool, has_doc: bool) -> dict:
    """The constexpr arguments every kernel shares."""
    S, dqk, dv = q.shape[2], q.shape[3], v.shape[3]
    d1, d2, bdv = _split_dims(dqk, dv)
    return dict(DQK=dqk, DV=dv, D1=d1, D2=d2, BDV=bdv, CAUSAL=causal, HAS_DOC=has_doc,
                EVEN_S=S % _MAX_BLOCK == 0, UPCAST=_INTERPRET, IEEE=q.dtype == torch.float32)


# The kernels run as torch.library custom ops so that torch.compile keeps each launch as one opaque
# node (dynamo cannot trace a Triton launch inside an autograd.Function). The forward returns the
# LSE too, as an output, for the backward to save: (out [B, H, S, Dv] contiguous, lse fp32
# [B*H, S], max_logit_H fp32 [H]).
@torch.library.custom_op("k2kernels::mla_attention_fwd", mutates_args=())
def _mla_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                       softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, S, _ = q.shape
    common = _common(q, v, causal, doc_ids is not None)
    out = torch.empty(B, H, S, common["DV"], dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, S, dtype=torch.float32, device=q.device)
    # Per (b*h, query block) maxima; sized for the smallest BLOCK_M any config uses.
    max_blk = torch.full((B * H, triton.cdiv(S, _MIN_BLOCK)), float("-inf"), device=q.device)
    doc = doc_ids if doc_ids is not None else lse  # dummy pointer when unused
    span = _doc_spans(doc_ids) if doc_ids is not None else lse
    sdoc = (doc_ids.stride(0), doc_ids.stride(1)) if doc_ids is not None else (0, 0)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel, cfg = _launcher("fwd", common["IEEE"])
    kernel[grid](
        q, k, v, out, lse, max_blk, doc, span, softmax_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sdoc,
        H, S, max_blk.shape[1], **common, **cfg,
    )
    return out, lse, max_blk.view(B, H, -1).amax(dim=(0, 2))


@torch.library.custom_op("k2kernels::mla_attention_bwd", mutates_args=())
def _mla_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, doc_ids: Optional[torch.Tensor], softmax_scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each with the strides of its input. Deterministic mode is read here, when
    the backward runs, so a compiled graph follows the switch too."""
    B, H, S, _ = q.shape
    common = _common(q, v, causal, doc_ids is not None)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    doc = doc_ids if doc_ids is not None else lse
    span = _doc_spans(doc_ids) if doc_ids is not None else lse
    sdoc = (doc_ids.stride(0), doc_ids.stride(1)) if doc_ids is not None else (0, 0)
    _bwd_delta_kernel[(triton.cdiv(S, 64), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, S,
        DV=common["DV"], BDV=common["BDV"], BLOCK_M=64, UPCAST=_INTERPRET,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    atomic = ATOMIC_DQ and not is_deterministic()  # atomics sum dq in a varying order
    dqacc = torch.zeros(1, device=q.device)  # unused; the tuner zeroes it, so not lse
    if atomic:  # fp32 dq accumulator, padded to D1 + D2 columns
        dqacc = torch.zeros(B * H, S, common["D1"] + common["D2"], device=q.device)
    grid_kv = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)  # noqa: E731
    kernel, cfg = _launcher("dkdv", common["IEEE"])
    kernel[grid_kv](
        q, k, v, dout, lse, delta, dk, dv, doc, span, dqacc, softmax_scale,
        *strides, *dk.stride(), *dv.stride(), *sdoc, H, S, ATOMIC_DQ=atomic, **common, **cfg,
    )
    if atomic:
        dq.copy_(dqacc.view(B, H, S, -1)[..., : q.shape[-1]])
        return dq, dk, dv
    grid_q = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel, cfg = _launcher("dq", common["IEEE"])
    kernel[grid_q](
        q, k, v, dout, lse, delta, dq, doc, span, softmax_scale,
        *strides, *dq.stride(), *sdoc, H, S, **common, **cfg,
    )
    return dq, dk, dv


@_mla_attention_fwd.register_fake
def _mla_attention_fwd_fake(q, k, v, doc_ids, softmax_scale, causal):
    B, H, S, _ = q.shape
    return (q.new_empty(B, H, S, v.shape[-1]), q.new_empty(B * H, S, dtype=torch.float32),
            q.new_empty(H, dtype=torch.float32))


@_mla_attention_bwd.register_fake
def _mla_attention_bwd_fake(dout, q, k, v, out, lse, doc_ids, softmax_scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_attention_bwd(ctx, inputs, output):
    q, k, v, doc_ids, softmax_scale, causal = inputs
    out, lse, max_logit_H = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(lse, max_logit_H)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for lse and max_logit_H


def _attention_backward(ctx, dout, _dlse, _dmax):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dq, dk, dv = _mla_attention_bwd(dout, q, k, v, out, lse, doc_ids, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None, None


_mla_attention_fwd.register_autograd(_attention_backward, setup_context=_save_for_attention_bwd)


# Block sizes: all configs use blocks in [_MIN_BLOCK, _MAX_BLOCK] that divide _MAX_BLOCK, so
# EVEN_S (S % _MAX_BLOCK == 0) lets every config drop the sequence-bound masks. Causal loops also
# need BLOCK_N % BLOCK_M == 0 (dkdv) and BLOCK_M % BLOCK_N == 0 (fwd, dq).
_MIN_BLOCK, _MAX_BLOCK = 16, 128
# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for H100/H200 at Dqk 192 / Dv 128, 16-bit
# inputs; the first is used when AUTOTUNE is off. Shared memory ~ stages * BLOCK * 320 * 2 bytes.
FWD_CONFIGS = [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)]
DKDV_CONFIGS = [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 1)]
DQ_CONFIGS = [(64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 1)]
# fp32 tiles are twice as large: one small config that fits shared memory, no tuning.
_FP32_CONFIGS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
# Under the interpreter (CPU tests) the tuner would run every config; use small blocks.
_INTERP_CONFIG = (16, 16, 4, 1)
AUTOTUNE = os.environ.get("K2TRAIN_ATTN_AUTOTUNE", "1") != "0"
# Backward dq: False = a second kernel recomputes logits per query block (no atomics);
# True = the dk/dv kernel adds each block's dq into an fp32 buffer with atomics (fewer FLOPs).
ATOMIC_DQ = os.environ.get("K2TRAIN_ATTN_ATOMIC_DQ", "0") == "1"
_TUNE_KEY = ["S", "DQK", "DV", "CAUSAL", "HAS_DOC", "IEEE"]
_LAUNCHERS = {}  # name -> triton.autotune wrapper (read best_config from it)


def _launcher(name, fp32):
    """(kernel, extra launch kwargs) for one of "fwd", "dkdv", "dq"."""
    kernel, pairs = {"fwd": (_fwd_kernel, FWD_CONFIGS), "dkdv": (_dkdv_kernel, DKDV_CONFIGS),
                     "dq": (_dq_kernel, DQ_CONFIGS)}[name]
    if _INTERPRET or fp32 or not AUTOTUNE or is_deterministic():
        bm, bn, w, st = _INTERP_CONFIG if _INTERPRET else _FP32_CONFIGS[name] if fp32 else pairs[0]
        return kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
    if name not in _LAUNCHERS:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st in pairs]
        key = _TUNE_KEY + (["ATOMIC_DQ"] if name == "dkdv" else [])
        reset = ["DQACC"] if name == "dkdv" else None  # tuning runs must not pile up in dq
        _LAUNCHERS[name] = triton.autotune(configs, key=key, reset_to_zero=reset)(kernel)
    return _LAUNCHERS[name], {}


__all__ = ["mla_attention", "mla_attention_reference"]


# ---------------------------------------------------------------------------------------------
# Triton kernels. Logits live in base-2 units: qk2 = (q . k) * softmax_scale * log2(e), so that
# exp2 replaces exp; LSE is stored in the same units. One program handles one (b, h) pair and
# one block of rows. CAUSAL blocks left of the diagonal need no mask; EVEN_S drops bound masks.
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols,
                   MASK_R: tl.constexpr, MASK_C: tl.constexpr, UPCAST: tl.constexpr):
        """Load ptr[rows, cols] (zeros outside the masks); fp32 under the interpreter."""
        ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
        if MASK_R:
            if MASK_C:
                x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
            else:
                x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            if MASK_C:
                x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
            else:
                x = tl.load(ptrs)
        if UPCAST:  # the interpreter miscomputes bf16 dots
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_tile(ptr, x, rows, cols, stride_r, stride_c, n_rows, n_cols,
                    MASK_R: tl.constexpr, MASK_C: tl.constexpr):
        ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
        x = x.to(ptr.dtype.element_ty)
        if MASK_R:
            if MASK_C:
                tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
            else:
                tl.store(ptrs, x, mask=rows[:, None] < n_rows)
        else:
            if MASK_C:
                tl.store(ptrs, x, mask=cols[None, :] < n_cols)
            else:
                tl.store(ptrs, x)

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _mask_logits(x, offs_m, offs_n, doc_q, doc_ptr, stride_ds, S,
                     CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr, HAS_DOC: tl.constexpr,
                     fill):
        """x[m, n] kept where key n is visible from query m, else `fill`."""
        if CAUSAL_MASK:  # n <= m < S also bounds n for every real row
            x = tl.where(offs_m[:, None] >= offs_n[None, :], x, fill)
        if BOUND_MASK:
            x = tl.where(offs_n[None, :] < S, x, fill)
        if HAS_DOC:
            doc_k = tl.load(doc_ptr + offs_n * stride_ds, mask=offs_n < S, other=-1)
            x = tl.where(doc_q[:, None] == doc_k[None, :], x, fill)
        return x

    @triton.jit
    def _doc_bounds(span_ptr, offs, S, HAS_DOC: tl.constexpr):
        """[lo, hi): the positions any row in ``offs`` can attend to (its documents' runs);
        [0, S) without documents."""
        if HAS_DOC:
            lo = tl.min(tl.load(span_ptr + offs, mask=offs < S, other=S), 0)
            hi = tl.max(tl.load(span_ptr + S + offs, mask=offs < S, other=0), 0)
        else:
            lo = 0
            hi = S
        return lo, hi

    @triton.jit
    def _fwd_step(acc, l_i, m_i, q1, q2, k_base, v_base, doc_q, doc_ptr, start_n, offs_m, qk_scale,
                  stride_ks, stride_kd, stride_vs, stride_vd, stride_ds, S,
                  DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                  BDV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                  BOUND_MASK: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr,
                  IEEE: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt1 = _load_tile(k_base, tl.arange(0, D1), offs_n, stride_kd, stride_ks, DQK, S,
                         False, BOUND_MASK, UPCAST)
        kt2 = _load_tile(k_base + D1 * stride_kd, tl.arange(0, D2), offs_n, stride_kd, stride_ks,
                         DQK - D1, S, D1 + D2 != DQK, BOUND_MASK, UPCAST)
        qk = _dot(q1, kt1, None, IEEE)
        qk = _dot(q2, kt2, qk, IEEE) * qk_scale
        qk = _mask_logits(qk, offs_m, offs_n, doc_q, doc_ptr, stride_ds, S,
                          CAUSAL_MASK, BOUND_MASK, HAS_DOC, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_DOC:  # a row may have seen no key of its document yet: keep exp2 off -inf - -inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, tl.arange(0, BDV), stride_vs, stride_vd, S, DV,
                       BOUND_MASK, BDV != DV, UPCAST)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        return acc, l_i, m_new

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, MAXBLK, DOC, SPAN, softmax_scale,
                    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                    sob, soh, sos, sod, sdb, sds, H, S, n_maxblk,
                    DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                    BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                    EVEN_S: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        doc_ptr = DOC + b * sdb
        q1 = _load_tile(q_base, offs_m, tl.arange(0, D1), sqs, sqd, S, DQK, not EVEN_S, False, UPCAST)
        q2 = _load_tile(q_base + D1 * sqd, offs_m, tl.arange(0, D2), sqs, sqd, S, DQK - D1,
                        not EVEN_S, D1 + D2 != DQK, UPCAST)
        if HAS_DOC:
            doc_q = tl.load(doc_ptr + offs_m * sds, mask=offs_m < S, other=-2)
        else:
            doc_q = offs_m  # unused
        qk_scale = softmax_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BDV], tl.float32)
        lo, hi = _doc_bounds(SPAN + b * 2 * S, offs_m, S, HAS_DOC)
        lo = lo // BLOCK_N * BLOCK_N  # key blocks before the rows' documents are skipped
        if CAUSAL:
            for start_n in range(lo, start_m, BLOCK_N):  # fully visible blocks
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q1, q2, k_base, v_base, doc_q, doc_ptr,
                                          start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S,
                                          DQK, DV, D1, D2, BDV, BLOCK_N, False, False, HAS_DOC,
                                          UPCAST, IEEE)
            for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):  # the diagonal block
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q1, q2, k_base, v_base, doc_q, doc_ptr,
                                          start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S,
                                          DQK, DV, D1, D2, BDV, BLOCK_N, True, not EVEN_S, HAS_DOC,
                                          UPCAST, IEEE)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q1, q2, k_base, v_base, doc_q, doc_ptr,
                                          start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S,
                                          DQK, DV, D1, D2, BDV, BLOCK_N, False, not EVEN_S, HAS_DOC,
                                          UPCAST, IEEE)
        out = acc / l_i[:, None]
        _store_tile(O + b * sob + h * soh, out, offs_m, tl.arange(0, BDV), sos, sod, S, DV,
                    not EVEN_S, BDV != DV)
        tl.store(LSE + bh * S + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < S)
        # The running row max is the max scaled logit of the row (every real row sees its own key).
        row_max = tl.where(offs_m < S, m_i, float("-inf"))
        tl.store(MAXBLK + bh * n_maxblk + pid_m, tl.max(row_max, 0) * 0.6931471805599453)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sos, sod, sdob, sdoh, sdos, sdod, H, S,
                          DV: tl.constexpr, BDV: tl.constexpr, BLOCK_M: tl.constexpr,
                          UPCAST: tl.constexpr):
        """delta[row] = sum_d out[row, d] * dout[row, d], the softmax-backward row term."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BDV)
        o = _load_tile(O + b * sob + h * soh, offs_m, cols, sos, sod, S, DV, True, BDV != DV, UPCAST)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, cols, sdos, sdod, S, DV, True, BDV != DV, UPCAST)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * S + offs_m, delta, mask=offs_m < S)

    @triton.jit
    def _dkdv_step(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_ptr, delta_ptr, doc_k, doc_ptr,
                   dqacc_base, softmax_scale, start_m, offs_n, qk_scale, sqs, sqd, sdos, sdod, sds, S,
                   DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   BDV: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                   BOUND_MASK: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr, ATOMIC_DQ: tl.constexpr):
        """One query block's contribution to a key block's dk, dv (transposed: rows = keys).

        With ATOMIC_DQ it also adds the block's dq (already scaled) into the fp32 accumulator
        [S, D1 + D2] at dqacc_base, so no second pass recomputes the logits.
        """
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt1 = _load_tile(q_base, tl.arange(0, D1), offs_m, sqd, sqs, DQK, S, False, BOUND_MASK, UPCAST)
        qt2 = _load_tile(q_base + D1 * sqd, tl.arange(0, D2), offs_m, sqd, sqs, DQK - D1, S,
                         D1 + D2 != DQK, BOUND_MASK, UPCAST)
        if BOUND_MASK:
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < S, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < S, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        qkt = _dot(k1, qt1, None, IEEE)
        qkt = _dot(k2, qt2, qkt, IEEE)
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        if HAS_DOC:
            doc_q = tl.load(doc_ptr + offs_m * sds, mask=offs_m < S, other=-2)
            pt = tl.where(doc_k[:, None] == doc_q[None, :], pt, 0.0)
        do = _load_tile(do_base, offs_m, tl.arange(0, BDV), sdos, sdod, S, DV, BOUND_MASK,
                        BDV != DV, UPCAST)
        dv = _dot(pt.to(do.dtype), do, dv, IEEE)
        dpt = _dot(v, tl.trans(do), None, IEEE)
        dst = (pt * (dpt - delta[None, :])).to(qt1.dtype)
        dk1 = _dot(dst, tl.trans(qt1), dk1, IEEE)
        dk2 = _dot(dst, tl.trans(qt2), dk2, IEEE)
        if ATOMIC_DQ:
            ds_m = tl.trans(dst)
            rows = offs_m[:, None] * (D1 + D2)
            dq1 = _dot(ds_m, k1, None, IEEE) * softmax_scale
            dq2 = _dot(ds_m, k2, None, IEEE) * softmax_scale
            c1 = tl.arange(0, D1)[None, :]
            c2 = D1 + tl.arange(0, D2)[None, :]
            if BOUND_MASK:
                tl.atomic_add(dqacc_base + rows + c1, dq1, mask=offs_m[:, None] < S, sem="relaxed")
                tl.atomic_add(dqacc_base + rows + c2, dq2, mask=offs_m[:, None] < S, sem="relaxed")
            else:
                tl.atomic_add(dqacc_base + rows + c1, dq1, sem="relaxed")
                tl.atomic_add(dqacc_base + rows + c2, dq2, sem="relaxed")
        return dk1, dk2, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, DOC, SPAN, DQACC, softmax_scale,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     sdob, sdoh, sdos, sdod, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
                     sdb, sds, H, S,
                     DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                     BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                     EVEN_S: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start_n = tl.program_id(0) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_base = K + b * skb + h * skh
        k1 = _load_tile(k_base, offs_n, tl.arange(0, D1), sks, skd, S, DQK, not EVEN_S, False, UPCAST)
        k2 = _load_tile(k_base + D1 * skd, offs_n, tl.arange(0, D2), sks, skd, S, DQK - D1,
                        not EVEN_S, D1 + D2 != DQK, UPCAST)
        v = _load_tile(V + b * svb + h * svh, offs_n, tl.arange(0, BDV), svs, svd, S, DV,
                       not EVEN_S, BDV != DV, UPCAST)
        doc_ptr = DOC + b * sdb
        if HAS_DOC:
            doc_k = tl.load(doc_ptr + offs_n * sds, mask=offs_n < S, other=-3)
        else:
            doc_k = offs_n  # unused
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_ptr = LSE + bh * S
        delta_ptr = DELTA + bh * S
        dqacc_base = DQACC + bh * S * (D1 + D2)
        qk_scale = softmax_scale * 1.4426950408889634
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dk2 = tl.zeros([BLOCK_N, D2], tl.float32)
        dv = tl.zeros([BLOCK_N, BDV], tl.float32)
        lo, hi = _doc_bounds(SPAN + b * 2 * S, offs_n, S, HAS_DOC)  # the query rows that can see these keys
        if CAUSAL:
            lo = start_n + BLOCK_N
            for start_m in range(start_n, start_n + BLOCK_N, BLOCK_M):  # the diagonal block
                dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_ptr,
                                          delta_ptr, doc_k, doc_ptr, dqacc_base, softmax_scale,
                                          start_m, offs_n, qk_scale, sqs, sqd, sdos, sdod, sds, S,
                                          DQK, DV, D1, D2, BDV, BLOCK_M, True, not EVEN_S, HAS_DOC,
                                          UPCAST, IEEE, ATOMIC_DQ)
        else:
            lo = lo // BLOCK_M * BLOCK_M
        for start_m in range(lo, hi, BLOCK_M):  # query blocks that see the whole key block
            dk1, dk2, dv = _dkdv_step(dk1, dk2, dv, k1, k2, v, q_base, do_base, lse_ptr,
                                      delta_ptr, doc_k, doc_ptr, dqacc_base, softmax_scale,
                                      start_m, offs_n, qk_scale, sqs, sqd, sdos, sdod, sds, S,
                                      DQK, DV, D1, D2, BDV, BLOCK_M, False, not EVEN_S, HAS_DOC,
                                      UPCAST, IEEE, ATOMIC_DQ)
        dk_base = DK + b * sdkb + h * sdkh
        _store_tile(dk_base, dk1 * softmax_scale, offs_n, tl.arange(0, D1), sdks, sdkd, S, DQK,
                    not EVEN_S, False)
        _store_tile(dk_base + D1 * sdkd, dk2 * softmax_scale, offs_n, tl.arange(0, D2), sdks, sdkd,
                    S, DQK - D1, not EVEN_S, D1 + D2 != DQK)
        _store_tile(DV_OUT + b * sdvb + h * sdvh, dv, offs_n, tl.arange(0, BDV), sdvs, sdvd, S, DV,
                    not EVEN_S, BDV != DV)

    @triton.jit
    def _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, doc_q, doc_ptr, start_n, offs_m,
                 qk_scale, sks, skd, svs, svd, sds, S,
                 DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 BDV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                 BOUND_MASK: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt1 = _load_tile(k_base, tl.arange(0, D1), offs_n, skd, sks, DQK, S, False, BOUND_MASK, UPCAST)
        kt2 = _load_tile(k_base + D1 * skd, tl.arange(0, D2), offs_n, skd, sks, DQK - D1, S,
                         D1 + D2 != DQK, BOUND_MASK, UPCAST)
        vt = _load_tile(v_base, tl.arange(0, BDV), offs_n, svd, svs, DV, S, BDV != DV, BOUND_MASK, UPCAST)
        qk = _dot(q1, kt1, None, IEEE)
        qk = _dot(q2, kt2, qk, IEEE)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        p = _mask_logits(p, offs_m, offs_n, doc_q, doc_ptr, sds, S, CAUSAL_MASK, BOUND_MASK,
                         HAS_DOC, 0.0)
        dp = _dot(do, vt, None, IEEE)
        ds = (p * (dp - delta[:, None])).to(kt1.dtype)
        dq1 = _dot(ds, tl.trans(kt1), dq1, IEEE)
        dq2 = _dot(ds, tl.trans(kt2), dq2, IEEE)
        return dq1, dq2

    @triton.jit
    def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC, SPAN, softmax_scale,
                   sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                   sdob, sdoh, sdos, sdod, sdqb, sdqh, sdqs, sdqd, sdb, sds, H, S,
                   DQK: tl.constexpr, DV: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   BDV: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                   EVEN_S: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start_m = tl.program_id(0) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_base = Q + b * sqb + h * sqh
        q1 = _load_tile(q_base, offs_m, tl.arange(0, D1), sqs, sqd, S, DQK, not EVEN_S, False, UPCAST)
        q2 = _load_tile(q_base + D1 * sqd, offs_m, tl.arange(0, D2), sqs, sqd, S, DQK - D1,
                        not EVEN_S, D1 + D2 != DQK, UPCAST)
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, tl.arange(0, BDV), sdos, sdod, S, DV,
                        not EVEN_S, BDV != DV, UPCAST)
        lse = tl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=float("inf"))
        delta = tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
        doc_ptr = DOC + b * sdb
        if HAS_DOC:
            doc_q = tl.load(doc_ptr + offs_m * sds, mask=offs_m < S, other=-2)
        else:
            doc_q = offs_m  # unused
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        qk_scale = softmax_scale * 1.4426950408889634
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
        dq2 = tl.zeros([BLOCK_M, D2], tl.float32)
        lo, hi = _doc_bounds(SPAN + b * 2 * S, offs_m, S, HAS_DOC)
        lo = lo // BLOCK_N * BLOCK_N
        if CAUSAL:
            for start_n in range(lo, start_m, BLOCK_N):
                dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, doc_q, doc_ptr,
                                    start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S, DQK, DV,
                                    D1, D2, BDV, BLOCK_N, False, False, HAS_DOC, UPCAST, IEEE)
            for start_n in range(start_m, start_m + BLOCK_M, BLOCK_N):
                dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, doc_q, doc_ptr,
                                    start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S, DQK, DV,
                                    D1, D2, BDV, BLOCK_N, True, not EVEN_S, HAS_DOC, UPCAST, IEEE)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                dq1, dq2 = _dq_step(dq1, dq2, q1, q2, do, lse, delta, k_base, v_base, doc_q, doc_ptr,
                                    start_n, offs_m, qk_scale, sks, skd, svs, svd, sds, S, DQK, DV,
                                    D1, D2, BDV, BLOCK_N, False, not EVEN_S, HAS_DOC, UPCAST, IEEE)
        dq_base = DQ + b * sdqb + h * sdqh
        _store_tile(dq_base, dq1 * softmax_scale, offs_m, tl.arange(0, D1), sdqs, sdqd, S, DQK,
                    not EVEN_S, False)
        _store_tile(dq_base + D1 * sdqd, dq2 * softmax_scale, offs_m, tl.arange(0, D2), sdqs, sdqd,
                    S, DQK - D1, not EVEN_S, D1 + D2 != DQK)
