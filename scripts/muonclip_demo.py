"""MuonClip vs plain Muon on a small K2 model (CPU, a few minutes): max attention logit and loss.

Trains the same model twice from the same seed on the same batches with an aggressive learning
rate, once with QK-Clip off (plain Muon) and once with QK-Clip at ``--tau``, and plots the per-step
max attention logit (max over layers and heads) and the loss to ``docs/muonclip_demo.png``.

The task makes attention sharp on purpose: each sequence is random tokens followed by a copy of
them, so the second half is predictable only by attending to one exact earlier position (an
induction head). Sharp attention is what large logits buy, and an aggressive Muon lr gets there by
growing the query/key weights. Both runs are the trainer's own (k2train.trainer.Trainer: MuonClip,
QK-Clip, router-bias update, WSD schedule, gradient clipping) fed with these batches; the loss is
on the copied half only (the first half's labels are ignored).

    python scripts/muonclip_demo.py --steps 200           # the setting of docs/muonclip_demo.png
    python scripts/muonclip_demo.py --steps 100 --lr 0.02 --tau 20
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from k2train.config import CheckpointConfig, JobConfig, LoggingConfig, ModelConfig, OptimConfig, TrainerConfig
from k2train.loss import IGNORE_INDEX
from k2train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

MODEL = ModelConfig(
    name="demo",
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    attn_impl="eager",
)


def copy_batches(seed: int, batch: int, half: int, vocab: int):
    """A data factory for the trainer: [batch, 2*half] tokens, random first half then the same
    tokens again; labels only on the copied half (the same batches in both runs)."""

    def factory(dp_rank: int, dp_size: int):
        gen = torch.Generator().manual_seed(seed)
        while True:
            first = torch.randint(2, vocab, (batch, half), generator=gen)
            tokens = torch.cat([first, first], dim=1)
            labels = tokens[:, 1:].clone()
            labels[:, : half - 1] = IGNORE_INDEX  # the first half is unpredictable noise
            yield {"tokens": tokens[:, :-1], "labels": labels}

    return factory


def train(args, qk_clip: bool) -> list[dict]:
    optim = OptimConfig(
        lr=args.lr,
        min_lr=args.lr / 10,
        weight_decay=0.1,
        ns_dtype="float32",  # bf16 matmuls are ~20x slower on CPU; the comparison does not depend on it
        qk_clip=qk_clip,  # off: plain Muon (the optim=muon preset)
        qk_clip_tau=args.tau,
        schedule="wsd",
        warmup_steps=args.warmup,
        decay_fraction=0.2,
    )
    trainer = TrainerConfig(
        steps=args.steps, seq_len=args.seq_len - 1, micro_batch_size=args.batch, global_batch_size=args.batch,
        grad_clip=1.0, seed=args.seed, device="cpu", log_interval=args.log_every, checkpoint=CheckpointConfig(enable=False),
    )
    logging = LoggingConfig(console=False, jsonl=False, progress_bar=False, wandb=False)
    cfg = JobConfig(model=MODEL, optim=optim, trainer=trainer, logging=logging)
    data = copy_batches(args.seed + 1, args.batch, args.seq_len // 2, MODEL.vocab_size)
    label = "muonclip" if qk_clip else "muon    "
    history = []
    with tempfile.TemporaryDirectory() as tmp, Trainer(cfg, run_dir=tmp, data=data) as t:
        for metrics in t.run():
            # the reported loss is the cross entropy of the copied half (the trainer adds the MoE aux loss)
            metrics = {**metrics, "step": len(history) + 1, "loss": metrics["loss"] - metrics["aux_loss"]}
            history.append(metrics)
            if metrics["step"] % args.log_every == 0:
                print(f"{label} step {metrics['step']:4d} loss {metrics['loss']:.3f} "
                      f"max_logit {metrics['max_logit']:8.2f} clipped {metrics['clipped_heads']}")
    return history


def plot(runs: dict[str, list[dict]], tau: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in runs.items():
        steps = [h["step"] for h in hist]
        ax1.plot(steps, [h["max_logit"] for h in hist], label=label)
        ax2.plot(steps, [h["loss"] for h in hist], label=label)
    ax1.axhline(tau, color="gray", linestyle="--", label=f"tau = {tau:g}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("max attention logit (all layers, heads)")
    ax1.set_title("max logit")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylabel("cross-entropy (copied half)")
    ax2.set_yscale("log")
    ax2.set_title("loss")
    ax2.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--tau", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the per-step metrics here")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "muonclip_demo.png")
    args = ap.parse_args()
    # One thread: the model is tiny, and on a busy machine OpenMP's spinning threads cost 5-10x.
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = {"Muon (no clip)": train(args, qk_clip=False), f"MuonClip (tau={args.tau:g})": train(args, qk_clip=True)}
    plot(runs, args.tau, args.out)
    summary = {
        label: {
            "final_loss_mean_last10": sum(h["loss"] for h in hist[-10:]) / 10,
            "peak_max_logit": max(h["max_logit"] for h in hist),
            "final_max_logit": hist[-1]["max_logit"],
            "clipped_heads_total": sum(h["clipped_heads"] for h in hist),
        }
        for label, hist in runs.items()
    }
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
