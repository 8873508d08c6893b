"""Fused cross entropy: the per-row loss ``logsumexp(x) - x[label]`` and its gradient
``softmax(x) - onehot(label)``, each in one pass over the logits, in fp32 from logits of any float
dtype.

torch's cross entropy on bf16 logits under autocast keeps the log-softmax in bf16 on CUDA (CUDA's
autocast lets ``cross_entropy`` ask for it in the logits' dtype) and materializes it, an fp32 copy
for ``nll_loss`` and fp32 / bf16 gradients of each: about 10 bytes per logit alive in its backward.
Here the forward reads the logits once and keeps one fp32 log-sum-exp per row; the backward reads
them once more and writes their gradient in their dtype: 4 bytes per bf16 logit (the logits and
their gradient), with every sum and exponential in fp32, as from fp32 logits.

Rows whose label is ``ignore_index`` have loss 0 and a zero gradient. Without Triton, or for CPU
tensors when Triton is not in interpreter mode (TRITON_INTERPRET=1), the same math runs in torch
(:func:`cross_entropy_torch`).
"""
from __future__ import annotations

import torch

from ._triton import interpreted as _interpreted, runs_on, tl, triton


if triton is not None:

    @triton.jit
    def _ce_fwd_kernel(X, LABELS, LOSS, LSE, V, s_x, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = X + row * s_x
        # per lane: the running max and the sum of exp(x - max) over the blocks it saw
        m = tl.full((BLOCK,), -1e30, tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
            m = m_new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        label = tl.load(LABELS + row)
        keep = label != ignore_index
        x_label = tl.load(base + tl.where(keep, label, 0)).to(tl.float32)
        tl.store(LOSS + row, tl.where(keep, lse - x_label, 0.0))
        tl.store(LSE + row, lse)

    @triton.jit
    def _ce_bwd_kernel(X, LABELS, LSE, DLOSS, DX, V, s_x, s_dx, s_dloss, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        g = tl.where(label != ignore_index, tl.load(DLOSS + row * s_dloss).to(tl.float32), 0.0)
        lse = tl.load(LSE + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(X + row * s_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
            d = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(DX + row * s_dx + cols, (d * g).to(DX.dtype.element_ty), mask=mask)


def _block(V: int, kernel) -> tuple[int, int]:
    if _interpreted(kernel):
        return triton.next_power_of_2(min(V, 128)), 1
    return min(triton.next_power_of_2(V), 4096), 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# torch.library custom ops, as the other kernels: torch.compile keeps each launch one opaque node
@torch.library.custom_op("k2kernels::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _rows(logits)
    N, V = x.shape
    loss = torch.empty(N, device=x.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    block, warps = _block(V, _ce_fwd_kernel)
    if N > 0:
        _ce_fwd_kernel[(N,)](x, labels, loss, lse, V, x.stride(0), ignore_index, BLOCK=block, num_warps=warps)
    return loss, lse


@torch.library.custom_op("k2kernels::cross_entropy_bwd", mutates_args=())
def _ce_bwd(dloss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            ignore_index: int) -> torch.Tensor:
    x = _rows(logits)
    N, V = x.shape
    dx = torch.empty(N, V, device=x.device, dtype=x.dtype)
    block, warps = _block(V, _ce_bwd_kernel)
    if N > 0:
        _ce_bwd_kernel[(N,)](x, labels, lse, dloss, dx, V, x.stride(0), dx.stride(0), dloss.stride(0), ignore_index,
                             BLOCK=block, num_warps=warps)
    return dx


@_ce_fwd.register_fake
def _ce_fwd_fake(logits, labels, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


@_ce_bwd.register_fake
def _ce_bwd_fake(dloss, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _save(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    return _ce_bwd(dloss, logits, labels, lse, ctx.ignore_index), None, None


_ce_fwd.register_autograd(_backward, setup_context=_save)


def triton_cross_entropy_available(t: torch.Tensor) -> bool:
    return triton is not None and runs_on(t, _ce_fwd_kernel)


def cross_entropy_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Reference: the per-row loss in fp32 from fp32 logits (0 where the label is ``ignore_index``)."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The per-row cross entropy of ``logits [N, V]`` against ``labels [N]`` in fp32 ([N]),
    differentiable in ``logits`` (the gradient in their dtype); fused where Triton runs."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} must be [N, V] and labels "
                         f"{tuple(labels.shape)} [N]")
    if not triton_cross_entropy_available(logits):
        return cross_entropy_torch(logits, labels, ignore_index)
    return _ce_fwd(logits, labels.contiguous(), ignore_index)[0]
