"""The optimizer scripts run on CPU and print what the docs quote (GPU numbers come from the same
scripts on the H200, docs/muonclip.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_muon_cpu_smoke_prints_the_table():
    out = _run("scripts/bench_muon.py", "--cpu-smoke", "--warmup", "0", "--repeat", "1")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "torch.optim.Muon (per matrix)" in rows and "MuonClip, Gram NS, torch, float32" in rows
    # unfused standard NS is bitwise torch.optim.Muon: zero difference in its row
    assert rows["MuonClip, standard NS, torch, bf16"].split("|")[5].strip() == "0.00e+00"


def test_ns_accuracy_gram_fp16_beats_torch_on_every_spectrum():
    out = _run("scripts/ns_accuracy.py", "--sizes", "48x160", "--count", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 48x160")]
    assert len(rows) == 5
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        torch_err, gram_fp16 = float(cells[2]), float(cells[4])
        assert gram_fp16 < torch_err, line


def test_symmetric_product_rule():
    import functools

    from k2train.kernels.newton_schulz import _sym_product, gemmt_persistent

    assert _sym_product("auto", 2048, 7168) is gemmt_persistent  # the Gram of an expert matrix
    assert _sym_product("auto", 2048, 2048) is gemmt_persistent  # Gram NS's M x M products
    assert _sym_product("auto", 7168, 8192) is gemmt_persistent  # o_proj
    small = _sym_product("auto", 576, 7168)  # launch-bound: one cuBLAS product
    assert isinstance(small, functools.partial) and small.keywords == {"blocks": 1}


def test_bench_e2e_cpu_smoke(tmp_path):
    # the trainer's step through the benchmark's loop: one row per case, the optimizer-side column
    import os

    env = {**os.environ, "OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, "scripts/bench_e2e.py", "--smoke", "--optim", "adamw", "--micro", "1", "2",
                          "--steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("adamw m=")]
    assert [r[1] for r in rows] == ["m=1", "m=2"] and all(float(r[2]) > 0 for r in rows)
    assert (tmp_path / "bench_e2e.jsonl").read_text().count("\n") == 2


def test_fp8_loss_curve_compares_paired_steps_where_both_runs_got_to():
    # a run cut short (preemption, timeout) is compared over the steps both reached, step by step
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp8_loss_curve", ROOT / "scripts/fp8_loss_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import math
    import statistics

    ref = [10.0 - 0.01 * i for i in range(300)]
    # a difference that drifts over tens of steps (neighbouring steps correlated), as a perturbed run's does
    drift = [0.001 + 0.002 * math.sin(i / 9) for i in range(235)]
    fp8 = [x * (1 + d) for x, d in zip(ref, drift)]
    cmp = mod.compare(ref, fp8)
    assert cmp["steps"] == 235 and cmp["skip"] == mod.SKIP and cmp["tail_steps"] == mod.TAIL
    rel = [b / a - 1 for a, b in zip(ref[mod.SKIP:235], fp8[mod.SKIP:])]
    assert cmp["mean"] == pytest.approx(statistics.fmean(rel), abs=1e-12)
    # the standard error of 20-step block means, well above what independent steps would give
    assert 3 * statistics.stdev(rel) / len(rel) ** 0.5 < cmp["sem"] < 1e-3
    tail = sum(fp8[-20:]) / sum(ref[215:235]) - 1  # the last 20 paired steps, not the reference's own last 20
    assert cmp["tail"] == pytest.approx(tail, abs=1e-12)


def test_gpu_idle_counts_gaps_between_overlapping_streams():
    # two streams: the second op overlaps the first, so the only gaps are 12 -> 15 and 20 -> 30
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "scripts/bench_e2e.py")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    ops = [(30.0, 31.0, "optimizer"), (0.0, 10.0, "fb"), (5.0, 12.0, "fb2"), (15.0, 20.0, "reduce")]
    idle, gaps = bench.gpu_idle(ops)
    assert idle == 13.0
    assert gaps == [(10.0, "reduce", "optimizer"), (3.0, "fb2", "reduce")]


def test_fp8_storage_moves_the_gradient_far_less_than_another_batch():
    # scripts/fp8_grad_noise.py on the CPU (a small K2 with whole 128-wide tiles, bf16 autocast): per
    # kind of parameter, FP8 storage's gradient within 10% of bf16 storage's, cosine > 0.99, and at
    # least 10x closer than the next batch's (measured 2.6-6% against ~140%)
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch paths: seconds, not minutes
    res = subprocess.run([sys.executable, "scripts/fp8_grad_noise.py", "--smoke", "--batches", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    rows = {}
    for line in out.splitlines()[1:]:
        *name, label1, label2, dist, cos, _ = line.split()
        rows[(" ".join(name), f"{label1} {label2}")] = (float(dist), float(cos))
    kinds = {k for k, _ in rows}
    assert {"attention", "routed gate/up", "routed down"} <= kinds, out
    for k in kinds:
        fp8, batch = rows[(k, "FP8 storage")], rows[(k, "next batch")]
        assert fp8[0] < 0.1 and fp8[1] > 0.99 and fp8[0] < batch[0] / 10, (k, fp8, batch)
