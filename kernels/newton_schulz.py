"""Batched Newton-Schulz orthogonalization (Muon's NS5) with a symmetric-product kernel (GEMMT).

Shapes: N = matrices in the batch, M = rows, K = columns (after the transpose that makes M <= K).

The GEMMT kernels compute alpha A B^T + beta Y + diag I for products known to be symmetric, only
the tiles on and below the diagonal, and write each one twice (as itself and mirrored): half the
FLOPs of a GEMM. `gemmt_persistent` (one persistent launch, TMA loads and stores) is the one
`_sym_product("auto")` picks on Hopper; `gemmt` (pointer loads), `gemmt_tma` and `gemmt_blocked`
(cuBLAS blocks) are the alternatives and fallbacks. Two Newton-Schulz schedules use them:

- standard (`zeropower_ns_batched`): per iteration A = X X^T; B = b A + c A A; X = a X + B X.
  X X^T and A A are symmetric: 3 M^2 K + M^3 FLOPs instead of 4 M^2 K + 2 M^3 (28% fewer for a
  2048 x 7168 expert matrix). B X is a general GEMM (cuBLAS).
- Gram (`zeropower_gram_batched`, math in k2train.optim.newton_schulz): the iteration runs on
  R = X X^T; every M x M product is symmetric and only X X^T and the final P X touch the M x K
  matrix: 6 M^2 K + 14 M^3 FLOPs with one restart (56% fewer than textbook for 2048 x 7168).

Without Triton, or for CPU tensors when Triton is not in interpreter mode (TRITON_INTERPRET=1),
the standard schedule runs in plain torch; the Gram schedule's torch version is the optimizer's own
(k2train.optim.newton_schulz), which picks between the two.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._triton import interpreted as _interpreted, launch_tuned, runs_on, tl, triton

# Muon's quintic Newton-Schulz coefficients (a, b, c) and the Gram schedule's default restart.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
GRAM_RESTARTS = (3,)


def scale_to_sqrt_m(X: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """Each matrix of ``X`` (``[..., r, c]``) times ``sqrt(M) / max(||X||_F, eps)``, M = min(r, c),
    computed in fp32 (or wider) and cast to ``dtype`` once. Entries come out ~1/sqrt(max(r, c)):
    normal numbers in fp16, where a raw gradient's would be subnormal or zero."""
    wide = torch.promote_types(X.dtype, torch.float32)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=wide)
    return (X.to(wide) * (math.sqrt(min(X.shape[-2:])) / norm.clamp(min=eps))).to(dtype)


def ns_input_target_norm(rows: int, cols: int) -> float:
    """The Frobenius norm MuonClip scales a ``[rows, cols]`` NS input to (to the nearest power of two)
    before an fp16 cast: ``sqrt(min(rows, cols))``, entries ~1/sqrt(max(rows, cols)), normal fp16
    numbers (a raw gradient's entries would be subnormal or zero), and the norm Gram NS iterates at,
    so the factor it folds into its products stays within sqrt(2) of 1."""
    return math.sqrt(min(rows, cols))


def pow2_scale(norm: Tensor, target: float) -> Tensor:
    """The power of two nearest (in log) to ``target / norm``, elementwise in fp32: a scale that
    rounds nothing itself (entries stay in fp16's normal range)."""
    return torch.exp2(torch.floor(torch.log2(target / norm.float().clamp(min=1e-30)) + 0.5))


if triton is not None:

    @triton.jit
    def _lower_tile(M, BM: tl.constexpr, BN: tl.constexpr):
        """Program p's tile: row ti = p % rows, column tj = p // rows (programs that run together share
        B's column block, L2 reuse), and whether it reaches the lower triangle."""
        pid = tl.program_id(0)
        rows = tl.cdiv(M, BM)
        ti = pid % rows
        tj = pid // rows
        return ti, tj, tj * BN <= ti * BM + BM - 1

    @triton.jit
    def _gemmt_epilogue(acc, C, Y, S, b, rm, rn, M, s_cb, s_cm, s_cn, s_yb, s_ym, s_yn, alpha, beta, diag,
                        HAS_Y: tl.constexpr, HAS_S: tl.constexpr):
        """alpha (* S[b]) acc (+ beta Y) + diag I, stored as the lower triangle (diagonal included)
        in place and the strictly lower part mirrored: the result is exactly symmetric, also inside
        diagonal tiles (where A B^T's two halves are separate dot products when B is not A)."""
        acc = acc * alpha
        if HAS_S:
            acc = acc * tl.load(S + b)
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        if HAS_Y:
            y = tl.load(Y + b * s_yb + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
            acc += beta * y.to(tl.float32)
        acc = tl.where(rm[:, None] == rn[None, :], acc + diag, acc)
        out = acc.to(C.dtype.element_ty)
        c = C + b * s_cb
        tl.store(c + rm[:, None] * s_cm + rn[None, :] * s_cn, out, mask=mask & (rm[:, None] >= rn[None, :]))
        mask_t = (rn[:, None] < M) & (rm[None, :] < M) & (rm[None, :] > rn[:, None])
        tl.store(c + rn[:, None] * s_cm + rm[None, :] * s_cn, tl.trans(out), mask=mask_t)


if triton is not None:

    @triton.jit
    def _gemmt_kernel(A, B, C, Y, S, M, K,
                      s_ab, s_am, s_ak, s_bb, s_bm, s_bk, s_cb, s_cm, s_cn, s_yb, s_ym, s_yn,
                      alpha, beta, diag,
                      HAS_Y: tl.constexpr, HAS_S: tl.constexpr, UPCAST: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr = False):
        """C[b] = alpha (* S[b]) * A[b] B[b]^T (+ beta * Y[b]) + diag * I, one BM x BN tile per program,
        only for tiles that reach the lower triangle, for a product known to be symmetric (B = A: a
        Gram matrix; or A, B commuting symmetric matrices, where A B^T = A B).

        Program (p, b): tile row ti = p % rows, tile column tj = p // rows, so programs that run
        together share B's column block (L2 reuse); tiles wholly above the diagonal return at once.
        Each tile stores its lower-triangle part in place and its strictly lower part mirrored. Y
        must be symmetric (its lower triangle is what counts)."""
        ti, tj, below = _lower_tile(M, BM, BN)
        if not below:
            return
        b = tl.program_id(1).to(tl.int64)
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = A + b * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak
        if BT:  # B's tile loaded as stored ([BM, BK], K contiguous) and transposed in registers
            bt_ptrs = B + b * s_bb + rn[:, None] * s_bm + rk[None, :] * s_bk
        else:
            bt_ptrs = B + b * s_bb + rn[None, :] * s_bm + rk[:, None] * s_bk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            if BT:
                bt = tl.trans(tl.load(bt_ptrs, mask=(rn[:, None] < M) & (rk[None, :] < k_left), other=0.0))
            else:
                bt = tl.load(bt_ptrs, mask=(rn[None, :] < M) & (rk[:, None] < k_left), other=0.0)
            if UPCAST:  # the interpreter computes half-precision dots wrongly
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc)
            a_ptrs += BK * s_ak
            bt_ptrs += BK * s_bk
        _gemmt_epilogue(acc, C, Y, S, b, rm, rn, M, s_cb, s_cm, s_cn, s_yb, s_ym, s_yn, alpha, beta, diag,
                        HAS_Y, HAS_S)


if triton is not None:

    @triton.jit
    def _gemmt_tma_kernel(A, B, C, Y, S, N, M, K,
                          s_cb, s_cm, s_cn, s_yb, s_ym, s_yn,
                          alpha, beta, diag,
                          HAS_Y: tl.constexpr, HAS_S: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """:func:`_gemmt_kernel` with the A and B tiles fetched by the tensor-memory accelerator
        (tensor descriptors over contiguous [N, M, K] operands; out-of-range rows and columns read
        as zeros). Same tile order and epilogue."""
        ti, tj, below = _lower_tile(M, BM, BN)
        if not below:
            return
        b = tl.program_id(1)
        a_desc = tl.make_tensor_descriptor(A, shape=[N, M, K], strides=[M * K, K, 1], block_shape=[1, BM, BK])
        b_desc = tl.make_tensor_descriptor(B, shape=[N, M, K], strides=[M * K, K, 1], block_shape=[1, BN, BK])
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            a = a_desc.load([b, ti * BM, k * BK]).reshape(BM, BK)
            bb = b_desc.load([b, tj * BN, k * BK]).reshape(BN, BK)
            if UPCAST:
                a = a.to(tl.float32)
                bb = bb.to(tl.float32)
            acc = tl.dot(a, tl.trans(bb), acc)
        b = b.to(tl.int64)
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BN + tl.arange(0, BN)
        _gemmt_epilogue(acc, C, Y, S, b, rm, rn, M, s_cb, s_cm, s_cn, s_yb, s_ym, s_yn, alpha, beta, diag,
                        HAS_Y, HAS_S)


# 128 x 256 tiles (wgmma's widest) are what Triton's Hopper matmuls run best with; 128 x 128 kept
# for small M. Timed once per shape.
_TMA_CONFIGS = [
    triton.Config({"BM": 128, "BN": bn, "BK": 64}, num_warps=8, num_stages=st)
    for bn, st in ((256, 3), (256, 4), (128, 3), (128, 4), (128, 5))
] if triton is not None else []
_gemmt_tma_tuned = (triton.autotune(_TMA_CONFIGS, key=["M", "K", "HAS_Y", "HAS_S"])(_gemmt_tma_kernel)
                    if triton is not None and not _interpreted(_gemmt_tma_kernel) else None)


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def gemmt_tma(A_NMK: torch.Tensor, B_NMK: torch.Tensor | None = None, alpha: float = 1.0,
              Y_NMM: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0,
              scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gemmt` with TMA tile loads. Operands are made contiguous; it needs a Hopper or newer GPU
    and rows 16-byte aligned (K % 8 == 0 in half precision), else it falls back to :func:`gemmt`."""
    A_NMK = A_NMK.contiguous()
    B_NMK = A_NMK if B_NMK is None else B_NMK.contiguous()
    N, M, K = A_NMK.shape
    pre_hopper = A_NMK.is_cuda and torch.cuda.get_device_capability(A_NMK.device)[0] < 9
    if pre_hopper or (K * A_NMK.element_size()) % 16 or B_NMK.shape != A_NMK.shape:
        return gemmt(A_NMK, B_NMK, alpha, Y_NMM, beta, diag, scale_N)
    C = torch.empty(N, M, M, device=A_NMK.device, dtype=A_NMK.dtype)
    Y = Y_NMM if Y_NMM is not None else C
    S = scale_N.float().contiguous() if scale_N is not None else C
    args = (A_NMK, B_NMK, C, Y, S, N, M, K, *C.stride(), *Y.stride(), float(alpha), float(beta), float(diag))

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(M, meta["BN"]), N)
    if _gemmt_tma_tuned is None:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
        _gemmt_tma_kernel[grid({"BM": 16, "BN": 32})](*args, HAS_Y=Y_NMM is not None, HAS_S=scale_N is not None,
                                                      UPCAST=True, BM=16, BN=32, BK=16, num_warps=1, num_stages=1)
    else:
        triton.set_allocator(_tma_scratch)
        launch_tuned(_gemmt_tma_tuned, _gemmt_tma_kernel, _TMA_CONFIGS[2], grid, *args, HAS_Y=Y_NMM is not None,
                     HAS_S=scale_N is not None, UPCAST=False)
    return C


if triton is not None:

    @triton.jit
    def _tile_of(r, SPLIT: tl.constexpr):
        """Lower-triangle tile r -> (row block, column block) in units of BT x BT blocks, for tiles of
        SPLIT x 1 blocks: row stripe I holds the tiles j = 0 .. SPLIT (I + 1) - 1, the first r tiles of
        stripes 0..I-1 number SPLIT I (I + 1) / 2."""
        i = ((tl.sqrt((8 * r // SPLIT + 1).to(tl.float32)) - 1) * 0.5).to(tl.int32)
        i = tl.where(SPLIT * i * (i + 1) // 2 > r, i - 1, i)
        i = tl.where(SPLIT * (i + 1) * (i + 2) // 2 <= r, i + 1, i)
        return i, r - SPLIT * i * (i + 1) // 2

    @triton.jit
    def _store_sym_block(acc, c_desc, y_desc, S, b, bi, bj, M, alpha, beta, diag,
                         HAS_Y: tl.constexpr, HAS_S: tl.constexpr, BT: tl.constexpr):
        """One BT x BT block (bi, bj) of the result: alpha (* S[b]) acc (+ beta Y) + diag I, stored at
        (bi, bj) and transposed at (bj, bi). A diagonal block keeps its lower half and mirrors it (the
        result is exactly symmetric, and both stores write the same bits); a block above the diagonal
        is not stored (its stores aim past the last row, which TMA clips)."""
        rm = tl.arange(0, BT)[:, None]
        rn = tl.arange(0, BT)[None, :]
        acc = acc * alpha
        if HAS_S:
            acc = acc * tl.load(S + b)
        if HAS_Y:
            acc += beta * y_desc.load([b, bi * BT, bj * BT]).reshape(BT, BT).to(tl.float32)
        acc = tl.where((rm == rn) & (bi == bj), acc + diag, acc)
        out = acc.to(c_desc.dtype)
        out_t = tl.trans(out)
        off_diag = bi != bj
        lower = tl.where((rm >= rn) | off_diag, out, out_t)
        upper = tl.where((rm <= rn) | off_diag, out_t, out)  # = lower^T
        skip = bj > bi
        c_desc.store([b, tl.where(skip, M, bi * BT), bj * BT], lower.reshape(1, BT, BT))
        c_desc.store([b, tl.where(skip, M, bj * BT), bi * BT], upper.reshape(1, BT, BT))

    @triton.jit
    def _gemmt_persistent_kernel(A, B, C, Y, S, N, M, K, s_cb, s_yb,
                                 alpha, beta, diag,
                                 HAS_Y: tl.constexpr, HAS_S: tl.constexpr, UPCAST: tl.constexpr,
                                 BT: tl.constexpr, SPLIT: tl.constexpr, BK: tl.constexpr):
        """:func:`_gemmt_tma_kernel` as a persistent kernel: one program per SM walks the lower-triangle
        tiles of all N matrices, the tile loop and the K loop flattened into one software pipeline (the
        next tile's TMA loads overlap this tile's epilogue). A tile is SPLIT x 1 blocks of BT x BT
        (SPLIT = 2: 256 x 128, the wgmma-friendly shape); each block is stored by
        :func:`_store_sym_block` with TMA, as itself and transposed."""
        a_desc = tl.make_tensor_descriptor(A, shape=[N, M, K], strides=[M * K, K, 1], block_shape=[1, SPLIT * BT, BK])
        b_desc = tl.make_tensor_descriptor(B, shape=[N, M, K], strides=[M * K, K, 1], block_shape=[1, BT, BK])
        c_desc = tl.make_tensor_descriptor(C, shape=[N, M, M], strides=[s_cb, M, 1], block_shape=[1, BT, BT])
        y_desc = c_desc
        if HAS_Y:
            y_desc = tl.make_tensor_descriptor(Y, shape=[N, M, M], strides=[s_yb, M, 1], block_shape=[1, BT, BT])
        nb = tl.cdiv(M, BT)
        stripes = tl.cdiv(nb, SPLIT)
        T = SPLIT * stripes * (stripes + 1) // 2 - (SPLIT * stripes - nb)  # past the last block: dropped
        k_tiles = tl.cdiv(K, BK)
        step = tl.num_programs(0)
        t_out = tl.program_id(0) - step  # the epilogue's own counter (keeps the pipeliner's
        for t in tl.range(tl.program_id(0), N * T, step, flatten=True):  # prologue and epilogue apart)
            ti, tj = _tile_of(t % T, SPLIT)
            b = t // T
            acc = tl.zeros((SPLIT * BT, BT), dtype=tl.float32)
            for kk in range(k_tiles):
                a = a_desc.load([b, ti * SPLIT * BT, kk * BK]).reshape(SPLIT * BT, BK)
                bb = b_desc.load([b, tj * BT, kk * BK]).reshape(BT, BK)
                if UPCAST:
                    a = a.to(tl.float32)
                    bb = bb.to(tl.float32)
                acc = tl.dot(a, tl.trans(bb), acc)
            t_out += step
            ti, tj = _tile_of(t_out % T, SPLIT)
            b = t_out // T
            if SPLIT == 1:
                _store_sym_block(acc, c_desc, y_desc, S, b, ti, tj, M, alpha, beta, diag, HAS_Y, HAS_S, BT)
            else:
                top, bottom = tl.split(tl.permute(tl.reshape(acc, (2, BT, BT)), (1, 2, 0)))
                _store_sym_block(top, c_desc, y_desc, S, b, 2 * ti, tj, M, alpha, beta, diag, HAS_Y, HAS_S, BT)
                _store_sym_block(bottom, c_desc, y_desc, S, b, 2 * ti + 1, tj, M, alpha, beta, diag, HAS_Y, HAS_S, BT)


# BT = 128 blocks; 128 x 128 tiles on one or two warpgroups, 256 x 128 tiles on two; 64-wide K steps
# and 3-6 stages (the deepest that fits shared memory won at 2048^3 on the H200). Timed once per shape.
_PERSISTENT_CONFIGS = [
    triton.Config({"BT": 128, "SPLIT": sp, "BK": 64}, num_warps=w, num_stages=st)
    for sp, w, st in ((1, 4, 4), (1, 4, 5), (1, 4, 6), (1, 8, 4), (1, 8, 5), (2, 8, 3), (2, 8, 4))
] if triton is not None else []
_gemmt_persistent_tuned = (triton.autotune(_PERSISTENT_CONFIGS, key=["M", "K", "HAS_Y", "HAS_S"])(_gemmt_persistent_kernel)
                           if triton is not None and not _interpreted(_gemmt_persistent_kernel) else None)


_INTERPRETER_SPLIT = 2  # the tile shape the CPU interpreter runs (tests set 1 and 2)


def gemmt_persistent(A_NMK: torch.Tensor, B_NMK: torch.Tensor | None = None, alpha: float = 1.0,
                     Y_NMM: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0,
                     scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gemmt` as one persistent launch with TMA loads and stores (:func:`_gemmt_persistent_kernel`):
    one program per SM walks every lower tile of every matrix of the batch. The output is exactly
    symmetric. Needs a Hopper or newer GPU (older ones get :func:`gemmt_blocked`), half precision
    and 16-byte aligned rows (K % 8 == 0 and M % 8 == 0; otherwise :func:`gemmt`). The CPU
    interpreter runs it in fp32, for the tests."""
    A_NMK = A_NMK.contiguous()
    B_NMK = A_NMK if B_NMK is None else B_NMK.contiguous()
    N, M, K = A_NMK.shape
    es = A_NMK.element_size()
    if A_NMK.is_cuda and torch.cuda.get_device_capability(A_NMK.device)[0] < 9:  # no TMA: cuBLAS blocks
        blocks = 4 if M >= 4096 else 2 if M >= 1024 else 1
        return gemmt_blocked(A_NMK, B_NMK, alpha, Y_NMM, beta, diag, scale_N, blocks=blocks)
    fp32_gpu = A_NMK.is_cuda and es > 2  # the configs' 64-wide K steps do not fit fp32 tiles in shared memory
    if fp32_gpu or (K * es) % 16 or (M * es) % 16 or B_NMK.shape != A_NMK.shape:
        return gemmt(A_NMK, B_NMK, alpha, Y_NMM, beta, diag, scale_N)
    C = torch.empty(N, M, M, device=A_NMK.device, dtype=A_NMK.dtype)
    Y = C if Y_NMM is None else Y_NMM.contiguous()
    S = scale_N.float().contiguous() if scale_N is not None else C
    args = (A_NMK, B_NMK, C, Y, S, N, M, K, C.stride(0), Y.stride(0), float(alpha), float(beta), float(diag))
    flags = dict(HAS_Y=Y_NMM is not None, HAS_S=scale_N is not None)
    if _gemmt_persistent_tuned is None:  # the interpreter: fp32 dots, small blocks, both tile shapes
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
        _gemmt_persistent_kernel[(3,)](*args, **flags, UPCAST=True, BT=16, SPLIT=_INTERPRETER_SPLIT, BK=16, num_warps=1,
                                       num_stages=1)
        return C
    triton.set_allocator(_tma_scratch)
    sms = torch.cuda.get_device_properties(A_NMK.device).multi_processor_count

    def grid(meta):
        nb = triton.cdiv(M, meta["BT"])
        stripes = triton.cdiv(nb, meta["SPLIT"])
        tiles = meta["SPLIT"] * stripes * (stripes + 1) // 2 - (meta["SPLIT"] * stripes - nb)
        return (min(sms, N * tiles),)
    launch_tuned(_gemmt_persistent_tuned, _gemmt_persistent_kernel, _PERSISTENT_CONFIGS[0], grid, *args, **flags,
                 UPCAST=False)
    return C


# 128x128 tiles with 64/128-wide K steps are wgmma-sized; the best pipeline depth and K step depend
# on K (7168 for the Gram of an expert matrix, M for A A), so the few candidates are timed once per shape.
_SYRK_CONFIGS = [
    triton.Config({"BM": 128, "BN": bn, "BK": 64, "BT": bt}, num_warps=8, num_stages=st)
    for bt in (False, True) for bn, st in ((256, 3), (128, 3), (128, 4))
] + [
    triton.Config({"BM": 64, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
] if triton is not None else []
_gemmt_tuned = (triton.autotune(_SYRK_CONFIGS, key=["M", "K", "HAS_Y", "HAS_S"])(_gemmt_kernel)
                if triton is not None and not _interpreted(_gemmt_kernel) else None)


def _gemmt_operands(A_NMK: torch.Tensor, B_NMK: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks A and B ([N, M, K], one shape; B=None is A) and returns B and the empty [N, M, M] result."""
    if A_NMK.dim() != 3:
        raise ValueError(f"gemmt expects a batch [N, M, K], got shape {tuple(A_NMK.shape)}")
    B_NMK = A_NMK if B_NMK is None else B_NMK
    if B_NMK.shape != A_NMK.shape:
        raise ValueError(f"gemmt needs A and B of one shape, got {tuple(A_NMK.shape)} and {tuple(B_NMK.shape)}")
    N, M, _ = A_NMK.shape
    return B_NMK, torch.empty(N, M, M, device=A_NMK.device, dtype=A_NMK.dtype)


def gemmt(A_NMK: torch.Tensor, B_NMK: torch.Tensor | None = None, alpha: float = 1.0,
          Y_NMM: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0,
          scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * A B^T + beta * Y + diag * I for a batch [N, M, K] whose result is symmetric, computing
    only the lower-triangular tiles (BLAS' GEMMT) and mirroring them. ``B=None`` is ``A`` (the Gram
    matrix A A^T, BLAS' SYRK). Otherwise A B^T must be symmetric in exact arithmetic (in Newton-Schulz:
    two polynomials of one symmetric matrix); the result is then the lower half's rounding, mirrored.

    Y, if given, must be symmetric (the lower tiles are read). ``scale_N`` (fp32, one per matrix)
    multiplies the product, like alpha. Output dtype = A's."""
    B_NMK, C = _gemmt_operands(A_NMK, B_NMK)
    N, M, K = A_NMK.shape
    Y = Y_NMM if Y_NMM is not None else C
    S = scale_N.float().contiguous() if scale_N is not None else C
    args = (A_NMK, B_NMK, C, Y, S, M, K, *A_NMK.stride(), *B_NMK.stride(), *C.stride(), *Y.stride(),
            float(alpha), float(beta), float(diag))

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(M, meta["BN"]), N)
    if _gemmt_tuned is None:  # the interpreter computes half dots wrongly: upcast, small tiles
        _gemmt_kernel[grid({"BM": 16, "BN": 32})](*args, HAS_Y=Y_NMM is not None, HAS_S=scale_N is not None,
                                                  UPCAST=True, BM=16, BN=32, BK=16, num_warps=1, num_stages=1)
    else:
        launch_tuned(_gemmt_tuned, _gemmt_kernel, _SYRK_CONFIGS[1], grid, *args, HAS_Y=Y_NMM is not None,
                     HAS_S=scale_N is not None, UPCAST=False)
    return C


def gemmt_blocked(A_NMK: torch.Tensor, B_NMK: torch.Tensor | None = None, alpha: float = 1.0,
                  Y_NMM: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0,
                  scale_N: torch.Tensor | None = None, blocks: int = 4) -> torch.Tensor:
    """:func:`gemmt` with cuBLAS: the M x M result is cut into ``blocks`` x ``blocks`` blocks; row
    block i is one batched GEMM over column blocks 0..i (written in place into the result), and the
    strictly-upper blocks are filled with the transposed lower ones. (blocks + 1) / (2 blocks) of the
    product's FLOPs (62.5% at 4 blocks), on cuBLAS GEMMs rather than on Triton tiles. Unlike
    :func:`gemmt`, diagonal blocks are computed whole, so they are symmetric only up to rounding."""
    B_NMK, C = _gemmt_operands(A_NMK, B_NMK)
    N, M, K = A_NMK.shape
    blocks = max(1, min(blocks, M))
    edges = [round(i * M / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        r0, r1 = edges[i], edges[i + 1]
        a, bt, out = A_NMK[:, r0:r1], B_NMK[:, :r1].mT, C[:, r0:r1, :r1]
        if Y_NMM is not None:
            torch.baddbmm(Y_NMM[:, r0:r1, :r1], a, bt, beta=beta, alpha=alpha, out=out)
        elif alpha != 1.0:
            torch.baddbmm(out, a, bt, beta=0.0, alpha=alpha, out=out)
        else:
            torch.bmm(a, bt, out=out)
    if scale_N is not None:
        C.mul_(scale_N.to(C.dtype)[:, None, None])
    if diag:
        C.diagonal(dim1=-2, dim2=-1).add_(diag)
    for i in range(blocks):
        for j in range(i):
            C[:, edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = C[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mT
    return C


def syrk(X_NMK: torch.Tensor, alpha: float = 1.0, Y_NMM: torch.Tensor | None = None,
         beta: float = 0.0) -> torch.Tensor:
    """alpha * X X^T + beta * Y for a batch [N, M, K], computing only the lower-triangular tiles."""
    return gemmt(X_NMK, None, alpha, Y_NMM, beta)


def _sym_product(sym_impl: str, M: int, K: int):
    """The symmetric-product implementation for an [N, M, K] operand: ``persistent``
    (:func:`gemmt_persistent`), ``triton`` (:func:`gemmt`, half the FLOPs on Triton tiles, pointer
    loads), ``tma`` (:func:`gemmt_tma`), ``blocked<n>`` (:func:`gemmt_blocked` with n x n blocks on
    cuBLAS; ``blocked``: up to 4 blocks of >= 128 rows), or ``auto``, a fixed rule from the H200
    measurements of docs/muonclip.md (a fixed rule, not a timing at run time, so that every rank and
    every run computes the same bits):

    - M >= 1024 (the experts' Gram and 2048^3 products, o_proj's 7168 ones): the persistent kernel,
      1.31-1.47x cuBLAS' full product (on a GPU older than Hopper it falls back to cuBLAS blocks);
    - smaller: cuBLAS' full product (one launch; these are launch-bound)."""
    if sym_impl == "auto":
        sym_impl = "persistent" if M >= 1024 else "blocked1"
    if sym_impl == "triton":
        return gemmt
    if sym_impl == "tma":
        return gemmt_tma
    if sym_impl == "persistent":
        return gemmt_persistent
    if sym_impl.startswith("blocked") and sym_impl[7:].isdigit():
        return functools.partial(gemmt_blocked, blocks=int(sym_impl[7:]))
    if sym_impl == "blocked":  # blocks of at least 128 rows: smaller GEMMs lose more than they save
        return functools.partial(gemmt_blocked, blocks=max(1, min(4, M // 128)))
    raise ValueError(f"sym_impl must be 'auto', 'triton', 'tma', 'persistent', 'blocked' or 'blocked<n>', got {sym_impl!r}")


def triton_ns_available(t: torch.Tensor) -> bool:
    """True when the Triton path can run on t's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and runs_on(t, _gemmt_kernel)


def zeropower_ns_batched(G_NMK: torch.Tensor, steps: int = 5,
                         coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                         eps: float = 1e-7, impl: str = "auto", sym_impl: str = "auto") -> torch.Tensor:
    """Approximate orthogonal factor U V^T of each matrix in a batch [N, M, K] (or one [M, K]).

    Muon's NS5: X = G / (||G||_F + eps) per matrix, transpose if M > K, then
    `steps` times A = X X^T; X = a X + (b A + c A A) X. Runs in bf16 and returns bf16 in the
    input's orientation. impl: "auto" (Triton where available), "triton" or "torch"."""
    if G_NMK.dim() not in (2, 3):
        raise ValueError(f"zeropower_ns_batched expects [N, M, K] or [M, K], got {tuple(G_NMK.shape)}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    single = G_NMK.dim() == 2
    X = G_NMK.unsqueeze(0) if single else G_NMK
    use_triton = impl == "triton" or (impl == "auto" and triton_ns_available(X))
    if impl == "triton" and not triton_ns_available(X):
        raise ValueError("impl='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    a, b, c = coefficients
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # the norm in fp32: a bf16 sum of squares over ~15M entries loses digits for nothing. Both the
    # norm and the division compute in fp32 inside one kernel each (no fp32 copy of the batch: two
    # of them, 4x a bf16 batch, were the optimizer step's peak).
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    X = torch.div(X, norm + eps, out=torch.empty(X.shape, dtype=torch.bfloat16, device=X.device))
    if use_triton:
        gram, square = _sym_product(sym_impl, X.size(-2), X.size(-1)), _sym_product(sym_impl, X.size(-2), X.size(-2))
    for _ in range(steps):
        if use_triton:
            A = gram(X)
            B = square(A, alpha=c, Y_NMM=A, beta=b)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    if transposed:
        X = X.mT
    return X[0] if single else X


def zeropower_gram_batched(G_NMK: torch.Tensor, steps: int = 5,
                           coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                           eps: float = 1e-7, dtype: torch.dtype = torch.float16,
                           restarts: tuple[int, ...] = GRAM_RESTARTS, impl: str = "auto",
                           sym_impl: str = "auto") -> torch.Tensor:
    """Gram Newton-Schulz (k2train.optim.newton_schulz.zeropower_via_gram_newtonschulz has the math
    and the torch reference) on a batch [N, M, K] (or one [M, K]): the Gram X X^T and every M x M
    product (R R, Q Q, R Q^2, Q P) go through a symmetric-product implementation chosen by
    :func:`_sym_product` (``sym_impl``); the two M x K products P X are cuBLAS. Runs in ``dtype`` (fp16
    or bf16 on GPUs; fp32 is for the CPU interpreter's tests), returns it, in the input's orientation.
    Needs Triton (``impl`` "auto" or "triton")."""
    if G_NMK.dim() not in (2, 3):
        raise ValueError(f"zeropower_gram_batched expects [N, M, K] or [M, K], got {tuple(G_NMK.shape)}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"Gram Newton-Schulz runs in fp16, bf16 (or fp32, for tests), got {dtype}")
    if impl not in ("auto", "triton"):
        raise ValueError(f"impl must be 'auto' or 'triton', got {impl!r} (the torch schedule is "
                         "k2train.optim.newton_schulz.zeropower_via_gram_newtonschulz)")
    if not triton_ns_available(G_NMK):
        raise ValueError("Gram Newton-Schulz kernels need triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    a, b, c = coefficients
    single = G_NMK.dim() == 2
    X = G_NMK.unsqueeze(0) if single else G_NMK
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    M = X.size(-2)
    if X.dtype != dtype:
        X = scale_to_sqrt_m(X, dtype, eps)
    X = X.contiguous()
    # X0 = f X with f = sqrt(M) / ||X||_F per matrix (~1 when MuonClip pre-scaled the input: see
    # ns_input_cast); f is folded into R0 and into the P that multiplies X, never a pass over X.
    f = math.sqrt(M) / torch.linalg.vector_norm(X, dim=(-2, -1), dtype=torch.float32).clamp(min=eps)
    gram, square = _sym_product(sym_impl, M, X.size(-1)), _sym_product(sym_impl, M, M)
    R = gram(X, alpha=1.0 / M, scale_N=f * f)
    P = None
    for it in range(steps):
        Q = square(R, alpha=c, Y_NMM=R, beta=b, diag=a)  # a I + b R + c R^2
        ends = it == steps - 1 or it + 1 in restarts
        if P is None:
            P = Q if not ends or f is None else Q * f[:, None, None].to(Q.dtype)
        else:
            P = square(Q, P, scale_N=f if ends else None)
        if it == steps - 1:
            break
        if it + 1 in restarts:
            X = torch.bmm(P, X)  # X_k = P X0 = (P f) X
            f = None
            R = gram(X, alpha=1.0 / M)
            P = None
        else:
            R = square(R, square(Q))  # R Q^2
    if P is None:
        X = X / math.sqrt(M) if f is None else X * (f[:, None, None] / math.sqrt(M)).to(X.dtype)
    else:
        X = torch.baddbmm(X.new_empty(()), P, X, beta=0.0, alpha=1.0 / math.sqrt(M))
    if transposed:
        X = X.mT
    return X[0] if single else X


def zeropower_ns_reference(G: torch.Tensor, steps: int = 5,
                           coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                           eps: float = 1e-7) -> torch.Tensor:
    """Plain per-matrix NS in a given dtype (G's), the textbook loop: for tests and benchmarks."""
    a, b, c = coefficients
    X = G
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


def zeropower_via_newtonschulz(G: torch.Tensor, steps: int = 5,
                               coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                               eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The `ns_fn` signature k2train.optim.MuonClip calls (optim.ns_impl=triton); bf16 only."""
    if dtype != torch.bfloat16:
        raise ValueError(f"the Triton Newton-Schulz runs in bf16; got dtype={dtype}, use optim.ns_impl=torch")
    return zeropower_ns_batched(G, steps=steps, coefficients=coefficients, eps=eps)
