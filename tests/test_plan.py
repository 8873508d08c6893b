"""The planner's counts equal what the public K2 config's tensors add up to."""

import subprocess
import sys

from k2train.config import load_config
from k2train.flops import count_params, flops_per_token


def _public_k2_tensor_sizes() -> tuple[int, int]:
    """Sum of the HF tensor shapes of the public Kimi K2 checkpoint (params, plus the fp32 router-bias buffers)."""
    D, V, L, E, I_dense, I_exp = 7168, 163840, 61, 384, 18432, 2048
    attn = 1536 * D + 1536 + 12288 * 1536 + 576 * D + 512 + 16384 * 512 + D * 8192
    norms = 2 * D
    dense_mlp = 3 * I_dense * D
    moe = E * D + E * 3 * I_exp * D + 3 * I_exp * D
    params = V * D + D + V * D + L * (attn + norms) + dense_mlp + (L - 1) * moe
    return params, (L - 1) * E


def test_k2_1t_counts_match_public_config():
    cfg = load_config(["model=k2_1t"]).model
    c = count_params(cfg)
    params, bias = _public_k2_tensor_sizes()
    assert c.total == params == 1_026_408_209_408
    assert c.embedding == c.head == 163840 * 7168
    # activated: everything but 376 of 384 routed experts per MoE layer
    assert c.active == params - 60 * 376 * 3 * 2048 * 7168
    assert bias == 23_040


def test_k2_flops_per_token_matches_baselines():
    cfg = load_config(["model=k2_1t"]).model
    meg = flops_per_token(cfg, 4096, "megatron")
    tt = flops_per_token(cfg, 4096, "torchtitan")
    assert abs(meg / 1e9 - 204.5) < 0.05  # docs/performance.md#anchors
    assert 1.07 < tt / meg < 1.09  # "about 8% more"


def test_plan_cli_prints_counts():
    out = subprocess.run(
        [sys.executable, "-m", "k2train.plan", "model=k2_1t"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "1,026,408,209,408" in out.stdout
    assert "Megatron convention" in out.stdout and "TorchTitan convention" in out.stdout
    # one row per run of identical layers: K2's dense layer 0, then its 60 MoE layers
    rows = [line.split()[:2] for line in out.stdout.splitlines() if line.split()[1:2] in (["moe"], ["dense"])]
    assert rows == [["0", "dense"], ["1-60", "moe"]], rows


def test_compute_report_is_flops_over_the_layouts_gpus():
    # K2's recipe: 16,384 x 4096 tokens per step on pp16 x ep16 (256 GPUs at dp=1); at 40% of a
    # Hopper GPU's 989 TFLOP/s a step is tokens x FLOPs / (GPUs x peak x MFU)
    from k2train.plan import format_compute_report

    cfg = load_config(["experiment=k2_pretrain"]).validate()
    report = format_compute_report(cfg)
    per_token = flops_per_token(cfg.model, 4096, "megatron")
    step_s = 16_384 * 4096 * per_token / (256 * 989e12 * 0.4)
    row = next(line for line in report.splitlines() if line.strip().startswith("40%"))
    assert f"{step_s:,.1f} s" in row, (row, step_s)
    gpu_hours = step_s * cfg.trainer.steps * 256 / 3600
    assert f"{gpu_hours:,.0f}" in row
    assert f"{1e12 * per_token / (989e12 * 0.4) / 3600:,.0f}" in row  # per trillion tokens
    assert "256 GPUs" in report and "divide the wall time" in report
    assert "evaluation" not in report
    # every 1000 steps and after the last: ceil(steps / 1000) evaluations of 10 forward-only batches
    # (a third of a step's FLOPs each)
    steps = cfg.trainer.steps
    evaluated = format_compute_report(load_config(["experiment=k2_pretrain", "trainer.eval_interval=1000",
                                                   "trainer.eval_steps=10"]).validate())
    assert f"{-(-steps // 1000):,d} x 10 global batches" in evaluated
    assert f"{-(-steps // 1000) * 10 / 3 / steps:.2%} more" in evaluated


def test_plan_cli_traces_a_step_beside_the_planner():
    """``--trace``: a step of the config on fake tensors, its traced memory beside the planner's,
    per phase; ``--top`` what is alive at the peaks. A layout of several processes is refused
    with what to do instead."""
    args = [sys.executable, "-m", "k2train.plan", "model=k2_1t", "model.num_hidden_layers=2", "model.n_routed_experts=8",
            "trainer.dtype=bfloat16", "model.attn_impl=triton", "model.moe_impl=triton", "trainer.seq_len=1024",
            "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "--trace", "--top", "3"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    traced = out.stdout.split("traced on fake tensors")[1]
    row = next(line for line in traced.splitlines() if line.startswith("k2_1t, 1024 tokens x 1"))
    fwd_traced, fwd_planned, error = row.split()[5:8]
    assert float(fwd_traced) > 40 and abs(float(error.rstrip("%"))) < 3, row  # ~54 GiB: K2's vocabulary and width
    assert traced.count("at the peak of k2train.") == 2 and "GiB  weights" in traced
    bad = subprocess.run([sys.executable, "-m", "k2train.plan", "experiment=k2_pretrain", "--trace"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "tracing a step runs one process" in bad.stderr + bad.stdout
    fp32 = subprocess.run([sys.executable, "-m", "k2train.plan", "model=k2_tiny", "--trace"], capture_output=True,
                          text=True, timeout=300)
    assert fp32.returncode != 0 and "set trainer.dtype=bfloat16" in fp32.stderr + fp32.stdout
