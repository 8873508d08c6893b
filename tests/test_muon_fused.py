"""The fused Muon elementwise kernels (k2train.kernels.muon_fused) against the unfused optimizer path:
momentum buffers, NS inputs and updates; Triton's CPU interpreter in CI, the GPU under -m gpu."""

import pytest
import torch

pytest.importorskip("triton")
from k2train.kernels.adamw import adamw_corrections, adamw_fused_, adamw_reference_  # noqa: E402
from k2train.kernels.muon_fused import (  # noqa: E402
    apply_update_, fused_muon_available, momentum_to_ns_input_)
from k2train.optim.muon import MuonClip, muon_momentum_, ns_input_cast  # noqa: E402
from k2train.optim.newton_schulz import ns_input_target_norm, zeropower_via_gram_newtonschulz  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _need_kernels():
    if not fused_muon_available(torch.empty(1, device=DEV)):
        pytest.skip("kernels were defined without TRITON_INTERPRET=1 and there is no CUDA device")


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("shape,transposed", [((3, 20, 36), False), ((36, 20), True), ((17, 17), False)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_to_ns_input_matches_unfused(shape, transposed, nesterov):
    _need_kernels()
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    grad = (torch.randn(*shape, generator=g) * 1e-6).to(DEV)  # a gradient's size: fp16 would underflow raw
    buf = torch.randn(*shape, generator=g).to(DEV) * 1e-6
    ref_buf = buf.clone()
    ref = ns_input_cast(muon_momentum_(grad, ref_buf, 0.95, nesterov), torch.float16)
    # the NS batch holds a tall matrix transposed: write through the transposed view
    store = torch.full(shape[:-2] + (shape[-1], shape[-2]) if transposed else shape, float("nan"),
                       dtype=torch.float16, device=DEV)
    out = store.mT if transposed else store
    momentum_to_ns_input_(grad, buf, out, 0.95, nesterov)  # no scale hint: this step's power of two
    assert _rel(buf, ref_buf) < 1e-6  # fp32, up to FMA contraction
    assert _rel(out, ref) < 1e-3  # the same power of two: one fp16 rounding (2^-11) of equal fp32 values
    # the power of two nearest the target norm: within sqrt(2) of it
    norms = torch.linalg.vector_norm(out.float(), dim=(-2, -1))
    target = ns_input_target_norm(*shape[-2:])
    assert ((norms / target).log2().abs() <= 0.5 + 1e-3).all()


def test_ns_input_scale_hint():
    # The hint (last step's power of two) only predicts this step's: right, the first kernel's
    # output stands; wrong, missing or not finite, the fixup kernel rewrites the matrix. The output
    # is the same either way, and the hint ends as this step's power of two.
    _need_kernels()
    g = torch.Generator().manual_seed(5)
    shape = (2, 24, 40)
    grad = (torch.randn(*shape, generator=g) * 1e-6).to(DEV)
    buf0 = torch.zeros(shape, device=DEV)

    def run(hint, grad=grad):
        buf, out = buf0.clone(), torch.full(shape, float("nan"), dtype=torch.float16, device=DEV)
        momentum_to_ns_input_(grad, buf, out, 0.95, True, scale_hint=hint)
        return out

    hint = torch.zeros(2, device=DEV)
    base = run(hint)
    p2 = hint.clone()
    assert torch.equal(p2, p2.log2().round().exp2()) and (p2 > 0).all()  # powers of two
    ref = ns_input_cast(muon_momentum_(grad, buf0.clone(), 0.95, True), torch.float16)
    assert _rel(base, ref) < 1e-3  # ns_input_cast's power of two (values up to fp32 op order)
    for wrong in [p2, p2 * 2, p2 / 4, p2 * 2.0**40, torch.tensor([float("inf"), float("nan")], device=DEV),
                  torch.tensor([p2[0].item(), 0.0], device=DEV)]:
        hint = wrong.clone()
        assert torch.equal(run(hint), base)
        assert torch.equal(hint, p2)
    # a non-finite gradient gives a non-finite NS input (as unfused), and the next step recovers
    hint = p2.clone()
    bad = grad.clone()
    bad[0, 0, 0] = float("nan")
    assert run(hint, bad)[0].isnan().any() and hint[0].isnan() and torch.equal(hint[1], p2[1])
    assert torch.equal(run(hint), base) and torch.equal(hint, p2)
    with pytest.raises(ValueError, match="scale_hint"):
        run(torch.zeros(3, device=DEV))


@pytest.mark.parametrize("master", [False, True])
def test_apply_update_matches_unfused(master):
    _need_kernels()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 24, 40, generator=g).to(DEV)
    o = torch.randn(2, 40, 24, generator=g).to(DEV).half().mT  # strided, as from the NS batch
    ref = w * (1 - 0.1 * 0.01) - 0.1 * 1.7 * o.float()
    param = torch.empty(2, 24, 40, dtype=torch.bfloat16, device=DEV) if master else None
    apply_update_(w, o, lr=0.1, weight_decay=0.01, lr_scale=1.7, param=param)
    assert torch.allclose(w, ref, rtol=1e-6, atol=1e-7)
    if master:
        assert torch.equal(param, w.bfloat16())
    with pytest.raises(ValueError, match="contiguous fp32"):
        apply_update_(w.half(), o, 0.1, 0.0, 1.0)


@pytest.mark.parametrize("grad_dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_adamw_fused_matches_torch_adamw(grad_dtype, master):
    # Three steps of the one-pass kernel against torch.optim.AdamW's single-tensor arithmetic on
    # fresh random tensors (odd length: a partial block), moments at several scales.
    _need_kernels()
    g = torch.Generator().manual_seed(11)
    n = 3 * 1024 + 77
    w = torch.randn(n, generator=g).to(DEV)
    m, v = torch.randn(n, generator=g).to(DEV) * 1e-3, torch.rand(n, generator=g).to(DEV) * 1e-6
    ref = [t.clone() for t in (w, m, v)]
    dev = [t.clone() for t in (w, m, v)]  # the bias corrections from a step count on the device
    param = torch.empty(n, dtype=torch.bfloat16, device=DEV) if master else None
    for step in (1, 2, 3):
        grad = (torch.randn(n, generator=g) * 10.0 ** -step).to(DEV, grad_dtype)
        hyper = (step, 3e-4, (0.9, 0.95), 1e-8, 0.1)
        adamw_fused_(w, grad, m, v, *hyper, param=param)
        adamw_reference_(ref[0], grad.float(), ref[1], ref[2], *hyper)
        corr = adamw_corrections(torch.tensor([float(step)], device=DEV), *hyper[1:3])[0]
        adamw_fused_(*dev[:1], grad, *dev[1:], corr, *hyper[1:])
        # fp32, same op order but the bias correction folded into a reciprocal: a few ulps
        for got, want in zip((w, m, v, *dev), ref + ref):
            assert torch.allclose(got, want, rtol=2e-6, atol=1e-9)
    if master:
        assert torch.equal(param, w.bfloat16())
    with pytest.raises(ValueError, match="must be fp32"):
        adamw_fused_(w.half(), grad, m, v, *hyper)
    with pytest.raises(ValueError, match="contiguous"):
        adamw_fused_(w, grad[:-1], m, v, *hyper)


def test_optimizer_uses_fused_adamw():
    # MuonClip's AdamW group: fused (interpreter) and torch paths give the same bf16 params
    _need_kernels()
    runs = []
    for fused in (True, False):
        params = _params(torch.bfloat16)
        opt = MuonClip([{"kind": "adamw", "params": params}], lr=1e-2, weight_decay=0.1, fused=fused)
        for step in range(2):
            g = torch.Generator().manual_seed(20 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(DEV, torch.bfloat16)
            assert opt._use_fused_adamw(params[0], opt._target(params[0])) == fused
            opt.step()
        runs.append([opt.master_weight(p).clone() for p in params])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 16, 40), (40, 16), (24, 24), (12, 40)]
    return [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.02).to(DEV, dtype)) for s in shapes]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_fused_muonclip_step_matches_unfused(param_dtype):
    # Two steps of the whole optimizer, Gram NS in fp16 (torch matmuls: same NS on both sides), the
    # fused and unfused elementwise paths; bf16 params exercise the fp32 master write-back.
    _need_kernels()
    ns_fn = lambda G, steps, coefficients, dtype: zeropower_via_gram_newtonschulz(G, steps, coefficients, dtype=dtype)  # noqa: E731
    runs = {}
    for fused in (True, False):
        params = _params(param_dtype)
        opt = MuonClip([{"kind": "muon", "params": params}], lr=0.02, weight_decay=0.1,
                       ns_dtype=torch.float16, ns_fn=ns_fn, fused=fused)
        start = [p.detach().float().clone() for p in params]
        for step in range(2):
            g = torch.Generator().manual_seed(10 + step)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-5).to(DEV, param_dtype)
            assert opt._use_fused(params, [opt._target(p) for p in params]) == fused
            opt.step()
        runs[fused] = ([p.detach().float() - s for p, s in zip(params, start)],
                       [opt.state[p]["momentum_buffer"] for p in params])
    for d_f, d_u in zip(runs[True][0], runs[False][0]):
        # the same update up to fp16 rounding of the NS input (the two paths' momentum math differs in
        # the last fp32 bit: a few NS-input entries one fp16 ulp apart, which NS of the near-singular
        # random 24 x 24 matrix amplifies to ~3e-3; the other shapes agree to <= 2e-4) and bf16
        # rounding of the param
        assert _rel(d_f, d_u) < (2e-2 if param_dtype == torch.bfloat16 else 5e-3)
    for b_f, b_u in zip(runs[True][1], runs[False][1]):
        assert _rel(b_f, b_u) < 1e-6


def _snapshot(opt, params):
    """Every bit the optimizer keeps: params, then each param's state tensors by key."""
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.detach().clone() for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_skip_flag_on_the_device_leaves_every_bit(fused, param_dtype):
    # MuonClip.step(skip=...) with a device flag: set, a step with NaN / inf gradients changes no
    # param, master, moment, momentum buffer or AdamW step count; clear, the step is the one without
    # a flag, bit for bit (Muon and AdamW groups, fused kernels and torch paths).
    _need_kernels()
    ns_fn = lambda G, steps, coefficients, dtype: zeropower_via_gram_newtonschulz(G, steps, coefficients, dtype=dtype)  # noqa: E731
    runs = []
    # (gradient seed, flag): without flags two steps; with flags the same two around a skipped one
    for steps in (((10, None), (12, None)), ((10, False), (11, True), (12, False))):
        params = _params(param_dtype)
        extra = [torch.nn.Parameter((torch.randn(40, generator=torch.Generator().manual_seed(3)) * 0.1).to(DEV, param_dtype))]
        opt = MuonClip([{"kind": "muon", "params": params}, {"kind": "adamw", "params": extra}], lr=0.02,
                       weight_decay=0.1, ns_dtype=torch.float16, ns_fn=ns_fn, fused=fused)
        for seed, flag in steps:
            g = torch.Generator().manual_seed(seed)
            for p in params + extra:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(DEV, param_dtype)
            if flag:
                params[0].grad.view(-1)[3] = float("nan")
                extra[0].grad.view(-1)[0] = float("inf")
                before = _snapshot(opt, params + extra)
            opt.step(skip=None if flag is None else torch.tensor(flag, device=DEV))
            if flag:
                after = _snapshot(opt, params + extra)
                assert len(after) == len(before)
                for a, b in zip(after, before):
                    assert torch.equal(a, b)
        assert opt.state[extra[0]]["step"].item() == 2.0
        runs.append(_snapshot(opt, params + extra))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bool scalar"):
        opt.step(skip=torch.zeros(2, dtype=torch.bool, device=DEV))
