"""Batched Newton-Schulz orthogonalization (Muon's NS5) with a symmetric Gram-product kernel.

Shapes: N = matrices in the batch, M = rows, K = columns (after the transpose that makes M <= K).

Each NS iteration is  A = X X^T;  B = b A + c A A;  X = a X + B X.  A and A A are symmetric, so the
Triton kernel `_syrk_kernel` computes only the tiles on and below the diagonal and writes each one
twice (as itself and mirrored). That halves the FLOPs of the two Gram products: per iteration
3 M^2 K + M^3 instead of 4 M^2 K + 2 M^3 (28% fewer for a 2048 x 7168 expert matrix). The
remaining product B X is a general batched GEMM and goes to cuBLAS (torch.baddbmm).

Without Triton, or for CPU tensors when Triton is not in interpreter mode (TRITON_INTERPRET=1),
the same math runs in plain torch.
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted, tl, triton

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


if triton is not None:

    @triton.jit
    def _syrk_kernel(X, C, Y, M, K,
                     s_xb, s_xm, s_xk, s_cb, s_cm, s_cn, s_yb, s_ym, s_yn,
                     alpha, beta,
                     HAS_Y: tl.constexpr, UPCAST: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr):
        """C[b] = alpha * X[b] X[b]^T (+ beta * Y[b]), one lower-triangular BM x BM tile per program.

        Program p takes lower-triangular tile p in row-major order (ti >= tj), so neighbouring
        programs share the X row-block ti (L2 reuse); the tile is stored at (ti, tj) and,
        transposed, at (tj, ti). Y must be symmetric (it is A itself in the NS step)."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        # invert p = ti (ti + 1) / 2 + tj; the fp32 sqrt is exact to +-1 up to ~2^20 tiles
        ti = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
        ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
        ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
        tj = pid - ti * (ti + 1) // 2
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BM + tl.arange(0, BM)
        rk = tl.arange(0, BK)
        x = X + b * s_xb
        a_ptrs = x + rm[:, None] * s_xm + rk[None, :] * s_xk
        bt_ptrs = x + rn[None, :] * s_xm + rk[:, None] * s_xk
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
            bt = tl.load(bt_ptrs, mask=(rn[None, :] < M) & (rk[:, None] < k_left), other=0.0)
            if UPCAST:  # the interpreter computes bf16 dots wrongly
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc)
            a_ptrs += BK * s_xk
            bt_ptrs += BK * s_xk
        acc = acc * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        if HAS_Y:
            y = tl.load(Y + b * s_yb + rm[:, None] * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
            acc += beta * y.to(tl.float32)
        out = acc.to(C.dtype.element_ty)
        c = C + b * s_cb
        tl.store(c + rm[:, None] * s_cm + rn[None, :] * s_cn, out, mask=mask)
        if ti != tj:
            mask_t = (rn[:, None] < M) & (rm[None, :] < M)
            tl.store(c + rn[:, None] * s_cm + rm[None, :] * s_cn, tl.trans(out), mask=mask_t)


# 128x128 tiles with 64/128-wide K steps are wgmma-sized; the best pipeline depth and K step depend
# on K (7168 for the Gram of an expert matrix, M for A A), so the few candidates are timed once per shape.
_SYRK_CONFIGS = [
    triton.Config({"BM": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BK": 128}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BK": 64}, num_warps=4, num_stages=4),
] if triton is not None else []
_syrk_tuned = (triton.autotune(_SYRK_CONFIGS, key=["M", "K", "HAS_Y"])(_syrk_kernel)
               if triton is not None and not _interpreted(_syrk_kernel) else None)


def syrk(X_NMK: torch.Tensor, alpha: float = 1.0, Y_NMM: torch.Tensor | None = None,
         beta: float = 0.0) -> torch.Tensor:
    """alpha * X X^T + beta * Y for a batch [N, M, K], computing only the lower-triangular tiles.

    Y, if given, must be symmetric (the lower tiles are read and mirrored). Output dtype = X's."""
    if X_NMK.dim() != 3:
        raise ValueError(f"syrk expects a batch [N, M, K], got shape {tuple(X_NMK.shape)}")
    N, M, K = X_NMK.shape
    C = torch.empty(N, M, M, device=X_NMK.device, dtype=X_NMK.dtype)
    Y = Y_NMM if Y_NMM is not None else C
    args = (X_NMK, C, Y, M, K, *X_NMK.stride(), *C.stride(), *Y.stride(), float(alpha), float(beta))

    def grid(meta):
        nt = triton.cdiv(M, meta["BM"])
        return (nt * (nt + 1) // 2, N)
    if _syrk_tuned is None:  # the interpreter computes bf16 dots wrongly: upcast, small tiles
        _syrk_kernel[grid({"BM": 16})](*args, HAS_Y=Y_NMM is not None, UPCAST=True, BM=16, BK=16,
                                       num_warps=1, num_stages=1)
    else:
        _syrk_tuned[grid](*args, HAS_Y=Y_NMM is not None, UPCAST=False)
    return C


def triton_ns_available(t: torch.Tensor) -> bool:
    """True when the Triton path can run on t's device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return t.is_cuda or (t.device.type == "cpu" and _interpreted(_syrk_kernel))


def zeropower_ns_batched(G_NMK: torch.Tensor, steps: int = 5,
                         coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                         eps: float = 1e-7, impl: str = "auto") -> torch.Tensor:
    """Approximate orthogonal factor U V^T of each matrix in a batch [N, M, K] (or one [M, K]).

    Math as DESIGN.md section 3: X = G / (||G||_F + eps) per matrix, transpose if M > K, then
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
    # the norm in fp32: a bf16 sum of squares over ~15M entries loses digits for nothing
    norm = torch.linalg.vector_norm(X.float(), dim=(-2, -1), keepdim=True)
    X = (X.float() / (norm + eps)).bfloat16().contiguous()
    for _ in range(steps):
        if use_triton:
            A = syrk(X)
            B = syrk(A, alpha=c, Y_NMM=A, beta=b)
        else:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
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
