"""MoE expert path (permute, grouped GEMMs, SwiGLU, combine) vs the per-expert loop reference,
forward and backward in x, routing weights and all expert weights, on fresh random routings:
fp32 on CPU under the Triton interpreter, bf16 on the GPU."""

import pytest
import torch


pytest.importorskip("triton")
from k2train.kernels.moe import build_routing, combine, expert_mlp_saved, moe_experts_forward, permute  # noqa: E402
from k2train.model.moe import experts_reference, grouped_mm_supported  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _random_case(T, D, I, E, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    # distinct experts per token, skewed load and some experts left empty
    scores = torch.rand(T, E, generator=g) * torch.linspace(0.2, 1.0, E)
    idx = scores.topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g) + 0.1
    ws = [torch.randn(E, I, D, generator=g) / D ** 0.5, torch.randn(E, I, D, generator=g) / D ** 0.5,
          torch.randn(E, D, I, generator=g) / I ** 0.5]
    cast = lambda t: t.to(DEV, dtype).requires_grad_()  # noqa: E731
    return cast(x), idx.to(DEV), w.to(DEV).requires_grad_(), [cast(t) for t in ws]


def _check(T, D, I, E, K, dtype, tol, seed=0, loop=False):
    x, idx, w, ws = _random_case(T, D, I, E, K, dtype, seed)
    y = moe_experts_forward(x, idx, w, *ws, grouped_mm_supported(x) and not loop)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    wsr = [t.detach().double().requires_grad_() for t in ws]
    yr = experts_reference(xr, idx, wr, *wsr)
    yr.backward(dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert _rel(y, yr) < tol
    for got, ref in zip([x, w, *ws], [xr, wr, *wsr]):
        assert _rel(got.grad, ref.grad) < tol


@pytest.mark.parametrize("T,D,I,E,K", [(13, 24, 16, 6, 2), (20, 40, 24, 8, 3)])
@pytest.mark.parametrize("loop", [False, True], ids=["grouped_mm", "expert_loop"])
def test_moe_fp32_matches_loop(T, D, I, E, K, loop):
    # the permute, gate and up GEMMs share one backward (their input gradients summed in the
    # permute's gather): with torch._grouped_mm and with the per-expert loop
    _check(T, D, I, E, K, torch.float32, 1e-5, seed=T, loop=loop)


@pytest.mark.parametrize("fp8", [False, True], ids=["kept", "fp8"])
def test_saved_expert_mlp_permuting_its_tokens_matches_permute_then_op(fp8):
    """``expert_mlp_saved(x_TD, ..., pos_TK=...)`` (the op permutes, and its backward sums the gate
    and up input gradients in the permute's gather) against ``permute`` then the op on the rows:
    the same output and gradients (fp32: to rounding; the sums' order differs)."""
    T, D, I, E, K = 16, 160, 48, 6, 2
    x, idx, w, ws = _random_case(T, D, I, E, K, torch.float32, seed=3)
    r = build_routing(idx, E)
    runs = []
    for fused in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, *ws)]
        xi, wi, a, b, c = leaves
        y_ND = (expert_mlp_saved(xi, a, b, c, r.offs_E, False, fp8, pos_TK=r.pos_TK) if fused
                else expert_mlp_saved(permute(xi, r), a, b, c, r.offs_E, False, fp8))
        out = combine(y_ND, wi, r)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEV))
        runs.append([out.detach(), *(t.grad for t in leaves)])
    for got, ref in zip(*reversed(runs)):
        assert _rel(got, ref) < 1e-6


def test_permute_combine_roundtrip_and_grads():
    T, D, E, K = 9, 70, 5, 3
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEV)
    r = build_routing(idx, E)
    assert r.offs_E[-1].item() == T * K
    x = torch.randn(T, D, device=DEV, requires_grad=True)
    xp = permute(x, r)
    # rows are in expert order and each row is the right token's copy
    exp_of_row = idx.reshape(-1)[torch.argsort(r.pos_TK.reshape(-1).long())]
    assert torch.all(exp_of_row[1:] >= exp_of_row[:-1])
    assert torch.equal(xp[r.pos_TK.long()], x.detach()[:, None].expand(T, K, D))
    w = torch.rand(T, K, device=DEV, requires_grad=True)
    out = combine(xp, w, r)
    torch.testing.assert_close(out, x.detach() * w.detach().sum(1, keepdim=True), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(w.grad, (g * x.detach()).sum(1, keepdim=True).expand(T, K), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g * w.detach().sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


def test_moe_shape_errors():
    x, idx, w, ws = _random_case(4, 8, 6, 3, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="must be"):
        moe_experts_forward(x[:, :5], idx, w, *ws, True)
    with pytest.raises(ValueError, match="topk_idx"):
        moe_experts_forward(x, idx[:, :1], w, *ws, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,D,I,E,K", [(1024, 7168, 2048, 24, 8), (333, 512, 256, 16, 4)])
def test_moe_gpu_bf16(T, D, I, E, K):
    # bf16 operands, fp32 accumulation inside the GEMMs; the loop reference runs in fp64
    _check(T, D, I, E, K, torch.bfloat16, 1.5e-2)
