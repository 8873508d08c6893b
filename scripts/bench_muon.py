"""Optimizer step on one K2 layer at EP16 (docs/performance.md#anchors): MuonClip vs torch.optim.Muon vs fused AdamW.

The slice: 24 routed experts (w_gate, w_up [2048, 7168], w_down [7168, 2048]), the shared expert
(same three shapes) and the five MLA matrices (q_a [1536, 7168], q_b [12288, 1536],
kv_a [576, 7168], kv_b [16384, 512], o [7168, 8192]): 80 matrices, 1.2B fp32 params, 64.8 TFLOP
of Newton-Schulz. Each optimizer gets its own copy of the params (fp32) and fixed random grads.

Rows: torch.optim.Muon (per-matrix bf16 NS; nesterov, match_rms_adamw); MuonClip with standard
NS (batched bf16 torch, unfused: bit-identical to torch.optim.Muon; Triton symmetric kernels) and
with Gram NS (torch matmuls; Triton GEMMT, fp16), as the trainer builds them (optim.ns_method /
ns_impl / ns_dtype); on CUDA with half-precision NS MuonClip fuses its elementwise passes
(k2train.kernels.muon_fused) unless a row says unfused; torch.optim.AdamW(fused=True).
"diff to torch Muon" compares each row's one-step update with torch.optim.Muon's; "error vs fp64 NS"
with the update whose NS5 ran in fp64: the same-result criterion is that a row's error is no larger
than torch.optim.Muon's own (half-precision NS rounding differs by op order).

    python scripts/bench_muon.py                 # GPU: the real shapes
    python scripts/bench_muon.py --cpu-smoke     # CPU: shapes / 64, 4 experts, a few repeats
"""

import argparse
import math
import time

import torch

from k2train.optim.muon import MuonClip
from k2train.optim.newton_schulz import NS_COEFFICIENTS, ns_flops

LR, WD = 2e-4, 0.1


def layer_slice(scale: int, experts: int) -> dict[str, tuple[int, ...]]:
    """Param name -> shape of the slice; ``scale`` divides every dim (CPU smoke test)."""
    D, I, s = 7168 // scale, 2048 // scale, scale
    shapes = {
        "experts.w_gate": (experts, I, D),
        "experts.w_up": (experts, I, D),
        "experts.w_down": (experts, D, I),
        "shared.gate_proj": (I, D),
        "shared.up_proj": (I, D),
        "shared.down_proj": (D, I),
        "attn.q_a_proj": (1536 // s, D),
        "attn.q_b_proj": (12288 // s, 1536 // s),
        "attn.kv_a_proj_with_mqa": (576 // s, D),
        "attn.kv_b_proj": (16384 // s, 512 // s),
        "attn.o_proj": (D, 8192 // s),
    }
    return shapes


def ns_tflop(shapes: dict[str, tuple[int, ...]], steps: int = 5) -> float:
    """Textbook NS5 TFLOP of the slice (the count every rate in the tables uses)."""
    return sum(math.prod(s[:-2]) * ns_flops(*s[-2:], steps) for s in shapes.values()) / 1e12


def make_params(shapes, device, split_experts: bool, seed: int = 0):
    """Fresh fp32 params with grads: experts as 3-D stacks, or split into 2-D matrices (torch.optim.Muon)."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: 2.4B normals per call
    params = []
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g, device=device) * 0.02
        gr = torch.randn(shape, generator=g, device=device)
        if split_experts and len(shape) == 3:
            for e in range(shape[0]):
                p = torch.nn.Parameter(w[e].clone())
                p.grad = gr[e].clone()
                params.append(p)
        else:
            p = torch.nn.Parameter(w)
            p.grad = gr
            params.append(p)
    return params


def timeit(fn, device, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def one_step_update(make_opt, shapes, device, split: bool) -> list[torch.Tensor]:
    """Per-matrix update (new - old) of one step from the same start, experts split into 2-D."""
    params = make_params(shapes, device, split)
    before = [p.detach().clone() for p in params]
    make_opt(params).step()
    deltas = [(p.detach() - b) for p, b in zip(params, before)]
    if not split:
        deltas = [d for x in deltas for d in (x.unbind(0) if x.ndim == 3 else [x])]
    return deltas


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a, b))


def ns_fn_for(impl: str, method: str, dtype: str, device):
    """MuonClip's ns_fn for (impl, method, dtype) as the trainer builds it, or None if it cannot run here."""
    from k2train.optim.grouping import _resolve_ns_fn

    if impl == "triton":
        try:
            from k2train.kernels.newton_schulz import triton_ns_available
        except ImportError:
            return None
        if not triton_ns_available(torch.empty(0, device=device)):
            return None
    return _resolve_ns_fn(impl, dtype, method)


def exact_update(shapes, device) -> list[torch.Tensor]:
    """The one-step update with NS5 in fp64 (no rounding to speak of): the 'same result' yardstick."""
    from k2train.optim.newton_schulz import zeropower_via_newtonschulz

    fp64 = lambda G, steps, coefficients, dtype: zeropower_via_newtonschulz(G, steps, coefficients, dtype=torch.float64)  # noqa: E731
    return one_step_update(lambda ps: MuonClip([{"kind": "muon", "params": ps}], lr=LR, weight_decay=WD,
                                               ns_dtype=torch.float64, ns_fn=fp64), shapes, device, split=False)


def gemmt_vs_cublas(device, warmup: int, repeat: int) -> None:
    """The symmetric-product kernel against cuBLAS computing the whole product (torch.bmm)."""
    from k2train.kernels.newton_schulz import (_gemmt_persistent_tuned, _gemmt_tma_tuned, _gemmt_tuned, gemmt,
                                               gemmt_blocked, gemmt_persistent, gemmt_tma)

    print("\nGEMMT (lower tiles, mirrored) vs torch.bmm (whole product), fp16, one batch of the expert bucket:")
    variants = {"triton": gemmt, "tma": gemmt_tma, "persistent": gemmt_persistent,
                "blocked2": lambda A: gemmt_blocked(A, blocks=2), "blocked4": lambda A: gemmt_blocked(A, blocks=4)}
    print(f"| {'N x M x K':16s} | {'bmm ms':>7s} {'TF/s':>5s} | " + " | ".join(f"{v:>8s} ms  x bmm" for v in variants) + " |")
    for N, M, K in [(36, 2048, 7168), (36, 2048, 2048), (1, 7168, 8192), (1, 7168, 7168)]:
        A = torch.randn(N, M, K, device=device, dtype=torch.float16)
        t_bmm = timeit(lambda: torch.bmm(A, A.mT), device, warmup, repeat)
        full = 2 * N * M * M * K / 1e12
        cells = []
        for fn in variants.values():
            t = timeit(lambda: fn(A), device, warmup, repeat)
            cells.append(f"{t:11.3f} {t_bmm / t:5.2f}x")
        print(f"| {f'{N}x{M}x{K}':16s} | {t_bmm:7.3f} {full / t_bmm * 1e3:5.0f} | " + " | ".join(cells) + " |")
        del A
    for name, tuned in (("pointer loads", _gemmt_tuned), ("TMA", _gemmt_tma_tuned), ("persistent", _gemmt_persistent_tuned)):
        for key, cfg in getattr(tuned, "cache", {}).items():
            print(f"  {name} {key[:4]}: {cfg}")


def ns_breakdown(shapes, device, warmup: int, repeat: int, full: bool = False) -> None:
    """Newton-Schulz alone per matrix shape, batched as MuonClip batches them, for each schedule and
    symmetric-product implementation. Rate = textbook NS5 FLOPs / time (comparable across columns)."""
    from k2train.kernels.newton_schulz import zeropower_gram_batched, zeropower_ns_batched
    from k2train.optim.muon import batched_newton_schulz
    from k2train.optim.newton_schulz import zeropower_via_gram_newtonschulz, zeropower_via_newtonschulz

    bf16, fp16 = torch.bfloat16, torch.float16
    impls = {
        "std torch": (bf16, lambda G, **k: zeropower_via_newtonschulz(G, dtype=bf16)),
        "gram torch": (fp16, lambda G, **k: zeropower_via_gram_newtonschulz(G, dtype=fp16)),
    }
    for sym in ("triton", "tma", "persistent", "blocked2", "blocked4", "auto"):
        impls[f"std {sym}"] = (bf16, lambda G, sym=sym, **k: zeropower_ns_batched(G, impl="triton", sym_impl=sym))
        impls[f"gram {sym}"] = (fp16, lambda G, sym=sym, **k: zeropower_gram_batched(G, impl="triton", sym_impl=sym))
    buckets: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        key = tuple(sorted(shape[-2:]))
        buckets[key] = buckets.get(key, 0) + (shape[0] if len(shape) == 3 else 1)
    print("\nNewton-Schulz alone, by shape: ms (textbook-equivalent TFLOP/s)")
    print(f"| {'shape x count':16s} | " + " | ".join(f"{name:>14s}" for name in impls) + " |")
    for (m, k), n in buckets.items():
        if n * ns_flops(m, k) < 5e12 and not full:  # the small MLA matrices are launch-bound alone
            continue
        G = torch.randn(n, m, k, device=device)
        cells = []
        for name, (dtype, fn) in impls.items():
            ms = timeit(lambda: batched_newton_schulz([G], fn, steps=5, coefficients=NS_COEFFICIENTS, dtype=dtype),
                        device, warmup, repeat)
            cells.append(f"{ms:6.2f} ({n * ns_flops(m, k) / ms / 1e9:4.0f})")
        print(f"| {f'{m}x{k} x{n}':16s} | " + " | ".join(f"{c:>14s}" for c in cells) + " |")
        del G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--sections", default="step,gemmt,ns", help="comma list: step (the table), gemmt, ns (GPU breakdowns)")
    # For the modelled share of step time in K2's layout (conf/parallel/k2_h800.yaml); assumptions, not measurements.
    ap.add_argument("--k2-gpus", type=int, default=2048, help="assumed cluster size for the model")
    ap.add_argument("--k2-tflops-per-gpu", type=float, default=300.0, help="assumed achieved training TFLOP/s per GPU")
    args = ap.parse_args()

    if args.cpu_smoke:
        device, scale, experts = torch.device("cpu"), 64, 4
        warmup, repeat = args.warmup or 1, args.repeat or 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU check")
        device, scale, experts = torch.device("cuda"), 1, args.experts
        warmup, repeat = args.warmup or 2, args.repeat or 5
    shapes = layer_slice(scale, experts)
    n_params = sum(math.prod(s) for s in shapes.values())
    n_mats = sum(s[0] if len(s) == 3 else 1 for s in shapes.values())
    flops = ns_tflop(shapes)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} | torch {torch.__version__}")
    print(f"slice: {n_mats} matrices, {n_params / 1e6:.1f}M params, {flops * 1e3:.3f} GFLOP of NS5 per step\n")

    def torch_muon(ps):
        return torch.optim.Muon(
            ps, lr=LR, weight_decay=WD, nesterov=True, adjust_lr_fn="match_rms_adamw", ns_coefficients=NS_COEFFICIENTS
        )

    def ours(ns_fn=None, ns_dtype=torch.bfloat16, fused=None):
        return lambda ps: MuonClip([{"kind": "muon", "params": ps}], lr=LR, weight_decay=WD, ns_fn=ns_fn,
                                   ns_dtype=ns_dtype, fused=fused)

    rows = [("torch.optim.Muon (per matrix)", torch_muon, True, True)]
    rows.append(("MuonClip, standard NS, torch, bf16", ours(fused=False), False, True))
    half = torch.float16 if device.type == "cuda" else torch.float32  # CPU: no fast half matmul
    hname = str(half)[6:]
    rows.append((f"MuonClip, Gram NS, torch, {hname}", ours(ns_fn_for("torch", "gram", hname, device), half), False, True))
    for method, dtype, fused, label in [
        ("standard", torch.bfloat16, None, "MuonClip, standard NS, Triton, bf16"),
        ("gram", torch.float16, False, "MuonClip, Gram NS, Triton, fp16, unfused"),
        ("gram", torch.float16, None, "MuonClip, Gram NS, Triton, fp16"),
    ]:
        fn = ns_fn_for("triton", method, str(dtype)[6:], device)
        if fn is None:
            print(f"(k2train.kernels.newton_schulz Triton path not available here: '{label}' skipped)")
            continue
        rows.append((label, ours(fn, dtype, fused), False, True))
    adamw_label = "torch.optim.AdamW(fused=True)" if device.type == "cuda" else "torch.optim.AdamW (CPU, unfused)"
    rows.append(
        (adamw_label, lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=device.type == "cuda"), False, False)
    )

    sections = set(args.sections.split(","))
    if "step" not in sections:
        rows = []
    exact = exact_update(shapes, device) if rows else None
    ref_update = one_step_update(torch_muon, shapes, device, split=True) if rows else None
    results = []
    for label, make_opt, split, is_muon in rows:
        if is_muon:
            update = ref_update if make_opt is torch_muon else one_step_update(make_opt, shapes, device, split)
            diff, err = max_rel_diff(update, ref_update), max_rel_diff(update, exact)
            del update
        else:
            diff = err = float("nan")
        params = make_params(shapes, device, split)
        opt = make_opt(params)
        ms = timeit(opt.step, device, warmup, repeat)
        results.append((label, ms, diff, err))
        del opt, params
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = results[0][1] if results else float("nan")
    print(
        f"| {'optimizer step':38s} | {'ms':>8s} | {'NS TFLOP/s*':>11s} | {'vs torch Muon':>13s} | "
        f"{'diff to torch Muon':>18s} | {'error vs fp64 NS':>16s} |"
    )
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 13}|{'-' * 15}|{'-' * 20}|{'-' * 18}|")
    for label, ms, diff, err in results:
        rate = f"{flops / (ms / 1e3):.0f}" if "AdamW" not in label else "-"
        d = "-" if math.isnan(diff) else f"{diff:.2e}"
        e = "-" if math.isnan(err) else f"{err:.2e}"
        print(f"| {label:38s} | {ms:8.2f} | {rate:>11s} | {base / ms:12.2f}x | {d:>18s} | {e:>16s} |")
    print("* textbook NS5 FLOPs of the slice over the whole step time (Gram and the symmetric kernels do fewer)")
    print("  diff / error: max over the matrices of ||update - other||_F / ||other||_F after one step")

    if device.type == "cuda" and "gemmt" in sections:
        gemmt_vs_cublas(device, warmup, repeat)
    if device.type == "cuda" and "ns" in sections:
        ns_breakdown(shapes, device, warmup, repeat)
    if device.type != "cuda" or not results:
        return
    # Modelled share of step time in K2's layout: PP16 (61 layers -> ~3.8 per stage), EP16, ZeRO-1
    # over the remaining data-parallel ranks (each matrix's NS runs on one of them).
    best = min(ms for label, ms, *_ in results if "AdamW" not in label)
    tokens, flop_per_token = 16384 * 4096, 204.5e9
    step_s = tokens * flop_per_token / (args.k2_gpus * args.k2_tflops_per_gpu * 1e12)
    layers_per_stage = 61 / 16
    expert_dp = max(1, args.k2_gpus // (16 * 16))
    muon_s = layers_per_stage * best / 1e3
    print(
        f"\nmodel, K2 layout: {args.k2_gpus} GPUs at {args.k2_tflops_per_gpu:g} TFLOP/s -> {step_s:.1f} s per 67M-token step; "
        f"Muon on ~{layers_per_stage:.1f} layers per stage = {muon_s * 1e3:.0f} ms unsharded "
        f"({100 * muon_s / step_s:.2f}% of the step), {muon_s / expert_dp * 1e3:.0f} ms with ZeRO-1 over "
        f"{expert_dp} data-parallel ranks ({100 * muon_s / expert_dp / step_s:.3f}%)"
    )


if __name__ == "__main__":
    main()
