"""The k2train entry point and step loop.

    python -m k2train.train                                   # k2_tiny on the embedded corpus
    python -m k2train.train model=k2_small optim.lr=3e-4 trainer.steps=100
    python -m k2train.train --cfg job                         # print the resolved config

Data flow: Hydra composes conf/ -> typed, validated JobConfig -> model built on the meta device,
materialized and initialized -> MuonClip -> data loader for this rank -> resume -> step loop
(micro-batches, grad clip, optimizer step, QK-Clip, router bias update, LR schedule, metrics,
checkpoint) -> final save. :func:`run` is the whole story, top to bottom.
"""

import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import JobConfig, ModelConfig, TrainerConfig, job_config_to_dict
from .flops import flops_per_token, peak_tflops
from .metrics import MetricLogger, format_step
from .model import K2Model, update_router_bias_


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> K2Model:
    """Build on the meta device (no memory, any size), then materialize and initialize on ``device``."""
    with torch.device("meta"):
        model = K2Model(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "k2train " + version("k2train")
        except PackageNotFoundError:
            return "unknown"


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1))


def grad_accumulation_steps(t: TrainerConfig, dp_size: int) -> int:
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {dp_size}; make it a multiple of {per_step}"
        )
    return t.global_batch_size // per_step


def build_data(cfg: JobConfig, dp_rank: int, dp_size: int):
    from .data_pipeline.loader import build_data_loader, check_vocab, load_tokenizer

    tokenizer = load_tokenizer(cfg.data)
    check_vocab(tokenizer, cfg.model.vocab_size)
    loader = build_data_loader(
        cfg.data,
        tokenizer,
        seq_len=cfg.trainer.seq_len,
        micro_batch_size=cfg.trainer.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        vocab_size=cfg.model.vocab_size,
    )
    return tokenizer, loader


def run(cfg: JobConfig, run_dir: Optional[Path] = None) -> list[dict]:
    """Train according to ``cfg``; returns the metrics logged at every step (for tests and scripts)."""
    from .optim import apply_qk_clip, attention_modules, build_lr_scheduler, build_optimizer, describe_param_groups

    cfg.validate()
    t = cfg.trainer
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    rank, dp_rank, dp_size = 0, 0, 1
    is_logging_rank = rank == 0
    run_dir = Path(run_dir) if run_dir is not None else Path(t.output_dir) / "logs" / time.strftime("%Y%m%d-%H%M%S")
    if is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(job_config_to_dict(cfg), indent=2))
        (run_dir / "git_revision").write_text(git_revision() + "\n")

    # --- model, optimizer, data ------------------------------------------------------------
    model = build_model(cfg.model, device, seed=t.seed)
    model.train()
    optimizer = build_optimizer([model], cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps=t.steps)
    attn = attention_modules(model)
    moes = list(model.moe_layers())
    _, loader = build_data(cfg, dp_rank, dp_size)
    data_iter = iter(loader)
    accum = grad_accumulation_steps(t, dp_size)
    tokens_per_step = t.global_batch_size * t.seq_len
    autocast_dtype = torch.bfloat16 if t.dtype == "bfloat16" else None
    flops_tok = flops_per_token(cfg.model, t.seq_len, "megatron")
    peak = peak_tflops(device)

    logger = MetricLogger(cfg.logging, run_dir, enabled=is_logging_rank, config_dict=job_config_to_dict(cfg))
    logger.console(
        f"k2train | model {cfg.model.name} | {sum(p.numel() for p in model.parameters()):,} params | device {device} "
        f"| {t.steps} steps x {tokens_per_step:,} tokens ({accum} micro-batches of {t.micro_batch_size}x{t.seq_len})"
        f"\nrun dir {run_dir}\n{describe_param_groups(optimizer)}"
    )

    history: list[dict] = []
    clipped_total = 0
    skipped_steps = 0
    loss_ema: Optional[float] = None
    progress = None
    if is_logging_rank and cfg.logging.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, desc="train", unit="step", dynamic_ncols=True, leave=True)

    step = 0
    while step < t.steps:
        step += 1
        t0 = time.perf_counter()
        for m in attn.values():
            m.reset_max_logit()
        optimizer.zero_grad(set_to_none=True)

        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next(data_iter)
            tokens = batch["tokens"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(tokens, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
                ce = cross_entropy(logits, labels)
                aux = model.aux_loss
            ((ce + aux) / accum).backward()
            loss_sum += ce.detach()
            aux_sum += aux.detach()
        loss = loss_sum / accum

        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"), foreach=True
        )
        # host-device sync: one .item() per step for the skip decision and the log line
        loss_val, gnorm_val = loss.item(), grad_norm.item()
        if not (math.isfinite(loss_val) and math.isfinite(gnorm_val)):
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            for moe in moes:
                moe.tokens_per_expert.zero_()
            logger.console(f"step {step}: non-finite loss={loss_val} or grad norm={gnorm_val}; step skipped")
            if t.on_nonfinite == "stop":
                raise FloatingPointError(f"non-finite loss or grad norm at step {step} (trainer.on_nonfinite=stop)")
            scheduler.step()
            continue

        optimizer.step()
        # Reduces the step's per-head max logits, clips (MuonClip) or only measures (tau=None), resets.
        clip = apply_qk_clip(attn, cfg.optim.qk_clip_tau if cfg.optim.qk_clip else None, optimizer=optimizer)
        loads = [moe.tokens_per_expert.clone() for moe in moes]
        for moe in moes:
            update_router_bias_(moe, cfg.model.bias_update_rate)
        scheduler.step()

        dt = time.perf_counter() - t0
        metrics = {
            "loss": loss_val,
            "aux_loss": (aux_sum / accum).item(),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": gnorm_val,
            "tokens_per_s": tokens_per_step / dt,
            "step_time_s": dt,
            "tokens_seen": step * tokens_per_step,
            "skipped_steps": skipped_steps,
        }
        if peak is not None:
            metrics["mfu"] = tokens_per_step / dt * flops_tok / (peak * 1e12)
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        clipped_total += clip["clipped_heads"]
        metrics.update(clip)
        metrics["clipped_heads_total"] = clipped_total
        if loads:
            ratios = []
            for moe, load in zip(moes, loads):
                layer = next(i for i, blk in model.layers.items() if blk.mlp is moe)
                ratio = (load.max() / load.mean().clamp_min(1e-9)).item()
                ratios.append(ratio)
                metrics[f"expert_load_max_over_mean/layer_{layer}"] = ratio
                metrics[f"dead_experts/layer_{layer}"] = int((load == 0).sum())
            metrics["expert_load_max_over_mean"] = max(ratios)
        if loss_ema is not None and loss_val > t.spike_factor * loss_ema:
            metrics["loss_spike"] = 1
            logger.console(f"step {step}: loss spike {loss_val:.4f} vs running mean {loss_ema:.4f}")
        loss_ema = loss_val if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_val

        history.append(metrics)
        logger.log(step, metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
        if step % t.log_interval == 0 or step == t.steps:
            msg = format_step(step, t.steps, metrics)
            if progress is not None:
                progress.write(msg)
            else:
                logger.console(msg)

    if progress is not None:
        progress.close()
    if is_logging_rank and t.checkpoint.enable:
        save_final(run_dir, model, optimizer, scheduler, loader, cfg, step)
    logger.close()
    return history


def save_final(run_dir: Path, model, optimizer, scheduler, loader, cfg: JobConfig, step: int) -> Path:
    """Final checkpoint: safetensors weights (HF-loadable via k2train.convert) plus the trainer state."""
    from safetensors.torch import save_file

    out = run_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step}
    if hasattr(loader, "state_dict"):
        state["data_loader"] = loader.state_dict()
    torch.save(state, out / "trainer_state.pt")
    (out / "config.json").write_text(json.dumps(job_config_to_dict(cfg), indent=2))
    return out


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import register_configs, to_job_config

    register_configs()

    @hydra.main(config_path="pkg://k2train.conf", config_name="config", version_base=None)
    def _main(dcfg) -> None:
        try:
            cfg = to_job_config(dcfg).validate()
        except ValueError as e:
            raise SystemExit(f"config error: {e}") from None
        run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))

    _main()


if __name__ == "__main__":
    main()
