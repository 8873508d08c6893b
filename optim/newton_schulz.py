"""Newton-Schulz orthogonalisation (the "zeroth power" of a matrix) used by Muon.

Shapes: ``G`` is one matrix ``[rows, cols]`` or a batch ``[n, rows, cols]`` (e.g. the experts of one
MoE layer, ``[E, out, in]``); every matrix of the batch is treated independently.
"""

import math

import torch
from torch import Tensor

# The constants and input-scaling rules shared with the Triton kernels live with the kernels
# (kernels import nothing of ours); re-exported here, where the optimizer reads them.
from k2train.kernels.newton_schulz import (GRAM_RESTARTS, NS_COEFFICIENTS, ns_input_target_norm, pow2_scale,
                                           scale_to_sqrt_m)

__all__ = ["GRAM_RESTARTS", "NS_COEFFICIENTS", "ns_flops", "ns_input_target_norm", "pow2_scale", "scale_to_sqrt_m",
           "zeropower_via_gram_newtonschulz", "zeropower_via_newtonschulz"]

def _check_ns_args(G: Tensor, steps: int, coefficients) -> None:
    if G.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if len(coefficients) != 3:
        raise ValueError(f"coefficients must be (a, b, c), got {coefficients}")
    if not 0 <= steps < 100:
        raise ValueError(f"steps={steps} must be in [0, 100)")


def zeropower_via_newtonschulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate ``U V^T`` of ``G = U S V^T`` with ``steps`` quintic Newton-Schulz iterations.

    Each matrix is first scaled to unit Frobenius norm (so its spectral norm is <= 1), then
    ``X <- a X + (b A + c A A) X`` with ``A = X X^T``. The iteration runs on the wide orientation
    (a tall matrix is transposed first and back at the end), which keeps ``A`` the small Gram matrix.

    The op sequence (cast, transpose, norm, clamp, ``addmm``) is the one of ``torch.optim.Muon``,
    so for a 2-D input and the same ``dtype`` the result is bit-identical to its internal NS. The
    normaliser is ``max(||G||_F, eps)`` as there; Moonlight writes ``||G||_F + eps``, which is the
    same number in bf16/fp32 for any matrix whose norm is not itself ~eps.

    Returns a tensor of ``dtype`` with the shape of ``G``; the input is not modified.
    """
    _check_ns_args(G, steps, coefficients)
    a, b, c = coefficients
    tall = G.size(-2) > G.size(-1)
    X = G.to(dtype)
    if tall:
        X = X.mT
    if X.ndim == 2:
        # Same ops as torch.optim.Muon, so the 2-D path matches it bit for bit.
        X = X.div(X.norm().clamp(min=eps))
        for _ in range(steps):
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            X = torch.addmm(X, B, X, beta=a)
    else:
        X = X.div(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
    if tall:
        X = X.mT
    return X


# ----------------------------------------------------------------------------------------------
# Gram Newton-Schulz
# ----------------------------------------------------------------------------------------------

def ns_flops(rows: int, cols: int, steps: int = 5, method: str = "standard", symmetric: bool = False,
             restarts: tuple[int, ...] = GRAM_RESTARTS) -> int:
    """Matmul FLOPs of one Newton-Schulz call on a ``[rows, cols]`` matrix (M = min, K = max).

    ``standard``: per iteration 4 M^2 K + 2 M^3 (X X^T, A A, B X), or 3 M^2 K + M^3 when the two
    symmetric products compute only half their tiles (``symmetric``, the Triton kernels).
    ``gram``: see :func:`zeropower_via_gram_newtonschulz`; every M x M product has a symmetric
    result (half the tiles with the Triton kernels, all of them in plain torch)."""
    M, K = sorted((rows, cols))
    if method == "standard":
        return steps * ((3 * M * M * K + M**3) if symmetric else (4 * M * M * K + 2 * M**3))
    if method != "gram":
        raise ValueError(f"method must be 'standard' or 'gram', got {method!r}")
    half = 1 if symmetric else 2
    gram = half * M * M * K  # X X^T
    cube = half * M**3  # one M x M product
    total, fresh = gram, True
    for it in range(steps):
        total += cube  # R R -> Q
        total += 0 if fresh else cube  # Q P
        fresh = False
        if it == steps - 1:
            break
        if it + 1 in restarts:
            total += 2 * M * M * K + gram  # X <- P X, R <- X X^T
            fresh = True
        else:
            total += 2 * cube  # Q Q, R Q^2
    return total + 2 * M * M * K  # P X


def zeropower_via_gram_newtonschulz(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float16,
    restarts: tuple[int, ...] = GRAM_RESTARTS,
) -> Tensor:
    """The same quintic Newton-Schulz as :func:`zeropower_via_newtonschulz`, iterated on the small
    ``M x M`` Gram matrix instead of the ``M x K`` matrix ("Gram Newton-Schulz", Dao AI Lab 2026).

    With ``R = X X^T``, one NS step is ``X <- Q X`` with ``Q = a I + b R + c R^2``, a polynomial in
    ``R``; so ``R <- Q R Q = R Q^2`` (all polynomials in ``R`` commute) and ``X_k = P X_0`` with
    ``P = Q_{k-1} ... Q_0``. Only two ``M x K`` products remain (``X X^T`` and the final ``P X``);
    every other product is ``M x M`` with a symmetric result. In exact arithmetic it is NS5; in half
    precision the product ``P`` drifts from a polynomial in ``R`` (spurious negative eigenvalues,
    eigenvector drift), so before each iteration listed in ``restarts`` ``X`` is formed explicitly
    and ``R`` recomputed from it. Restarting before iteration 3 costs one ``X X^T`` and one ``P X``.

    Precision: ``dtype`` (fp16 by default) for every stored matrix, fp32 accumulation. fp16 has the
    tensor-core rate of bf16 and 3 more mantissa bits; every matrix here is bounded (``||X||_F =
    sqrt(M)`` after scaling, ``R = X X^T / M`` so ``|R| <= 1``, ``|Q| <= a``, ``|P| <= a^3``), so its
    range is not a concern. An input of another dtype is scaled in fp32 before the cast
    (:func:`scale_to_sqrt_m`: a gradient's entries would underflow fp16; typical scaled entries,
    ~1/sqrt(K), are normal). An input already in ``dtype`` is used as it is, its norm folded into ``R``
    and ``P`` (as the kernel path does): inputs a power of two apart give the same bits.

    Returns a tensor of ``dtype`` with the shape of ``G``; the input is not modified.
    """
    _check_ns_args(G, steps, coefficients)
    a, b, c = coefficients
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    batched = X.ndim == 3
    if not batched:
        X = X.unsqueeze(0)
    M = X.size(-2)
    if X.dtype != dtype:
        X = scale_to_sqrt_m(X, dtype, eps)
    # X0 = f X, f = sqrt(M) / ||X||_F per matrix (~1 after scale_to_sqrt_m); the sqrt(M) is taken
    # back out of R and of the final product
    wide = torch.promote_types(X.dtype, torch.float32)
    f = (math.sqrt(M) / torch.linalg.vector_norm(X, dim=(-2, -1), dtype=wide).clamp(min=eps))[:, None, None]

    def mm(x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
        # half inputs: fp32 accumulation and one rounding of alpha * x y, as the GPU GEMMs do
        return torch.baddbmm(x.new_empty(()), x, y, beta=0.0, alpha=alpha).to(dtype) if alpha != 1.0 else torch.bmm(x, y)

    R = mm(X, X.mT, 1.0 / M) * (f * f).to(dtype)
    P = None
    for it in range(steps):
        Q = torch.baddbmm(R, R, R, beta=b, alpha=c)  # b R + c R^2
        Q.diagonal(dim1=-2, dim2=-1).add_(a)
        P = Q if P is None else mm(Q, P)
        if it == steps - 1:
            break
        if it + 1 in restarts:
            X = mm(P if f is None else P * f.to(dtype), X)
            f = None
            R = mm(X, X.mT, 1.0 / M)
            P = None
        else:
            R = mm(R, mm(Q, Q))
    if f is not None:
        X = X * f.to(dtype)
    X = mm(P, X, 1.0 / math.sqrt(M)) if P is not None else (X.float() / math.sqrt(M)).to(dtype)
    if not batched:
        X = X.squeeze(0)
    return X.mT if tall else X
