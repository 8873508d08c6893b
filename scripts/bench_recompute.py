"""Activation recompute and torch.compile on one GPU: peak activation memory and step time of one
forward+backward per mode, side by side with the planner's activation estimate.

    python scripts/bench_recompute.py                    # GPU: k2_small, bf16 autocast, 1 x 4096
    python scripts/bench_recompute.py --smoke            # CPU: k2_tiny, fp32, 2 x 64 (no memory stats)

Modes: none, selective, full, full + trainer.compile. Memory: ``max_memory_allocated`` during the
step minus what is allocated before it (weights and pre-allocated gradients), i.e. activations plus
transient buffers; the estimate is the planner's per-layer activations (k2train/parallel/memory.py)
plus the head, plus, for full recompute, one layer's activations while it is recomputed.
"""

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from k2train.config import ParallelConfig, load_config
from k2train.model import K2Model
from k2train.parallel import ParallelDims
from k2train.parallel.memory import head_activation_bytes, layer_activation_bytes
from k2train.parallel.parallelize import parallelize

MODES = [("none", False), ("selective", False), ("full", False), ("full", True)]


def estimate(cfg, mode: str, tokens: int, seq: int, a: int, residual: int) -> float:
    moe = [i >= cfg.first_k_dense_replace for i in range(cfg.num_hidden_layers)]
    per_token = sum(layer_activation_bytes(cfg, m, seq, mode, a, residual_bytes=residual) for m in moe)
    per_token += head_activation_bytes(cfg, a)
    if mode == "full":
        per_token += layer_activation_bytes(cfg, True, seq, "none", a)
    return per_token * tokens


def run(cfg, mode: str, compiled: bool, batch: int, seq: int, device: torch.device, dtype, steps: int) -> dict:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = K2Model(cfg)
    layout = ParallelConfig(recompute=mode)
    (model,) = parallelize(model, ParallelDims.from_config(layout, 1), layout, compile=compiled, seq_len=seq,
                           micro_batch_size=batch, num_microbatches=1, loss_fn=None, device=device).parts
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    cuda = device.type == "cuda"
    times, peak = [], 0
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss
        del logits
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if i:  # the first step warms up (and compiles)
            times.append(time.perf_counter() - t0)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {"ms": 1e3 * statistics.median(times), "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="k2_tiny on CPU, fp32 (checks that every mode runs)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    if args.smoke or not torch.cuda.is_available():
        cfg = load_config(["model=k2_tiny"]).model
        device, dtype, batch, seq, a, residual = torch.device("cpu"), None, 2, 64, 4, 4
    else:
        cfg = dataclasses.replace(load_config(["model=k2_small"]).model, attn_impl="sdpa", moe_impl="grouped_mm")
        device, dtype, batch, seq, a, residual = torch.device("cuda"), torch.bfloat16, 1, 4096, 2, 4
    tokens = batch * seq
    print(f"{cfg.name}: {cfg.num_hidden_layers} layers, micro-batch {batch} x {seq}, {device.type}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, attn {cfg.attn_impl}, experts {cfg.moe_impl}")
    print(f"{'mode':22s} {'step ms':>9s} {'x none':>7s} {'peak act GiB':>13s} {'planner GiB':>12s} {'error':>7s}")
    base_ms = None
    for mode, compiled in MODES:
        r = run(cfg, mode, compiled, batch, seq, device, dtype, args.steps)
        base_ms = base_ms or r["ms"]
        est = estimate(cfg, mode, tokens, seq, a, residual)
        name = mode + (" + compile" if compiled else "")
        if r["peak"]:
            mem = f"{r['peak'] / 2**30:13.2f} {est / 2**30:12.2f} {est / r['peak'] - 1:+7.1%}"
        else:
            mem = f"{'n/a':>13s} {est / 2**30:12.4f} {'':>7s}"
        print(f"{name:22s} {r['ms']:9.1f} {r['ms'] / base_ms:7.2f} {mem}", flush=True)


if __name__ == "__main__":
    main()
