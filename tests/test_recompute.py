"""Activation recompute (parallel.recompute): the same numbers as no recompute, less memory, and the
planner's per-mode activation estimate within 10% of what the blocks really keep.

Exactness: one thread, fp32 -> loss, every gradient, every buffer (router-bias inputs, max logits)
bitwise equal to ``none``. With several intra-op threads the recomputed matmuls can split their
reductions differently (seen: 4e-7 relative on gradients), hence ``torch.set_num_threads(1)``.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import parallel_harness as h
from k2train.model import K2Model
from k2train.parallel.memory import layer_activation_bytes
from k2train.parallel.recompute import RecomputedBlock, apply_recompute
from test_memory_model import tiny

MODES = ("selective", "full")


def _model(cfg, mode):
    torch.manual_seed(0)
    model = K2Model(cfg)
    model.init_weights(seed=0)
    model.train()
    return apply_recompute(model, mode)


def _two_micro_batches(model, cfg):
    tokens = torch.randint(0, cfg.vocab_size, (2, 2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for mb in tokens:
        loss = F.cross_entropy(model(mb[:, :-1]).flatten(0, 1), mb[:, 1:].flatten()) + model.aux_loss
        (loss / 2).backward()
        losses.append(loss.detach())
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return losses, grads, buffers


@pytest.mark.parametrize("mode", MODES)
def test_recompute_is_exact_and_counts_tokens_once(mode, one_thread):
    cfg = tiny()
    ref = _two_micro_batches(_model(cfg, "none"), cfg)
    model = _model(cfg, mode)
    assert all(isinstance(b, RecomputedBlock) for b in model.layers.values())
    got = _two_micro_batches(model, cfg)
    assert [l.item() for l in got[0]] == [l.item() for l in ref[0]]
    bad = [k for k in ref[1] if not torch.equal(got[1][k], ref[1][k])]
    assert not bad, f"gradients differ from no recompute: {bad[:5]}"
    # tokens_per_expert would double under a recompute that is not undone; max_logit is a max.
    for k, b in ref[2].items():
        assert torch.equal(got[2][k], b), k
    assert ref[2]["layers.1.mlp.tokens_per_expert"].sum() == 2 * 2 * 32 * cfg.num_experts_per_tok


def test_names_and_state_dict_unchanged_and_none_undoes():
    cfg = tiny()
    plain = K2Model(cfg)
    model = apply_recompute(K2Model(cfg), "selective")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert model.layers["1"].self_attn is model.layers["1"]._modules["self_attn"]
    apply_recompute(model, "full")  # switching modes does not stack wrappers or hooks
    assert type(model.layers["1"]).__mro__[1:3] == (RecomputedBlock, type(plain.layers["1"]))
    assert not model.layers["1"].self_attn.q_b_proj._forward_hooks
    apply_recompute(model, "none")
    assert type(model.layers["1"]) is type(plain.layers["1"])
    with pytest.raises(ValueError, match="choose one of none, selective, full"):
        apply_recompute(model, "some")


def test_eval_and_no_grad_skip_the_checkpoint(monkeypatch):
    import k2train.parallel.recompute as recompute

    cfg = tiny()
    model = _model(cfg, "full").eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    calls = []
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or a[0](*a[1:]))
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (1, 8, cfg.vocab_size) and out.grad_fn is None and not calls
    model(tokens).sum()  # with grad on, the blocks do go through the checkpoint
    assert len(calls) == cfg.num_hidden_layers


class HeldBytes(TorchDispatchMode):
    """Bytes of the storages created inside the blocks' forwards that are still alive when the
    forward is over: what the blocks keep for the backward (autograd's saved tensors, recompute
    caches and checkpoint inputs alike). Parameters and buffers are not counted."""

    def __init__(self, model):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.refs, self.depth = [], 0
        for block in model.layers.values():
            block.register_forward_pre_hook(lambda *a: self._inside(+1))
            block.register_forward_hook(lambda *a: self._inside(-1))

    def _inside(self, step):
        self.depth += step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                    self.refs.append(weakref.ref(t.untyped_storage()))
        return out

    def alive(self) -> int:
        gc.collect()
        live = {s.data_ptr(): s.nbytes() for s in (r() for r in self.refs) if s is not None}
        return sum(live.values())


@pytest.mark.parametrize("mode", ("none", *MODES))
def test_planner_activation_bytes_per_mode(mode):
    """fp32, eager attention (the CPU reference path; sdpa on CPU falls back to the math kernel).
    Observed: none -0.6%, selective -5.6%, full -0.0% (docs/planner.md)."""
    cfg = tiny()
    B, S = 4, 128
    model = _model(cfg, mode)
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(2))
    held = HeldBytes(model)
    with held:
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss
    measured = held.alive()
    estimate = B * S * sum(
        layer_activation_bytes(cfg, i >= cfg.first_k_dense_replace, S, mode, 4) for i in range(cfg.num_hidden_layers)
    )
    print(f"{mode}: measured {measured:,} B, estimate {estimate:,.0f} B ({estimate / measured - 1:+.1%})")
    assert abs(estimate - measured) <= 0.10 * measured
    loss.backward()


def test_full_recompute_under_autocast_keeps_the_fp32_residual():
    """Under autocast the residual stream (the block input that full recompute keeps) stays fp32."""
    cfg = tiny()
    B, S = 2, 64
    model = _model(cfg, "full")
    held = HeldBytes(model)
    with held, torch.autocast("cpu", torch.bfloat16):
        out = model(torch.randint(0, cfg.vocab_size, (B, S)))
    measured = held.alive()
    estimate = B * S * sum(
        layer_activation_bytes(cfg, i >= cfg.first_k_dense_replace, S, "full", 2, residual_bytes=4)
        for i in range(cfg.num_hidden_layers)
    )
    assert abs(estimate - measured) <= 0.10 * measured, (estimate, measured)
    out.float().sum().backward()


@pytest.mark.parametrize(
    "layout, mode",
    [
        (dict(ep=2), "selective"),  # the selective policy around the expert all-to-all
        pytest.param(dict(tp=2), "full", marks=pytest.mark.slow),  # DTensor blocks recomputed
        pytest.param(dict(tp=2, ep=2), "selective", marks=pytest.mark.slow),
    ],
    ids=["ep2_selective", "tp2_full", "tp2_ep2_selective"],
)
def test_parallel_layout_with_recompute_matches_single_process(layout, mode):
    from test_parallel_parity import assert_parity

    par = h.run_parallel({**layout, "recompute": mode})
    assert_parity(par, h.run_reference())


def _trainer_losses(out, *overrides):
    from k2train.config import load_config
    from k2train.train import run

    cfg = load_config([
        "model=k2_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        "trainer.steps=3", f"trainer.output_dir={out}", "trainer.device=cpu", "trainer.dtype=float32",
        "trainer.checkpoint.enable=false", "logging.wandb=false", "logging.progress_bar=false",
        "data.prefetch=0", *overrides,
    ])  # fmt: skip
    return [m["loss"] for m in run(cfg, run_dir=out / "logs")]


def test_trainer_recompute_is_bit_exact(tmp_path, one_thread):
    ref = _trainer_losses(tmp_path / "none")
    assert _trainer_losses(tmp_path / "sel", "parallel.recompute=selective") == ref
    assert _trainer_losses(tmp_path / "full", "parallel.recompute=full") == ref


@pytest.mark.slow  # inductor compiles the blocks: ~1-5 min on 2 cores with a cold cache
@pytest.mark.parametrize("mode", MODES)
def test_trainer_compile_matches_eager(tmp_path, one_thread, mode):
    """Compiled blocks with recompute (full: the block compiled inside an eager checkpoint;
    selective: the checkpoint compiled with the block) against eager: inductor fuses and reorders
    fp32 arithmetic, so equal to 1e-5 relative rather than bitwise (observed ~1e-6)."""
    ref = _trainer_losses(tmp_path / "eager")
    got = _trainer_losses(tmp_path / "compiled", "trainer.compile=true", f"parallel.recompute={mode}")
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (got, ref)


def _compiled_saved_bytes(block, x, cos, sin) -> int:
    """What a compiled block keeps for its backward: the forward graph's saved activations (the
    compiler's partitioner picks them; inductor's partitioner, with eager kernels), plus the block
    input that every recompute mode keeps."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    forwards = []

    def partition(joint, inputs, **kw):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
        forwards.append(fw)
        return fw, bw

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition)
    block.compile_inner(backend)
    out = block(x, cos, sin)
    assert len(forwards) == 1, "the block did not compile as one graph"
    nodes = {n for n in next(n for n in forwards[0].graph.nodes if n.op == "output").args[0] if hasattr(n, "op")}
    kept = sum(n.meta["val"].nbytes for n in nodes if n.op != "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
    out.sum().backward()
    return kept + x.nbytes


def test_compiled_selective_recompute_keeps_what_eager_keeps(one_thread):
    """trainer.compile with selective recompute: the compiled checkpoint keeps the same tensors as
    the eager one (the policy finds the recomputed linears by the traced nodes' module stack), far
    fewer than no recompute, and the recomputed forward inside the compiled backward does not count
    the routed tokens a second time."""
    import dataclasses

    torch._dynamo.reset()
    cfg = dataclasses.replace(tiny(), attn_impl="triton", norm_impl="triton", mlp_impl="triton", moe_impl="triton")
    B, S = 2, 32
    x = torch.randn(B, S, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    held, counts = {}, {}
    for mode in ("none", "selective", "compiled"):
        model = _model(cfg, "selective" if mode == "compiled" else mode)
        block, xi = model.layers["2"], x.clone().requires_grad_()
        cos, sin = model.rope_cos[:S].expand(B, S, -1), model.rope_sin[:S].expand(B, S, -1)
        if mode == "compiled":
            held[mode] = _compiled_saved_bytes(block, xi, cos, sin)
        else:
            meter = HeldBytes(model)
            with meter:
                out = block(xi, cos, sin)
            held[mode] = meter.alive() + (xi.nbytes if mode != "none" else 0)
            out.sum().backward()
        counts[mode] = block.mlp.tokens_per_expert.clone()
    torch._dynamo.reset()
    print({k: f"{v:,}" for k, v in held.items()})
    assert abs(held["compiled"] - held["selective"]) <= 0.01 * held["selective"], held
    assert held["compiled"] < 0.6 * held["none"], held
    assert counts["compiled"].sum() == B * S * cfg.num_experts_per_tok
    assert torch.equal(counts["compiled"], counts["none"])


def test_compiled_selective_recompute_with_a_graph_break_runs_eagerly_and_exactly(one_thread):
    """A block that does not compile as one graph (here the per-expert loop that fp32 grouped GEMMs
    take on CPU once compiled) runs its checkpoint eagerly, with the eager policy and its state
    restore: the same losses, gradients and buffers as no recompute, routed tokens counted once."""
    from k2train.parallel.compile import apply_compile
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny()
    ref = _two_micro_batches(_model(cfg, "none"), cfg)
    got = _two_micro_batches(apply_compile(_model(cfg, "selective"), backend="aot_eager"), cfg)
    torch._dynamo.reset()
    assert counters["graph_break"], "the case needs a graph break inside the block"
    assert [l.item() for l in got[0]] == [l.item() for l in ref[0]]
    bad = [k for k in ref[1] if not torch.allclose(got[1][k], ref[1][k], rtol=1e-6, atol=0)]
    assert not bad, f"gradients differ from no recompute: {bad[:5]}"
    for k, b in ref[2].items():
        assert torch.equal(got[2][k], b), k


BF16 = ["trainer.dtype=bfloat16", "trainer.param_dtype=bfloat16"]


@pytest.mark.parametrize("overrides, match", [
    (["trainer.compile=true", "trainer.compile_mode=fast"], "choose one of default, reduce-overhead"),
    (["trainer.compile_mode=max-autotune-no-cudagraphs"], "set trainer.compile=true"),
    (["trainer.compile=true", "trainer.compile_mode=reduce-overhead", "parallel=pp2", *BF16], "a pipeline schedule runs"),
    (["trainer.compile=true", "trainer.compile_mode=max-autotune", "parallel.recompute=full", *BF16],
     "use parallel.recompute=selective"),
    (["trainer.compile=true", "trainer.compile_mode=reduce-overhead"], "use trainer.param_dtype=bfloat16"),
], ids=["unknown", "without_compile", "cuda_graphs_with_pp", "cuda_graphs_with_full_recompute", "cuda_graphs_fp32_weights"])
def test_compile_mode_is_checked_with_a_way_out(overrides, match):
    from k2train.config import load_config

    with pytest.raises(Exception, match=match):
        load_config(overrides).validate()
    load_config(["trainer.compile=true", "trainer.compile_mode=reduce-overhead", "parallel.recompute=selective", *BF16]
                ).validate()


@pytest.mark.slow  # inductor compiles the blocks: ~1-5 min on 2 cores with a cold cache
def test_trainer_compile_mode_reduce_overhead_matches_eager(tmp_path, one_thread):
    """The CUDA-graph mode's path through the trainer (bf16 weights, a step marker before each
    micro-batch); on the CPU inductor runs no graphs, so this checks the plumbing and the numbers
    (bf16: compiled and eager round differently), and the GPU test below the graphs."""
    ref = _trainer_losses(tmp_path / "eager", *BF16)
    got = _trainer_losses(tmp_path / "compiled", *BF16, "trainer.compile=true", "trainer.compile_mode=reduce-overhead",
                          "parallel.recompute=selective")
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(got, ref)), (got, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_gpu_trainer_compiled_with_cuda_graphs_matches_eager(tmp_path, recompute):
    """k2_tiny with every kernel in Triton, bf16 weights, four micro-batches a step: the blocks
    compiled with ``trainer.compile_mode=reduce-overhead`` (each block's forward and backward
    replayed as CUDA graphs) give eager's losses to bf16 rounding (compiled and eager round
    differently; observed on the CPU path: 1e-6 in fp32)."""
    common = ["trainer.device=cuda", *BF16, "trainer.steps=4", "trainer.global_batch_size=8",
              "model.attn_impl=triton", "model.moe_impl=triton", "model.norm_impl=triton", "model.mlp_impl=triton",
              f"parallel.recompute={recompute}"]
    ref = _trainer_losses(tmp_path / "eager", *common)
    got = _trainer_losses(tmp_path / "graphs", *common, "trainer.compile=true", "trainer.compile_mode=reduce-overhead")
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(got, ref)), (got, ref)


def test_selective_recompute_refuses_a_kept_output_modified_in_place():
    """A matmul output the policy keeps, then scaled in place by the forward: the recompute would
    read the scaled value where the forward read the product; it stops with an error instead."""
    from torch.utils.checkpoint import checkpoint

    from k2train.parallel.recompute import _selective_contexts

    def fn(x, w):
        y = x @ w
        y.mul_(2)
        return (y * y).sum()

    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    loss = checkpoint(fn, x, w, use_reentrant=False, context_fn=_selective_contexts)
    with pytest.raises(RuntimeError, match="modified in place afterwards"):
        loss.backward()


def test_a_recompute_leaves_no_weight_cast_in_autocasts_cache():
    """A recompute's casts are not cached. On the CPU the backward runs in the forward's thread,
    inside the trainer's step-long autocast region: cached, every weight a recompute casts (the
    LM head's in each loss chunk, every block's) would stay to the end of the step. After the
    backward of a chunked loss inside such a region, only the gradients are alive."""
    from k2train.loss import NextTokenLoss
    from k2train.profiling import TensorMemoryTrace

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 512, bias=False)
    hidden = torch.randn(2, 16, 64, requires_grad=True)
    labels = torch.randint(0, 512, (2, 16))
    loss = NextTokenLoss(chunk_tokens=8)
    loss.head = head
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trace = TensorMemoryTrace(stacks=False)
        with trace:
            out = loss(hidden, labels)
            torch.clear_autocast_cache()  # as the trainer does before a step's last backward
            out.backward()
            del out
            alive = trace.live
    grads = head.weight.grad.nbytes + hidden.grad.nbytes
    assert alive <= grads + 64, (alive, grads)  # a cached bf16 head would add 64 KiB
