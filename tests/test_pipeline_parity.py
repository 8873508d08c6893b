"""Pipeline parallelism (and its combinations) against one process, on CPU with gloo.

Tiny K2 in fp32, fixed data, 5 MuonClip steps (QK-Clip at tau=0.04, about the initial max logit, so that it fires, router
bias updates on). Every layout must reproduce the single-process loss at every step and the final
parameters within 1e-5 relative (max |diff| / max |ref| per tensor).

The reference accumulates gradients the way the schedule does (sum of the micro-batch gradients,
then divided by their number) and runs on one thread like the workers; the gradients then agree
bitwise. Last-bit differences (another thread count, or dividing each micro-batch loss before
summing) are amplified by AdamW on gradient elements near zero (m / sqrt(v) ~ sign(g) early on):
lm_head then differs by ~9e-5 relative after 5 steps, with grads equal to ~1e-7 relative.
"""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from k2train.config import ModelConfig, OptimConfig, ParallelConfig
from k2train.model import K2Model, update_router_bias_

STEPS = 5
MICRO_BATCH = 2
NUM_MICRO = 4
SEQ = 16
TAU = 0.04
RTOL = 1e-5


def tiny_cfg(num_layers: int = 4) -> ModelConfig:
    return ModelConfig(
        name="pp_test",
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=num_layers,
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


def optim_cfg() -> OptimConfig:
    # fp32 Newton-Schulz: in bf16, a last-bit difference in a gradient can flip the rounding of an NS
    # input element, which moves that parameter by ~lr * 2^-8 (a 1e-4 relative change, not a bug).
    return OptimConfig(
        name="muonclip", lr=1e-2, qk_clip=True, qk_clip_tau=TAU, zero1=False, warmup_steps=0, ns_dtype="float32"
    )


def cross_entropy(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1))


def fixed_batches(cfg: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        seq = torch.randint(0, cfg.vocab_size, (NUM_MICRO * MICRO_BATCH, SEQ + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def build_reference_model(cfg: ModelConfig) -> K2Model:
    torch.manual_seed(0)
    model = K2Model(cfg)
    model.init_weights(seed=0)
    return model


def after_step(parts, optimizer, group=None) -> dict:
    from k2train.optim.qk_clip import apply_qk_clip, attention_modules

    optimizer.step()
    metrics = apply_qk_clip(attention_modules(parts), TAU, group, optimizer)
    for part in parts:
        for moe in part.moe_layers():
            update_router_bias_(moe, part.cfg.bias_update_rate)
    return metrics


def run_reference(cfg: ModelConfig):
    from k2train.optim import build_optimizer

    model = build_reference_model(cfg)
    opt = build_optimizer([model], optim_cfg())
    losses, clipped = [], 0
    for tokens, labels in fixed_batches(cfg):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(NUM_MICRO):
            sl = slice(m * MICRO_BATCH, (m + 1) * MICRO_BATCH)
            ce = cross_entropy(model(tokens[sl]), labels[sl])
            loss = ce + model.aux_loss
            loss.backward()
            total += loss.item() / NUM_MICRO
        # The pipeline schedule's convention (scale_grads): sum the micro-batch gradients, then divide.
        for p in model.parameters():
            p.grad.div_(NUM_MICRO)
        losses.append(total)
        clipped += after_step([model], opt)["clipped_heads"]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, clipped


def _run_layout(name: str, layout: dict, rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from k2train.optim import build_optimizer
    from k2train.parallel.pipeline import build_pipeline, pipeline_step

    cfg = tiny_cfg()
    pcfg = ParallelConfig(pp=layout["pp"], vpp=layout["vpp"], pp_schedule=layout["schedule"])
    mesh = init_device_mesh("cpu", (layout["pp"],), mesh_dim_names=("pp",))
    pipe = build_pipeline(
        build_reference_model(cfg),
        mesh["pp"],
        pcfg,
        num_microbatches=NUM_MICRO,
        micro_batch_size=MICRO_BATCH,
        seq_len=SEQ,
        loss_fn=cross_entropy,
        device=torch.device("cpu"),
    )
    opt = build_optimizer(pipe.model_parts, optim_cfg())
    losses, clipped = [], 0
    for tokens, labels in fixed_batches(cfg):
        opt.zero_grad(set_to_none=True)
        result = pipeline_step(pipe, tokens, labels)
        losses.append(result.loss.item())
        clipped += after_step(pipe.model_parts, opt).get("clipped_heads", 0)
    state = {}
    for part in pipe.model_parts:
        state.update({k: v.detach().clone() for k, v in part.state_dict().items()})
    torch.save(
        {"losses": losses, "state": state, "clipped": clipped, "split": pipe.layer_split},
        os.path.join(out_dir, f"{name}_rank{rank}.pt"),
    )


def _pp_worker(rank: int, world: int, init_file: str, out_dir: str, layouts: dict) -> None:
    """All layouts of one world size in one spawn: importing torch.distributed.pipelining costs
    several seconds per process on a loaded 2-core machine."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, layout in layouts.items():
            _run_layout(name, layout, rank, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> str:
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="pp_parity_")
    init_file = os.path.join(out_dir, "init")
    mp.spawn(fn, args=(world, init_file, out_dir, *args), nprocs=world, join=True)
    return out_dir


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


LAYOUTS = {
    "pp2_1f1b": dict(pp=2, vpp=1, schedule="1F1B"),
    "pp2_vpp2_interleaved": dict(pp=2, vpp=2, schedule="Interleaved1F1B"),
    "pp2_gpipe": dict(pp=2, vpp=1, schedule="GPipe"),
}


@pytest.fixture(scope="module")
def reference():
    # One thread, like the workers: the matmul reductions then split the same way and the
    # gradients of every layout are bitwise equal to these.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_reference(tiny_cfg())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pp2_results():
    return spawn(_pp_worker, 2, LAYOUTS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_matches_single_process(name, reference, pp2_results):
    ref_losses, ref_state, ref_clipped = reference
    assert ref_clipped > 0, "QK-Clip never fired in the reference: lower TAU"
    world = LAYOUTS[name]["pp"]
    results = [torch.load(os.path.join(pp2_results, f"{name}_rank{r}.pt")) for r in range(world)]
    state = {}
    for r in results:
        for k in r["state"]:
            assert k not in state or "rope_inv_freq" in k, f"{k} held by two pp ranks"
        state.update(r["state"])
    assert set(state) == set(ref_state)
    for r in results:  # every pp rank reports the same, full loss
        for step, (a, b) in enumerate(zip(r["losses"], ref_losses)):
            assert abs(a - b) <= RTOL * abs(b), f"{name} step {step}: loss {a} vs single process {b}"
    assert sum(r["clipped"] for r in results) == ref_clipped
    worst = max((rel_err(state[k].float(), ref_state[k].float()), k) for k in ref_state if ref_state[k].is_floating_point())
    assert worst[0] <= RTOL, f"{name}: {worst[1]} differs by {worst[0]:.2e} relative"


# ---------------------------------------------------------------------------------------------
# pipeline combined with expert and data parallelism (tests/parallel_harness.py conventions)
# ---------------------------------------------------------------------------------------------

# One sample per micro-batch, so that PP2 x EP2 x DP2 (4 data streams of 2 rows) still has pp = 2
# micro-batches per stream; the single-process reference uses the same micro-batch size.
def _combo_trainer():
    from k2train.config import TrainerConfig

    return TrainerConfig(steps=5, seq_len=16, micro_batch_size=1, global_batch_size=8, grad_clip=1.0)


def _combo_layout(name: str, layout: dict, rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    import parallel_harness as h
    from k2train.optim import build_optimizer
    from k2train.optim.qk_clip import apply_qk_clip, attention_modules
    from k2train.parallel import ParallelDims, apply_ep, apply_tp, clip_grad_norm_, reduce_gradients_, sum_expert_load_
    from k2train.parallel import local_loss, loss_context
    from k2train.parallel.pipeline import build_pipeline, pipeline_step

    trainer = _combo_trainer()
    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.from_config(pcfg, world).validate(h.TINY, trainer)
    dims.build_mesh("cpu")
    pipe = build_pipeline(
        h.build_tiny(),
        dims.pp_mesh,
        pcfg,
        num_microbatches=dims.num_microbatches(trainer),
        micro_batch_size=trainer.micro_batch_size,
        seq_len=trainer.seq_len,
        loss_fn=lambda logits, labels: local_loss(cross_entropy(logits, labels)),
        device=torch.device("cpu"),
    )
    tp_mesh = dims.tp_mesh if dims.tp > 1 else None
    for part in pipe.model_parts:  # the fixed order: pipeline split, then TP/EP on each part
        apply_tp(part, dims.tp_mesh, dims.sequence_parallel)
        apply_ep(part, dims.ep_mesh)
    parts = pipe.model_parts
    # TP-sharded (DTensor) matrices are orthogonalised whole through dims
    opt = build_optimizer(parts, h.OPTIM, dims=dims if tp_mesh is not None else None)
    attn = attention_modules(parts)
    dp_group = dims.dense_dp_mesh.get_group() if dims.dp_size > 1 else None
    token_group = dims.token_mesh.get_group() if dims.token_mesh.size() > 1 else None
    out = {"loss": [], "clipped_heads": []}
    for step, batch in enumerate(h.global_batches(trainer)):
        opt.zero_grad(set_to_none=True)
        local = torch.cat(h.micro_batches(batch, dims.dp_rank, dims.dp_size, trainer.micro_batch_size))
        with loss_context(tp_mesh):
            loss = pipeline_step(pipe, local[:, :-1], local[:, 1:]).loss
        reduce_gradients_(parts, dims)
        if dp_group is not None:
            dist.all_reduce(loss, group=dp_group)
            loss /= dims.dp_size
        clip_grad_norm_(parts, trainer.grad_clip, dims)
        if step == 0:
            out["grads"] = {k: v for part in parts for k, v in h.full_tensors(part, dims, grads=True).items()}
        opt.step()
        clip = apply_qk_clip(
            attn, h.OPTIM.qk_clip_tau, group=dp_group, optimizer=opt, tp_group=None if tp_mesh is None else tp_mesh.get_group()
        )
        for part in parts:
            sum_expert_load_(part, token_group)
            for moe in part.moe_layers():
                update_router_bias_(moe, part.cfg.bias_update_rate)
        out["loss"].append(loss.item())
        out["clipped_heads"].append(clip.get("clipped_heads", 0))
    out["params"] = {k: v for part in parts for k, v in h.full_tensors(part, dims).items()}
    out["buffers"] = {
        k: v.clone() for part in parts for k, v in part.named_buffers() if k.endswith("e_score_correction_bias")
    }
    torch.save(out, os.path.join(out_dir, f"{name}_rank{rank}.pt"))


def _combo_worker(rank: int, world: int, init_file: str, out_dir: str, layouts: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, layout in layouts.items():
            _combo_layout(name, layout, rank, world, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


COMBO_LAYOUTS = {
    "pp2_ep2": dict(pp=2, ep=2, dp=1),
    "pp2_vpp2_ep2": dict(pp=2, vpp=2, ep=2, dp=1, pp_schedule="Interleaved1F1B"),
    "pp2_ep2_dp2": dict(pp=2, ep=2, dp=2),
    # sequence-sharded hidden states [B, S/tp, D] between stages, vocab-parallel loss on the last
    "pp2_tp2": dict(pp=2, tp=2, ep=1, dp=1),
    "pp2_tp2_ep2": dict(pp=2, tp=2, ep=2, dp=1),
}
SLOW_COMBOS = {"pp2_ep2_dp2", "pp2_tp2", "pp2_tp2_ep2"}
_COMBO_RUNS: dict[tuple, str] = {}


def _world(layout: dict) -> int:
    return layout["pp"] * layout["ep"] * layout["dp"] * layout.get("tp", 1)


def _combo_results(name: str) -> str:
    """One spawn per world size (and speed class) runs all its layouts (imports cost seconds per
    process)."""
    key = (_world(COMBO_LAYOUTS[name]), name in SLOW_COMBOS)
    if key not in _COMBO_RUNS:
        layouts = {k: v for k, v in COMBO_LAYOUTS.items() if (_world(v), k in SLOW_COMBOS) == key}
        _COMBO_RUNS[key] = spawn(_combo_worker, key[0], layouts)
    return _COMBO_RUNS[key]


@pytest.fixture(scope="module")
def combo_reference():
    import parallel_harness as h

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _combo_trainer()
        return h.train(h.build_tiny(), h.global_batches(trainer), trainer=trainer)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "name",
    # 8 gloo processes on 2 cores: ~150 s under load (13 s on 16 cores), hence slow.
    ["pp2_ep2", "pp2_vpp2_ep2", *(pytest.param(n, marks=pytest.mark.slow) for n in sorted(SLOW_COMBOS))],
)
def test_pipeline_with_ep_dp_matches_single_process(name, combo_reference):
    """Tolerances as tests/test_parallel_parity.py: 1e-5 relative for losses, step-1 gradients and
    every Muon-updated parameter; 2e-4 for embed_tokens / lm_head (AdamW amplifies last-bit gradient
    differences of rarely seen tokens); router biases and clipped-head counts exactly equal."""
    import parallel_harness as h

    layout = COMBO_LAYOUTS[name]
    world = _world(layout)
    out_dir = _combo_results(name)
    results = [torch.load(os.path.join(out_dir, f"{name}_rank{r}.pt")) for r in range(world)]
    ref = combo_reference
    par = {"grads": {}, "params": {}, "buffers": {}}
    for r in results:
        for key in par:
            par[key].update(r[key])
        for step, (a, b) in enumerate(zip(r["loss"], ref["loss"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"{name} step {step + 1}: loss {a} vs single process {b}"
    # Each pp stage counts its own layers' clipped heads; the dp/ep replicas of a stage agree.
    per_stage = {}
    for r, res in enumerate(results):
        per_stage.setdefault(r // (world // layout["pp"]), res["clipped_heads"])
    assert [sum(c) for c in zip(*per_stage.values())] == ref["clipped_heads"] and sum(ref["clipped_heads"]) > 0
    assert set(par["grads"]) == set(ref["grads"]) and set(par["params"]) == set(ref["params"])
    for k, g in ref["grads"].items():
        assert h.max_rel_diff(par["grads"][k], g) <= 1e-5, f"{name}: step-1 grad of {k}"
    for k, p in ref["params"].items():
        tol = 2e-4 if k in ("embed_tokens.weight", "lm_head.weight") else 1e-5
        assert h.max_rel_diff(par["params"][k], p) <= tol, f"{name}: final {k}: {h.max_rel_diff(par['params'][k], p)}"
    for k, b in ref["buffers"].items():
        assert torch.equal(par["buffers"][k], b), f"{name}: router bias {k}"


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
