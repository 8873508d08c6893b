"""K2's activation memory: FP8 storage of the routed experts' inputs (kernels.fp8, 1 x 128 tiles)
and CPU offload of what the blocks keep. CPU here; the GPU tests are marked."""

import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from k2train.config import load_config
from k2train.kernels.fp8 import E4M3, dequantize_tiles, quantize_tiles
from k2train.kernels.moe import build_routing, combine, expert_mlp_saved, permute
from k2train.model import K2Model
from k2train.model.moe import experts_reference
from k2train.parallel.activation_memory import apply_fp8_storage, apply_offload
from cpu_offload import CpuOffload, install_cpu_offload, install_stand_in_streams

E4M3_RELATIVE = 2.0**-4  # 3 mantissa bits: round to nearest is within half a step, 2^-4 relative


@pytest.mark.parametrize("D", [128, 200, 7168])
def test_fp8_tiles_round_trip_within_e4m3_precision(D):
    g = torch.Generator().manual_seed(D)
    # every tile spans another range: 1e-3 .. 1e4, plus outliers and a zero tile
    x = torch.randn(6, D, generator=g) * torch.logspace(-3, 4, 6)[:, None]
    x[2, :128] = 0
    q, scale = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (6, -(-D // 128))
    back = dequantize_tiles(q, scale, torch.float32)
    big = x.abs() >= scale.repeat_interleave(128, dim=1)[:, :D] * 2.0**-6  # E4M3's normal range
    assert torch.isfinite(back).all()
    assert ((back - x).abs() <= E4M3_RELATIVE * x.abs())[big].all()
    assert (back[2, :128] == 0).all()


def test_fp8_tiles_are_unbiased():
    # round to nearest: the errors average out. Over 2^20 normal values (a tile's largest at 448,
    # the others spread over E4M3's binades) the mean error away from zero is below 0.1% of the
    # mean magnitude (measured -0.05%: a density that falls away from zero puts more of each
    # rounding interval's values on its lower half, a second-order shrink; truncation gives -4%),
    # and the RMS relative error is the 2-3% that 3 mantissa bits give
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 128, generator=g)
    err = dequantize_tiles(*quantize_tiles(x), torch.float32) - x
    outward = (err * x.sign()).flatten()  # < 0: shrunk towards 0, as truncation would (-4% of |x|)
    assert outward.mean().abs() < 1e-3 * x.abs().mean(), outward.mean()
    keep = x.abs() > 1e-2
    relative = (err[keep] / x[keep]).pow(2).mean().sqrt()
    assert 0.015 < relative < 0.03, relative


def test_large_values_come_back_scaled_where_an_unscaled_cast_cannot():
    x = torch.tensor([[470.0, 500.0, 1e4, -1e4] + [0.5] * 124])
    back = dequantize_tiles(*quantize_tiles(x), torch.float32)
    assert torch.isfinite(back).all()
    assert ((back - x).abs() <= E4M3_RELATIVE * x.abs()).all()
    unscaled = x[0, :4].to(E4M3).float()  # above E4M3's 448: clamped on CPU, NaN on an H200 (GPU test)
    assert not torch.equal(unscaled, x[0, :4])


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton's CPU "
                                         "interpreter rounds fp32 to bf16 by truncation)")])])
@pytest.mark.parametrize("C", [200, 384])
def test_swiglu_backward_from_fp8_tiles_matches_its_reference(C, dtype):
    """The fused pass of the experts' FP8 backward (dequantize gate and up, h, d gate, d up) against
    the unfused ops on fresh random inputs spanning 1e-2 .. 1e3 per row, a partial last tile
    included (C=200): relative to the reference's norm, fp32 within 1e-6, bf16 within 2^-8 (a
    rounding or two: gate and up are rounded to bf16 before the math, as dequantize_tiles does)."""
    from k2train.kernels.swiglu import swiglu_bwd_from_tiles, swiglu_grads_torch, swiglu_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(C)
    span = torch.logspace(-2, 3, 5)[:, None]
    gate, up = (torch.randn(5, C, generator=g) * span for _ in range(2))
    dh = torch.randn(5, C, generator=g).to(dev, dtype)
    (qg, sg), (qu, su) = quantize_tiles(gate.to(dev, dtype)), quantize_tiles(up.to(dev, dtype))
    h, dgate, dup = swiglu_bwd_from_tiles(qg, sg, qu, su, dh)
    gate_d, up_d = dequantize_tiles(qg, sg, dtype), dequantize_tiles(qu, su, dtype)
    ref = (swiglu_torch(gate_d, up_d), *swiglu_grads_torch(gate_d, up_d, dh))
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    for got, want in zip((h, dgate, dup), ref):
        assert got.dtype == dtype and got.shape == (5, C)
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err <= tol, (err, tol)
    with pytest.raises(ValueError, match="must match"):
        swiglu_bwd_from_tiles(qg, sg, qu[:, :128], su[:, :1], dh)


def _experts_case(seed=0, T=64, D=256, I=128, E=6, K=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, requires_grad=True)
    ws = [(torch.randn(*shape, generator=g) / shape[-1] ** 0.5).requires_grad_()
          for shape in ((E, I, D), (E, I, D), (E, D, I))]
    return x, idx, w, ws


def _grads(fn, tensors, dy):
    out = fn()
    return [out.detach()] + list(torch.autograd.grad(out, tensors, dy))


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_saved_expert_mlp_backward_is_exact_without_fp8_and_close_with_it(use_grouped_mm):
    """The custom backward (dequantize, recompute the SwiGLU, grouped weight gradients) against
    autograd through the per-expert reference: exact to fp32 rounding (1e-6 of the norm) when nothing is quantized;
    with FP8 storage the output is exact (compute is not quantized) and the gradients within the
    error FP8 storage allows (measured 2.6-3.7e-2 relative in norm on random data)."""
    x, idx, w, ws = _experts_case()
    tensors = [x, w, *ws]
    dy = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    ref = _grads(lambda: experts_reference(x, idx, w, *ws), tensors, dy)

    def saved(fp8):
        r = build_routing(idx, 6)
        return combine(expert_mlp_saved(permute(x, r, "torch"), *ws, r.offs_E, use_grouped_mm, fp8), w, r, "torch")

    exact = _grads(lambda: saved(False), tensors, dy)
    for a, b in zip(exact, ref):  # sums in another order: fp32 rounding, 1e-6 of the norm
        assert (a - b).norm() <= 1e-6 * b.norm()
    fp8 = _grads(lambda: saved(True), tensors, dy)
    torch.testing.assert_close(fp8[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fp8[1:], ref[1:]):
        assert (a - b).norm() <= 0.06 * b.norm()


def _tiny():
    return dataclasses.replace(load_config(["model=k2_tiny"]).model, aux_loss_alpha=0.01)


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fp8_storage_in_the_model(one_thread):
    """The whole model with FP8 storage: the same loss (the forward is not quantized) and
    gradients within FP8's error of the bf16-storage ones (here fp32 storage)."""
    cfg = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(3))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    ref_loss, ref = _loss_and_grads(model, tokens)
    apply_fp8_storage(model)
    loss, got = _loss_and_grads(model, tokens)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    worst = max((got[n] - g).norm() / g.norm().clamp_min(1e-12) for n, g in ref.items())
    assert worst <= 0.05, worst
    experts = [n for n in ref if ".experts.w_" in n]
    assert all(not torch.equal(got[n], ref[n]) for n in experts)  # the switch acts


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_fp8_storage_under_recompute_gives_the_same_gradients(one_thread, mode):
    """FP8 storage inside recomputed blocks: the recompute quantizes the same values again, so the
    loss and every gradient equal those of FP8 storage without recompute (fp32, 1e-6)."""
    from k2train.parallel.recompute import apply_recompute

    cfg = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    apply_fp8_storage(model)
    ref_loss, ref = _loss_and_grads(model, tokens)
    apply_recompute(model, mode)
    loss, got = _loss_and_grads(model, tokens)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref.items():
        assert torch.allclose(got[n], g, rtol=1e-6, atol=1e-7), n


def test_offload_on_cpu_passes_everything_through(one_thread):
    cfg = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(4))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    ref = _loss_and_grads(model, tokens)
    apply_offload(model)
    got = _loss_and_grads(model, tokens)
    assert got[0] == ref[0] and all(torch.equal(got[1][n], g) for n, g in ref[1].items())


@pytest.fixture
def cpu_streams(monkeypatch):
    """CUDA's streams and events as CPU stand-ins (tests/cpu_offload.py), so that ActivationOffload's
    logic (what crosses, the bound on copies in flight, the way back) runs without a GPU."""
    install_stand_in_streams(monkeypatch.setattr)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_offload_logic_on_cpu_stand_in_streams(one_thread, cpu_streams, recompute):
    """ActivationOffload with the CPU as its device and stand-in streams (its GPU test runs the
    same on CUDA): the same loss and gradients as no offload, bitwise; at most two blocks hold
    their originals at any block's end (the bound on copies in flight: at 32K on the proxy an
    unbounded forward kept them all); the last offloaded block's come back without a copy, the
    others' from the host; after the backward nothing is held."""
    from k2train.parallel.recompute import apply_recompute

    cfg = dataclasses.replace(_tiny(), num_hidden_layers=6)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    apply_recompute(model, recompute)
    ref = _loss_and_grads(model, tokens)
    offload = apply_offload(model, CpuOffload())
    got = _loss_and_grads(model, tokens)
    assert got[0] == ref[0] and all(torch.equal(got[1][n], g) for n, g in ref[1].items())
    assert offload.bytes_offloaded > 0 and len(offload.blocks) == 5  # every block but the one before the loss
    assert max(offload.holding) == 2 and offload.holding[-1] == 2, offload.holding
    assert offload.handed_back > 0 and offload.copied_back > 0, (offload.handed_back, offload.copied_back)
    for b in offload.blocks:
        assert all(e.views == 0 and e.gpu is None and e.host is None and e.src is None for e in b)


@pytest.mark.parametrize("recompute, offload, fp8", [
    ("none", False, False), ("full", False, False), ("selective", False, False),
    ("none", True, False), ("selective", True, True),
], ids=["none", "full", "selective", "offload", "k2_recipe"])
def test_a_failed_forward_leaves_nothing_alive(cpu_streams, recompute, offload, fp8):
    """A step that fails after some blocks ran (out of memory in the next block, the loss, ...),
    caught by the caller, which drops the model: no weight, no activation and no hook stays alive.
    Checkpointed blocks used to keep everything: what the checkpoint holds for the backward (the
    block, selective recompute's kept outputs) closed a cycle with the tensors of the block's own
    graph (the MoE's aux_loss, the kept outputs' grad_fn) through autograd's C++ graph, which
    Python's garbage collector cannot break; a benchmark's next case then ran on a GPU still full
    of the last one."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from k2train.parallel.recompute import apply_recompute

    def fail_after_the_blocks():
        model = K2Model(dataclasses.replace(_tiny(), num_hidden_layers=4))
        model.init_weights(seed=0)
        apply_recompute(model, recompute)
        if fp8:
            apply_fp8_storage(model)
        if offload:
            apply_offload(model, CpuOffload())
        alive = [weakref.ref(p) for p in model.parameters()]

        def out_of_memory(module, args, output):
            raise torch.OutOfMemoryError("injected: the step's next allocation failed")

        blocks = list(model.layers.values())
        blocks[0].register_forward_hook(lambda module, args, output: alive.append(weakref.ref(output)))
        blocks[-1].register_forward_hook(out_of_memory)
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            model(torch.randint(0, model.cfg.vocab_size, (2, 16)))
        return alive

    alive = fail_after_the_blocks()
    gc.collect()
    assert not [r for r in alive if r() is not None], "weights or activations outlived the failed step"
    assert _get_current_dispatch_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no checkpoint or offload hooks left


def test_offload_logic_through_the_trainer_with_gradient_accumulation(one_thread, monkeypatch):
    """K2's recipe (FP8 storage, selective recompute, offload) through the trainer's own step, four
    micro-batches per step, two steps and evaluations under no_grad, with the offloader's logic running on the
    CPU: the same losses, gradients and weights as the pass-through path, bitwise, and every block
    but the last sends its tensors out and gets them back. (Pipeline schedules: test_parallel_parity.)"""
    import parallel_harness as h

    cfg = h.job(dict(fp8_moe_inputs=True, recompute="selective", offload_activations=True),
                trainer=dataclasses.replace(h.TRAINER, steps=2))
    ref = h.run_reference_job(cfg)
    install_cpu_offload(monkeypatch.setattr)
    got = h.train(cfg, h.global_batches(cfg.trainer, cfg.model.vocab_size))
    assert got["loss"] == ref["loss"] and got["val_loss"] == ref["val_loss"]
    for key in ("grads", "params"):
        assert all(torch.equal(got[key][n], t) for n, t in ref[key].items()), key
    (stats,) = got["offload"]
    steps, micro = cfg.trainer.steps, cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size
    assert stats["blocks"] == steps * micro * (cfg.model.num_hidden_layers - 1), stats
    assert stats["max_holding"] == 2 and stats["left"] == 0 and stats["copied_back"] > 0, stats
    assert ref["offload"] == []  # the pass-through path made no offloader of the tests'


def test_offload_layers_picks_the_first_blocks_of_each_part_and_the_planner_follows(one_thread):
    """parallel.offload_layers=n: the first n blocks of a part offload (never the one before the
    loss); the planner keeps the rest on the GPU, moves what offloads to the host (the two always
    add up to the activations without offload), and needs less GPU memory the more blocks offload."""
    from k2train.parallel.activation_memory import offloaded_blocks
    from k2train.parallel.memory import estimate_memory

    assert [offloaded_blocks(4, True, n) for n in (-1, 1, 2, 3, 9)] == [3, 1, 2, 3, 3]
    assert [offloaded_blocks(2, False, n) for n in (-1, 1, 5)] == [2, 1, 2]
    cfg = _tiny()
    model = K2Model(dataclasses.replace(cfg, num_hidden_layers=4))
    apply_offload(model, num_layers=2)
    assert [b.offload_saves for b in model.layers.values()] == [True, True, False, False]
    with pytest.raises(ValueError, match="offload_layers=0 must be >= 1, or -1"):
        load_config(["parallel.offload_activations=true", "parallel.offload_layers=0"]).validate()

    base = ["model=k2_1t", "model.num_hidden_layers=6", "model.n_routed_experts=16", "trainer.seq_len=4096",
            "trainer.micro_batch_size=1", "trainer.global_batch_size=8", "trainer.dtype=bfloat16"]
    plans = {}
    for extra in ([], ["parallel.offload_activations=true"],
                  *[["parallel.offload_activations=true", f"parallel.offload_layers={n}"] for n in (1, 3, 5)]):
        c = load_config([*base, *extra]).validate()
        plans[tuple(extra)] = estimate_memory(c.model, c.parallel, c.trainer, c.optim, precision="autocast").peak
    none = plans[()]
    gpu = [plans[("parallel.offload_activations=true", f"parallel.offload_layers={n}")].activations for n in (1, 3, 5)]
    assert none.activations > gpu[0] > gpu[1] > gpu[2]
    assert gpu[2] == plans[("parallel.offload_activations=true",)].activations  # 5 of 6: every block but the last
    for plan in plans.values():
        assert plan.activations + plan.host == pytest.approx(none.activations, rel=1e-12)


def test_trainer_runs_with_both_and_the_checks_say_why_not_with_full_recompute(tmp_path):
    from k2train.train import run

    common = ["model=k2_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
              "trainer.steps=2", "trainer.checkpoint.enable=false", "logging.wandb=false", "logging.progress_bar=false",
              "logging.console=false", f"trainer.output_dir={tmp_path}"]
    plain = run(load_config(common), run_dir=tmp_path / "a")
    both = run(load_config([*common, "parallel.fp8_moe_inputs=true", "parallel.offload_activations=true"]),
               run_dir=tmp_path / "b")
    assert plain[0]["loss"] == pytest.approx(both[0]["loss"], rel=1e-6)  # step 1: same forward
    selective = run(load_config([*common, "parallel.recompute=selective", "parallel.offload_activations=true",
                                 "parallel.offload_layers=1"]), run_dir=tmp_path / "c")
    assert [m["loss"] for m in selective] == pytest.approx([m["loss"] for m in plain], rel=1e-6)
    with pytest.raises(ValueError, match="use parallel.recompute=selective .* or none with it"):
        load_config(["parallel.offload_activations=true", "parallel.recompute=full"]).validate()
    load_config(["parallel.offload_activations=true", "parallel.recompute=selective"]).validate()
    load_config(["parallel.fp8_moe_inputs=true", "parallel.recompute=selective"]).validate()  # FP8 composes


def test_selective_recompute_keeps_its_saved_outputs_through_the_offloader(one_thread):
    """Offload with selective recompute: what the policy keeps goes through the offloader's pack
    (here a stand-in that moves each tensor into a holder, as the real one moves it to the host) and
    comes back through unpack for the recompute; the same loss and gradients, bitwise."""
    from k2train.parallel.recompute import apply_recompute

    class Holder:
        def __init__(self, t):
            self.t = t.clone()

    class Recording:
        def __init__(self):
            self.packed = self.unpacked = 0

        def pack(self, t):
            self.packed += 1
            return Holder(t)

        def unpack(self, x):
            if isinstance(x, Holder):
                self.unpacked += 1
                return x.t
            return x

    cfg = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(7))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    apply_recompute(model, "selective")
    ref = _loss_and_grads(model, tokens)
    recording = Recording()
    for block in model.layers.values():
        block.offload = recording
    got = _loss_and_grads(model, tokens)
    assert got[0] == ref[0] and all(torch.equal(got[1][n], g) for n, g in ref[1].items())
    # the recompute stops once the backward has what it needs: a block's last kept output (its
    # last matmul's, which no backward reads) may be packed and never asked for
    assert 0 < recording.unpacked <= recording.packed <= recording.unpacked + cfg.num_hidden_layers


def test_k2_pretrain_plan_fits_h800s_at_dp1_with_the_real_switches():
    from k2train.parallel.memory import estimate_memory, trainer_precision

    cfg = load_config(["experiment=k2_pretrain"]).validate()
    p = cfg.parallel
    assert (p.fp8_moe_inputs, p.offload_activations, p.recompute, p.pp, p.ep, p.cp) == (True, True, "selective", 16, 16, 1)
    plan = estimate_memory(cfg.model, p, cfg.trainer, cfg.optim, precision=trainer_precision(cfg.trainer))
    assert plan.precision == "bf16"  # what the trainer runs: bf16 weights, fp32 gradients and masters
    assert plan.world_size == 256 and plan.peak.total <= 80e9
    # what leaves the GPU is on the host: the two add up to what the GPU would hold without offload,
    # with no recompute and with selective recompute (its kept outputs are offloaded)
    for recompute in ("none", "selective"):
        offloaded = estimate_memory(cfg.model, dataclasses.replace(p, recompute=recompute), cfg.trainer, cfg.optim)
        kept = estimate_memory(cfg.model, dataclasses.replace(p, recompute=recompute, offload_activations=False),
                               cfg.trainer, cfg.optim)
        for r, k in zip(offloaded.ranks, kept.ranks):
            assert r.host > 0 and r.activations + r.host == pytest.approx(k.activations, rel=1e-12)


def test_offload_host_memory_is_checked_against_the_node():
    # K2's recipe parks ~77 GiB per GPU in pinned (unswappable) host memory: 617 GiB on an 8-GPU node
    from k2train.parallel.memory import GiB, estimate_memory, host_memory_check, read_meminfo

    cfg = load_config(["experiment=k2_pretrain"]).validate()
    plan = estimate_memory(cfg.model, cfg.parallel, cfg.trainer, cfg.optim)
    per_gpu = max(r.host for r in plan.ranks)
    assert 75 * GiB < per_gpu < 80 * GiB
    assert host_memory_check(plan, 8, 2048 * GiB, 1900 * GiB) is None
    warning = host_memory_check(plan, 8, 1024 * GiB, 600 * GiB)
    assert "617 GiB for the 8 GPU(s)" in warning and "600 GiB of 1024 are available" in warning
    with pytest.raises(ValueError, match=r"more than the node has \(512 GiB\).*parallel.offload_layers"):
        host_memory_check(plan, 8, 512 * GiB, 500 * GiB)
    total, available = read_meminfo()  # Linux: this machine's own numbers
    assert 0 < available <= total


def _gpu_runs_without_and_with_offload(recompute: str):
    """k2_small (4 layers) on CUDA under bf16 autocast, once without offload and once with it, in
    ``recompute`` mode: each run's loss, gradients and the memory held after the forward; and the
    offloader of the second."""
    from k2train.parallel.recompute import apply_recompute

    cfg = dataclasses.replace(load_config(["model=k2_small"]).model, num_hidden_layers=4)
    tokens = torch.randint(0, cfg.vocab_size, (1, 2049), device="cuda")
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = K2Model(cfg).cuda()
        model.init_weights(seed=0)
        apply_recompute(model, recompute)
        if offload:
            offloader = apply_offload(model)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, held))
        del model
    return results[0], results[1], offloader


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_kernels_and_offload():
    """The Triton quantize/dequantize against the torch path (bitwise on the scales and the FP8
    bytes); an unscaled cast of 470 / 1e4 gives NaN on the GPU; offload on CUDA gives the same
    loss and gradients as no offload (bitwise) and holds less memory after the forward."""
    x = torch.randn(513, 7168, device="cuda") * torch.logspace(-2, 3, 513, device="cuda")[:, None]
    q, s = quantize_tiles(x)
    q_cpu, s_cpu = quantize_tiles(x.cpu())
    assert torch.equal(s.cpu(), s_cpu) and torch.equal(q.cpu().view(torch.uint8), q_cpu.view(torch.uint8))
    assert torch.equal(dequantize_tiles(q, s, torch.float32).cpu(), dequantize_tiles(q_cpu, s_cpu, torch.float32))
    assert torch.isnan(torch.tensor([470.0, 1e4], device="cuda").to(E4M3).float()).all()
    (l0, g0, h0), (l1, g1, h1), offloader = _gpu_runs_without_and_with_offload("none")
    assert l0 == l1 and all(torch.equal(g1[n], g) for n, g in g0.items())
    assert h1 < 0.5 * h0, (h0, h1)
    # activations crossed, the weights' bf16 copies did not (one layer's worth would be >= 1 GiB)
    assert 0 < offloader.bytes_offloaded < h0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_offload_with_selective_recompute():
    """On CUDA, offload on top of selective recompute: the same loss and gradients as selective
    alone (bitwise: the kept outputs cross PCIe and back unchanged) and less memory after the forward."""
    (l0, g0, h0), (l1, g1, h1), offloader = _gpu_runs_without_and_with_offload("selective")
    assert l0 == l1 and all(torch.equal(g1[n], g) for n, g in g0.items())
    assert h1 < 0.8 * h0 and offloader.bytes_offloaded > 0, (h0, h1)


def test_selective_recompute_keeps_the_fp8_tiles_not_the_bf16_expert_activations(one_thread, monkeypatch):
    """K2's recipe (selective recompute + FP8 storage): the policy sees the routed experts' MLP as one
    op and keeps its outputs (the FP8 tiles among them); no GEMM inside it is cached or recomputed."""
    from k2train.parallel import recompute

    decisions = []

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((str(op.overloadpacket), decision.name))
        return decision

    policy = recompute._policy
    monkeypatch.setattr(recompute, "_policy", recording)
    cfg = _tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(6))
    model = K2Model(cfg)
    model.init_weights(seed=0)
    apply_fp8_storage(model)
    recompute.apply_recompute(model, "selective")
    _loss_and_grads(model, tokens)
    kept = {op for op, d in decisions if d == "MUST_SAVE"}
    assert "k2kernels.expert_mlp_saved_fwd" in kept
    assert "k2kernels.grouped_linear_loop" not in {op for op, _ in decisions}  # inside the FP8 op: unseen
