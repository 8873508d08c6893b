"""AdamW's step in one pass per tensor.

torch's single-tensor AdamW on an fp32 master with a bf16 gradient makes about eleven passes over
the fp32 tensors (the gradient's cast, weight decay, lerp, mul + addcmul, sqrt, division, add,
addcdiv, the copy back to the bf16 parameter): ~100 bytes moved per parameter. This kernel reads the
master, the gradient and both moments once and writes them (and the bf16 parameter) once: 28 bytes
per parameter for a bf16 model with fp32 masters, which is what the embedding and the LM head (2.3B
parameters at K2's width, AdamW even under MuonClip) cost each step.

The arithmetic is torch.optim.AdamW's, in fp32, in the same order except that the bias corrections
are folded into two scalars: results agree with :func:`adamw_reference_` to a few fp32 ulps.

A trainer that keeps its step count on the device (so that no host read is needed to decide a
step) passes the bias corrections as a tensor (:func:`adamw_corrections`) instead of the step
number, and a ``skip`` flag: where it is set the kernel stores nothing, and the weight, the
moments and the low-precision param keep every bit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._triton import interpreted as _interpreted, runs_on, tl, triton

if triton is not None:

    @triton.jit
    def _adamw_kernel(W, G, M, V, P, Corr, Skip, n, decay, beta1, beta2, step_size, inv_sqrt_bc2, eps,
                      CORR: tl.constexpr, SKIP: tl.constexpr, HAS_P: tl.constexpr, BLOCK: tl.constexpr):
        """W <- W decay - step_size M' / (sqrt(V') inv_sqrt_bc2 + eps), M' = lerp(M, G, 1 - beta1),
        V' = beta2 V + (1 - beta2) G^2; P <- W in P's dtype. With CORR, step_size and
        1 / inv_sqrt_bc2 are read from Corr[0], Corr[1]; with SKIP and Skip[0] set, it returns at once."""
        if SKIP:
            if tl.load(Skip) != 0:
                return
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if CORR:
            step_size = tl.load(Corr)
            inv_sqrt_bc2 = 1.0 / tl.load(Corr + 1)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + offs, mask=mask, other=0.0)
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
        w = w * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w - step_size * (m / (tl.sqrt(v) * inv_sqrt_bc2 + eps))
        tl.store(W + offs, w, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
        if HAS_P:
            tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)


def fused_adamw_available(t: torch.Tensor) -> bool:
    """Whether :func:`adamw_fused_` can run on ``t`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and runs_on(t, _adamw_kernel)


def adamw_corrections(steps: torch.Tensor, lr: float, betas: tuple[float, float]) -> torch.Tensor:
    """``[n, 2]`` fp32: ``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` for each step number ``t``
    of ``steps`` (``[n]``, on any device), computed in fp64 as torch.optim.AdamW computes them on
    the host, so that either form of ``step`` gives the same bits. No host read."""
    beta1, beta2 = betas
    t = steps.double()
    return torch.stack([lr / (1 - beta1**t), (1 - beta2**t) ** 0.5], dim=-1).float()


@contextlib.contextmanager
def skippable(skip: torch.Tensor | None, *tensors: torch.Tensor) -> Iterator[None]:
    """Whatever the block does to ``tensors`` is undone, bit for bit, when ``skip`` (a bool scalar
    on their device) is set, without reading it on the host; a no-op when ``skip`` is None. Costs a
    copy of each tensor: for the torch paths (the kernels mask their stores instead)."""
    saved = [t.clone() for t in tensors] if skip is not None else []
    yield
    for t, old in zip(tensors, saved):
        torch.where(skip, old, t, out=t)


def adamw_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: int | torch.Tensor, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                     skip: torch.Tensor | None = None) -> None:
    """torch.optim.AdamW's single-tensor step (moments at ``step - 1`` on entry), in torch ops, in
    its op order: bit-identical to it on CPU. ``step``: the step number, or its
    :func:`adamw_corrections` row ``[2]`` (same bits); ``skip``: a bool scalar tensor, where set
    nothing changes."""
    beta1, beta2 = betas
    with skippable(skip, param, exp_avg, exp_avg_sq):
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if isinstance(step, torch.Tensor):  # addcdiv's value * t1 / t2, with a tensor value
            denom = (exp_avg_sq.sqrt() / step[1]).add_(eps)
            param.add_(exp_avg.mul(-step[0]).div_(denom))
            return
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


def adamw_fused_(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int | torch.Tensor, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 param: torch.Tensor | None = None, skip: torch.Tensor | None = None) -> None:
    """:func:`adamw_reference_` on ``weight`` (contiguous fp32; ``grad`` of any float dtype) in one
    pass, and ``param <- weight`` in param's dtype when ``weight`` is param's fp32 master copy.
    ``step``: the step number, or its :func:`adamw_corrections` row (fp32 ``[2]`` on the weight's
    device); ``skip``: a bool scalar on the device, where set nothing is written."""
    tensors = {"weight": weight, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if param is not None:
        tensors["param"] = param
    for name, t in tensors.items():
        if not t.is_contiguous() or t.shape != weight.shape:
            raise ValueError(f"adamw_fused_: {name} must be contiguous and of the weight's shape "
                             f"{tuple(weight.shape)}, got {tuple(t.shape)} (contiguous: {t.is_contiguous()})")
    if weight.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError(f"adamw_fused_: weight and moments must be fp32, got {weight.dtype}, {exp_avg.dtype}, "
                         f"{exp_avg_sq.dtype}")
    corr = step if isinstance(step, torch.Tensor) else None
    for name, t in (("step corrections", corr), ("skip", skip)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"adamw_fused_: the {name} tensor is on {t.device}, the weight on {weight.device}")
    beta1, beta2 = betas
    n = weight.numel()
    interp = _interpreted(_adamw_kernel)
    # the interpreter truncates fp32 -> bf16 instead of rounding to nearest: copy with torch there
    in_kernel = param is not None and not interp
    BLOCK = 1024 if interp else 2048
    host = (0.0, 1.0) if corr is not None else (lr / (1 - beta1**step), 1 / (1 - beta2**step) ** 0.5)
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        weight, grad, exp_avg, exp_avg_sq, param if in_kernel else weight,
        corr if corr is not None else weight, skip.view(torch.uint8) if skip is not None else weight, n,
        float(1 - lr * weight_decay), float(beta1), float(beta2), float(host[0]), float(host[1]), float(eps),
        CORR=corr is not None, SKIP=skip is not None, HAS_P=in_kernel, BLOCK=BLOCK, num_warps=4)
    if param is not None and not in_kernel:
        with skippable(skip, param):
            param.copy_(weight)
