"""Dry run: what a config costs, before any work starts.

    python -m k2train.plan model=k2_1t
    python -m k2train.plan model=k2_1t parallel=k2_h800 trainer.seq_len=4096

Prints exact parameter counts (total, activated per token, embedding and head, per layer) from the
model built on the meta device, FLOPs per token in the Megatron and TorchTitan conventions, and,
for a parallel layout, the per-rank memory breakdown of the planner.
"""

import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .cli import user_errors
from .config import JobConfig, load_config
from .flops import count_params, flops_per_token
from .parallel.memory import format_memory_report


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
        f"{'routed experts':>16} {'total':>16} {'activated':>14}",
    ]
    for layer in counts.layers:
        lines.append(
            f"  {layer.index:>5} {layer.kind:>5} {layer.attention:>14,d} {layer.norms:>8,d} {layer.ffn:>14,d} "
            f"{layer.router:>11,d} {layer.routed_experts:>16,d} {layer.total:>16,d} {layer.active:>14,d}"
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


def format_plan(cfg: JobConfig) -> str:
    return format_param_report(cfg) + "\n\n" + format_memory_report(cfg.model, cfg.parallel, cfg.trainer, cfg.optim)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with user_errors(errors=(ValueError, HydraException, OmegaConfBaseException)):
        cfg = load_config(argv).validate()
        print(format_plan(cfg))


if __name__ == "__main__":
    main()
