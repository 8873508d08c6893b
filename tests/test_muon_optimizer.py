"""MuonClip's Muon and AdamW paths against torch.optim.Muon / torch.optim.AdamW, expert stacks,
fp32 master copies, grouping and state_dict."""

import copy

import pytest
import torch
from torch import nn

from k2train.config import OptimConfig
from k2train.optim.grouping import build_optimizer, build_param_groups, describe_param_groups
from k2train.optim.muon import MuonClip

STEPS = 5


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone().to(p.dtype)
        opt.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_muon_2d_equals_torch_muon(wd):
    # Same-shape matrices and a transposed one (batched into one NS call), a tall and a wide one.
    shapes = [(24, 40), (24, 40), (40, 24), (64, 16), (16, 48)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours = [nn.Parameter(w.clone()) for w in init]
    ref = [nn.Parameter(w.clone()) for w in init]
    grads = _grads(shapes, STEPS)
    _run(MuonClip([{"kind": "muon", "params": ours}], lr=0.02, weight_decay=wd), ours, grads)
    _run(torch.optim.Muon(ref, lr=0.02, weight_decay=wd, nesterov=True, adjust_lr_fn="match_rms_adamw"), ref, grads)
    for a, b in zip(ours, ref):
        # Same ops in the same order (CPU bmm reduces like mm): bitwise, which is stricter than
        # the "fp32 rounding" the spec asks for.
        assert torch.equal(a, b), (a - b).abs().max()
    assert all(not torch.equal(a, w) for a, w in zip(ours, init))


def test_expert_stack_equals_per_expert_matrices():
    E, out_dim, in_dim = 4, 24, 40
    w0 = torch.randn(E, out_dim, in_dim, generator=torch.Generator().manual_seed(5))
    stack = nn.Parameter(w0.clone())
    single = [nn.Parameter(w0[e].clone()) for e in range(E)]
    grads = _grads([(E, out_dim, in_dim)], STEPS, seed=6)
    _run(MuonClip([{"kind": "muon", "params": [stack]}], lr=0.01), [stack], grads)
    per_expert = [[g[0][e] for e in range(E)] for g in grads]
    _run(MuonClip([{"kind": "muon", "params": single}], lr=0.01), single, per_expert)
    for e in range(E):
        assert torch.equal(stack[e], single[e])
    # RMS matching uses each expert's own shape: 0.2 * sqrt(max(24, 40)).
    assert not torch.equal(stack, w0)


def test_adamw_group_equals_torch_adamw():
    shapes = [(10, 8), (8,), (5, 3, 2)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours = [nn.Parameter(w.clone()) for w in init]
    ref = [nn.Parameter(w.clone()) for w in init]
    grads = _grads(shapes, STEPS, seed=7)
    _run(MuonClip([{"kind": "adamw", "params": ours}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8), ours, grads)
    _run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False), ref, grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b), (a - b).abs().max()


def test_bf16_params_update_an_fp32_master():
    w0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(8))
    p32 = nn.Parameter(w0.clone())
    p16 = nn.Parameter(w0.bfloat16())
    a32 = nn.Parameter(w0[0].clone())
    a16 = nn.Parameter(w0[0].bfloat16())
    grads = _grads([(16, 32), (32,)], STEPS, seed=9)
    o32 = MuonClip([{"kind": "muon", "params": [p32]}, {"kind": "adamw", "params": [a32]}], lr=0.01)
    o16 = MuonClip([{"kind": "muon", "params": [p16]}, {"kind": "adamw", "params": [a16]}], lr=0.01)
    # The fp32 run starts from the bf16-rounded weights so both see the same start.
    with torch.no_grad():
        p32.copy_(p16.float())
        a32.copy_(a16.float())
    # Gradients bf16-representable in both runs: then the master trajectory equals the fp32 run.
    grads = [[g.bfloat16().float() for g in gs] for gs in grads]
    _run(o32, [p32, a32], grads)
    _run(o16, [p16, a16], grads)
    for p, ref in ((p16, p32), (a16, a32)):
        master = o16.master_weight(p)
        assert master.dtype == torch.float32
        assert torch.equal(master, ref)
        assert torch.equal(p, master.bfloat16())
    assert o32.master_weight(p32) is None
    # state_dict round trip keeps the master and moments in fp32.
    o16b = MuonClip([{"kind": "muon", "params": [p16]}, {"kind": "adamw", "params": [a16]}], lr=0.01)
    o16b.load_state_dict(copy.deepcopy(o16.state_dict()))
    assert o16b.master_weight(p16).dtype == torch.float32
    assert torch.equal(o16b.master_weight(p16), o16.master_weight(p16))
    assert o16b.state[p16]["momentum_buffer"].dtype == torch.float32


def test_rejects_non_matrix_in_muon_group():
    with pytest.raises(ValueError, match="AdamW"):
        MuonClip([{"kind": "muon", "params": [nn.Parameter(torch.zeros(4))], "names": ["norm.weight"]}])
    with pytest.raises(ValueError, match="kind"):
        MuonClip([{"params": [nn.Parameter(torch.zeros(4))]}])


class _FakeK2(nn.Module):
    """The parameter names and shapes of K2Model (k2train.model), at toy sizes."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 8)
        self.layers = nn.ModuleDict({"0": nn.Module(), "1": nn.Module()})
        for blk in self.layers.values():
            blk.input_layernorm = nn.LayerNorm(8, bias=False)
            blk.self_attn = nn.Module()
            blk.self_attn.q_a_proj = nn.Linear(8, 6, bias=False)
            blk.self_attn.kv_a_layernorm = nn.LayerNorm(4, bias=False)
        self.layers["1"].mlp = nn.Module()
        self.layers["1"].mlp.experts = nn.Module()
        self.layers["1"].mlp.experts.w_gate = nn.Parameter(torch.zeros(3, 5, 8))
        self.layers["1"].mlp.gate = nn.Linear(8, 3, bias=False)
        self.layers["1"].mlp.gate.register_buffer("e_score_correction_bias", torch.zeros(3))
        self.norm = nn.LayerNorm(8, bias=False)
        self.lm_head = nn.Linear(8, 50, bias=False)


def test_grouping_rule_and_table():
    model = _FakeK2()
    groups = {g["name"]: g["names"] for g in build_param_groups([model], OptimConfig())}
    assert sorted(groups["muon"]) == sorted(
        ["layers.0.self_attn.q_a_proj.weight", "layers.1.self_attn.q_a_proj.weight",
         "layers.1.mlp.experts.w_gate", "layers.1.mlp.gate.weight"]
    )
    assert sorted(groups["adamw"]) == ["embed_tokens.weight", "lm_head.weight"]
    assert len(groups["adamw_no_decay"]) == 5  # 4 block norms + final norm
    opt = build_optimizer([model], OptimConfig())
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    table = describe_param_groups(opt)
    assert "muon" in table and f"{3 * 5 * 8 + 2 * 6 * 8 + 3 * 8:,}" in table
    # optim=adamw: nothing goes to Muon.
    assert all(g["kind"] == "adamw" for g in build_param_groups([model], OptimConfig(name="adamw")))


def test_gram_method_through_build_optimizer_matches_standard_in_fp32():
    # optim.ns_method=gram: on CPU the NS runs in fp32 (ns_dtype=auto), where Gram NS is the same
    # iteration as standard NS up to fp32 rounding; shapes where it saves nothing (square) run standard.
    model = _FakeK2()
    runs = []
    for method in ("standard", "gram"):
        m = copy.deepcopy(model)
        opt = build_optimizer([m], OptimConfig(ns_method=method, lr=0.02))
        params = [p for g in opt.param_groups for p in g["params"]]
        _run(opt, params, _grads([p.shape for p in params], 3, seed=4))
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gram_ns_fn_picks_the_cheaper_schedule_per_shape(monkeypatch):
    import k2train.optim.grouping as grouping

    calls = []
    monkeypatch.setattr(
        grouping, "zeropower_via_gram_newtonschulz", lambda G, *a, **k: calls.append(("gram", tuple(G.shape))) or G
    )
    monkeypatch.setattr(
        grouping, "zeropower_via_newtonschulz", lambda G, *a, **k: calls.append(("standard", tuple(G.shape))) or G
    )
    ns_fn = grouping._resolve_ns_fn("torch", "float32", "gram")
    for shape in [(4, 64, 224), (1, 96, 96)]:
        ns_fn(torch.zeros(shape), steps=5, coefficients=(3.4445, -4.7750, 2.0315), dtype=torch.float32)
    assert calls == [("gram", (4, 64, 224)), ("standard", (1, 96, 96))]
    assert grouping._resolve_ns_fn("torch", "float32", "standard") is None  # MuonClip's bit-exact default
