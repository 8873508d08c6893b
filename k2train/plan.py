"""Dry run: what a config costs, before any work starts.

    python -m k2train.plan model=k2_1t
    python -m k2train.plan model=k2_1t parallel=k2_h800 trainer.seq_len=4096
    python -m k2train.plan model=k2_small trainer.dtype=bfloat16 model.attn_impl=triton --trace [--top 20]

Prints exact parameter counts (total, activated per token, embedding and head, per layer) from the
model built on the meta device, FLOPs per token in the Megatron and TorchTitan conventions, the
per-rank memory breakdown of the planner for the parallel layout, and what ``trainer.steps`` cost
in time and GPU-hours at a few model FLOP utilisations.

``--trace`` (one-process layouts) then runs a training step of the config on fake tensors and
prints its traced memory beside the planner's, per phase (k2train/memtrace.py: seconds, no GPU,
any model size); ``--top N`` lists what is alive at each peak, by source line.
"""

import os
import sys

if __name__ == "__main__" and "--trace" in sys.argv:
    # before the kernels are imported: their custom-op path, the one a GPU runs, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .cli import user_errors
from .config import JobConfig, load_config
from .flops import PEAK_BF16_TFLOPS, count_params, flops_per_token
from .parallel.memory import estimate_memory, format_memory_report

# model FLOP utilisations the compute table is printed at; measured on one H200 at K2's width:
# 43-49% (docs/performance.md); a cluster adds communication and the pipeline bubble
MFUS = (0.3, 0.4, 0.5)


def _b(n: float) -> str:
    return f"{n / 1e9:,.3f}B"


def format_param_report(cfg: JobConfig) -> str:
    m = cfg.model
    counts = count_params(m)
    seq = cfg.trainer.seq_len
    lines = [
        f"model {m.name}: {m.num_hidden_layers} layers ({m.first_k_dense_replace} dense, {m.num_moe_layers} MoE), "
        f"hidden {m.hidden_size}, {m.num_attention_heads} heads, {m.n_routed_experts} experts "
        f"(top-{m.num_experts_per_tok} + {m.n_shared_experts} shared), vocab {m.vocab_size}",
        "",
        f"  total parameters        {counts.total:>20,d}  ({_b(counts.total)})",
        f"  activated per token     {counts.active:>20,d}  ({_b(counts.active)})",
        f"  activated, no embedding {counts.active - counts.embedding:>20,d}  ({_b(counts.active - counts.embedding)})",
        f"  embedding               {counts.embedding:>20,d}  ({_b(counts.embedding)})",
        f"  LM head                 {counts.head:>20,d}  ({_b(counts.head)})",
        f"  final norm              {counts.final_norm:>20,d}",
        f"  + router bias buffers   {m.num_moe_layers * m.n_routed_experts:>20,d}  (fp32 e_score_correction_bias, not trained)",
        "",
        f"  {'layer':>5} {'kind':>5} {'attention':>14} {'norms':>8} {'dense/shared':>14} {'router':>11} "
        f"{'routed experts':>16} {'total':>16} {'activated':>14}   (parameters of each layer)",
    ]
    runs: list[list] = []  # consecutive layers of the same counts share one row ("1-60")
    for layer in counts.layers:
        row = (layer.kind, layer.attention, layer.norms, layer.ffn, layer.router, layer.routed_experts, layer.total,
               layer.active)
        if runs and runs[-1][2] == row:
            runs[-1][1] = layer.index
        else:
            runs.append([layer.index, layer.index, row])
    for first, last, (kind, attention, norms, ffn, router, routed, total, active) in runs:
        index = f"{first}" if first == last else f"{first}-{last}"
        lines.append(
            f"  {index:>5} {kind:>5} {attention:>14,d} {norms:>8,d} {ffn:>14,d} "
            f"{router:>11,d} {routed:>16,d} {total:>16,d} {active:>14,d}"
        )
    meg = flops_per_token(m, seq, "megatron", counts)
    tt = flops_per_token(m, seq, "torchtitan", counts)
    lines += [
        "",
        f"  FLOPs per token at seq_len {seq} (forward + backward):",
        f"    Megatron convention (causal attention at half):  {meg / 1e9:,.2f} GFLOP",
        f"    TorchTitan convention (no causal discount):      {tt / 1e9:,.2f} GFLOP  ({tt / meg:.3f}x)",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.2f} ms"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_compute_report(cfg: JobConfig) -> str:
    """What ``trainer.steps`` cost: FLOPs per step (Megatron's count) over the layout's GPUs at a
    Hopper GPU's dense bf16 peak, at each MFU of :data:`MFUS`: step time, tokens/s per GPU, the
    run's wall time and GPU-hours, and GPU-hours per trillion tokens."""
    t = cfg.trainer
    plan = estimate_memory(cfg.model, cfg.parallel, t, cfg.optim)
    per_token = flops_per_token(cfg.model, t.seq_len, "megatron")
    per_step = plan.tokens_per_step * per_token
    peak = PEAK_BF16_TFLOPS["H800"] * 1e12
    lines = [
        f"compute: {plan.tokens_per_step:,d} tokens per step x {per_token / 1e9:,.2f} GFLOP per token = "
        f"{per_step:.3e} FLOP per step; {plan.world_size:,d} GPU{'s' * (plan.world_size > 1)} at {peak / 1e12:,.0f} "
        f"TFLOP/s bf16 peak each (H100/H200/H800; scale by your GPU's peak, e.g. A100 {PEAK_BF16_TFLOPS['A100']:.0f})",
        f"  {'MFU':>5} {'step':>10} {'tokens/s/GPU':>13} {f'{t.steps:,d} steps':>16} {'GPU-hours':>12} "
        f"{'GPU-hours per 1T tokens':>24}",
    ]
    for mfu in MFUS:
        step_s = per_step / (plan.world_size * peak * mfu)
        run_s = step_s * t.steps
        per_trillion = 1e12 * per_token / (peak * mfu) / 3600
        gpu_hours = run_s * plan.world_size / 3600
        step = f"{step_s * 1e3:.2f} ms" if step_s < 1 else f"{step_s:,.1f} s"
        hours = f"{gpu_hours:,.0f}" if gpu_hours >= 10 else f"{gpu_hours:.3g}"
        lines.append(f"  {mfu:>5.0%} {step:>10} {plan.tokens_per_step / step_s / plan.world_size:>13,.0f} "
                     f"{_duration(run_s):>16} {hours:>12} {per_trillion:>24,.0f}")
    if t.eval_interval:  # forward only: a third of a training step's FLOPs per batch
        evals = -(-t.steps // t.eval_interval)
        extra = evals * t.eval_steps / 3 / t.steps
        lines.append(f"  + evaluation: {evals:,d} x {t.eval_steps} global batches, forward only "
                     f"(trainer.eval_interval={t.eval_interval}): {extra:.2%} more than the steps above")
    if cfg.parallel.dp == -1:
        lines.append("  (dp=1 as above: more data-parallel replicas divide the wall time, not the GPU-hours)")
    return "\n".join(lines)


def format_plan(cfg: JobConfig) -> str:
    return "\n\n".join([format_param_report(cfg),
                         format_memory_report(cfg.model, cfg.parallel, cfg.trainer, cfg.optim),
                         format_compute_report(cfg)])


def _flags(argv: list[str]) -> tuple[list[str], bool, int]:
    """(overrides, --trace, --top N) from the command line."""
    overrides, trace, top, words = [], False, 0, iter(argv)
    for a in words:
        if a == "--trace":
            trace = True
        elif a == "--top" or a.startswith("--top="):
            value = a.split("=", 1)[1] if "=" in a else next(words, "")
            if not value.isdigit():
                raise ValueError(f"--top takes a number of lines (e.g. --top 20), got {value!r}")
            top, trace = int(value), True
        else:
            overrides.append(a)
    return overrides, trace, top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with user_errors(errors=(ValueError, HydraException, OmegaConfBaseException)):
        overrides, trace, top = _flags(argv)
        cfg = load_config(overrides).validate()
        print(format_plan(cfg))
        if trace:
            from .memtrace import format_header, format_row, trace_step

            row = trace_step(cfg, top=top)
            print(f"\nmemory of one training step, traced on fake tensors (k2train/memtrace.py):\n{format_header('')}")
            print(format_row(f"{cfg.model.name}, {cfg.trainer.seq_len} tokens x {cfg.trainer.micro_batch_size}", row))


if __name__ == "__main__":
    main()
