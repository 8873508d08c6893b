"""One full K2 MoE layer (MLA 64 heads, 384 experts + shared, router), bf16, fwd+bwd on one GPU,
ours (k2train.model.Block) against HF transformers' DeepseekV3DecoderLayer with grouped_mm experts;
then one k2_small training step (tokens/s, MFU by the Megatron convention).

    python scripts/bench_layer.py [--skip-hf] [--skip-layer] [--skip-small]   # prints a table; $OUT/bench_layer.json
    python scripts/bench_layer.py --skip-hf --skip-small --fused [--profile]  # only the all-Triton rows, eager and
                                  # compiled (norms and SwiGLU fused too), with the B=2 step's top GPU kernels
    ... --fused --compile-mode reduce-overhead [max-autotune-no-cudagraphs ...]  # compiled rows in these modes too
                                  # (trainer.compile_mode; reduce-overhead replays each step as CUDA graphs)

Layer FLOPs (Megatron count, docs/performance.md#anchors): 6*T*(attention params + 9 experts' params)
+ 6*T*S*64*(192+128)/2. The HF layer and ours are built and timed one after the other (each
holds ~63 GiB of bf16 weights and grads), so the peak memory numbers are each one's own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import bootstrap_k2train  # noqa: E402  (also maps kernels/ and optim/)

bootstrap_k2train()
from k2train.config import CUDA_GRAPH_COMPILE_MODES, ModelConfig  # noqa: E402

RES: dict = {}
SEQ = 4096


def layer_flops(T, S):
    h, nh, ql, kvl, dn, dr, dv, fe = 7168, 64, 1536, 512, 128, 64, 128, 2048
    attn_lin = h * ql + ql * nh * (dn + dr) + h * (kvl + dr) + kvl * nh * (dn + dv) + nh * dv * h
    return 6 * T * (attn_lin + 3 * h * fe * 9) + 6 * T * S * nh * (dn + dr + dv) / 2


def record(key, ms, T, peak, anchor_ms=None):
    fl = layer_flops(T, SEQ)
    RES[key] = dict(ms=ms, tflops=fl / ms / 1e9, peak_gib=peak)
    sp = f"x{anchor_ms / ms:.2f}" if anchor_ms else ""
    print(f"{key:66s} {ms:8.2f} ms {fl / ms / 1e9:7.1f} TFLOP/s peak {peak:5.1f} GiB {sp}", flush=True)


def time_step(step):
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(step, warmup=3, rep=30, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() / 2**30


def bench_hf():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding
    cfg = DeepseekV3Config(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=2,
                           first_k_dense_replace=1, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
                           n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                           num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=163840,
                           rope_theta=50000.0, max_position_embeddings=131072, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = DeepseekV3DecoderLayer(cfg, layer_idx=1).to(torch.bfloat16)
        rope = DeepseekV3RotaryEmbedding(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.006)
    out = {}
    for B in (1, 2):
        x = torch.randn(B, SEQ, 7168, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(SEQ, device="cuda")[None].expand(B, SEQ)
        pe = rope(x, pos)
        g = torch.randn_like(x)

        def step():
            layer.zero_grad(set_to_none=True)
            y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
            (y[0] if isinstance(y, tuple) else y).backward(g)
        ms, peak = time_step(step)
        record(f"anchor: HF DeepseekV3DecoderLayer grouped_mm sdpa B={B} S={SEQ}", ms, B * SEQ, peak)
        out[B] = ms
        del x, g
    del layer
    torch.cuda.empty_cache()
    return out


def top_kernels(step, top=15):
    """The GPU work of one ``step`` (kernels, copies, memsets from the profiler's trace), summed by
    name, largest first: [(ms, share, name)]."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.load(open(f"{tmp}/trace.json"))["traceEvents"]
    by_name: dict[str, float] = {}
    spans = []
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"] / 1e3
            spans.append((e["ts"], e["ts"] + e["dur"]))
    total = sum(by_name.values())
    rows = sorted(((ms, ms / total, name) for name, ms in by_name.items()), reverse=True)
    # the GPU's idle time between the step's first and last kernel: launch gaps between kernels
    # (a few microseconds each on the device even when queued) and any wait for the host
    spans.sort()
    idle, end = 0.0, spans[0][1] if spans else 0.0
    for start, stop in spans[1:]:
        idle += max(0.0, start - end)
        end = max(end, stop)
    span_ms = (end - spans[0][0]) / 1e3 if spans else 0.0
    print(f"    GPU work of one step: {total:.2f} ms in all, {len(spans)} kernels/copies over {span_ms:.2f} ms "
          f"(idle between them {idle / 1e3:.2f} ms); the top {top}:")
    for ms, share, name in rows[:top]:
        print(f"    {ms:8.3f} ms {share:6.1%}  {name[:110]}")
    return rows[:top]


def bench_ours(attn_impl, moe_impl, anchors, fused=False, compile=False, profile_b=None, mode="default"):
    """``fused``: the norms and the dense SwiGLU (shared expert) in Triton too; ``compile``: the
    block under torch.compile (the kernels stay opaque custom ops; the plain-torch rest is fused),
    in torch.compile's ``mode`` (as ``trainer.compile_mode``)."""
    from k2train.model import Block
    from k2train.model.rope import rope_table
    impls = dict(norm_impl="triton", mlp_impl="triton") if fused else {}
    cfg = ModelConfig(num_hidden_layers=2, first_k_dense_replace=1, attn_impl=attn_impl, moe_impl=moe_impl, **impls)
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = Block(cfg, layer_id=1).to(torch.bfloat16)
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, std=0.006) if p.ndim > 1 else torch.nn.init.ones_(p)
    cos_table, sin_table = (t.cuda() for t in rope_table(cfg))
    run = torch.compile(block, mode=None if mode == "default" else mode) if compile else block
    graphs = compile and mode in CUDA_GRAPH_COMPILE_MODES
    label = (f"attn={attn_impl} moe={moe_impl}" + (" norm,mlp=triton" if fused else "") + (" compiled" if compile else "")
             + (f" mode={mode}" if compile and mode != "default" else ""))
    for B in (1, 2):
        x = torch.randn(B, SEQ, 7168, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cos, sin = cos_table[:SEQ].expand(B, SEQ, -1), sin_table[:SEQ].expand(B, SEQ, -1)
        g = torch.randn_like(x)

        def step():
            block.zero_grad(set_to_none=True)
            if graphs:  # as the trainer does before each micro-batch
                torch.compiler.cudagraph_mark_step_begin()
            run(x, cos, sin).backward(g)
        ms, peak = time_step(step)
        record(f"ours: Block {label} B={B} S={SEQ}", ms, B * SEQ, peak, anchors.get(B))
        if B == profile_b:
            RES[f"ours: Block {label} B={B} top kernels"] = top_kernels(step)
        del x, g
    del block
    torch.cuda.empty_cache()


def bench_small(attn_impl, moe_impl, ns_impl, B=4):
    """The trainer's own optimizer step (k2train.trainer.Trainer.train_step) on k2_small."""
    import tempfile

    from k2train.config import CheckpointConfig, JobConfig, LoggingConfig, OptimConfig, TrainerConfig, load_config
    from k2train.flops import flops_per_token
    from k2train.trainer import Trainer
    cfg = dataclasses.replace(load_config(["model=k2_small"]).model, attn_impl=attn_impl, moe_impl=moe_impl)
    job = JobConfig(
        model=cfg, optim=OptimConfig(ns_impl=ns_impl),
        trainer=TrainerConfig(seq_len=SEQ, micro_batch_size=B, global_batch_size=B, dtype="bfloat16", device="cuda",
                              checkpoint=CheckpointConfig(enable=False)),
        logging=LoggingConfig(console=False, jsonl=False, progress_bar=False, wandb=False),
    )
    tokens = torch.randint(0, cfg.vocab_size, (B, SEQ + 1))
    batches = [{"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}]
    trainer = Trainer(job, run_dir=tempfile.mkdtemp(), data=lambda rank, size: iter(()))

    def step():
        trainer.train_step(batches)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(step, warmup=1, rep=2000, return_mode="median")
    peak = torch.cuda.max_memory_allocated() / 2**30
    tok_s = B * SEQ / ms * 1e3
    fpt = flops_per_token(cfg, SEQ, "megatron")
    mfu = tok_s * fpt / 989e12
    key = f"k2_small step B={B} S={SEQ} attn={attn_impl} moe={moe_impl} ns={ns_impl}"
    RES[key] = dict(ms=ms, tokens_per_s=tok_s, mfu=mfu, gflop_per_token=fpt / 1e9, peak_gib=peak)
    print(f"{key:66s} {ms:8.1f} ms {tok_s:9.0f} tok/s MFU {mfu:.1%} (989 TFLOP/s peak) peak {peak:.1f} GiB", flush=True)
    trainer.close()
    del trainer
    torch.cuda.empty_cache()


def main():
    import transformers
    import triton
    print(f"torch {torch.__version__} triton {triton.__version__} transformers {transformers.__version__} "
          f"{torch.cuda.get_device_name()}", flush=True)
    RES["versions"] = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    anchors = {}
    runs = [] if "--skip-hf" in sys.argv else [("hf", bench_hf)]
    prof = 2 if "--profile" in sys.argv else None
    if "--fused" in sys.argv:
        runs += [("ours all triton", lambda: bench_ours("triton", "triton", anchors, fused=True, profile_b=prof)),
                 ("ours all triton compiled",
                  lambda: bench_ours("triton", "triton", anchors, fused=True, compile=True, profile_b=prof))]
        modes = sys.argv[sys.argv.index("--compile-mode") + 1:] if "--compile-mode" in sys.argv else []
        for mode in [m for m in modes if not m.startswith("--")]:
            runs.append((f"ours all triton compiled mode={mode}",
                         lambda mode=mode: bench_ours("triton", "triton", anchors, fused=True, compile=True,
                                                      profile_b=prof, mode=mode)))
    elif "--skip-layer" not in sys.argv:
        runs += [("ours triton/triton", lambda: bench_ours("triton", "triton", anchors)),
                 ("ours sdpa/triton", lambda: bench_ours("sdpa", "triton", anchors)),
                 ("ours sdpa/grouped_mm", lambda: bench_ours("sdpa", "grouped_mm", anchors))]
    if "--skip-small" not in sys.argv:
        runs += [("small triton", lambda: bench_small("triton", "triton", "triton")),
                 ("small torch", lambda: bench_small("sdpa", "grouped_mm", "torch"))]
    for name, fn in runs:
        try:
            r = fn()
            if name == "hf":
                anchors.update(r)
        except Exception as e:  # keep the other rows' numbers
            import traceback
            traceback.print_exc(limit=-4)
            print(f"{name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            RES[f"{name}_error"] = repr(e)[:500]
        torch.cuda.empty_cache()
        json.dump(RES, open(os.path.join(os.environ.get("OUT", "."), "bench_layer.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
