"""QK-Clip: the MLA rule on raw weights, then on a tiny K2Model: (a) clipped heads re-run at tau,
other heads unchanged; (b) V rows, shared rope key and unclipped heads bit-identical; (c) clipping
off = plain Muon; fp32 master copies clipped too."""


import pytest
import torch

from k2train.config import OptimConfig, load_config
from k2train.model import K2Model
from k2train.optim import build_optimizer
from k2train.optim.qk_clip import apply_qk_clip, attention_modules, head_clip_scale, qk_clip_

H, DN, DR, DV, RQ, RKV = 4, 6, 4, 5, 8, 7
# bf16 matmuls are ~20x slower than fp32 on CPU; the clip does not depend on the NS dtype.
FAST = dict(ns_dtype="float32")


def test_rule_on_raw_weights():
    g = torch.Generator().manual_seed(0)
    q_b = torch.randn(H * (DN + DR), RQ, generator=g)
    kv_b = torch.randn(H * (DN + DV), RKV, generator=g)
    q0, kv0 = q_b.clone(), kv_b.clone()
    s = torch.tensor([50.0, 250.0, float("-inf"), 400.0])
    mask = qk_clip_(q_b, kv_b, s, 100.0, H, DN, DR, DV)
    assert mask.tolist() == [False, True, False, True]
    gamma = torch.tensor([1.0, 0.4, 1.0, 0.25])
    q, q_ref = q_b.view(H, DN + DR, RQ), q0.view(H, DN + DR, RQ)
    kv, kv_ref = kv_b.view(H, DN + DV, RKV), kv0.view(H, DN + DV, RKV)
    for h in range(H):
        torch.testing.assert_close(q[h, :DN], q_ref[h, :DN] * gamma[h].sqrt(), rtol=1e-6, atol=0)
        torch.testing.assert_close(q[h, DN:], q_ref[h, DN:] * gamma[h], rtol=1e-6, atol=0)
        torch.testing.assert_close(kv[h, :DN], kv_ref[h, :DN] * gamma[h].sqrt(), rtol=1e-6, atol=0)
        assert torch.equal(kv[h, DN:], kv_ref[h, DN:])  # V rows never change
    for h in (0, 2):  # unclipped heads: bit-identical
        assert torch.equal(q[h], q_ref[h]) and torch.equal(kv[h], kv_ref[h])
    # Per head: q_nope.k_nope scales by sqrt(g)^2 and q_rope.k_rope by g, i.e. both by g.
    assert torch.allclose(gamma.sqrt() ** 2, gamma)


def test_rule_rejects_wrong_layout():
    with pytest.raises(ValueError, match="num_heads"):
        qk_clip_(torch.zeros(10, 3), torch.zeros(H * (DN + DV), 3), torch.zeros(H), 1.0, H, DN, DR, DV)


def test_gamma_is_one_unless_above_tau():
    s = torch.tensor([float("nan"), float("-inf"), 100.0, 100.5])
    gamma = head_clip_scale(s, 100.0)
    assert gamma[:3].tolist() == [1.0, 1.0, 1.0]
    assert gamma[3].item() == pytest.approx(100.0 / 100.5, rel=1e-7)  # fp32


def _tiny(seed=0, dtype=torch.float32):
    cfg = load_config().model
    cfg.attn_impl = "eager"
    model = K2Model(cfg)
    model.init_weights(seed)
    return model.to(dtype), cfg


def _batch(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def _train_step(model, opt, tokens):
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()


def _capture_attention_inputs(model, attn, tokens):
    """Run the model once and keep each MLA's call arguments (its input is the residual stream)."""
    calls, hooks = {}, []
    for i, m in attn.items():
        hooks.append(
            m.register_forward_pre_hook(lambda mod, args, kwargs, i=i: calls.__setitem__(i, (args, kwargs)), with_kwargs=True)
        )
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return calls


def _rerun(attn, calls):
    """Each MLA on its captured input; returns its per-head max logit [L, H]."""
    out = []
    with torch.no_grad():
        for i, m in attn.items():
            m.reset_max_logit()
            args, kwargs = calls[i]
            m(*args, **kwargs)
            out.append(m.max_logit.clone())
    return torch.stack(out)


def test_clip_on_tiny_model_a_and_b():
    model, cfg = _tiny()
    attn = attention_modules(model)
    assert list(attn) == list(range(cfg.num_hidden_layers))
    tokens = _batch(cfg)
    with torch.no_grad():  # make the logits large in some heads of some layers
        for i in (0, 2):
            w = attn[i].q_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.q_lora_rank)
            w[1:3] *= 400.0
    opt = build_optimizer([model], OptimConfig(lr=1e-3, **FAST))
    _train_step(model, opt, tokens)  # a real step first: the clip acts on post-step weights
    for m in attn.values():
        m.reset_max_logit()
    calls = _capture_attention_inputs(model, attn, tokens)
    before = torch.stack([m.max_logit.clone() for m in attn.values()])
    assert torch.equal(_rerun(attn, calls), before)  # re-running a module on its input is exact
    tau = float(before[before < before.max()].median())  # some heads above, some below
    clipped_mask = before > tau
    assert 0 < clipped_mask.sum() < clipped_mask.numel()

    weights0 = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = apply_qk_clip(attn, tau, optimizer=opt)
    assert all(torch.isinf(m.max_logit).all() for m in attn.values())  # reset for the next step
    assert metrics["clipped_heads"] == int(clipped_mask.sum())
    assert metrics["max_logit"] == pytest.approx(float(before.max()))
    for i in attn:
        assert metrics[f"clipped_heads/layer_{i}"] == int(clipped_mask[i].sum())

    # (a) every clipped head re-runs at tau (fp32: rtol 1e-5), every other head is unchanged, bitwise.
    after = _rerun(attn, calls)
    torch.testing.assert_close(after[clipped_mask], torch.full_like(after[clipped_mask], tau), rtol=1e-5, atol=0)
    assert torch.equal(after[~clipped_mask], before[~clipped_mask])

    # (b) untouched weights are bit-identical.
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    state = model.state_dict()
    for name, w in state.items():
        if not (name.endswith("q_b_proj.weight") or name.endswith("kv_b_proj.weight")):
            assert torch.equal(w, weights0[name]), name  # includes kv_a_proj_with_mqa (shared rope key)
    for i in attn:
        p = f"layers.{i}.self_attn."
        q, q0 = state[p + "q_b_proj.weight"].view(H, dn + dr, -1), weights0[p + "q_b_proj.weight"].view(H, dn + dr, -1)
        kv, kv0 = state[p + "kv_b_proj.weight"].view(H, dn + dv, -1), weights0[p + "kv_b_proj.weight"].view(H, dn + dv, -1)
        assert torch.equal(kv[:, dn:], kv0[:, dn:])  # V rows
        for h in range(H):
            if not clipped_mask[i, h]:
                assert torch.equal(q[h], q0[h]) and torch.equal(kv[h], kv0[h])
            else:
                assert not torch.equal(q[h], q0[h])
