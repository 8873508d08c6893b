"""MLA attention kernel vs the explicit-logits reference.

CPU: the Triton kernels under TRITON_INTERPRET=1 on tiny fp32 shapes (the interpreter upcasts
tiles to fp32, so this checks the indexing, masking and online-softmax/backward math, not bf16
rounding). GPU (`-m gpu`): bf16 against the fp32 reference on fresh random inputs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (triton.jit reads it at decoration time,
    # also for triton.language's own helpers).
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from k2train.kernels import attention as attn  # noqa: E402
from k2train.kernels.attention import mla_attention, mla_attention_reference  # noqa: E402

# fp32 interpreter: the kernel and the reference differ only in summation order.
TOL_FP32 = 2e-5
# bf16 on GPU: inputs rounded the same way; error from bf16 P and dS in the dots.
TOL_BF16 = {"out": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 1e-2, "max_logit": 1e-3}


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def make_inputs(B, H, S, dqk, dv, dtype, device, seed, strided=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, S, dqk, generator=g) * 1.5
    k = torch.randn(B, H, S, dqk, generator=g)
    v = torch.randn(B, H, S, dv, generator=g)
    do = torch.randn(B, H, S, dv, generator=g)
    if strided:  # [B, S, H, D] memory, as the model's projections produce it
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def random_doc_ids(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S // 2, (B, S), generator=g)
    ids = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        ends = torch.cumsum(lengths[b], 0)
        ids[b] = torch.searchsorted(ends, torch.arange(S), right=True)
    return ids


def run_both(q, k, v, do, scale, causal, doc_ids):
    results = []
    for fn in (mla_attention, mla_attention_reference):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, ml = fn(qq, kk, vv, scale, causal=causal, doc_ids=doc_ids)
        out.backward(do)
        results.append(dict(out=out, max_logit=ml, dq=qq.grad, dk=kk.grad, dv=vv.grad))
    return results


CPU_CASES = [
    # (B, H, S, dqk, dv, causal, docs, strided)
    (1, 2, 32, 24, 16, True, False, False),
    (1, 2, 32, 24, 16, True, True, False),
    (2, 1, 40, 48, 24, True, True, True),  # S not a multiple of the blocks, padded Dv
    (1, 2, 24, 24, 16, False, False, False),
    (1, 1, 32, 32, 16, False, True, False),
    (2, 1, 96, 24, 16, True, True, False),  # several documents per block and blocks per document
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU tests cover CUDA")
@pytest.mark.parametrize("B,H,S,dqk,dv,causal,docs,strided,atomic_dq",
                         [c + (False,) for c in CPU_CASES] + [c + (True,) for c in CPU_CASES[1:3]])
def test_interpreter_matches_reference(B, H, S, dqk, dv, causal, docs, strided, atomic_dq, monkeypatch):
    monkeypatch.setattr(attn, "ATOMIC_DQ", atomic_dq)
    assert attn._INTERPRET, "TRITON_INTERPRET must be set before the kernels are imported"
    seed = hash((B, H, S, dqk, dv, causal, docs)) % 1000
    q, k, v, do = make_inputs(B, H, S, dqk, dv, torch.float32, "cpu", seed, strided)
    doc_ids = random_doc_ids(B, S, seed) if docs else None
    ours, ref = run_both(q, k, v, do, dqk**-0.5, causal, doc_ids)
    for name in ("out", "dq", "dk", "dv"):
        assert ours[name].shape == ref[name].shape
        assert rel_err(ours[name], ref[name]) < TOL_FP32, name
    assert torch.allclose(ours["max_logit"], ref["max_logit"], rtol=1e-5, atol=1e-5)
    assert not ours["max_logit"].requires_grad


def test_doc_spans():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 7, 7, 5, 5, 9, 9]])  # row 1: id 5 comes back
    span = attn._doc_spans(ids)
    assert span.dtype == torch.int32 and span.shape == (2, 2, 8)
    assert span[0, 0].tolist() == [0, 0, 0, 3, 3, 5, 5, 5] and span[0, 1].tolist() == [3, 3, 3, 5, 5, 8, 8, 8]
    assert span[1, 0].tolist() == [0] * 8 and span[1, 1].tolist() == [8] * 8  # no skipping there


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPU tests cover CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_skipped(causal):
    # Documents aligned to the interpreter's 16-row blocks; a NaN in the first document's values
    # (and keys) reaches another document's output or gradients only through a block the kernels
    # visit: masking multiplies by zero, and 0 * NaN is NaN. Then packed ids with a recurring id:
    # no block may be skipped there, and the results match the reference.
    S = 64
    q, k, v, do = make_inputs(2, 2, S, 24, 16, torch.float32, "cpu", 7)
    doc_ids = (torch.arange(S) // 16).expand(2, S).contiguous()
    v[:, :, :16] = float("nan")
    k[:, :, :16] = float("nan")
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, ml = mla_attention(qq, kk, vv, 0.2, causal=causal, doc_ids=doc_ids)
    out.backward(do)
    for t in (out, qq.grad, kk.grad, vv.grad):
        assert t[:, :, :16].isnan().all() and t[:, :, 16:].isfinite().all()
    q, k, v, do = make_inputs(2, 2, S, 24, 16, torch.float32, "cpu", 8)
    doc_ids = torch.tensor([0, 1, 2, 0]).repeat_interleave(16).expand(2, S).contiguous()
    ours, ref = run_both(q, k, v, do, 24**-0.5, causal, doc_ids)
    for name in ("out", "dq", "dk", "dv"):
        assert rel_err(ours[name], ref[name]) < TOL_FP32, name


def test_masking_matters_for_max_logit():
    """A huge logit on a masked (future / other-document) pair must not reach max_logit_H."""
    q, k, v, _ = make_inputs(1, 1, 32, 24, 16, torch.float32, "cpu", 0)
    k[0, 0, 20] = q[0, 0, 3] * 50  # key 20 is in the future of query 3
    doc_ids = torch.zeros(1, 32, dtype=torch.int64)
    doc_ids[:, 16:] = 1
    k[0, 0, 10] = q[0, 0, 25] * 50  # key 10 is in another document than query 25
    for causal_docs in (dict(causal=True), dict(causal=True, doc_ids=doc_ids)):
        _, ml = mla_attention(q, k, v, 0.2, **causal_docs)
        _, ml_ref = mla_attention_reference(q, k, v, 0.2, **causal_docs)
        assert torch.allclose(ml, ml_ref, rtol=1e-5)
    _, ml_full = mla_attention_reference(q, k, v, 0.2, causal=True)
    _, ml_docs = mla_attention_reference(q, k, v, 0.2, causal=True, doc_ids=doc_ids)
    assert ml_docs.item() < ml_full.item()  # the test can fail: masking changed the max


def test_bad_shapes_raise():
    q = torch.zeros(1, 2, 8, 24)
    with pytest.raises(ValueError, match="doc_ids"):
        mla_attention(q, q, q[..., :16], 0.1, doc_ids=torch.zeros(1, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected q, k"):
        mla_attention(q, q[:, :1], q, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("S,docs,atomic_dq", [(512, False, False), (384, True, False), (1000, False, True)])
def test_gpu_bf16_matches_fp32_reference(S, docs, atomic_dq, monkeypatch):
    monkeypatch.setattr(attn, "AUTOTUNE", False)  # one compile per variant; the bench tunes
    monkeypatch.setattr(attn, "ATOMIC_DQ", atomic_dq)
    q, k, v, do = make_inputs(2, 4, S, 192, 128, torch.bfloat16, "cuda", S, strided=True)
    doc_ids = random_doc_ids(2, S, S).cuda() if docs else None
    ours = run_both(q, k, v, do, 192**-0.5, True, doc_ids)[0]
    ref = run_both(q.float(), k.float(), v.float(), do.float(), 192**-0.5, True, doc_ids)[1]
    for name, tol in TOL_BF16.items():
        assert rel_err(ours[name], ref[name]) < tol, (name, rel_err(ours[name], ref[name]))
