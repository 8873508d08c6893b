"""The fused cross entropy (kernels/cross_entropy.py) against torch's in fp64, loss and gradient,
on fresh random inputs: fp32 and bf16 logits on the CPU under the Triton interpreter, bf16 at K2's
vocabulary on the GPU; and through the next-token loss (model.loss_impl=triton), whole and chunked."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from k2train.kernels.cross_entropy import cross_entropy, triton_cross_entropy_available  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_without_kernel():
    if not triton_cross_entropy_available(torch.empty(1, device=DEV)):
        pytest.skip("kernels were defined without TRITON_INTERPRET=1 and there is no CUDA device")


def _check(N, V, dtype, tol, scale=3.0):
    _skip_without_kernel()
    g = torch.Generator(device=DEV).manual_seed(N * 7 + V)
    logits = (scale * torch.randn(N, V, device=DEV, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV, generator=g)
    labels[::5] = -100  # ignored rows: loss 0, gradient 0
    weights = torch.rand(N, device=DEV, generator=g)  # a different gradient per row
    loss = cross_entropy(logits, labels)
    (loss * weights).sum().backward()
    ref_x = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, ignore_index=-100, reduction="none")
    (ref * weights.double()).sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert (loss[::5] == 0).all() and (logits.grad[::5] == 0).all()
    err = ((loss.double() - ref).abs().max() / ref.abs().max()).item()
    gerr = ((logits.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()).item()
    assert err < tol and gerr < tol, (err, gerr)


@pytest.mark.parametrize("N, V", [(16, 1000), (5, 129), (3, 64)])
def test_fused_cross_entropy_matches_torch_fp32(N, V):
    # fp32 logits: the kernel's fp32 sums against fp64 (V not a multiple of the block: a partial last block)
    _check(N, V, torch.float32, 1e-5)


def test_fused_cross_entropy_from_bf16_logits_is_fp32_math():
    # bf16 logits, the reference from the same bf16 values in fp64: the loss within fp32's rounding
    # (it never rounds to bf16), the gradient within one bf16 rounding of its output
    _check(8, 3000, torch.bfloat16, 8e-3)


def test_fused_cross_entropy_is_stable_for_large_logits():
    # logits far from 0 (1e4): log-sum-exp with the running max, no overflow
    _check(4, 500, torch.float32, 1e-5, scale=1e4)


def test_bad_shapes_say_what_to_change():
    with pytest.raises(ValueError, match=r"must be \[N, V\]"):
        cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("chunk", [0, 8])
def test_next_token_loss_with_the_fused_kernel(chunk):
    """model.loss_impl=triton through NextTokenLoss (whole, and in chunks with the head recomputed):
    the loss and the gradients of the hidden states and the head equal torch's to fp32 rounding."""
    _skip_without_kernel()
    from k2train.loss import NextTokenLoss

    g = torch.Generator(device=DEV).manual_seed(3)
    hidden = torch.randn(2, 12, 32, device=DEV, generator=g, requires_grad=True)
    head = torch.nn.Linear(32, 300, bias=False, device=DEV)
    labels = torch.randint(0, 300, (2, 12), device=DEV, generator=g)
    labels[0, :3] = -100
    results = []
    for impl in ("torch", "triton"):
        loss_fn = NextTokenLoss(chunk_tokens=chunk, impl=impl)
        loss_fn.head = head
        hidden.grad = head.weight.grad = None
        out = hidden if chunk else head(hidden)
        loss = loss_fn(out, labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*results):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match="impl='cuda'"):
        NextTokenLoss(impl="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_cross_entropy_at_k2_vocabulary_on_the_gpu():
    # 1,024 tokens x 163,840, bf16 logits: the loss to fp32 rounding of the fp64 reference
    _check(1024, 163840, torch.bfloat16, 8e-3)
