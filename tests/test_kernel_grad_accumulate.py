"""The fp32 gradient accumulator (k2train.kernels.grad_accumulate) against torch's in-place add and
copy: bit-identical on fresh random inputs; Triton's CPU interpreter in CI, the GPU under -m gpu."""

import pytest
import torch

pytest.importorskip("triton")
from k2train.kernels._triton import runs_on  # noqa: E402
from k2train.kernels.grad_accumulate import _accumulate_kernel, accumulate_  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _need_kernel():
    if not runs_on(torch.empty(1, device=DEV), _accumulate_kernel):
        pytest.skip("the kernel was defined without TRITON_INTERPRET=1 and there is no CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (4097,), (33, 130), (3, 64, 96)])
def test_accumulate_matches_torch(dtype, shape):
    _need_kernel()
    g = torch.Generator(device=DEV).manual_seed(sum(shape) * 8 + dtype.itemsize)
    acc = torch.randn(shape, device=DEV, generator=g) * 1e3
    grads = [(torch.randn(shape, device=DEV, generator=g) * 10.0 ** k).to(dtype) for k in (-3, 0, 2)]
    ref = acc.clone()
    for x in grads:
        ref.add_(x)
        assert accumulate_(acc, x, interpreter=True) is acc
    assert torch.equal(acc, ref)
    accumulate_(acc, grads[0], add=False, interpreter=True)
    assert torch.equal(acc, grads[0].float())


def test_other_layouts_take_torch():
    # a non-contiguous gradient, or one of another shape (broadcast), is torch's add: the same bits
    acc = torch.randn(8, 6, device=DEV)
    x = torch.randn(6, 8, device=DEV).to(torch.bfloat16).t()
    ref = acc.clone().add_(x)
    assert torch.equal(accumulate_(acc, x, interpreter=True), ref)
    row = torch.randn(6, device=DEV).to(torch.bfloat16)
    assert torch.equal(accumulate_(acc, row, interpreter=True), ref.add_(row))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulate_large_on_the_gpu():
    # more than 2^31 bytes of accumulator: the offsets are 64-bit
    acc = torch.randn(2**29 + 7, device="cuda")
    x = torch.randn(acc.shape, device="cuda", dtype=torch.bfloat16)
    ref = acc.clone().add_(x)
    assert torch.equal(accumulate_(acc, x), ref)
