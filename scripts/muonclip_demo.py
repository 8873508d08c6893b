"""MuonClip vs plain Muon on a small K2 model (CPU, a few minutes): max attention logit and loss.

Trains the same model twice from the same seed on the same batches with an aggressive learning
rate, once with QK-Clip off (plain Muon) and once with QK-Clip at ``--tau``, and plots the per-step
max attention logit (max over layers and heads) and the loss to ``docs/muonclip_demo.png``.

The task makes attention sharp on purpose: each sequence is random tokens followed by a copy of
them, so the second half is predictable only by attending to one exact earlier position (an
induction head). Sharp attention is what large logits buy, and an aggressive Muon lr gets there by
growing the query/key weights. The loop is compact (model + MuonClip + QK-Clip + WSD schedule);
the real trainer is ``python -m k2train.train``, which calls the same functions.

    python scripts/muonclip_demo.py --steps 200           # the setting of docs/muonclip_demo.png
    python scripts/muonclip_demo.py --steps 100 --lr 0.02 --tau 20
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from k2train.config import ModelConfig, OptimConfig
from k2train.model import K2Model, update_router_bias_
from k2train.optim import apply_qk_clip, attention_modules, build_lr_scheduler, build_optimizer

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


def copy_batch(gen: torch.Generator, batch: int, half: int, vocab: int) -> torch.Tensor:
    """[batch, 2*half] tokens: random first half, then the same tokens again."""
    first = torch.randint(2, vocab, (batch, half), generator=gen)
    return torch.cat([first, first], dim=1)


def train(args, qk_clip: bool) -> list[dict]:
    torch.manual_seed(args.seed)
    model = K2Model(MODEL)
    model.init_weights(seed=args.seed)
    cfg = OptimConfig(
        name="muonclip" if qk_clip else "muon",
        lr=args.lr,
        min_lr=args.lr / 10,
        weight_decay=0.1,
        ns_dtype="float32",  # bf16 matmuls are ~20x slower on CPU; the comparison does not depend on it
        qk_clip=qk_clip,
        qk_clip_tau=args.tau,
        schedule="wsd",
        warmup_steps=args.warmup,
        decay_fraction=0.2,
    )
    opt = build_optimizer([model], cfg)
    sched = build_lr_scheduler(opt, cfg, args.steps)
    attn = attention_modules(model)
    moes = list(model.moe_layers())
    gen = torch.Generator().manual_seed(args.seed + 1)  # same batches in both runs
    half = args.seq_len // 2
    history = []
    for step in range(1, args.steps + 1):
        tokens = copy_batch(gen, args.batch, half, MODEL.vocab_size)
        logits = model(tokens[:, :-1])
        # Loss on the copied half only: the first half is unpredictable noise.
        loss = F.cross_entropy(logits[:, half - 1 :].flatten(0, 1), tokens[:, half:].flatten())
        (loss + model.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = apply_qk_clip(attn, args.tau if qk_clip else None, optimizer=opt)
        for moe in moes:
            update_router_bias_(moe, MODEL.bias_update_rate)
        sched.step()
        history.append({"step": step, "loss": loss.item(), **metrics})
        if step % args.log_every == 0:
            print(
                f"{'muonclip' if qk_clip else 'muon    '} step {step:4d} loss {loss.item():.3f} "
                f"max_logit {metrics['max_logit']:8.2f} clipped {metrics['clipped_heads']}"
            )
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
