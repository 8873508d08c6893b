"""Fused RMSNorm(+residual) and SwiGLU vs their torch references, forward and backward, on fresh
random inputs: fp32 on CPU under the Triton interpreter, bf16 on the GPU."""

import pytest
import torch
import torch.nn.functional as F


pytest.importorskip("triton")
from k2train.kernels.norms import rmsnorm, rmsnorm_residual, triton_norms_available  # noqa: E402
from k2train.kernels.swiglu import swiglu, triton_swiglu_available  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _ref_norm(x, r, w, eps):
    s = x + r
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w, s


def _check_rmsnorm(shape, dtype, tol):
    if not triton_norms_available(torch.empty(1, device=DEV)):
        pytest.skip("kernels were defined without TRITON_INTERPRET=1 and there is no CUDA device")
    D = shape[-1]
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    r = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device=DEV, dtype=dtype)).requires_grad_()
    dy, ds = torch.randn(shape, device=DEV, dtype=dtype), torch.randn(shape, device=DEV, dtype=dtype)
    y, s = rmsnorm_residual(x, r, w, 1e-6)
    (y.float() * dy.float()).sum().add((s.float() * ds.float()).sum()).backward()
    xr, rr, wr = (t.detach().double().requires_grad_() for t in (x, r, w))
    y_ref, s_ref = _ref_norm(xr, rr, wr, 1e-6)
    ((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum()).backward()
    assert _rel(y, y_ref) < tol and _rel(s, s_ref) < tol
    assert _rel(x.grad, xr.grad) < tol and _rel(r.grad, rr.grad) < tol
    assert _rel(w.grad, wr.grad) < tol
    # the plain norm (no residual) through the same kernel
    x2 = x.detach().clone().requires_grad_()
    y2 = rmsnorm(x2, w.detach(), 1e-6)
    y2.backward(dy)
    x2r = x.detach().double().requires_grad_()
    y2r = x2r * torch.rsqrt(x2r.pow(2).mean(-1, keepdim=True) + 1e-6) * w.detach().double()
    y2r.backward(dy.double())
    assert _rel(y2, y2r) < tol and _rel(x2.grad, x2r.grad) < tol


@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 100), (7, 33)])
def test_rmsnorm_residual_fp32(shape):
    _check_rmsnorm(shape, torch.float32, 1e-5)


def _check_swiglu(R, C, dtype, tol, fused_layout):
    if not triton_swiglu_available(torch.empty(1, device=DEV)):
        pytest.skip("kernels were defined without TRITON_INTERPRET=1 and there is no CUDA device")
    if fused_layout:  # gate and up as halves of one [R, 2C] projection output: strided views
        gu = torch.randn(R, 2 * C, device=DEV, dtype=dtype, requires_grad=True)
        g, u = gu[:, :C], gu[:, C:]
        leaves = [gu]
    else:
        g = torch.randn(R, C, device=DEV, dtype=dtype, requires_grad=True)
        u = torch.randn(R, C, device=DEV, dtype=dtype, requires_grad=True)
        leaves = [g, u]
    dh = torch.randn(R, C, device=DEV, dtype=dtype)
    h = swiglu(g, u)
    h.backward(dh)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    gr, ur = (refs[0][:, :C], refs[0][:, C:]) if fused_layout else refs
    hr = F.silu(gr) * ur
    hr.backward(dh.double())
    assert _rel(h, hr) < tol
    for t, tr in zip(leaves, refs):
        assert _rel(t.grad, tr.grad) < tol


@pytest.mark.parametrize("R,C,fused", [(6, 40, False), (3, 130, True)])
def test_swiglu_fp32(R, C, fused):
    _check_swiglu(R, C, torch.float32, 1e-6, fused)


def test_shape_errors():
    with pytest.raises(ValueError, match="must have the same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_residual(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(4096, 7168), (3, 1000, 1536), (17, 512)])
def test_rmsnorm_residual_gpu_bf16(shape):
    # bf16 inputs and outputs, fp32 statistics: one bf16 rounding (2^-9) per output, ~4e-3 relative
    _check_rmsnorm(shape, torch.bfloat16, 8e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("R,C,fused", [(8192, 2048, False), (1000, 2048, True), (33, 300, False)])
def test_swiglu_gpu_bf16(R, C, fused):
    _check_swiglu(R, C, torch.bfloat16, 8e-3, fused)
