"""Pipeline parallelism (and its combinations) against one process, on CPU with gloo, both through
the trainer's own step (k2train.trainer.Trainer, tests/parallel_harness.py).

1. PP alone (1F1B, interleaved with vpp=2, GPipe): tiny K2 in fp32, fixed data, 5 MuonClip steps
   (QK-Clip at tau=0.04, about the initial max logit, so that it fires; router bias updates on),
   no gradient clipping. Every layout must reproduce the single-process loss at every step and the
   final parameters within 1e-5 relative (max |diff| / max |ref| per tensor), AdamW-updated
   embedding and head included: the trainer sums the micro-batch gradients and divides once, in
   one process as in the schedule, so the gradients agree bitwise (on one thread, like the
   workers). Last-bit gradient differences would be amplified by AdamW on gradient elements near
   zero (m / sqrt(v) ~ sign(g) early on): ~9e-5 relative on lm_head after 5 steps.
2. PP combined with EP, DP and TP, with clipping: the tolerances of test_parallel_parity.py.
"""

import dataclasses

import pytest

import parallel_harness as h
from test_parallel_parity import assert_val_parity
from k2train.config import ModelConfig, OptimConfig

RTOL = 1e-5

PP_MODEL = ModelConfig(
    name="pp_test",
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    # a visible aux loss, so that a wrong aux-loss gradient would fail the test
    aux_loss_alpha=0.01,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
)
# fp32 Newton-Schulz: in bf16, a last-bit difference in a gradient can flip the rounding of an NS
# input element, which moves that parameter by ~lr * 2^-8 (a 1e-4 relative change, not a bug).
PP_OPTIM = OptimConfig(name="muonclip", lr=1e-2, qk_clip=True, qk_clip_tau=0.04, zero1=False, warmup_steps=0,
                       ns_dtype="float32")
# 4 micro-batches of 2 sequences of 16 tokens per step, no clipping.
PP_TRAINER = dataclasses.replace(h.TRAINER, micro_batch_size=2, global_batch_size=8, grad_clip=0.0, seed=0)

LAYOUTS = {
    "pp2_1f1b": dict(pp=2, vpp=1, pp_schedule="1F1B"),
    "pp2_vpp2_interleaved": dict(pp=2, vpp=2, pp_schedule="Interleaved1F1B"),
    "pp2_gpipe": dict(pp=2, vpp=1, pp_schedule="GPipe"),
}


@pytest.fixture(scope="module")
def pp2_results():
    jobs = {name: h.job(layout, PP_OPTIM, PP_TRAINER, PP_MODEL) for name, layout in LAYOUTS.items()}
    return h.run_jobs(jobs, 2)


@pytest.fixture(scope="module")
def reference():
    return h.run_reference_job(h.job(None, PP_OPTIM, PP_TRAINER, PP_MODEL))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_matches_single_process(name, reference, pp2_results):
    ranks = pp2_results[name]
    assert sum(reference["clipped_heads"]) > 0, "QK-Clip never fired in the reference: lower the tau"
    for r in ranks:  # every pp rank reports the same, full loss and clipped-head count
        for step, (a, b) in enumerate(zip(r["loss"], reference["loss"])):
            assert abs(a - b) <= RTOL * abs(b), f"{name} step {step}: loss {a} vs single process {b}"
        assert r["clipped_heads"] == reference["clipped_heads"]
        assert_val_parity(r, reference, RTOL)  # the forward-only schedule, on every pp rank
    stage_params = [set(r["params"]) for r in ranks]
    assert not stage_params[0] & stage_params[1], "a parameter is held by both pp ranks"
    par = h.merged(ranks)
    assert set(par["params"]) == set(reference["params"]) and set(par["buffers"]) == set(reference["buffers"])
    for group in ("params", "buffers"):
        worst = max((h.max_rel_diff(par[group][k], v), k) for k, v in reference[group].items())
        assert worst[0] <= RTOL, f"{name}: {worst[1]} differs by {worst[0]:.2e} relative"


# ---------------------------------------------------------------------------------------------
# pipeline combined with expert, data and tensor parallelism (tests/parallel_harness.py conventions)
# ---------------------------------------------------------------------------------------------

# One sample per micro-batch, so that PP2 x EP2 x DP2 (4 data streams of 2 rows) still has pp = 2
# micro-batches per stream; the single-process reference uses the same micro-batch size.
COMBO_TRAINER = dataclasses.replace(h.TRAINER, micro_batch_size=1)
COMBO_LAYOUTS = {
    "pp2_ep2": dict(pp=2, ep=2, dp=1),
    "pp2_vpp2_ep2": dict(pp=2, vpp=2, ep=2, dp=1, pp_schedule="Interleaved1F1B"),
    "pp2_ep2_dp2": dict(pp=2, ep=2, dp=2),
    # sequence-sharded hidden states [B, S/tp, D] between stages, vocab-parallel loss on the last
    "pp2_tp2": dict(pp=2, tp=2, ep=1, dp=1),
    "pp2_tp2_ep2": dict(pp=2, tp=2, ep=2, dp=1),
}
SLOW_COMBOS = {"pp2_ep2_dp2", "pp2_tp2", "pp2_tp2_ep2"}
_COMBO_RUNS: dict[tuple, dict] = {}


def _combo_results(name: str) -> list[dict]:
    """One spawn per world size (and speed class) runs all its layouts."""
    key = (h.world_size(COMBO_LAYOUTS[name]), name in SLOW_COMBOS)
    if key not in _COMBO_RUNS:
        jobs = {k: h.job(v, trainer=COMBO_TRAINER) for k, v in COMBO_LAYOUTS.items()
                if (h.world_size(v), k in SLOW_COMBOS) == key}
        _COMBO_RUNS[key] = h.run_jobs(jobs, key[0])
    return _COMBO_RUNS[key][name]


@pytest.mark.parametrize(
    "name",
    # 8 gloo processes on 2 cores: ~150 s under load (13 s on 16 cores), hence slow.
    ["pp2_ep2", "pp2_vpp2_ep2", *(pytest.param(n, marks=pytest.mark.slow) for n in sorted(SLOW_COMBOS))],
)
def test_pipeline_with_ep_dp_matches_single_process(name):
    """Tolerances as tests/test_parallel_parity.py: 1e-5 relative for losses, step-1 gradients and
    every Muon-updated parameter; 2e-4 for embed_tokens / lm_head (AdamW amplifies last-bit gradient
    differences of rarely seen tokens); router biases and clipped-head counts exactly equal."""
    from test_parallel_parity import assert_parity

    ranks = _combo_results(name)
    ref = h.run_reference(COMBO_TRAINER)
    for r in ranks:  # every rank reports the whole model's loss and clipped heads
        assert r["loss"] == ranks[0]["loss"] and r["clipped_heads"] == ranks[0]["clipped_heads"]
    assert_parity(h.merged(ranks), ref)


# ---------------------------------------------------------------------------------------------
# layer placement (pure functions, no processes)
# ---------------------------------------------------------------------------------------------


def test_split_layers_balances_and_accounts_for_head():
    from k2train.parallel.pipeline import split_layers, stage_ids_for_rank

    assert split_layers([1.0] * 4, 2) == [[0, 1], [2, 3]]
    # a head worth two layers pushes layers to the front
    assert split_layers([1.0] * 6, 2, last_extra=2.0) == [[0, 1, 2, 3], [4, 5]]
    assert split_layers([1.0] * 6, 2, first_extra=2.0) == [[0, 1], [2, 3, 4, 5]]
    assert stage_ids_for_rank(1, 4, 2) == [1, 5]
    with pytest.raises(ValueError, match="cannot fill"):
        split_layers([1.0] * 3, 4)


def test_k2_split_32_stages():
    from k2train.parallel.pipeline import layer_costs, split_layers

    cfg = ModelConfig()  # the defaults are Kimi K2's config (conf/model/k2_1t.yaml)
    costs, first, last = layer_costs(cfg, 4096)
    split = split_layers(costs, 32, first, last)
    assert [i for s in split for i in s] == list(range(61)) and all(split)
    stage = [sum(costs[i] for i in s) for s in split]
    stage[-1] += last
    # the head costs ~2.2 layers of FLOPs: the last stage keeps a single layer (at least one per
    # stage), which makes it the unavoidable maximum; every other stage holds at most 2 layers
    assert len(split[-1]) == 1 and max(stage) == stage[-1], [len(s) for s in split]
    assert max(len(s) for s in split[:-1]) == 2
