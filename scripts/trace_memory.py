"""A training step's memory, traced on the CPU with fake tensors, against the planner, for the
cases of scripts/bench_trainer.py (which measures them on a GPU) or one configuration.

    python scripts/trace_memory.py long_context              # bench_trainer.py's cases, no GPU needed
    python scripts/trace_memory.py memory --only "muonclip m=8 none|muonclip m=8 fp8$" --top 12
    python scripts/trace_memory.py --set model=k2_1t model.num_hidden_layers=4 model.n_routed_experts=16 \\
        trainer.seq_len=32768 trainer.global_batch_size=1 parallel.recompute=full trainer.loss_chunk_tokens=4096

How and what it measures: k2train/memtrace.py (``python -m k2train.plan <overrides> --trace`` does
the same for one configuration). Columns: the forward/backward's peak against the larger of the
planner's activation peak and end of the backward, the optimizer step's, and what the backward
leaves (weights, gradients, states). Rows also go to ``$OUT/trace_memory.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# before the kernels are imported: their custom-op path (the GPU's) on CPU tensors
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import SUITES  # noqa: E402

from k2train.config import load_config  # noqa: E402
from k2train.memtrace import format_header, format_row, trace_step  # noqa: E402


def trace_case(name: str, overrides: list[str], top: int = 0, fake: bool = True) -> dict:
    """One case (``fake=False``: real tensors, for a model the CPU can hold)."""
    row = trace_step(load_config(overrides), top=top, fake=fake)
    return {"case": name, "overrides": overrides, **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", nargs="?", choices=sorted(SUITES), help="bench_trainer.py's cases (default: one case "
                    "from --set alone)")
    ap.add_argument("--only", default="", help="the cases whose name contains one of these texts, '|'-separated "
                    "(a text ending in '$': the case of exactly that name)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides appended to every case")
    ap.add_argument("--top", type=int, default=0, help="list what is alive at each phase's peak (N lines)")
    args = ap.parse_args()
    if args.suite:
        parts = args.only.split("|")
        cases = [(n, [*o, *args.set]) for n, o in SUITES[args.suite]()
                 if any(n == part[:-1] if part.endswith("$") else part in n for part in parts)]
    else:
        cases = [("--set", args.set)]
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / "trace_memory.jsonl"
    print(format_header())
    with open(out, "a") as log:
        for name, overrides in cases:
            row = trace_case(name, overrides, args.top)
            print(format_row(name, row), flush=True)
            log.write(json.dumps(row) + "\n")
    print(f"rows: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
