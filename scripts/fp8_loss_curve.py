"""Does FP8 storage of the MoE activations cost loss? Two training runs through the trainer, the
same seed and data, bf16 storage against ``parallel.fp8_moe_inputs=true``; the loss curves side by
side, and the relative difference of the loss. The bar is DeepSeek-V3's for FP8 training: within
0.25%. Both runs see the same batches, so the difference is taken step by step (paired) over every
step both reached after the first ``SKIP`` (the drop from ~12): its mean with a standard error, and
the mean of the last ``TAIL`` steps. After a few hundred steps the two trajectories decorrelate
(a rounding flips a token's expert, the batches' losses then differ by ~1% either way), so a
20-step tail alone swings by several tenths of a percent; the paired mean over the run is the
measure that resolves 0.25%.

    python scripts/fp8_loss_curve.py                   # GPU: k2_small, 300 steps of 4 x 4096 (~4 min per run on an H200)
    python scripts/fp8_loss_curve.py --noise           # and a third run: bf16 storage from another init
                                                       #   seed, the same measure: the floor of run-to-run noise
    python scripts/fp8_loss_curve.py --set trainer.param_dtype=bfloat16   # overrides for every run (K2's bf16 weights)
    python scripts/fp8_loss_curve.py --noise --runs-from fp8_loss.json   # only the runs that file lacks (a second call)
    python scripts/fp8_loss_curve.py --second-pair --runs-from fp8_loss.json  # FP8 from init seed 1 too: a second pair
    python scripts/fp8_loss_curve.py --smoke           # CPU: k2_tiny, a few steps (the code path)
    python scripts/fp8_loss_curve.py --cpu --steps 200 --second-pair   # CPU: a small K2, two seeds' pairs (~15 min)
    python scripts/fp8_loss_curve.py --plot-from runs.json --out docs/img/fp8_storage_loss.png

Writes ``$OUT/fp8_loss.json`` (both histories) and the plot (``--out``, default
``$OUT/fp8_storage_loss.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from k2train.config import load_config
from k2train.trainer import Trainer

GPU = ["model=k2_small", "trainer.dtype=bfloat16", "trainer.seq_len=4096", "trainer.micro_batch_size=1",
       "trainer.global_batch_size=4", "model.attn_impl=triton", "model.moe_impl=triton", "optim.ns_impl=triton"]
SMOKE = ["model=k2_tiny", "trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]
# a CPU-sized K2 whose experts' rows are whole 1 x 128 tiles, bf16 autocast (~1 s a step on 2 cores)
CPU = ["model=k2_tiny", "model.hidden_size=256", "model.moe_intermediate_size=256", "trainer.dtype=bfloat16",
       "trainer.seq_len=128", "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.device=cpu"]
TAIL = 20
SKIP = 20
BLOCK = 20


def train(overrides: list[str], steps: int, work: Path) -> list[float]:
    cfg = load_config([*overrides, f"trainer.steps={steps}", "trainer.checkpoint.enable=false", "logging.wandb=false",
                       "logging.progress_bar=false", f"trainer.log_interval={max(1, steps // 10)}",
                       f"trainer.output_dir={work}"])
    with Trainer(cfg, run_dir=work / "run") as trainer:
        return [m["loss"] for m in trainer.run()]


def plot(runs: dict[str, list[float]], cmp: dict, out: Path, model: str = "k2_small") -> None:
    """Every run's loss; below, FP8 against bf16 storage step by step and its 20-step mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for label, losses in runs.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_ylabel("loss (cross entropy + aux)")
    ax.set_yscale("log")
    title = f"{model}: FP8 storage {cmp['mean']:+.3%} ± {cmp['sem']:.3%} loss over {cmp['steps']} paired steps"
    if len(runs) > 3:  # two pairs: their mean, then each
        pair, mean, sem = second_pair(runs, cmp)
        title = (f"{model}: FP8 storage {mean:+.3%} ± {sem:.3%} loss, two pairs\n"
                 f"(init seed 0: {cmp['mean']:+.3%} ± {cmp['sem']:.3%}; seed 1: {pair['mean']:+.3%} ± {pair['sem']:.3%})")
    ax.set_title(title, fontsize=10)
    ax.legend()
    window = 20
    ref, *others = (v[:cmp["steps"]] for v in runs.values())

    def against_ref(run: list[float], base: list[float] = ref) -> tuple[list[float], list[float]]:
        """per step (%) and its rolling mean"""
        rel = [100 * (b / a - 1) for a, b in zip(base, run)]
        return rel, [statistics.fmean(rel[max(0, i - window + 1):i + 1]) for i in range(len(rel))]

    steps = range(1, cmp["steps"] + 1)
    rel, rolling = against_ref(others[0])
    bx.plot(steps, rel, linewidth=0.5, color="0.6", label="FP8, per step")
    bx.plot(steps, rolling, linewidth=1.2, label=f"FP8, mean of {window}")
    if len(others) > 1:  # the noise floor: another bf16 run against the reference, the same rolling mean
        bx.plot(steps, against_ref(others[1])[1], linewidth=1.2, color="tab:green",
                label=f"{list(runs)[2]}, mean of {window}")
    if len(others) > 2:  # the second pair: FP8 against bf16, both from init seed 1
        bx.plot(steps, against_ref(others[2], others[1])[1], linewidth=1.2, color="tab:purple",
                label=f"FP8 / bf16, seed 1, mean of {window}")
    for bar in (-0.25, 0.25):
        bx.axhline(bar, color="red", linewidth=0.8, linestyle="--")
    bx.set_ylim(-2, 2)
    bx.set_xlabel("step")
    bx.set_ylabel("run / bf16 - 1 (%)")
    bx.legend(loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def second_pair(runs: dict[str, list[float]], cmp: dict) -> tuple[dict, float, float]:
    """The second pair (the third and fourth runs: bf16 and FP8 from init seed 1) compared, and the
    two pairs' mean with its standard error (``cmp``: the first pair's :func:`compare`)."""
    pair = compare(*list(runs.values())[2:4])
    return pair, (cmp["mean"] + pair["mean"]) / 2, (cmp["sem"] ** 2 + pair["sem"] ** 2) ** 0.5 / 2


def compare(ref: list[float], fp8: list[float]) -> dict:
    """A run's losses against the reference's, step by step over the steps both runs reached (a run cut short,
    e.g. by a preemption signal, is compared where it got to): the paired mean relative
    difference after the first ``SKIP`` steps, its standard error, and the mean of the last
    ``TAIL`` paired steps."""
    steps = min(len(ref), len(fp8))
    if steps < 3:
        raise SystemExit(f"too few steps to compare ({steps}): run longer (--steps)")
    skip, tail = min(SKIP, steps // 3), min(TAIL, steps // 3)  # a short (smoke) run: its thirds
    rel = [b / a - 1 for a, b in zip(ref[skip:steps], fp8[skip:steps])]
    mean = sum(rel) / len(rel)
    # the standard error of means of 20-step blocks: neighbouring steps' differences are correlated
    # (a perturbation lasts a few steps), which a per-step standard error would ignore
    block = BLOCK if len(rel) >= 4 * BLOCK else 1
    means = [statistics.fmean(rel[i:i + block]) for i in range(0, len(rel) - block + 1, block)]
    sem = statistics.stdev(means) / len(means) ** 0.5
    last = sum(fp8[steps - tail:steps]) / sum(ref[steps - tail:steps]) - 1
    return {"steps": steps, "skip": skip, "mean": mean, "sem": sem, "tail_steps": tail, "tail": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="a CPU-sized K2 (whole 128-wide tiles), as many steps as asked")
    ap.add_argument("--noise", action="store_true", help="a third run: bf16 storage with trainer.seed=1 (another init)")
    ap.add_argument("--second-pair", action="store_true",
                    help="the noise run and a fourth: FP8 storage from init seed 1, paired with it")
    ap.add_argument("--set", nargs="*", default=[], help="overrides appended to every run's config")
    ap.add_argument("--runs-from", type=Path, help="a fp8_loss.json of an earlier call: its runs are kept, not run again")
    ap.add_argument("--plot-from", type=Path, help="only plot the runs of this JSON file")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", tempfile.gettempdir()))
    if args.plot_from:
        runs = json.loads(args.plot_from.read_text())
    else:
        base = SMOKE if args.smoke else CPU if args.cpu else GPU
        steps = min(args.steps, 6) if args.smoke else args.steps
        runs = json.loads(args.runs_from.read_text()) if args.runs_from else {}
        with tempfile.TemporaryDirectory() as tmp:
            todo = [("bf16 storage", []), ("FP8 MoE inputs", ["parallel.fp8_moe_inputs=true"])]
            if args.noise or args.second_pair:
                todo.append(("bf16 storage, init seed 1", ["trainer.seed=1"]))
            if args.second_pair:
                todo.append(("FP8 MoE inputs, init seed 1", ["parallel.fp8_moe_inputs=true", "trainer.seed=1"]))
            out_dir.mkdir(parents=True, exist_ok=True)
            for label, extra in todo:
                if label in runs:
                    print(f"{label}: {len(runs[label])} steps from {args.runs_from}")
                    continue
                runs[label] = train([*base, *args.set, *extra], steps, Path(tmp) / label.split()[0])
                (out_dir / "fp8_loss.json").write_text(json.dumps(runs))  # after each run: a cut call keeps the others
    ref, *others = runs.values()
    cmp = compare(ref, others[0])
    cut = "" if len({len(v) for v in runs.values()}) == 1 else f" (runs of {', '.join(str(len(v)) for v in runs.values())} steps)"
    # the bar is about loss FP8 costs: its mean increase bounded at two standard errors; the
    # two-sided bound (a decrease counts too) is printed beside it
    verdict = "within" if cmp["mean"] + 2 * cmp["sem"] <= 0.0025 else "NOT within"
    both = "within" if abs(cmp["mean"]) + 2 * cmp["sem"] <= 0.0025 else "not within"
    print(f"FP8 storage against bf16, {cmp['steps']} paired steps{cut}: {cmp['mean']:+.3%} ± {cmp['sem']:.3%} "
          f"mean loss after step {cmp['skip']}: increase {verdict} 0.25% at two standard errors "
          f"(mean + 2 se {cmp['mean'] + 2 * cmp['sem']:+.3%}; |mean| + 2 se {abs(cmp['mean']) + 2 * cmp['sem']:.3%}, "
          f"{both}); last {cmp['tail_steps']} steps {cmp['tail']:+.3%}")
    if len(others) > 1:
        floor = compare(ref, others[1])
        print(f"noise floor, bf16 from init seed 1 against bf16, {floor['steps']} paired steps: {floor['mean']:+.3%} ± "
              f"{floor['sem']:.3%} mean, last {floor['tail_steps']} steps {floor['tail']:+.3%}")
    if len(others) > 2:  # the second pair, both from init seed 1, and the two pairs' mean
        pair, mean, sem = second_pair(runs, cmp)
        print(f"FP8 storage against bf16, both from init seed 1, {pair['steps']} paired steps: {pair['mean']:+.3%} ± "
              f"{pair['sem']:.3%} mean, last {pair['tail_steps']} steps {pair['tail']:+.3%}")
        print(f"FP8 storage, the two pairs' mean: {mean:+.3%} ± {sem:.3%}: increase "
              f"{'within' if mean + 2 * sem <= 0.0025 else 'NOT within'} 0.25% at two standard errors")
    try:
        plot(runs, cmp, args.out or out_dir / "fp8_storage_loss.png",
             "a small K2 (CPU)" if args.cpu else "k2_tiny" if args.smoke else "k2_small")
    except ImportError:
        print("matplotlib missing: no plot (python scripts/fp8_loss_curve.py --plot-from fp8_loss.json)")


if __name__ == "__main__":
    main()
