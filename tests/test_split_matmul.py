"""The router's fp32 matmul (k2train.kernels.split_matmul): the split into bf16 parts against fp64
(its arithmetic emulated by fp32 matmuls on the CPU, the real bf16 GEMMs under -m gpu), the fp32
path against the router's former ``F.linear(x.float(), w.float())`` bit for bit, and what each
keeps for the backward."""

import pytest
import torch
import torch.nn.functional as F

from k2train.kernels.split_matmul import linear_fp32

BF16, FP32 = torch.bfloat16, torch.float32


def _inputs(x_dtype, w_dtype, device="cpu", T=96, D=1024, E=48, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, D, device=device, generator=g).to(x_dtype).requires_grad_()
    w = (torch.randn(E, D, device=device, generator=g) * D**-0.5).to(w_dtype).requires_grad_()
    gout = torch.randn(T, E, device=device, generator=g)
    return x, w, gout


def _run(x, w, gout, mode):
    x.grad = w.grad = None
    out = linear_fp32(x, w, mode) if mode else F.linear(x.double(), w.double())
    out.backward(gout.to(out.dtype))
    return out.detach(), x.grad.clone(), w.grad.clone()


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# forward, dx, dw: relative (Frobenius) error against fp64 on the same inputs. An fp32 operand
# keeps 16 of its 24 mantissa bits in its two parts (~1e-5 of the product); two bf16 operands
# multiply exactly (only fp32 summation is left); a bf16 gradient is rounded as the fp64
# reference's is (they differ where a value sits near a rounding boundary).
@pytest.mark.parametrize(
    "x_dtype, w_dtype, bound",
    [(BF16, BF16, (1e-6, 1e-3, 1e-3)), (BF16, FP32, (2e-5, 1e-3, 2e-5)), (FP32, FP32, (2e-5, 2e-5, 2e-5))],
)
def test_split_against_fp64(x_dtype, w_dtype, bound):
    x, w, gout = _inputs(x_dtype, w_dtype)
    ref = _run(x, w, gout, None)
    split = _run(x, w, gout, "emulate")
    assert split[0].dtype == FP32 and split[1].dtype == x_dtype and split[2].dtype == w_dtype
    errors = [_rel(a, r) for a, r in zip(split, ref)]
    assert all(e < b for e, b in zip(errors, bound)), (errors, bound)
    # one bf16 GEMM instead would be ~400x worse where both operands are fp32
    if x_dtype == w_dtype == FP32:
        assert _rel(F.linear(x.to(BF16), w.to(BF16)), ref[0]) > 100 * errors[0]


def test_fp32_path_is_the_former_router_bit_for_bit():
    for x_dtype, w_dtype in [(BF16, FP32), (BF16, BF16), (FP32, FP32)]:
        x, w, gout = _inputs(x_dtype, w_dtype, seed=1)
        x.grad = w.grad = None
        out = F.linear(x.float(), w.float())
        out.backward(gout)
        old = out.detach(), x.grad.clone(), w.grad.clone()
        new = _run(x, w, gout, "fp32")
        assert all(torch.equal(a, b) for a, b in zip(new, old)), (x_dtype, w_dtype)
    with pytest.raises(ValueError, match="use auto, split, fp32 or emulate"):
        linear_fp32(x, w, "tf32")


@pytest.mark.parametrize("mode", ["fp32", "emulate"])
def test_a_bf16_input_is_kept_as_it_is(mode):
    # the former router kept an fp32 copy of its bf16 input for the backward (4 bytes per element)
    x, w, _ = _inputs(BF16, FP32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_fp32(x, w, mode)
    big = [t for t in saved if t is not None and t.shape == x.shape]
    assert len(big) == 1 and big[0].dtype == BF16 and big[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("mode", ["fp32", "emulate"])
def test_autocast_does_not_lower_it(mode):
    # a training step runs its backward inside its autocast region too
    x, w, gout = _inputs(FP32, FP32, seed=2)
    ref = _run(x, w, gout, None)
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=BF16):
        out = linear_fp32(x, w, mode)
        out.backward(gout)
    errors = [_rel(a, r) for a, r in zip((out.detach(), x.grad, w.grad), ref)]
    assert out.dtype == FP32 and all(e < 2e-5 for e in errors), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_split_on_the_tensor_cores(compiled):
    # Hopper's tensor cores sum bf16 products with less than fp32's rounding: ~1e-5 of the product
    # where the emulation is exact (an H100, 2026-12-05: forward 7.9e-6 against the fp32 GEMM's 2.4e-7).
    # Compiled, a split by casts lost its low part (inductor keeps a cast's bf16 result in fp32 inside
    # a fused kernel): dx, dw 2.6e-3 on the H100; the CPU's inductor does not show it.
    fn = torch.compile(linear_fp32, fullgraph=True) if compiled else linear_fp32
    for x_dtype, w_dtype, bound in [(BF16, BF16, (2e-5, 1e-3, 1e-3)), (BF16, FP32, (2e-5, 1e-3, 2e-5)),
                                    (FP32, FP32, (2e-5, 2e-5, 2e-5))]:
        x, w, gout = _inputs(x_dtype, w_dtype, "cuda", T=4096, D=7168, E=384)
        ref = _run(x, w, gout, None)
        x.grad = w.grad = None
        out = fn(x, w, "split")
        out.backward(gout)
        errors = [_rel(a, r) for a, r in zip((out.detach(), x.grad, w.grad), ref)]
        assert all(e < b for e, b in zip(errors, bound)), (x_dtype, errors)

