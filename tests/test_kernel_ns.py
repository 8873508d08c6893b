"""Newton-Schulz kernels vs the torch reference: the symmetric Gram kernel (syrk) exactly in fp32
under the Triton interpreter on CPU, the full batched NS5 in bf16 (CPU interpreter and GPU)."""

import pytest
import torch


pytest.importorskip("triton")
from k2train.kernels.newton_schulz import (  # noqa: E402
    gemmt, gemmt_blocked, gemmt_persistent, gemmt_tma, syrk, triton_ns_available, zeropower_gram_batched, zeropower_ns_batched,
    zeropower_ns_reference)
from k2train.kernels import newton_schulz  # noqa: E402
from k2train.optim.newton_schulz import zeropower_via_gram_newtonschulz  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 products: exact fp32 under the CPU interpreter; on a GPU Triton's fp32 dot is TF32 (10-bit
# mantissa, ~3e-4 relative over these sums)
FP32_TOL = 1e-5 if DEV == "cpu" else 2e-3


def _rel(out, ref):
    ref = ref.double().to(out.device)
    return ((out.double() - ref).norm() / ref.norm()).item()


def _need_triton():
    if not triton_ns_available(torch.empty(1, device=DEV)):
        pytest.skip("kernels were defined without TRITON_INTERPRET=1 and there is no CUDA device")


@pytest.mark.parametrize("N,M,K", [(2, 37, 50), (1, 100, 20), (3, 48, 33)])
def test_syrk_fp32_matches_matmul(N, M, K):
    _need_triton()
    g = torch.Generator().manual_seed(N * 1000 + M + K)
    X = torch.randn(N, M, K, generator=g).to(DEV)
    Y = torch.randn(N, M, M, generator=g).to(DEV)
    Y = Y + Y.mT  # symmetric, as in the NS step
    ref = X.double() @ X.double().mT
    assert _rel(syrk(X), ref) < FP32_TOL
    out = syrk(X, alpha=-0.5, Y_NMM=Y, beta=2.0)
    assert _rel(out, -0.5 * ref + 2.0 * Y.double()) < FP32_TOL
    # the strictly lower triangle is mirrored: exactly symmetric
    assert torch.equal(out, out.mT)


@pytest.mark.parametrize("N,M", [(2, 37), (1, 20)])
def test_gemmt_of_commuting_symmetric_matrices(N, M):
    # A, B polynomials of one symmetric S: A B^T = A B is symmetric, the kernel's lower tiles + mirror
    # give it; with Y and diag: the Gram NS step's Q = a I + b R + c R R.
    _need_triton()
    g = torch.Generator().manual_seed(N + M)
    S = torch.randn(N, M, M, generator=g, dtype=torch.float64)
    S = (S + S.mT) / M
    A, B = (2 * S + S @ S), (S - 3 * S @ S @ S)
    ref = -1.5 * A @ B + 0.5 * S + 3.0 * torch.eye(M, dtype=torch.float64)
    out = gemmt(A.float().to(DEV), B.float().to(DEV), alpha=-1.5, Y_NMM=S.float().to(DEV), beta=0.5, diag=3.0)
    assert _rel(out, ref) < FP32_TOL
    assert torch.equal(out, out.mT)
    with pytest.raises(ValueError, match="one shape"):
        gemmt(A.float(), B[:, :-1].float())
    # TMA tile loads (tensor descriptors; the interpreter emulates them): K = 40 keeps fp32 rows
    # 16-byte aligned, so the descriptor kernel runs rather than its fallback
    tma = gemmt_tma(A.float().to(DEV), B.float().to(DEV), alpha=-1.5, Y_NMM=S.float().to(DEV), beta=0.5, diag=3.0)
    assert _rel(tma, ref) < FP32_TOL and torch.equal(tma, tma.mT)
    # the cuBLAS-blocked version, on any device (3 blocks: uneven edges at M=37 and 20)
    blocked = gemmt_blocked(A.float().to(DEV), B.float().to(DEV), alpha=-1.5, Y_NMM=S.float().to(DEV), beta=0.5,
                            diag=3.0, scale_N=torch.full((N,), 2.0, device=DEV), blocks=3)
    assert _rel(blocked, 2 * (-1.5 * A @ B + 0.5 * S) + 3.0 * torch.eye(M, dtype=torch.float64)) < FP32_TOL


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("N,M", [(1, 20), (3, 40), (2, 64)])
def test_gemmt_persistent(N, M, split, monkeypatch):
    # One persistent launch over every lower tile of every matrix (three programs under the
    # interpreter, so each walks tiles of several matrices). The interpreter's 16 x 16 blocks in
    # 16 x 16 (split 1) or 32 x 16 tiles (split 2, the GPU's 256 x 128 shape), over odd (M = 20:
    # 2 blocks, the last partial; 40: 3) and even (64: 4) block counts. M % 4 == 0: fp32 rows are
    # 16-byte aligned, so the descriptor kernel runs rather than its fallback. (On a GPU fp32 takes
    # the pointer-load kernel; test_gemmt_persistent_gpu_fp16 runs the persistent one.)
    _need_triton()
    monkeypatch.setattr(newton_schulz, "_INTERPRETER_SPLIT", split)
    g = torch.Generator().manual_seed(N + M + split)
    S = torch.randn(N, M, M, generator=g, dtype=torch.float64)
    S = (S + S.mT) / M
    A, B = (2 * S + S @ S), (S - 3 * S @ S @ S)
    scale = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    ref = scale[:, None, None] * (-1.5 * A @ B) + 0.5 * S + 3.0 * torch.eye(M, dtype=torch.float64)
    out = gemmt_persistent(A.float().to(DEV), B.float().to(DEV), alpha=-1.5, Y_NMM=S.float().to(DEV), beta=0.5,
                           diag=3.0, scale_N=scale.float().to(DEV))
    assert _rel(out, ref) < FP32_TOL and torch.equal(out, out.mT)
    X = torch.randn(N, M, 24, generator=g)
    gram = gemmt_persistent(X.to(DEV))
    assert _rel(gram, X.double() @ X.double().mT) < FP32_TOL and torch.equal(gram, gram.mT)


@pytest.mark.parametrize("sym_impl", ["triton", "tma", "persistent", "blocked"])
@pytest.mark.parametrize("shape", [(3, 24, 80), (2, 80, 24), (20, 32)])
def test_gram_ns_kernel_matches_torch_gram(shape, sym_impl):
    # The kernel path and the torch reference run the same schedule; in fp32 (the interpreter's
    # precision) they differ only in summation order. On the GPU, fp16: closer to the exact NS5 than
    # the textbook bf16 loop (the criterion of tests/test_muon_newton_schulz.py).
    _need_triton()
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(DEV)
    ref64 = zeropower_ns_reference(G.double())
    if DEV == "cpu":
        out = zeropower_gram_batched(G, dtype=torch.float32, impl="triton", sym_impl=sym_impl)
        ref = zeropower_via_gram_newtonschulz(G, dtype=torch.float32)
        assert out.shape == G.shape and _rel(out, ref) < 1e-5 and _rel(out, ref64) < 1e-5
    else:
        out = zeropower_gram_batched(G, dtype=torch.float16, impl="triton", sym_impl=sym_impl)
        assert out.shape == G.shape and out.dtype == torch.float16
        assert _rel(out, ref64) <= 0.5 * _rel(zeropower_ns_reference(G.bfloat16()), ref64)


@pytest.mark.parametrize("sym_impl", ["triton", "blocked"])
@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 40, 24), (33, 20)])
def test_ns_batched_matches_reference(shape, sym_impl):
    _need_triton()
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(*shape, generator=g).to(DEV)
    out = zeropower_ns_batched(G, impl="triton", sym_impl=sym_impl)
    assert out.shape == G.shape and out.dtype == torch.bfloat16
    ref64 = zeropower_ns_reference(G.double())
    textbook_bf16 = zeropower_ns_reference(G.bfloat16())  # what Muon implementations run
    # bf16 NS5 amplifies rounding in the small singular directions: the textbook bf16 loop lands
    # ~3.3e-2 from the fp64 iteration at these sizes; ours must be no worse (measured ~2.5e-2)
    assert _rel(out, ref64) < 4e-2
    assert _rel(out, ref64) <= 1.1 * _rel(textbook_bf16, ref64)
    # and the result is close to orthogonal: singular values in NS5's band around 1
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_ns_torch_path_matches_reference_cpu():
    G = torch.randn(4, 30, 70)
    assert _rel(zeropower_ns_batched(G, impl="torch"), zeropower_ns_reference(G.double())) < 3e-2


def test_ns_rejects_bad_input():
    with pytest.raises(ValueError, match="expects"):
        zeropower_ns_batched(torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="impl"):
        zeropower_ns_batched(torch.randn(3, 4), impl="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,M,K", [(4, 2048, 7168), (2, 576, 7168), (2, 1000, 1536), (1, 300, 301)])
def test_ns_gpu_bf16(N, M, K):
    G = torch.randn(N, M, K, device="cuda")
    X = G.bfloat16()
    # fp32 accumulation, one bf16 rounding of the output (measured 1.8e-3 at 2048 x 7168)
    assert _rel(syrk(X), X.double() @ X.double().mT) < 4e-3
    out = zeropower_ns_batched(G)
    ref = zeropower_ns_batched(G, impl="torch")
    ref64 = zeropower_ns_reference(G.double())
    assert _rel(out, ref64) <= 1.1 * _rel(zeropower_ns_reference(G.bfloat16()), ref64)
    assert _rel(out, ref) < 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,M,K", [(4, 2048, 7168), (2, 576, 7168), (2, 16384, 512), (1, 300, 301)])
def test_gram_ns_gpu_fp16(N, M, K):
    G = torch.randn(N, M, K, device="cuda")
    out = zeropower_gram_batched(G)
    assert out.dtype == torch.float16 and out.shape == G.shape
    ref64 = zeropower_ns_reference(G.double())
    textbook = _rel(zeropower_ns_reference(G.bfloat16()), ref64)
    assert _rel(out, ref64) <= 0.5 * textbook  # measured on the CPU reference: 3-10x under it
    # the torch reference of the same schedule, fp16 too: only summation order and tiling differ
    assert _rel(out, zeropower_via_gram_newtonschulz(G, dtype=torch.float16)) < 1e-2
    Q = torch.randn(N, min(M, K), min(M, K), device="cuda", dtype=torch.float16)
    S = (Q + Q.mT) / 2
    P = S @ S
    assert _rel(gemmt(S, P), S.double() @ P.double()) < 2e-3  # fp32 accumulation, one fp16 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,M,K", [(4, 2048, 7168), (3, 2048, 2048), (1, 7168, 8192), (2, 1536, 12288), (2, 1000, 1536)])
def test_gemmt_persistent_gpu_fp16(N, M, K):
    # fp32 accumulation and one fp16 rounding, as cuBLAS: within fp16's half-ulp (4.9e-4) of the
    # fp64 product, and exactly symmetric; with Y and diag (Gram NS's Q = a I + b R + c R R)
    A = torch.randn(N, M, K, device="cuda", dtype=torch.float16) / K**0.5
    ref = A.double() @ A.double().mT
    out = gemmt_persistent(A)
    assert _rel(out, ref) < 5e-4 and torch.equal(out, out.mT)
    R = (ref / ref.diagonal(dim1=-2, dim2=-1).amax()).half()
    out = gemmt_persistent(R, alpha=2.0315, Y_NMM=R, beta=-4.775, diag=3.4445)
    refq = 2.0315 * R.double() @ R.double() - 4.775 * R.double() + 3.4445 * torch.eye(M, device="cuda", dtype=torch.float64)
    assert _rel(out, refq) < 5e-4 and torch.equal(out, out.mT)
