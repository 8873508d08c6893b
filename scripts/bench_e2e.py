"""End-to-end training speed on the K2-width proxy, beside TorchTitan's own trainer on the same GPU.

The proxy (5.4B parameters: K2's width, 4 layers = 1 dense + 3 MoE, 16 experts, seq 4096, micro-batch
1, bf16, the Triton kernels) trains through :class:`k2train.trainer.Trainer`, the step users run, for
each optimizer and micro-batch count asked, in the trainer's own loop (``Trainer.run``: the host
queues steps and reads each one's numbers one step late, never waiting for the GPU's step; a step's
time is the time between two reads), steady-state median of the steps after the first two
(``--sync-steps``: each step timed on its own between two device synchronizations, as before
2026-12-04).
Per case: step time, tokens/s per GPU, MFU (Megatron's FLOP count: causal attention at half; and
TorchTitan's, which has no causal discount, to compare with its log), peak allocated memory, and
the step's time beyond its micro-batches (the optimizer side).

    python scripts/bench_e2e.py                                   # AdamW and MuonClip x 1 and 8 micro-batches
    python scripts/bench_e2e.py --optim adamw --micro 1 --profile # + a profiler trace of two steps:
                                                                  #   host syncs per step, time per phase
    python scripts/bench_e2e.py --titan $OUT/titan                # + TorchTitan's figures from run_titan.sh's
                                                                  #   logs there (m=8 in titan/m8), and the ratios
    python scripts/bench_e2e.py --run-titan .titan                # run TorchTitan's kit first (eager and compiled,
                                                                  #   1 and 8 micro-batches), then k2train beside it
    python scripts/bench_e2e.py --run-titan .titan --titan-runs compile --optim adamw --micro 8 \
        --set trainer.param_dtype=bfloat16 trainer.compile=true   # the headline pair: both compiled, 8 micro-batches
    python scripts/bench_e2e.py --smoke                           # k2_tiny on the CPU: the code path

TorchTitan's kit (its README says how; `bash run_titan.sh` with `TITAN_EXTRA_ARGS="--training.global_batch_size 8"`
for 8 micro-batches) writes ``titan_eager.log`` / ``titan_compile.log``; ``--titan DIR`` reads
``DIR/titan_{eager,compile}.log`` (1 micro-batch) and ``DIR/m8/titan_{eager,compile}.log`` (8).
Rows go to ``$OUT/bench_e2e.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import bench_trainer  # same directory
from bench_trainer import FAST, PROXY, SEQ4K, SMOKE
from k2train.config import load_config
from k2train.flops import flops_per_token, peak_tflops
from k2train.trainer import Trainer

GiB = 2**30
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TITAN_STEP = re.compile(r"step:\s*(\d+)\s.*memory:\s*([-\d.]+)GiB.*tps:\s*([\d,]+)")


def gpu_idle(ops: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, str, str]]]:
    """The GPU's idle time between the first and the last of one step's ``ops`` (start, end, phase
    that launched it; any order, overlapping on several streams), and each gap as (length, phase
    of the op that ended before it, phase of the op after it), longest first."""
    ops = sorted(ops)
    gaps = []
    end, before = ops[0][1], ops[0][2]
    for start, stop, phase in ops[1:]:
        if start > end:
            gaps.append((start - end, before, phase))
        if stop > end:
            end, before = stop, phase
    return sum(g[0] for g in gaps), sorted(gaps, reverse=True)


def profile_steps(trainer: Trainer, steps: int, out: Path, name: str, top: int = 8, log_interval: int = 2) -> dict:
    """``steps`` more steps of the trainer's own loop (``Trainer.run``, its metrics read every
    ``log_interval`` steps) under torch.profiler: host syncs per step and where they are, per phase of
    the step (the trainer's ``record_function`` ranges) the GPU time of the kernels launched in it,
    with its longest kernels, and the GPU's idle time per step with its longest gaps by the phases
    around them (a host sync that the GPU waits on shows as a gap after it)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    t = trainer.cfg.trainer
    t.steps, t.log_interval = trainer.step + steps, log_interval
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("bench.run"):
            trainer.run()
        torch.cuda.synchronize()
    trace = Path(os.environ.get("K2_TRACE_DIR", out)) / f"trace_{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "user_annotation" and e["name"].startswith(("k2train.", "bench."))),
                    key=lambda r: (r[0], -r[1]))

    def phase_of(ts: float) -> str:
        inner = [r for r in ranges if r[0] <= ts <= r[1]]
        return min(inner, key=lambda r: r[1] - r[0])[2] if inner else "(outside the step)"

    launched = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    phases: dict[str, float] = {}
    kernels: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("args", {}).get("correlation") in launched:
            phase = phase_of(launched[e["args"]["correlation"]])
            phases[phase] = phases.get(phase, 0.0) + e["dur"] / 1e3 / steps
            key = (phase, e["name"][:70])
            kernels[key] = kernels.get(key, 0.0) + e["dur"] / 1e3 / steps
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in SYNC_EVENTS
             and phase_of(e["ts"]) != "(outside the step)"]
    where: dict[str, int] = {}
    for e in syncs:
        where[phase_of(e["ts"])] = where.get(phase_of(e["ts"]), 0) + 1
    longest = {p: sorted(((ms, k) for (ph, k), ms in kernels.items() if ph == p), reverse=True)[:top] for p in phases}
    idle_ms, gaps = 0.0, {}
    for start, stop, _ in (r for r in ranges if r[2] == "bench.run"):
        ops = [(e["ts"], e["ts"] + e["dur"], phase_of(launched[e["args"]["correlation"]])) for e in events
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
               and start <= launched.get(e.get("args", {}).get("correlation"), -1) <= stop]
        if ops:
            idle, step_gaps = gpu_idle(ops)
            idle_ms += idle / 1e3 / steps
            for length, before, after in step_gaps:
                gaps[(before, after)] = gaps.get((before, after), 0.0) + length / 1e3 / steps
    return {"syncs_per_step": len(syncs) / steps, "syncs_where": where, "phase_gpu_ms": phases,
            "phase_kernels": longest, "gpu_idle_ms": idle_ms,
            "gpu_gaps_ms": sorted(((ms, f"{b} -> {a}") for (b, a), ms in gaps.items()), reverse=True)[:top],
            "trace": str(trace)}


def run_case(optim: str, micro: int, steps: int, extra: list[str], smoke: bool, profile: bool, out: Path,
             top: int = 8, sync_steps: bool = False) -> dict:
    name = f"{optim} m={micro}" + (" bf16 w" if "trainer.param_dtype=bfloat16" in extra else "")  # bf16 weights
    overrides = [*PROXY, *FAST, *SEQ4K, f"optim={optim}", f"trainer.global_batch_size={micro}", "parallel.recompute=none"]
    if optim == "muonclip":  # the fastest Newton-Schulz (docs/muonclip.md): Gram iteration, fp16, Triton
        overrides += ["optim.ns_method=gram", "optim.ns_dtype=float16"]
    if smoke:
        overrides = [*(o for o in overrides if not o.startswith("model")), *SMOKE]
    overrides += extra
    after = (lambda tr: profile_steps(tr, 4, out, name, top)) if profile else None
    with tempfile.TemporaryDirectory() as tmp:
        row = bench_trainer.run_case(name, overrides, steps, Path(tmp), warmup=2, after=after, spare_steps=4,
                                     pipelined=not sync_steps)
    if "step_ms" not in row:
        return row
    model = load_config(overrides).model
    row.update(flops_megatron=flops_per_token(model, row["seq_len"], "megatron"),
               flops_titan=flops_per_token(model, row["seq_len"], "torchtitan"))
    peak = peak_tflops(torch.device("cuda")) if torch.cuda.is_available() else None
    if peak:
        row["mfu"] = row["tokens_per_s"] * row["flops_megatron"] / (peak * 1e12)
        row["mfu_titan_count"] = row["tokens_per_s"] * row["flops_titan"] / (peak * 1e12)
    return row


def titan_rows(folder: Path, skip: int = 5) -> dict[str, dict]:
    """TorchTitan's steady-state median tokens/s and max memory (reserved) per log: ``folder`` holds
    the 1-micro-batch runs, ``folder/m8`` the 8-micro-batch ones; keys ``eager``, ``compile_m8``..."""
    rows = {}
    for log in sorted([*folder.glob("titan_*.log"), *folder.glob("m8/titan_*.log")]):
        name = log.stem.removeprefix("titan_") + ("_m8" if log.parent.name == "m8" else "")
        if name.startswith("preflight"):
            continue
        text = log.read_text(errors="replace")
        steps = [(int(m[1]), float(m[2]), float(m[3].replace(",", ""))) for m in TITAN_STEP.finditer(text)]
        steady = [s for s in steps if s[0] > skip]
        if steady:
            rows[name] = {"tokens_per_s": statistics.median(s[2] for s in steady), "memory_gib": max(s[1] for s in steps),
                          "steps": len(steady)}
    return rows


def run_titan(kit: Path, out: Path, micro: list[int], runs: list[str], steps: tuple[int, int] = (15, 11)) -> Path:
    """TorchTitan's own trainer on the proxy through its kit (``run_titan.sh``: ``runs`` of eager
    and compiled), with 1 micro-batch per step into ``out/titan`` and 8 into ``out/titan/m8``, for
    the counts in ``micro``."""
    folder = out / "titan"
    for m, sub, extra, n in ((1, "", "", steps[0]), (8, "m8", "--training.global_batch_size 8", steps[1])):
        if m not in micro:
            continue
        (folder / sub).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OUT": str((folder / sub).resolve()), "STEPS": str(n), "TITAN_EXTRA_ARGS": extra,
               "RUNS": " ".join(runs)}
        done = subprocess.run(["bash", str(kit.resolve() / "run_titan.sh")], env=env, capture_output=True, text=True)
        print(f"TorchTitan kit ({sub or 'm1'}): exit {done.returncode}; logs in {folder / sub}", flush=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optim", nargs="+", default=["adamw", "muonclip"])
    ap.add_argument("--micro", nargs="+", type=int, default=[1, 8], help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="overrides appended to every case")
    ap.add_argument("--profile", action="store_true",
                    help="profile four more steps per case in the trainer's loop, metrics read every 2 steps (syncs, "
                         "phases, GPU idle; Chrome trace into $K2_TRACE_DIR, default $OUT)")
    ap.add_argument("--top", type=int, default=8, help="with --profile: the longest kernels listed per phase")
    ap.add_argument("--titan", type=Path, help="folder with run_titan.sh's logs (titan_eager.log, m8/titan_eager.log, ...)")
    ap.add_argument("--run-titan", type=Path, metavar="KIT",
                    help="run TorchTitan's kit (set up: wheels, corpus, tokenizer) first, into $OUT/titan")
    ap.add_argument("--titan-runs", nargs="+", choices=["eager", "compile"], default=["eager", "compile"],
                    help="with --run-titan: which of TorchTitan's runs (for the micro-batch counts of --micro, 1 and 8)")
    ap.add_argument("--smoke", action="store_true", help="k2_tiny on the CPU (the code path, not the numbers)")
    ap.add_argument("--sync-steps", action="store_true",
                    help="time each step on its own between two device synchronizations (not the trainer's loop)")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", tempfile.gettempdir()))
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.run_titan:
        args.titan = run_titan(args.run_titan, out, args.micro, args.titan_runs)
    titan = titan_rows(args.titan) if args.titan else {}
    for name, r in titan.items():
        print(f"TorchTitan {name:14s} {r['tokens_per_s']:9,.0f} tokens/s  {r['memory_gib']:6.1f} GiB reserved  "
              f"({r['steps']} steps)")
    print(f"{'case':18s} {'step ms':>8s} {'tokens/s':>9s} {'MFU':>6s} {'peak GiB':>8s} {'beyond mb ms':>12s}  vs TorchTitan")
    rows = []
    with open(out / "bench_e2e.jsonl", "a") as log:
        for optim in args.optim:
            for micro in args.micro:
                row = run_case(optim, micro, args.steps, args.set, args.smoke, args.profile, out, args.top,
                               args.sync_steps)
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                if "error" in row:
                    print(f"{row['case']:18s} {row['error']}")
                    continue
                # step(m) = beyond + m x per-micro-batch: from this optimizer's m=1 row and this one
                ones = next((r for r in rows if r["case"] == row["case"].replace(f"m={micro}", "m=1") and "step_ms" in r), None)
                beyond = ""
                if ones is not None and micro > 1:
                    per_mb = (row["step_ms"] - ones["step_ms"]) / (micro - 1)
                    beyond = f"{ones['step_ms'] - per_mb:12.1f}"
                ratios = []
                for kind in ("eager", "compile"):
                    ref = titan.get(kind if micro == 1 else f"{kind}_m{micro}")
                    if ref and optim == "adamw":
                        ratios.append(f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x {kind}")
                mfu = f"{row['mfu']:6.1%}" if "mfu" in row else f"{'':6s}"
                peak = f"{row['peak_gib']:8.2f}" if "peak_gib" in row else f"{'':8s}"
                print(f"{row['case']:18s} {row['step_ms']:8.1f} {row['tokens_per_s']:9,.0f} {mfu} {peak} {beyond:>12s}  "
                      f"{', '.join(ratios)}", flush=True)
                if "syncs_per_step" in row:
                    print(f"      host syncs per step: {row['syncs_per_step']:.1f} {row['syncs_where']}")
                    print(f"      GPU idle inside the step: {row['gpu_idle_ms']:.1f} ms; longest gaps (phase before -> after):")
                    for ms, where in row["gpu_gaps_ms"]:
                        print(f"          {ms:8.2f} ms  {where}")
                    for phase, ms in row["phase_gpu_ms"].items():
                        print(f"      {phase:40s} {ms:8.1f} ms GPU")
                        for kms, kernel in row["phase_kernels"][phase]:
                            print(f"          {kms:8.2f} ms  {kernel}")
    print(f"rows: {out / 'bench_e2e.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
