"""Check and time the MLA attention kernel against SDPA (cuDNN), FlexAttention and padded flash.

    python scripts/bench_attention.py [--out DIR] [--quick]
    python scripts/bench_attention.py --docs   # packed documents: ours with doc_ids vs FlexAttention's document mask

1. Correctness: bf16 (and one fp32) on the GPU, fresh random inputs, against the fp32
   explicit-logits reference: relative error of out, dq, dk, dv and max_logit_H.
2. Timing (triton.testing.do_bench medians), qk 192 / v 128, causal, B2 H64 S4096 and
   B1 H64 S8192, forward and forward+backward.

FLOPs (as in docs/performance.md#anchors): forward = 2*B*H*S*S*(Dqk+Dv) / 2 (two matmuls, causal
counts half); backward = 2.5 x forward; forward+backward = 3.5 x forward. Writes
bench_attention.json to --out (default $OUT, else the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

try:
    from k2train.kernels import attention as attn
except ImportError:  # running from a bare checkout: load the file directly
    import importlib.util

    _path = os.path.join(os.path.dirname(__file__), "..", "kernels", "attention.py")
    _spec = importlib.util.spec_from_file_location("k2_attention", _path)
    attn = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(attn)

DQK, DV, H = 192, 128, 64
SHAPES = [(2, 4096), (1, 8192)]


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check_one(B, S, dtype, docs, seed, heads=8):
    torch.manual_seed(seed)
    # [B, S, H, D] memory viewed as [B, H, S, D], as the model produces it
    q, k = (torch.randn(B, S, heads, DQK, device="cuda").transpose(1, 2) for _ in range(2))
    q = q * 2.0
    v = torch.randn(B, S, heads, DV, device="cuda").transpose(1, 2)
    do = torch.randn(B, heads, S, DV, device="cuda").to(dtype)
    doc_ids = None
    if docs:
        cuts = torch.sort(torch.randint(1, S, (B, 6), device="cuda"), dim=1).values
        doc_ids = (torch.arange(S, device="cuda")[None, :, None] >= cuts[:, None, :]).sum(-1)
    lo = [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v)]
    hi = [t.to(dtype).float().detach().requires_grad_(True) for t in (q, k, v)]  # same rounding
    out, ml = attn.mla_attention(*lo, DQK**-0.5, causal=True, doc_ids=doc_ids)
    out.backward(do)
    ref, ml_ref = attn.mla_attention_reference(*hi, DQK**-0.5, causal=True, doc_ids=doc_ids)
    ref.backward(do.float())
    errs = dict(out=rel_err(out, ref), dq=rel_err(lo[0].grad, hi[0].grad),
                dk=rel_err(lo[1].grad, hi[1].grad), dv=rel_err(lo[2].grad, hi[2].grad),
                max_logit=rel_err(ml, ml_ref))
    finite = all(torch.isfinite(t).all().item() for t in (out, ml, *(x.grad for x in lo)))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = finite and max(errs.values()) < tol and errs["max_logit"] < 1e-3
    return errs, finite, ok


def check_correctness(lean=False):
    """Every config on the timed variant (even S, no docs), then the other variants untuned."""
    rows = []
    lists = ("FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS")
    saved = {n: list(getattr(attn, n)) for n in lists}
    attn.AUTOTUNE = False  # _launcher then uses config 0 of each list
    n_cfg = max(len(c) for c in saved.values())
    cases = [dict(B=2, S=1024, dtype=torch.bfloat16, docs=False, config=i, atomic=a)
             for a in (False, True) for i in range(n_cfg)]
    cases += [dict(B=2, S=1000, dtype=torch.bfloat16, docs=False, config=0, atomic=a) for a in (False, True)]
    cases += [dict(B=2, S=1024, dtype=torch.bfloat16, docs=True, config=0, atomic=a) for a in (False, True)]
    cases += [dict(B=1, S=640, dtype=torch.float32, docs=True, config=0, atomic=False)]
    if lean:
        cases = [dict(B=2, S=1000, dtype=torch.bfloat16, docs=True, config=i, atomic=a)
                 for a in (False, True) for i in (0, 1)]
    for i, c in enumerate(cases):
        for n in lists:
            cfgs = saved[n]
            setattr(attn, n, [cfgs[c["config"] % len(cfgs)]] + cfgs)
        attn.ATOMIC_DQ = c["atomic"]
        try:
            errs, finite, ok = check_one(c["B"], c["S"], c["dtype"], c["docs"], seed=1000 + i)
        except triton.runtime.errors.OutOfResources as e:  # the tuner prunes these configs
            print(f"check {c}: skipped, {e}", flush=True)
            continue
        rows.append(dict(case={k_: str(v_) for k_, v_ in c.items()}, errors=errs, finite=finite, ok=ok))
        print(f"check {c}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + f" -> {'OK' if ok else 'FAIL'}",
              flush=True)
    for n in lists:
        setattr(attn, n, saved[n])
    attn.AUTOTUNE, attn.ATOMIC_DQ = True, False
    return rows


def make_impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    masks = {}

    def ours(q, k, v):
        return attn.mla_attention(q, k, v, DQK**-0.5, causal=True)[0]

    def sdpa_default(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=DQK**-0.5)

    def flex_causal(q, k, v):
        S = q.shape[2]
        if S not in masks:
            masks[S] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")
        return flex(q, k, v, block_mask=masks[S], scale=DQK**-0.5)

    def flash_padded(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, DQK - DV)), is_causal=True, scale=DQK**-0.5)
        return o[..., :DV]

    return {"ours (triton, +max logit)": ours, "ours, atomic dq": ours, "sdpa default (cudnn)": sdpa_default,
            "flex (compiled)": flex_causal, "sdpa flash, V padded": flash_padded}


def time_impl(fn, B, S, backward):
    q = torch.randn(B, H, S, DQK, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k = torch.randn(B, H, S, DQK, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    v = torch.randn(B, H, S, DV, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    do = torch.randn(B, H, S, DV, device="cuda", dtype=torch.bfloat16)
    if backward:
        def step():
            fn(q, k, v).backward(do)
        return do_bench(step, warmup=50, rep=200, grad_to_none=[q, k, v], return_mode="median")
    with torch.no_grad():
        return do_bench(lambda: fn(q, k, v), warmup=50, rep=200, return_mode="median")


def kernel_breakdown(B, S):
    """Per-kernel CUDA time of one of our fwd+bwd steps (torch profiler)."""
    q, k = (torch.randn(B, H, S, DQK, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, S, DV, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, H, S, DV, device="cuda", dtype=torch.bfloat16)
    attn.mla_attention(q, k, v, DQK**-0.5)[0].backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            q.grad = k.grad = v.grad = None
            attn.mla_attention(q, k, v, DQK**-0.5)[0].backward(do)
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                times[e.key] = t / 5 / 1000  # ms per step
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def compiled_resources():
    """Registers, spills and shared memory of every compiled variant (best effort: internal API)."""
    rows = []
    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        try:
            for entry in getattr(attn, name).device_caches.values():
                for kern in entry[0].values():
                    kern._init_handles()
                    consts = {str(k_): v_ for k_, v_ in getattr(kern.src, "constants", {}).items()
                              if "BLOCK" in str(k_) or "EVEN" in str(k_) or "DOC" in str(k_)}
                    rows.append(dict(kernel=name, consts=str(consts), warps=kern.metadata.num_warps,
                                     stages=kern.metadata.num_stages, regs=kern.n_regs,
                                     spills=kern.n_spills, shared=kern.metadata.shared))
        except Exception as e:
            rows.append(dict(kernel=name, error=repr(e)[:200]))
    return rows


def best_configs():
    out = {}
    for name, tuner in attn._LAUNCHERS.items():
        cfg = getattr(tuner, "best_config", None)
        if cfg is not None:
            out[name] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def bench_documents(B=2, S=4096):
    """fwd+bwd with packed documents of equal length: the kernels visit only the blocks of each
    row's own document, so the time should fall with the document length, as FlexAttention's
    document block mask does (TorchTitan's way to mask documents)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    rows = []
    ok = check_one(B, 1024, torch.bfloat16, True, seed=0)[2]  # random documents against the fp32 reference
    for doc_len in (S, 2048, 512):
        doc_ids = (torch.arange(S, device="cuda") // doc_len).expand(B, S).contiguous()
        ids = doc_ids[0]
        mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (ids[qi] == ids[ki]), None, None, S, S,
                                 device="cuda")
        impls = {"ours, doc_ids": lambda q, k, v: attn.mla_attention(q, k, v, DQK**-0.5, causal=True, doc_ids=doc_ids)[0],
                 "flex, document mask": lambda q, k, v: flex(q, k, v, block_mask=mask, scale=DQK**-0.5)}
        # causal pairs inside documents, for the rate
        pairs = B * H * (S // doc_len) * doc_len * doc_len / 2
        for name, fn in impls.items():
            ms = time_impl(fn, B, S, True)
            rate = 2 * pairs * (DQK + DV) * 3.5 / ms / 1e9
            rows.append(dict(impl=name, doc_len=doc_len, ms=ms, tflops=rate, check_ok=ok))
            print(f"  {name:22s} B{B} S{S} documents of {doc_len:5d}: fwd+bwd {ms:8.3f} ms, {rate:6.0f} TFLOP/s "
                  f"of in-document work (correctness {'ok' if ok else 'FAILED'})", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="only B2 S4096, no FlexAttention")
    ap.add_argument("--lean", action="store_true",
                    help="--quick, untuned first configs, 4 correctness cases, fwd+bwd of ours and cuDNN")
    ap.add_argument("--docs", action="store_true", help="only the packed-documents rows")
    args = ap.parse_args()
    t0 = time.time()
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), cudnn=torch.backends.cudnn.version())
    print(env)
    if args.docs:
        os.makedirs(args.out, exist_ok=True)
        rows = bench_documents()
        with open(os.path.join(args.out, "bench_attention_docs.json"), "w") as f:
            json.dump(dict(env=env, documents=rows), f, indent=1)
        sys.exit(0 if all(r["check_ok"] for r in rows) else 1)
    args.quick = args.quick or args.lean
    result = dict(env=env, correctness=check_correctness(args.lean), timings=[], configs={}, breakdown={})
    attn.AUTOTUNE = not args.lean
    print(f"correctness done in {time.time() - t0:.0f}s", flush=True)
    impls = make_impls()
    shapes = SHAPES[:1] if args.quick else SHAPES
    for B, S in shapes:
        fwd_flop = 2 * B * H * S * S * (DQK + DV) / 2
        for name, fn in impls.items():
            if args.quick and name.startswith("flex") or args.lean and "padded" in name:
                continue
            attn.ATOMIC_DQ = "atomic" in name
            for backward in (False, True):
                if "atomic" in name and not backward or args.lean and not backward:
                    continue  # same forward as ours
                try:
                    ms = time_impl(fn, B, S, backward)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    print(f"{name} B{B} S{S} bwd={backward}: failed: {e!r}"[:300], flush=True)
                    ms = float("nan")
                flop = fwd_flop * (3.5 if backward else 1.0)
                result["timings"].append(dict(impl=name, B=B, S=S, mode="fwd+bwd" if backward else "fwd",
                                              ms=ms, tflops=flop / ms / 1e9))
                print(f"  {name:28s} B{B} S{S} {'fwd+bwd' if backward else 'fwd':8s} {ms:8.3f} ms "
                      f"({time.time() - t0:.0f}s)", flush=True)
        if args.lean:  # the second dkdv config with atomic dq, untuned
            saved = attn.DKDV_CONFIGS
            attn.DKDV_CONFIGS, attn.ATOMIC_DQ = saved[1:] + saved[:1], True
            ms = time_impl(impls["ours, atomic dq"], B, S, True)
            result["timings"].append(dict(impl=f"ours, atomic dq, dkdv {saved[1]}", B=B, S=S,
                                          mode="fwd+bwd", ms=ms, tflops=fwd_flop * 3.5 / ms / 1e9))
            attn.DKDV_CONFIGS = saved
        attn.ATOMIC_DQ = False
        result["configs"][f"B{B}_S{S}"] = best_configs()
    for atomic in (False, True):
        if args.lean:
            break
        attn.ATOMIC_DQ = atomic
        try:
            result["breakdown"][f"atomic_dq={atomic}"] = kernel_breakdown(*shapes[0])
        except Exception as e:
            print(f"profiler breakdown failed: {e!r}")
    attn.ATOMIC_DQ = False
    result["resources"] = compiled_resources()
    for r in result["resources"]:
        print("  ", r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"total {time.time() - t0:.0f}s")
    if not all(r["ok"] for r in result["correctness"]):
        sys.exit(1)


def print_table(result):
    for variant, times in result["breakdown"].items():
        print(f"\nkernel breakdown, ours fwd+bwd ({variant}), ms/step:")
        for k_, t in list(times.items())[:6]:
            print(f"  {t:7.3f}  {k_[:90]}")
    print("\nbest configs:", json.dumps(result["configs"]))
    print(f"\n{'impl':28s} {'shape':10s} {'mode':8s} {'ms':>8s} {'TFLOP/s':>8s} {'vs cuDNN':>9s}")
    ref = {(r["B"], r["S"], r["mode"]): r["ms"] for r in result["timings"] if r["impl"].startswith("sdpa default")}
    for r in result["timings"]:
        ratio = ref[(r["B"], r["S"], r["mode"])] / r["ms"]  # >1: faster than cuDNN
        print(f"{r['impl']:28s} B{r['B']} S{r['S']:<6d} {r['mode']:8s} {r['ms']:8.3f} {r['tflops']:8.0f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
