"""How far does FP8 storage move the gradient, against how far another batch moves it?

One model, one state (the initial weights, or after ``--warm`` training steps with bf16 storage),
the gradient of one global batch three ways: bf16 storage (the reference), FP8 storage
(``parallel.fp8_moe_inputs=true``) and bf16 storage of the *next* batch (the batch-to-batch noise
SGD lives with). Per kind of parameter (the routed experts' gate/up and down stacks, attention,
the rest), the relative distance ``|g - g_ref| / |g_ref|`` and the cosine to the reference; and
the mean signed projection of FP8's difference on the reference (< 0: FP8 shrinks the gradient).
If FP8's distance is a small fraction of another batch's and has no sign, FP8 storage adds noise
far below SGD's own and cannot cost loss by itself.

    python scripts/fp8_grad_noise.py                          # GPU: k2_small, 4 x 4096 tokens, bf16 autocast
    python scripts/fp8_grad_noise.py --warm 50 --set trainer.param_dtype=bfloat16
    python scripts/fp8_grad_noise.py --smoke                  # CPU: a small K2 with whole 128-wide tiles
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fp8_loss_curve import CPU, GPU  # the same models as the loss curves (scripts/ is on the path)
from k2train.config import load_config
from k2train.trainer import Trainer

QUIET = ["trainer.checkpoint.enable=false", "logging.wandb=false", "logging.progress_bar=false", "logging.console=false"]


def kind(name: str) -> str:
    if ".experts." in name:
        return "routed down" if "down" in name else "routed gate/up"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense / shared MLP, router"
    return "embedding, head, norms"


def gradients(trainer: Trainer, batches) -> dict[str, torch.Tensor]:
    for part in trainer.parts:
        part.zero_grad(set_to_none=True)
    trainer._forward_backward(batches)
    return {n: p.grad.detach().float().clone() for part in trainer.parts for n, p in part.named_parameters()
            if p.grad is not None}


def compare(ref: dict, other: dict) -> dict[str, tuple[float, float, float]]:
    """Per kind: (|other - ref| / |ref|, cosine, <other - ref, ref> / |ref|^2)."""
    sums: dict[str, list[float]] = {}
    for n, g in ref.items():
        d = other[n] - g
        s = sums.setdefault(kind(n), [0.0, 0.0, 0.0, 0.0])
        s[0] += float(d.pow(2).sum())
        s[1] += float(g.pow(2).sum())
        s[2] += float(other[n].pow(2).sum())
        s[3] += float((other[n] * g).sum())
    return {k: ((dd / rr) ** 0.5, dot / (rr * oo) ** 0.5, (dot - rr) / rr) for k, (dd, rr, oo, dot) in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--warm", type=int, default=0, help="train this many steps (bf16 storage) before measuring")
    ap.add_argument("--batches", type=int, default=4, help="measure on this many global batches, averaged")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    args = ap.parse_args()
    base = [*(CPU if args.smoke else GPU), *QUIET, *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([*base, f"trainer.steps={max(1, args.warm)}", f"trainer.output_dir={tmp}"])
        with Trainer(cfg, run_dir=Path(tmp) / "ref") as ref:
            for _ in range(args.warm):
                ref.train_step(ref.next_batches())
            # the weights and the buffers (the routers' biases move with training too)
            state = [{n: t.detach().clone() for n, t in part.state_dict().items()} for part in ref.parts]
            batches = [ref.next_batches() for _ in range(args.batches + 1)]
            g_ref = [gradients(ref, b) for b in batches]
        cfg8 = load_config([*base, "parallel.fp8_moe_inputs=true", "trainer.steps=1", f"trainer.output_dir={tmp}/fp8"])
        with Trainer(cfg8, run_dir=Path(tmp) / "fp8") as fp8:
            for part, sd in zip(fp8.parts, state):
                part.load_state_dict(sd)
            g_fp8 = [gradients(fp8, b) for b in batches[:-1]]
    rows: dict[str, list] = {}
    for i in range(args.batches):
        for label, other in (("FP8 storage", g_fp8[i]), ("next batch", g_ref[i + 1])):
            for k, v in compare(g_ref[i], other).items():
                rows.setdefault((k, label), []).append(v)
    print(f"{'parameters':28s} {'against bf16 storage':20s} {'|g - ref| / |ref|':>18s} {'cosine':>8s} {'along ref':>10s}")
    for (k, label), vals in sorted(rows.items()):
        mean = [sum(v[j] for v in vals) / len(vals) for j in range(3)]
        print(f"{k:28s} {label:20s} {mean[0]:18.3e} {mean[1]:8.4f} {mean[2]:+10.2e}")


if __name__ == "__main__":
    main()
