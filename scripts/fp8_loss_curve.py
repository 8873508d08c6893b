"""Does FP8 storage of the MoE activations cost loss? Two training runs through the trainer, the
same seed and data, bf16 storage against ``parallel.fp8_moe_inputs=true``; the loss curves side by
side, and the relative difference of the final loss (mean of the last 20 steps). The bar is
DeepSeek-V3's for FP8 training: within 0.25%.

    python scripts/fp8_loss_curve.py                   # GPU: k2_small, 300 steps of 4 x 4096 (~6 min on an H200)
    python scripts/fp8_loss_curve.py --smoke           # CPU: k2_tiny, a few steps (the code path)
    python scripts/fp8_loss_curve.py --plot-from runs.json --out docs/img/fp8_storage_loss.png

Writes ``$OUT/fp8_loss.json`` (both histories) and the plot (``--out``, default
``$OUT/fp8_storage_loss.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from k2train.config import load_config
from k2train.trainer import Trainer

GPU = ["model=k2_small", "trainer.dtype=bfloat16", "trainer.seq_len=4096", "trainer.micro_batch_size=1",
       "trainer.global_batch_size=4", "model.attn_impl=triton", "model.moe_impl=triton", "optim.ns_impl=triton"]
SMOKE = ["model=k2_tiny", "trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]
TAIL = 20


def train(overrides: list[str], steps: int, work: Path) -> list[float]:
    cfg = load_config([*overrides, f"trainer.steps={steps}", "trainer.checkpoint.enable=false", "logging.wandb=false",
                       "logging.progress_bar=false", f"trainer.log_interval={max(1, steps // 10)}",
                       f"trainer.output_dir={work}"])
    with Trainer(cfg, run_dir=work / "run") as trainer:
        return [m["loss"] for m in trainer.run()]


def plot(runs: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in runs.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross entropy + aux)")
    ax.set_yscale("log")
    ax.set_title(f"k2_small: {final_difference(runs):+.3%} final loss with FP8 storage")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def final_difference(runs: dict[str, list[float]]) -> float:
    ref, fp8 = (sum(v[-TAIL:]) / len(v[-TAIL:]) for v in runs.values())
    return fp8 / ref - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--plot-from", type=Path, help="only plot the runs of this JSON file")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", tempfile.gettempdir()))
    if args.plot_from:
        runs = json.loads(args.plot_from.read_text())
    else:
        base = SMOKE if args.smoke else GPU
        steps = min(args.steps, 6) if args.smoke else args.steps
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, extra in (("bf16 storage", []), ("FP8 MoE inputs", ["parallel.fp8_moe_inputs=true"])):
                runs[label] = train([*base, *extra], steps, Path(tmp) / label.split()[0])
        (out_dir / "fp8_loss.json").write_text(json.dumps(runs))
    diff = final_difference(runs)
    print(f"final loss (mean of the last {TAIL} steps): " + ", ".join(
        f"{k} {sum(v[-TAIL:]) / len(v[-TAIL:]):.4f}" for k, v in runs.items()) + f"; FP8 {diff:+.3%} (bar: within 0.25%)")
    try:
        plot(runs, args.out or out_dir / "fp8_storage_loss.png")
    except ImportError:
        print("matplotlib missing: no plot (python scripts/fp8_loss_curve.py --plot-from fp8_loss.json)")


if __name__ == "__main__":
    main()
