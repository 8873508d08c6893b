"""QK-Clip on a tiny K2Model: (c) clipping off = plain Muon; fp32 master copies are clipped too."""

import copy

import torch

from k2train.config import OptimConfig
from k2train.optim import build_optimizer
from k2train.optim.qk_clip import apply_qk_clip, attention_modules

from test_qk_clip import FAST, _batch, _tiny, _train_step


def test_c_clipping_off_equals_muon():
    model_a, cfg = _tiny(seed=3)
    model_b = copy.deepcopy(model_a)
    opt_a = build_optimizer([model_a], OptimConfig(lr=5e-3, qk_clip=False, **FAST))
    opt_b = build_optimizer([model_b], OptimConfig(lr=5e-3, **FAST))
    attn_b = attention_modules(model_b)
    for step in range(2):
        tokens = _batch(cfg, seed=10 + step)
        _train_step(model_a, opt_a, tokens)
        _train_step(model_b, opt_b, tokens)
        metrics = apply_qk_clip(attn_b, None)  # measure only
        assert metrics["clipped_heads"] == 0 and metrics["max_logit"] > 0
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        if not n.endswith("max_logit"):
            assert torch.equal(a, b), n
    # A tau above every logit is the same as no clip.
    before = copy.deepcopy(model_b.state_dict())
    _train_step(model_b, opt_b, _batch(cfg, seed=20))
    after_step = copy.deepcopy(model_b.state_dict())
    assert apply_qk_clip(attn_b, 1e9)["clipped_heads"] == 0
    for n, w in model_b.state_dict().items():
        assert torch.equal(w, after_step[n]), n
    assert not torch.equal(before["layers.1.self_attn.q_b_proj.weight"], after_step["layers.1.self_attn.q_b_proj.weight"])


def test_bf16_model_clips_the_fp32_master():
    model, cfg = _tiny(seed=4, dtype=torch.bfloat16)
    attn = attention_modules(model)
    opt = build_optimizer([model], OptimConfig(lr=1e-3, **FAST))
    _train_step(model, opt, _batch(cfg))
    m = attn[1]
    w, master = m.q_b_proj.weight, opt.master_weight(m.q_b_proj.weight)
    assert master is not None and master.dtype == torch.float32
    master0, kv_master0 = master.clone(), opt.master_weight(m.kv_b_proj.weight).clone()
    for mm in attn.values():
        mm.max_logit.fill_(1.0)
    m.max_logit[2] = 4.0
    metrics = apply_qk_clip(attn, 2.0, optimizer=opt)
    assert metrics["clipped_heads"] == 1 and metrics["clipped_heads/layer_1"] == 1
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q, q0 = master.view(H, dn + dr, -1), master0.view(H, dn + dr, -1)
    torch.testing.assert_close(q[2, :dn], q0[2, :dn] * 0.5**0.5, rtol=1e-6, atol=0)
    torch.testing.assert_close(q[2, dn:], q0[2, dn:] * 0.5, rtol=1e-6, atol=0)
    assert torch.equal(q[[0, 1, 3]], q0[[0, 1, 3]])
    kv, kv0 = opt.master_weight(m.kv_b_proj.weight).view(H, dn + dv, -1), kv_master0.view(H, dn + dv, -1)
    torch.testing.assert_close(kv[2, :dn], kv0[2, :dn] * 0.5**0.5, rtol=1e-6, atol=0)
    assert torch.equal(kv[2, dn:], kv0[2, dn:])
    # The bf16 weight itself got the same clip (to bf16 rounding).
    torch.testing.assert_close(w.float(), master, rtol=2**-7, atol=0)
