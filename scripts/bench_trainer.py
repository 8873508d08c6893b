"""Training steps through the trainer users run (k2train.trainer.Trainer), one configuration after
another in one process on one GPU: step time, tokens/s, peak memory (``max_memory_allocated``)
and the planner's peak for the same configuration side by side.

    python scripts/bench_trainer.py memory          # the K2-width proxy in every activation-memory mode
    python scripts/bench_trainer.py long_context    # the longest sequence k2_small / the proxy train at
    python scripts/bench_trainer.py deterministic   # trainer.deterministic=true against false
    python scripts/bench_trainer.py memory --only fp8 --smoke   # CPU, k2_tiny: every case runs

Each case builds a Trainer from the overrides, runs ``--steps`` optimizer steps on random tokens
and reports the median time of the steps after the first. ``static``: memory held after the last
step (weights, gradients, optimizer states), against the planner's weights + grads + masters +
states; ``peak - static`` against its activations + buffers. Rows go to stdout and, one JSON object
per line, to ``$OUT/bench_trainer_<suite>.jsonl`` as they finish (a timeout keeps what was
measured). The planner is asked for ``precision="autocast"``: what the trainer runs with
trainer.dtype=bfloat16 (fp32 weights, bf16 compute).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from k2train.config import load_config
from k2train.memtrace import random_tokens
from k2train.parallel.memory import estimate_memory, trainer_precision
from k2train.profiling import OUR_DIRS
from k2train.trainer import Trainer

GiB = 2**30
# 5.4B parameters at K2's width: 4 layers (1 dense + 3 MoE), 16 experts, 64 heads, vocabulary 163,840
PROXY = ["model=k2_1t", "model.num_hidden_layers=4", "model.n_routed_experts=16"]
FAST = ["model.attn_impl=triton", "model.moe_impl=triton", "optim.ns_impl=triton", "trainer.dtype=bfloat16"]
SEQ4K = ["trainer.seq_len=4096", "trainer.micro_batch_size=1"]


def _memory_cases() -> list[tuple[str, list[str]]]:
    modes = {
        "none": ["parallel.recompute=none"],
        "selective": ["parallel.recompute=selective"],
        "full": ["parallel.recompute=full"],
        "fp8": ["parallel.recompute=none", "parallel.fp8_moe_inputs=true"],
        "fp8+selective": ["parallel.recompute=selective", "parallel.fp8_moe_inputs=true"],
        "offload": ["parallel.recompute=none", "parallel.offload_activations=true"],
        "offload+selective": ["parallel.recompute=selective", "parallel.offload_activations=true"],
        "offload(1)": ["parallel.recompute=none", "parallel.offload_activations=true", "parallel.offload_layers=1"],
        "fp8+offload": ["parallel.recompute=none", "parallel.fp8_moe_inputs=true", "parallel.offload_activations=true"],
        "fp8+offload+selective": ["parallel.recompute=selective", "parallel.fp8_moe_inputs=true",  # K2's recipe
                                  "parallel.offload_activations=true"],
    }
    cases = []
    for optim in ("muonclip", "adamw"):
        for micro in (8, 1):
            for mode, extra in modes.items():
                cases.append((f"{optim} m={micro} {mode}", [*PROXY, *FAST, *SEQ4K, f"optim={optim}",
                                                           f"trainer.global_batch_size={micro}", *extra]))
    return cases


def _long_context_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name, model, lengths in (("k2_small", ["model=k2_small"], (32768, 65536, 131072, 262144)),
                                 ("proxy", PROXY, (32768, 65536, 131072))):
        for seq in lengths:
            common = [*model, *FAST, f"trainer.seq_len={seq}", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
                      f"model.max_position_embeddings={max(seq, 131072)}", "trainer.loss_chunk_tokens=4096"]
            cases.append((f"{name} S={seq // 1024}K full", [*common, "parallel.recompute=full"]))
        seq = 32768
        common = [*model, *FAST, f"trainer.seq_len={seq}", "trainer.micro_batch_size=1", "trainer.global_batch_size=1",
                  "trainer.loss_chunk_tokens=4096"]
        cases.append((f"{name} S=32K fp8+offload", [*common, "parallel.recompute=none", "parallel.fp8_moe_inputs=true",
                                                   "parallel.offload_activations=true"]))
    return cases


def _deterministic_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for name, model, micro in (("k2_small", ["model=k2_small"], 4), ("proxy", PROXY, 8)):
        for det in ("false", "true"):
            cases.append((f"{name} m={micro} deterministic={det}",
                          [*model, *FAST, *SEQ4K, f"trainer.global_batch_size={micro}", f"trainer.deterministic={det}"]))
    return cases


SUITES = {"memory": _memory_cases, "long_context": _long_context_cases, "deterministic": _deterministic_cases}
# every case shrunk to something a CPU runs in seconds (the code path, not the numbers)
SMOKE = ["model=k2_tiny", "model.num_hidden_layers=2", "trainer.seq_len=64", "trainer.dtype=float32",
         "model.attn_impl=eager", "model.moe_impl=loop", "optim.ns_impl=torch", "trainer.loss_chunk_tokens=0"]


def peak_composition(trace: list[dict], top: int = 12, copies: Optional[dict[int, str]] = None) -> list[tuple[float, str]]:
    """From a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): what
    was allocated during the trace and alive at its highest point, in GiB by allocating source line
    (the innermost frame in k2train, kernels or optim, else the innermost one). ``copies``: block
    sizes of the weights' bf16 copies (autocast's casts) -> a label; such blocks are grouped under
    it instead of their line."""
    cur = best = best_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            cur += e["size"]
            if cur > best:
                best, best_at = cur, i
        elif e["action"] == "free_requested":
            cur -= e["size"]
    live: dict[int, dict] = {}
    for e in trace[: best_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    groups: dict[str, float] = {}
    for e in live.values():
        if copies and e["size"] in copies:
            groups[copies[e["size"]]] = groups.get(copies[e["size"]], 0.0) + e["size"] / GiB
            continue
        frames = e.get("frames") or [{"filename": "?", "line": 0, "name": "?"}]
        ours = [f for f in frames if any(d in f["filename"] for d in OUR_DIRS)]
        f = (ours or frames)[0]
        key = f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
        groups[key] = groups.get(key, 0.0) + e["size"] / GiB
    return sorted(((v, k) for k, v in groups.items()), reverse=True)[:top]


def run_case(name: str, overrides: list[str], steps: int, work: Path, peak: bool = False, warmup: int = 1,
             after: Optional[Callable[[Trainer], dict]] = None, spare_steps: int = 0, pipelined: bool = False) -> dict:
    """``steps`` timed train steps of one configuration (median of those after ``warmup``), its peak
    against the planner; ``after(trainer)`` adds to the row on the GPU once they are done (and may
    run up to ``spare_steps`` more steps).

    Each step is timed on its own, from a synchronized device to a synchronized device
    (``Trainer.train_step``), unless ``pipelined``: then the steps are the trainer's own loop
    (``Trainer.run``, metrics read every step, one step late, the host never waiting for the GPU's
    step), and a step's time is the time between two reads."""
    cfg = load_config([*overrides, "trainer.checkpoint.enable=false", "logging.wandb=false", "logging.console=false",
                       "logging.progress_bar=false", "logging.jsonl=false", "trainer.log_interval=1",
                       f"trainer.steps={steps if pipelined else steps + spare_steps}", f"trainer.output_dir={work}"])
    t = cfg.trainer
    plan = estimate_memory(cfg.model, cfg.parallel, t, cfg.optim, trainer_precision(t))
    rank = plan.peak
    row = {"case": name, "overrides": overrides, "seq_len": t.seq_len, "tokens_per_step": t.global_batch_size * t.seq_len,
           "plan_gib": rank.total / GiB, "plan_static_gib": (rank.params + rank.grads + rank.master + rank.optimizer) / GiB,
           "plan_host_gib": rank.host / GiB}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        with Trainer(cfg, run_dir=work / "run", data=random_tokens(cfg.model.vocab_size, t.micro_batch_size, t.seq_len)) as tr:
            if pipelined:
                history = tr.run()
                times = [m["step_time_s"] for m in history]
                row["loss"] = history[-1]["loss"]
            for i in range(0 if pipelined else steps):
                batches = tr.next_batches()
                if cuda:
                    torch.cuda.synchronize()
                    if peak and i == steps - 1:  # the last step's allocations, with Python stacks
                        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
                t0 = time.perf_counter()
                # recomputes run to their end while stacks are recorded (k2train/profiling.py says why)
                with set_checkpoint_early_stop(False) if peak and i == steps - 1 else nullcontext():
                    row["loss"] = tr.train_step(batches).loss
                if cuda:  # the read waited for the step's stream; offload's side streams too
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            offload = next((b.offload for p in tr.parts for b in p.layers.values() if hasattr(b, "offload")), None)
            if offload is not None:
                row["offloaded_gib_per_step"] = offload.bytes_offloaded / GiB / steps
            if cuda:
                torch.cuda.synchronize()
                if peak:
                    traces = torch.cuda.memory._snapshot()["device_traces"]
                    torch.cuda.memory._record_memory_history(enabled=None)
                    copies = {}
                    for part in tr.parts:
                        for n, prm in part.named_parameters():
                            if prm.dtype == torch.float32:  # autocast casts it: 2 bytes an element
                                kind = "experts" if ".experts." in n else "block" if n.startswith("layers.") else n.split(".")[0]
                                copies[-(-2 * prm.numel() // 512) * 512] = f"bf16 copy of weights ({kind})"
                    row["peak_composition"] = peak_composition(traces[torch.cuda.current_device()], top=16, copies=copies)
                row["static_gib"] = torch.cuda.memory_allocated() / GiB
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
                if after is not None:
                    row.update(after(tr))
    except torch.OutOfMemoryError as e:
        # the allocator's own account (allocated / reserved but unallocated) is the line's second half
        row["error"] = f"out of memory in step {len(times) + 1}: " + " ".join(str(e).split("\n")[0].split()[3:])[:400]
        if peak and len(times) == steps - 1:  # the step that failed was recorded: what was alive when it did
            traces = torch.cuda.memory._snapshot()["device_traces"]
            torch.cuda.memory._record_memory_history(enabled=None)
            row["peak_composition"] = peak_composition(traces[torch.cuda.current_device()], top=16)
    finally:
        # the trainer (weights, gradients, optimizer state) and its last batches go before the cache
        # is emptied: the next case starts on an allocator that holds nothing of this one
        tr = batches = None  # noqa: F841
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if len(times) == steps:
        ms = 1e3 * statistics.median(times[warmup:] or times)
        row.update(step_ms=ms, tokens_per_s=row["tokens_per_step"] / ms * 1e3)
    return row


def show(row: dict, base: dict | None) -> str:
    if "error" in row:
        return f"{row['case']:34s} {row['error']}"
    ratio = f"{row['step_ms'] / base['step_ms']:6.2f}x" if base and "step_ms" in base else f"{'':7s}"
    mem = ""
    if "peak_gib" in row:
        err = row["plan_gib"] / row["peak_gib"] - 1
        act = row["peak_gib"] - row["static_gib"]
        plan_act = row["plan_gib"] - row["plan_static_gib"]
        mem = (f" {row['peak_gib']:7.2f} {row['plan_gib']:7.2f} {err:+6.1%}  "
               f"{row['static_gib']:6.2f}/{row['plan_static_gib']:6.2f}  {act:6.2f}/{plan_act:6.2f}")
    moved = f"  offloaded {row['offloaded_gib_per_step']:.1f} GiB/step" if "offloaded_gib_per_step" in row else ""
    return f"{row['case']:34s} {row['step_ms']:9.1f} {ratio} {row['tokens_per_s']:9,.0f}{mem}{moved}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--only", default="", help="run the cases whose name contains one of these texts, '|'-separated "
                    "(a text ending in '$': the case of exactly that name)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help="overrides appended to every case")
    ap.add_argument("--peak", action="store_true",
                    help="record the last step's allocations and print what is alive at its peak, by source line "
                    "(a step that runs out of memory: what was alive when it did; --steps 1 for the first)")
    ap.add_argument("--smoke", action="store_true", help="k2_tiny on the CPU (checks that every case runs)")
    args = ap.parse_args()
    parts = args.only.split("|")
    cases = [(n, o) for n, o in SUITES[args.suite]()
             if any(n == part[:-1] if part.endswith("$") else part in n for part in parts)]
    cases = [(n, [*o, *args.set]) for n, o in cases]
    if args.smoke:
        cases = [(n, [*(x for x in o if not x.startswith("model")), *SMOKE]) for n, o in cases]
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / f"bench_trainer_{args.suite}.jsonl"
    if torch.cuda.is_available():
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':34s} {'step ms':>9s} {'x base':>7s} {'tokens/s':>9s} {'peak':>7s} {'planner':>7s} {'error':>6s}  "
          f"{'static/planned':>13s}  {'act+buf/planned':>13s}  (GiB)")
    bases: dict[str, dict] = {}  # step-time ratios against the first case of each group
    failed: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp, open(out, "a") as log:
        for name, overrides in cases:
            group, model = name.rsplit(" ", 1)[0], name.split(" ")[0]
            if args.suite == "long_context" and name.endswith(" full") and model in failed:
                continue  # a shorter sequence of this model did not fit
            row = run_case(name, overrides, args.steps, Path(tmp), peak=args.peak)
            if "step_ms" in row:
                bases.setdefault(group, row)
            elif name.endswith(" full"):
                failed.add(model)
            print(show(row, bases.get(group)), flush=True)
            for gib, where in row.get("peak_composition", []):
                print(f"      {gib:7.2f} GiB  {where}")
            log.write(json.dumps(row) + "\n")
            log.flush()
    print(f"rows: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
