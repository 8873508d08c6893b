"""Our kernels against the anchors of docs/performance.md, side by side in one run on one GPU (< 5 min).

    python scripts/bench_kernels.py            # prints a table; writes $OUT/bench_kernels.json
    python scripts/bench_kernels.py --only accumulate norms   # some sections
    python scripts/bench_kernels.py --only pcie               # what activation offload can move per second
    python scripts/bench_kernels.py --only gemm               # the experts' grouped GEMMs against the memory floor

Rows: Newton-Schulz on the K2 layer slice (vs torch.optim.Muon's NS and step, and plain batched bf16
torch), the MoE expert path fwd+bwd (vs the torch._grouped_mm reference in k2train.model.moe and HF
transformers' grouped_mm experts), permute/combine, RMSNorm and SwiGLU bandwidth (vs a measured
copy), the fp32 gradient accumulator (vs torch's mixed-dtype in-place add), FP8 tile
quantize/dequantize of the experts' inputs (vs a copy of the bytes they move), PCIe to pinned host
memory each way and both at once (what activation offload can hide), the fused cross entropy (vs
torch's under autocast and from fp32 logits), the router's fp32 matmul as split bf16 GEMMs (vs the
fp32 GEMM it was), and each of the routed experts' grouped GEMMs (torch._grouped_mm) against the
bytes it must move (`--only gemm`). Each of ours is checked against its reference on the same random
inputs before timing.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench



def bootstrap_k2train():
    """Import k2train from this checkout when it is not pip-installed (the GPU machine): the repo
    root on sys.path, and kernels/ and optim/ mapped to k2train.kernels / k2train.optim as
    pyproject.toml's package-dir does."""
    try:
        import k2train.kernels  # noqa: F401
        import k2train.optim  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    import k2train
    for sub in ("kernels", "optim"):
        spec = importlib.util.spec_from_file_location(
            f"k2train.{sub}", os.path.join(root, sub, "__init__.py"), submodule_search_locations=[os.path.join(root, sub)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"k2train.{sub}"] = mod
        spec.loader.exec_module(mod)
        setattr(k2train, sub, mod)


bootstrap_k2train()
from k2train.kernels.cross_entropy import cross_entropy  # noqa: E402
from k2train.kernels.fp8 import dequantize_tiles, quantize_tiles  # noqa: E402
from k2train.kernels.grad_accumulate import accumulate_  # noqa: E402
from k2train.kernels.split_matmul import linear_fp32  # noqa: E402
from k2train.kernels.moe import build_routing, combine, moe_experts_forward, permute  # noqa: E402
from k2train.kernels.newton_schulz import zeropower_ns_batched, zeropower_ns_reference  # noqa: E402
from k2train.optim.newton_schulz import ns_flops  # noqa: E402
from k2train.kernels.norms import rmsnorm_residual, rmsnorm_residual_torch  # noqa: E402
from k2train.kernels.swiglu import swiglu, swiglu_torch  # noqa: E402
from k2train.model.moe import experts_grouped_mm, grouped_mm_supported  # noqa: E402

DEV = "cuda"
RES: dict = {}


def bench(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def row(name, ms, anchor_ms=None, flops=None, bytes_=None, note=""):
    r = {"ms": ms}
    if flops:
        r["tflops"] = flops / ms / 1e9
    if bytes_:
        r["gbps"] = bytes_ / ms / 1e6
    if anchor_ms:
        r["speedup_vs_anchor"] = anchor_ms / ms
    r["note"] = note
    RES[name] = r
    rate = f"{r['tflops']:7.1f} TFLOP/s" if flops else (f"{r['gbps']:7.0f} GB/s" if bytes_ else "")
    sp = f"x{r['speedup_vs_anchor']:.2f}" if anchor_ms else ""
    print(f"{name:62s} {ms:9.3f} ms {rate:>16s} {sp:>7s} {note}", flush=True)


def ceilings():
    x = torch.empty(2 * 1024**3 // 2, device=DEV, dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    row("ceiling: copy 2 GiB", ms, bytes_=2 * x.numel() * 2)
    del x, y
    return RES["ceiling: copy 2 GiB"]["gbps"]


def newton_schulz():
    shapes = ([(2048, 7168)] * 50 + [(7168, 2048)] * 25
              + [(1536, 7168), (12288, 1536), (576, 7168), (16384, 512), (7168, 8192)])
    grads = [torch.randn(s, device=DEV) for s in shapes]

    nsf = sum(ns_flops(*s) for s in shapes)
    groups: dict = {}
    for g in grads:
        groups.setdefault(tuple(g.shape), []).append(g)
    stacks = {s: torch.stack(gs) for s, gs in groups.items()}
    # correctness on the slice: ours vs the plain bf16 batched iteration, per shape group
    errs = {str(s): rel(zeropower_ns_batched(st[:4]), zeropower_ns_reference(st[:4].double()))
            for s, st in stacks.items()}
    errs_ref = {str(s): rel(zeropower_ns_reference(st[:4].bfloat16()), zeropower_ns_reference(st[:4].double()))
                for s, st in stacks.items()}
    print("NS rel. error vs fp64 iteration, ours:", {k: round(v, 4) for k, v in errs.items()})
    print("NS rel. error vs fp64 iteration, textbook bf16:", {k: round(v, 4) for k, v in errs_ref.items()})
    RES["ns_rel_err"] = {"ours": errs, "textbook_bf16": errs_ref}

    params = [torch.nn.Parameter(g.clone()) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    anchor = None
    if hasattr(torch.optim, "Muon"):
        opt = torch.optim.Muon(params, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        anchor = bench(lambda: opt.step(), rep=100)
        row("NS anchor: torch.optim.Muon step (layer slice, fp32 params)", anchor, flops=nsf)
        from torch.optim._muon import _zeropower_via_newtonschulz as muon_ns
        ms = bench(lambda: [muon_ns(g, (3.4445, -4.7750, 2.0315), 5, 1e-7) for g in grads], rep=100)
        row("NS anchor: torch.optim.Muon's NS, per matrix", ms, flops=nsf)
        del opt
    plain = bench(lambda: [zeropower_ns_reference(st.bfloat16()) for st in stacks.values()], rep=100)
    row("NS anchor: batched bf16 NS5 in plain torch (by shape)", plain, flops=nsf)
    ours = bench(lambda: [zeropower_ns_batched(st) for st in stacks.values()], rep=100)
    row("NS ours: zeropower_ns_batched (by shape)", ours, anchor_ms=anchor, flops=nsf,
        note=f"x{plain / ours:.2f} vs plain batched")
    # the tall expert matrices join the wide ones in one batch once transposed
    merged = dict(stacks)
    merged[(2048, 7168)] = torch.cat([stacks[(2048, 7168)], stacks[(7168, 2048)].mT])
    del merged[(7168, 2048)]
    ours_m = bench(lambda: [zeropower_ns_batched(st) for st in merged.values()], rep=100)
    row("NS ours: zeropower_ns_batched (tall experts transposed in)", ours_m, anchor_ms=anchor, flops=nsf)
    big = stacks[(2048, 7168)]
    t_ours = bench(lambda: zeropower_ns_batched(big, impl="triton"))
    t_torch = bench(lambda: zeropower_ns_batched(big, impl="torch"))
    row("NS 50 x (2048, 7168) ours (triton syrk)", t_ours, anchor_ms=t_torch, flops=50 * ns_flops(2048, 7168))
    row("NS 50 x (2048, 7168) same loop, torch matmuls", t_torch, flops=50 * ns_flops(2048, 7168))
    del params, grads, stacks, merged
    torch.cuda.empty_cache()


def hf_experts(E, D, I, w_gate, w_up, w_down):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=8,
                           n_group=1, topk_group=1)
    cfg._experts_implementation = "grouped_mm"
    with torch.device(DEV):
        ex = DeepseekV3Experts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.cat([w_gate, w_up], dim=1))
        ex.down_proj.copy_(w_down)
    return ex


def moe(copy_gbps):
    E, D, I, K = 24, 7168, 2048, 8
    ws = [torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16) * D**-0.5,
          torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16) * D**-0.5,
          torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16) * I**-0.5]
    ws = [w.requires_grad_() for w in ws]
    hf = hf_experts(E, D, I, *[w.detach() for w in ws])
    for N in (2048, 8192, 32768):
        T = N // K
        x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        idx = torch.rand(T, E, device=DEV).topk(K, dim=-1).indices
        w = torch.rand(T, K, device=DEV).requires_grad_()
        dy = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
        fl = 18 * N * D * I  # fwd 3 GEMMs of 2*N*D*I, bwd twice that

        def run(fn, params):
            def step():
                for p in params:
                    p.grad = None
                fn().backward(dy)
            return step
        ours_fn = lambda: moe_experts_forward(x, idx, w, *ws, grouped_mm_supported(x))  # noqa: E731
        ref_fn = lambda: experts_grouped_mm(x, idx, w, *ws)  # noqa: E731
        hf_fn = lambda: hf.forward(x, idx, w)  # noqa: E731
        # correctness: forward and every gradient, ours vs the grouped_mm reference
        outs = []
        for fn in (ours_fn, ref_fn):
            for p in [x, w, *ws]:
                p.grad = None
            y = fn()
            y.backward(dy)
            outs.append([y.detach()] + [p.grad.clone() for p in [x, w, *ws]])
        errs = [rel(a, b) for a, b in zip(*outs)]
        t_ref = bench(run(ref_fn, [x, w, *ws]), rep=100)
        t_hf = bench(run(hf_fn, [x, w, *hf.parameters()]), rep=100)
        t_ours = bench(run(ours_fn, [x, w, *ws]), rep=100)
        row(f"MoE fwd+bwd N={N} anchor: torch._grouped_mm reference", t_ref, flops=fl)
        row(f"MoE fwd+bwd N={N} anchor: HF DeepseekV3Experts grouped_mm", t_hf, flops=fl)
        row(f"MoE fwd+bwd N={N} ours", t_ours, anchor_ms=t_ref, flops=fl,
            note=f"x{t_hf / t_ours:.2f} vs HF; max rel err y/dx/dw/dWg/dWu/dWd {max(errs):.1e}")
        RES[f"moe_rel_err N={N}"] = errs
        # the data movement pieces alone
        with torch.no_grad():
            r = build_routing(idx, E)
            xd = x.detach()
            yN = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
            pb = (T + N) * D * 2
            t_p = bench(lambda: permute(xd, r))
            row(f"permute N={N} ours", t_p, bytes_=pb, note=f"{pb / t_p / 1e6 / copy_gbps:.0%} of copy")
            t_pt = bench(lambda: xd[r.token_N])
            row(f"permute N={N} anchor: torch index", t_pt, bytes_=pb)
            t_c = bench(lambda: combine(yN, w.detach(), r))
            row(f"combine N={N} ours", t_c, bytes_=pb, note=f"{pb / t_c / 1e6 / copy_gbps:.0%} of copy")
        del x, w, dy
    del hf, ws
    torch.cuda.empty_cache()


def norms(copy_gbps):
    T, D = 16384, 7168
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.ones(D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    y, s = rmsnorm_residual(x, r, w)
    y_t, s_t = rmsnorm_residual_torch(x, r, w)
    print(f"RMSNorm rel err vs torch: y {rel(y, y_t):.1e} s {rel(s, s_t):.1e}")
    b = 4 * T * D * 2
    t = bench(lambda: rmsnorm_residual(x, r, w))
    row("RMSNorm+residual fwd [16384, 7168] ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    tt = bench(lambda: rmsnorm_residual_torch(x, r, w))
    row("RMSNorm+residual fwd anchor: torch unfused", tt, bytes_=b)
    yy, ss = rmsnorm_residual(x, r, w)
    t = bench(lambda: torch.autograd.grad((yy, ss), (x, r, w), (dy, ds), retain_graph=True))
    row("RMSNorm+residual bwd ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    yy, ss = rmsnorm_residual_torch(x, r, w)
    tt = bench(lambda: torch.autograd.grad((yy, ss), (x, r, w), (dy, ds), retain_graph=True))
    row("RMSNorm+residual bwd anchor: torch unfused", tt, bytes_=b)
    del x, r, dy, ds, yy, ss, y, s, y_t, s_t
    R, C = 65536, 2048
    g = torch.randn(R, C, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    dh = torch.randn_like(g)
    print(f"SwiGLU rel err vs torch: {rel(swiglu(g, u), swiglu_torch(g, u)):.1e}")
    b = 3 * R * C * 2
    t = bench(lambda: swiglu(g, u))
    row("SwiGLU fwd [65536, 2048] ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    tt = bench(lambda: F.silu(g) * u)
    row("SwiGLU fwd anchor: F.silu(g) * u", tt, bytes_=b)
    h = swiglu(g, u)
    b = 5 * R * C * 2
    t = bench(lambda: torch.autograd.grad(h, (g, u), dh, retain_graph=True))
    row("SwiGLU bwd ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    h = F.silu(g) * u
    tt = bench(lambda: torch.autograd.grad(h, (g, u), dh, retain_graph=True))
    row("SwiGLU bwd anchor: torch autograd", tt, bytes_=b)


def accumulate(copy_gbps):
    # a bf16 gradient into an fp32 sum, as bf16 weights do every micro-batch: 1 GiB of fp32 sum
    n = 2**28
    acc = torch.randn(n, device=DEV)
    x = torch.randn(n, device=DEV).to(torch.bfloat16)
    ref = acc.clone().add_(x)
    print(f"accumulate bit-identical to torch: {torch.equal(accumulate_(acc.clone(), x), ref)}")
    b = n * (4 + 4 + 2)
    tt = bench(lambda: acc.add_(x))
    t = bench(lambda: accumulate_(acc, x))
    row("fp32 += bf16 [2^28] ours", t, anchor_ms=tt, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    row("fp32 += bf16 anchor: torch acc.add_(g)", tt, bytes_=b)
    b = n * (4 + 2)
    tt = bench(lambda: acc.copy_(x))
    t = bench(lambda: accumulate_(acc, x, add=False))
    row("fp32 <- bf16 [2^28] ours", t, anchor_ms=tt, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    row("fp32 <- bf16 anchor: torch acc.copy_(g)", tt, bytes_=b)


def fp8(copy_gbps):
    # one MoE layer's routed-expert input at the proxy's width (4096 tokens x 8 experts, 7168)
    x = torch.randn(32768, 7168, device=DEV, dtype=torch.bfloat16)
    q, s = quantize_tiles(x)
    back = dequantize_tiles(q, s, torch.bfloat16)
    print(f"FP8 tiles round trip rel err: {rel(back, x):.1e}")
    b = x.numel() * (2 + 1) + s.numel() * 4
    t = bench(lambda: quantize_tiles(x))
    row("FP8 quantize [32768, 7168] bf16 ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")
    t = bench(lambda: dequantize_tiles(q, s, torch.bfloat16))
    row("FP8 dequantize [32768, 7168] to bf16 ours", t, bytes_=b, note=f"{b / t / 1e6 / copy_gbps:.0%} of copy")


def pcie(copy_gbps):
    # what activation offload can move: 1 GiB between the GPU and pinned host memory, each way alone and
    # both at once on two side streams (the offloader's layout: copies out in the forward, in ahead of the backward)
    n = 2**29
    dev = torch.empty(n, device=DEV, dtype=torch.bfloat16).normal_()
    dev2 = torch.empty_like(dev)
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host2 = torch.empty(n, dtype=torch.bfloat16, pin_memory=True).normal_()
    b = n * 2
    row("PCIe: GPU -> pinned host, 1 GiB", bench(lambda: host.copy_(dev, non_blocking=True), rep=50), bytes_=b)
    row("PCIe: pinned host -> GPU, 1 GiB", bench(lambda: dev2.copy_(host2, non_blocking=True), rep=50), bytes_=b)
    out_s, in_s = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        main = torch.cuda.current_stream()
        out_s.wait_stream(main)
        in_s.wait_stream(main)
        with torch.cuda.stream(out_s):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(in_s):
            dev2.copy_(host2, non_blocking=True)
        main.wait_stream(out_s)
        main.wait_stream(in_s)
    row("PCIe: both ways at once, 1 GiB each", bench(both, rep=50), bytes_=2 * b, note="sum of both directions")
    del dev, dev2, host, host2


def loss(copy_gbps):
    # the next-token loss of one 4,096-token micro-batch at K2's vocabulary, forward and backward from
    # bf16 logits: torch's under bf16 autocast (bf16 log-softmax on CUDA), torch's from fp32 logits
    # (TorchTitan's and Megatron's precision), and the fused kernel (fp32 math, bf16 gradient)
    N, V = 4096, 163840
    x = (2 * torch.randn(N, V, device=DEV)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV)
    ref = F.cross_entropy(x.detach().double(), labels, reduction="sum")
    runs = {
        "torch, bf16 autocast": lambda: _autocast_ce(x, labels),
        "torch, fp32 logits": lambda: F.cross_entropy(x.float(), labels, reduction="sum"),
        "ours, fused": lambda: cross_entropy(x, labels).sum(),
    }
    base = None
    for name, fn in runs.items():
        print(f"cross entropy {name}: loss rel err vs fp64 {abs(fn().item() / ref.item() - 1):.1e}")

        def step(fn=fn):
            x.grad = None
            fn().backward()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - x.numel() * 2 * 2) / 2**30  # beyond the logits and their gradient
        t = bench(step, rep=50)
        base = base or t
        row(f"cross entropy fwd+bwd [{N}, {V}], {name}", t, anchor_ms=base if name != "torch, bf16 autocast" else None,
            bytes_=3 * N * V * 2, note=f"{peak:.2f} GiB beyond logits + grad")
    del x


def router(copy_gbps):
    # K2's router on one B2 x S4096 micro-batch, forward and backward: fp32 logits from bf16 hidden
    # states and bf16 weights (K2's setup) or fp32 master weights under autocast
    T, D, E = 8192, 7168, 384
    for w_dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(T, D, device=DEV).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(E, D, device=DEV) * D**-0.5).to(w_dtype).requires_grad_()
        x_ = x.float() if w_dtype == torch.float32 else x  # under autocast the norm hands over fp32
        g = torch.randn(T, E, device=DEV)
        ref_out = F.linear(x_.double(), w.double())
        ref = torch.autograd.grad(ref_out, (x, w), g.double())
        runs = {"anchor: fp32 GEMM": "fp32", "ours, split bf16 GEMMs": "split"}
        base = None
        for name, mode in runs.items():
            out = linear_fp32(x_, w, mode)
            grads = torch.autograd.grad(out, (x, w), g)
            errs = " ".join(f"{rel(a, r):.1e}" for a, r in zip((out, *grads), (ref_out, *ref)))

            def step(mode=mode):
                torch.autograd.grad(linear_fp32(x_, w, mode), (x, w), g)
            t = bench(step)
            base = base or t
            row(f"router fwd+bwd [{T}, {D}] x [{E}], {str(w_dtype)[6:]} weight, {name}", t,
                anchor_ms=base if mode != "fp32" else None, flops=3 * 2 * T * D * E,
                note=f"rel err out/dx/dw vs fp64 {errs}")
        del x, w, x_


def gemm(copy_gbps):
    # The routed experts' grouped GEMMs (torch._grouped_mm, CUTLASS) at K2's widths (D 7168, I 2048)
    # for 65,536 routed rows (one B2 x S4096 micro-batch, 8 experts a token) over 384 / 24 experts:
    # 171 rows per expert (all of K2's experts on one GPU: bound by memory on an H100, near the ridge
    # on an H200) and 2,731 (EP16: bound by the tensor cores). "of copy": the bytes a GEMM must move at least (weights once,
    # activations once) over the time, against a device copy's bandwidth; the input's gradient of
    # gate and up is two GEMMs and a sum. (The weights' gradients with dy^T copied K-major need each
    # expert's rows in multiples of 8, else CUTLASS asserts on the device; with rows padded so, that
    # layout measured slower, 0.61-0.99x at 171 rows and 0.50-0.75x at 2,731, 2026-12-05.)
    D, I, N = 7168, 2048, 65536
    gm = torch._grouped_mm
    for E in (384, 24):
        idx = torch.rand(N // 8, E, device=DEV).topk(8, dim=-1).indices
        offs = build_routing(idx, E).offs_E
        wg = torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16) * D**-0.5
        wu = torch.randn(E, I, D, device=DEV, dtype=torch.bfloat16) * D**-0.5
        wd = torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16) * I**-0.5
        x = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
        h = torch.randn(N, I, device=DEV, dtype=torch.bfloat16)
        dgate = torch.randn(N, I, device=DEV, dtype=torch.bfloat16)
        dup = torch.randn(N, I, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
        one = E * I * D * 2 + (N * D + N * I) * 2  # one weight and its two activations
        ops = {  # name: (fn, bytes at least, flops)
            "fwd gate x@Wg^T": (lambda: gm(x, wg.transpose(1, 2), offs=offs), one, 2 * N * D * I),
            "fwd down h@Wd^T": (lambda: gm(h, wd.transpose(1, 2), offs=offs), one, 2 * N * D * I),
            "dgrad down dy@Wd": (lambda: gm(dy, wd, offs=offs), one, 2 * N * D * I),
            "dgrad x dg@Wg + du@Wu": (lambda: gm(dgate, wg, offs=offs) + gm(dup, wu, offs=offs),
                                      2 * E * I * D * 2 + (N * D + 2 * N * I) * 2, 4 * N * D * I),
            "wgrad gate dg^T@x": (lambda: gm(dgate.t(), x, offs=offs), one, 2 * N * D * I),
            "wgrad down dy^T@h": (lambda: gm(dy.t(), h, offs=offs), one, 2 * N * D * I),
        }
        for name, (fn, nbytes, fl) in ops.items():
            t = bench(fn, rep=60)
            row(f"gemm E={E} ({N // E} rows/expert) {name}", t, flops=fl,
                note=f"{nbytes / 1e9:.1f} GB at least, {nbytes / t / 1e6 / copy_gbps:.0%} of copy")
            torch.cuda.empty_cache()
        del wg, wu, wd, x, h, dgate, dup, dy
        torch.cuda.empty_cache()


def _autocast_ce(x, labels):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return F.cross_entropy(x, labels, reduction="sum")


def main():
    import argparse
    sections = {"accumulate": accumulate, "pcie": pcie, "loss": loss, "router": router, "fp8": fp8, "norms": norms,
                "moe": moe, "gemm": gemm, "ns": lambda copy_gbps: newton_schulz()}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(sections), default=list(sections))
    args = ap.parse_args()
    import triton
    import transformers
    print(f"torch {torch.__version__} triton {triton.__version__} transformers {transformers.__version__} "
          f"{torch.cuda.get_device_name()}", flush=True)
    RES["versions"] = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                           gpu=torch.cuda.get_device_name())
    torch.manual_seed(0)
    copy_gbps = ceilings()
    for name in args.only:
        try:
            sections[name](copy_gbps)
        except Exception as e:  # one failing section must not cost the others their numbers
            print(f"{name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            RES[f"{name}_error"] = repr(e)[:500]
        torch.cuda.empty_cache()
    json.dump(RES, open(os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
