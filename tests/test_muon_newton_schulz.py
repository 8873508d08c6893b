"""Newton-Schulz: bitwise against torch.optim.Muon's internal NS, batched == per matrix, orthogonality."""

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

from k2train.optim.newton_schulz import NS_COEFFICIENTS, zeropower_via_newtonschulz


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (7, 130)])
def test_matches_torch_muon_bitwise(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = zeropower_via_newtonschulz(G, steps=5)
    ref = torch_ns(G, NS_COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert ours.shape == G.shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", [(5, 24, 40), (3, 40, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_equals_per_matrix(shape, dtype):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    batched = zeropower_via_newtonschulz(G, dtype=dtype)
    each = torch.stack([zeropower_via_newtonschulz(g, dtype=dtype) for g in G])
    # CPU bmm/baddbmm reduce in the same order as mm/addmm: bitwise. Elsewhere allow dtype rounding.
    assert torch.equal(batched, each)


def test_singular_values_near_one():
    # The quintic deliberately overshoots: singular values land in roughly [0.6, 1.2], not at 1.
    G = torch.randn(64, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X = zeropower_via_newtonschulz(G, dtype=torch.float32).double()
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3, s
    # Same singular vectors as the exact polar factor U V^T (up to the singular-value spread).
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0)
    assert cos > 0.95


def test_scale_invariant_and_input_untouched():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))
    G0 = G.clone()
    a = zeropower_via_newtonschulz(G, dtype=torch.float32)
    b = zeropower_via_newtonschulz(G * 1024.0, dtype=torch.float32)  # power of two: exact scaling
    assert torch.equal(G, G0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_zero_matrix_stays_zero():
    assert torch.count_nonzero(zeropower_via_newtonschulz(torch.zeros(8, 4))) == 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz(torch.zeros(3))
    with pytest.raises(ValueError, match="coefficients"):
        zeropower_via_newtonschulz(torch.zeros(3, 3), coefficients=(1.0, 2.0))
