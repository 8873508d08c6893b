"""Newton-Schulz orthogonalisation (the "zeroth power" of a matrix) used by Muon.

Shapes: ``G`` is one matrix ``[rows, cols]`` or a batch ``[n, rows, cols]`` (e.g. the experts of one
MoE layer, ``[E, out, in]``); every matrix of the batch is treated independently.
"""

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


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
    normaliser is ``max(||G||_F, eps)`` as there; DESIGN.md writes ``||G||_F + eps``, which is the
    same number in bf16/fp32 for any matrix whose norm is not itself ~eps.

    Returns a tensor of ``dtype`` with the shape of ``G``; the input is not modified.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if len(coefficients) != 3:
        raise ValueError(f"coefficients must be (a, b, c), got {coefficients}")
    if not 0 <= steps < 100:
        raise ValueError(f"steps={steps} must be in [0, 100)")
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
