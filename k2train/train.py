"""The k2train entry point and step loop.

    python -m k2train.train                                   # k2_tiny on the embedded corpus
    python -m k2train.train model=k2_small optim.lr=3e-4 trainer.steps=100
    python -m k2train.train --cfg job                         # print the resolved config

Data flow: Hydra composes conf/ -> typed, validated JobConfig -> model built on the meta device,
materialized and initialized -> MuonClip -> data loader for this rank -> resume -> step loop
(micro-batches, grad clip, optimizer step, QK-Clip, router bias update, LR schedule, metrics,
checkpoint) -> final save. :func:`run` is the whole story, top to bottom.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .checkpoint_layout import git_revision as ckpt_git_revision
from .config import JobConfig, ModelConfig, TrainerConfig, job_config_to_dict
from .flops import flops_per_token, peak_tflops
from .metrics import MetricLogger, format_step, layer_metrics
from .model import K2Model, update_router_bias_
from .parallel import ParallelDims
from .runtime import logging_rank
from .runtime import default_wandb_run_id


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


def pipeline_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's loss: under TP the logits are a vocab-sharded DTensor and the
    replicated loss comes back as a plain tensor (the schedule runs it inside ``loss_context``)."""
    from .parallel import local_loss

    return local_loss(cross_entropy(logits, labels))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss (mean over tokens); autocast runs it in fp32, loss_parallel on vocab shards."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


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


@dataclass
class Runtime:
    """Where this process sits: device, degrees and mesh, and which rank logs."""

    device: torch.device
    dims: ParallelDims
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == logging_rank(self.world_size, self.dims.pp)

    @property
    def dp_rank(self) -> int:
        """This rank's data stream: the flattened (dp, ep) coordinate."""
        return self.dims.dp_rank if self.distributed else 0

    def group(self, mesh_name: str):
        """The process group of a (flattened) mesh, or None where it has a single rank."""
        if not self.distributed:
            return None
        mesh = getattr(self.dims, mesh_name)
        return mesh.get_group() if mesh.size() > 1 else None


def setup_runtime(cfg: JobConfig) -> Runtime:
    """Process group and DeviceMesh from the torchrun environment; validates the layout first."""
    from .parallel import ParallelDims, backend_for

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg.parallel, world).validate(cfg.model, cfg.trainer)
    device = pick_device(cfg.trainer.device)
    if world == 1:
        return Runtime(device, dims)
    import torch.distributed as dist

    from .faults import init_distributed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        init_distributed(backend_for(device.type), cfg.parallel.timeout_s)
    dims.build_mesh(device.type)
    return Runtime(device, dims, rank=dist.get_rank(), world_size=world)


def build_model_parts(cfg: JobConfig, rt: Runtime, accum: int):
    """Meta-device model -> pipeline split -> TP -> EP -> recompute -> compile -> materialize +
    layout-invariant init.

    Returns (model parts held by this rank, the pipeline or None)."""
    from .parallel import apply_ep, apply_tp
    from .parallel.compile import apply_compile
    from .parallel.recompute import apply_recompute

    t = cfg.trainer
    with torch.device("meta"):
        model = K2Model(cfg.model)
    pipe = None
    parts = [model]
    if rt.dims.pp > 1:
        from .parallel.pipeline import build_pipeline

        pipe = build_pipeline(
            model,
            rt.dims.pp_mesh,
            cfg.parallel,
            num_microbatches=accum,
            micro_batch_size=t.micro_batch_size,
            seq_len=t.seq_len,
            loss_fn=pipeline_cross_entropy,
            device=rt.device,
        )
        parts = pipe.model_parts
    for part in parts:
        if rt.dims.tp > 1:
            apply_tp(part, rt.dims.tp_mesh, cfg.parallel.sequence_parallel)
        if rt.dims.ep > 1:
            apply_ep(part, rt.dims.ep_mesh)
        if cfg.parallel.recompute != "none":
            apply_recompute(part, cfg.parallel.recompute)
        if t.compile:
            apply_compile(part)
        part.to_empty(device=rt.device)
        part.init_weights(seed=t.seed)
        part.train()
    return parts, pipe


def build_optimizer_for(parts, cfg: JobConfig, rt: Runtime):
    """MuonClip over this rank's parts: TP-sharded matrices orthogonalized whole, EP-local experts
    locally, and (``optim.zero1``) the state sharded over each parameter's data-parallel replicas."""
    from .optim import build_optimizer

    return build_optimizer(parts, cfg.optim, dims=rt.dims if rt.distributed else None)


def run(cfg: JobConfig, run_dir: Optional[Path] = None, checkpoint_dir: Optional[Path] = None) -> list[dict]:
    """Train according to ``cfg``; returns the metrics logged at every step (for tests and scripts).

    Checkpoints go to ``checkpoint_dir``, by default ``trainer.output_dir/checkpoints``: a rerun or a
    Slurm requeue of the same output folder resumes there."""
    from .checkpoint import CheckpointManager, load_model_weights
    from .faults import LossSpikeDetector, NonFiniteGuard, PreemptionHandler, discard_step_
    from .optim import apply_qk_clip, attention_modules, build_lr_scheduler, describe_param_groups
    from .parallel import clip_grad_norm_, local_loss, loss_context, reduce_gradients_, sum_expert_load_

    cfg.validate()
    t = cfg.trainer
    rt = setup_runtime(cfg)
    device, dims = rt.device, rt.dims
    torch.manual_seed(t.seed)
    run_dir = Path(run_dir) if run_dir is not None else Path(t.output_dir) / "logs" / time.strftime("%Y%m%d-%H%M%S")
    if rt.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(job_config_to_dict(cfg), indent=2))
        (run_dir / "git_revision").write_text(ckpt_git_revision() + "\n")

    # --- model, optimizer, data ------------------------------------------------------------
    accum = grad_accumulation_steps(t, dims.dp_size)
    parts, pipe = build_model_parts(cfg, rt, accum)
    optimizer = build_optimizer_for(parts, cfg, rt)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, total_steps=t.steps)
    attn = attention_modules(parts)
    moes = [m for part in parts for m in part.moe_layers()]
    moe_layer_ids = [int(i) for part in parts for i, blk in part.layers.items() if blk.mlp in moes]
    _, loader = build_data(cfg, rt.dp_rank, dims.dp_size)
    tokens_per_step = t.global_batch_size * t.seq_len
    autocast_dtype = torch.bfloat16 if t.dtype == "bfloat16" else None
    flops_tok = flops_per_token(cfg.model, t.seq_len, "megatron")
    peak = peak_tflops(device)
    dp_group, token_group, pp_group = rt.group("dense_dp_mesh"), rt.group("token_mesh"), rt.group("pp_mesh")
    tp_mesh = dims.tp_mesh if dims.tp > 1 else None

    # --- resume ----------------------------------------------------------------------------
    guard, spikes = NonFiniteGuard(t.on_nonfinite), LossSpikeDetector(t.spike_factor, t.spike_window)
    progress_state = {"step": 0, "tokens_seen": 0, "clipped_heads_total": 0, "wandb_run_id": None}
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(t.output_dir) / "checkpoints"
    ckpt = CheckpointManager(checkpoint_dir, t.checkpoint, job_config=job_config_to_dict(cfg))
    state = {
        "model": parts,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "data": loader,
        "train": progress_state,
        "nonfinite": guard,
        "spikes": spikes,
    }
    if t.checkpoint.load_path:
        # Initial weights (a k2train checkpoint or an imported HF folder); a resume below overrides them.
        load_model_weights(t.checkpoint.load_path, parts)
    if t.checkpoint.enable and t.checkpoint.resume:
        resumed = ckpt.load_latest(state)
        if resumed is not None and rt.is_logging_rank:
            print(f"resumed from {ckpt.folder} at step {resumed}", flush=True)
    step = progress_state["step"]

    # The checkpoint's wandb run id, else one every rank derives alike: rank 0 writes it into meta.json,
    # the logging rank (maybe another) continues that wandb run after a restart.
    progress_state["wandb_run_id"] = ckpt.wandb_run_id = progress_state["wandb_run_id"] or default_wandb_run_id(run_dir)
    logger = MetricLogger(
        cfg.logging,
        run_dir,
        enabled=rt.is_logging_rank,
        config_dict=job_config_to_dict(cfg),
        wandb_run_id=progress_state["wandb_run_id"],
    )
    n_params = sum(p.numel() for part in parts for p in part.parameters())
    logger.console(
        f"k2train | model {cfg.model.name} | {n_params:,} params on this rank | device {device} | world {rt.world_size} "
        f"(pp {dims.pp}, dp {dims.dp}, ep {dims.ep}, tp {dims.tp})\n"
        f"{t.steps} steps x {tokens_per_step:,} tokens ({accum} micro-batches of {t.micro_batch_size}x{t.seq_len} per "
        f"data-parallel rank){f', resuming at step {step}' if step else ''}\nrun dir {run_dir}\n"
        f"{describe_param_groups(optimizer)}"
    )
    if step >= t.steps:
        logger.console(
            f"the checkpoint in {ckpt.folder} is at step {step} >= trainer.steps={t.steps}: nothing to train "
            "(raise trainer.steps, or use another trainer.output_dir / trainer.checkpoint.resume=false)"
        )

    progress = None
    if rt.is_logging_rank and cfg.logging.progress_bar and step < t.steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    preempt = PreemptionHandler()
    history: list[dict] = []
    data_iter = iter(loader)

    while step < t.steps:
        step += 1
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)

        # --- forward / backward over this step's micro-batches -------------------------------
        batches = [next(data_iter) for _ in range(accum)]
        if pipe is not None:
            from .parallel.pipeline import pipeline_step

            cat = {k: torch.cat([b[k] for b in batches]).to(device) for k in batches[0]}
            with loss_context(tp_mesh), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                res = pipeline_step(pipe, cat["tokens"], cat["labels"], cat.get("position_ids"), cat.get("doc_ids"))
            ce_mean, aux_mean = res.ce, res.aux
        else:
            ce_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            model = parts[0]
            for batch in batches:
                tokens = batch["tokens"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                pos, docs = batch.get("position_ids"), batch.get("doc_ids")
                with loss_context(tp_mesh), torch.autocast(
                    device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                ):
                    logits = model(
                        tokens,
                        position_ids=None if pos is None else pos.to(device),
                        doc_ids=None if docs is None else docs.to(device),
                    )
                    ce = local_loss(cross_entropy(logits, labels))
                    aux = model.aux_loss
                    ((ce + aux) / accum).backward()
                ce_sum += ce.detach()
                aux_sum += aux.detach()
            ce_mean, aux_mean = ce_sum / accum, aux_sum / accum
        loss = ce_mean + aux_mean
        if dp_group is not None:
            import torch.distributed as dist

            dist.all_reduce(loss, group=dp_group)
            loss /= dims.dp_size

        # --- gradients: reduce over data parallel, clip by the global norm ------------------
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        if rt.distributed:
            reduce_gradients_(parts, dims)
            grad_norm = clip_grad_norm_(parts, max_norm, dims)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(parts[0].parameters(), max_norm, foreach=True)
        # host sync: one per step, for the skip decision and the log line
        loss_val, gnorm_val = loss.item(), float(grad_norm)
        if not guard.check(loss_val, gnorm_val, step):
            discard_step_(optimizer, moes)
            for m in attn.values():
                m.reset_max_logit()
            scheduler.step()
            logger.console(f"step {step}: non-finite loss={loss_val} or grad norm={gnorm_val}; step skipped")
            continue

        # --- update: optimizer, QK-Clip, aux-loss-free router bias, LR ------------------------
        optimizer.step()
        clip = apply_qk_clip(
            attn,
            cfg.optim.qk_clip_tau if cfg.optim.qk_clip else None,
            group=dp_group,
            optimizer=optimizer,
            tp_group=rt.group("tp_mesh"),
        )
        for part in parts:
            sum_expert_load_(part, token_group)
        loads = [moe.tokens_per_expert.clone() for moe in moes]
        for moe in moes:
            update_router_bias_(moe, cfg.model.bias_update_rate)
        scheduler.step()

        # --- metrics ----------------------------------------------------------------------
        stage_stats = dict(clip)  # this rank's layers: max logit and clipped heads, expert load
        for layer, load in zip(moe_layer_ids, loads):
            stage_stats[f"expert_load_max_over_mean/layer_{layer}"] = (load.max() / load.mean().clamp_min(1e-9)).item()
            stage_stats[f"dead_experts/layer_{layer}"] = int((load == 0).sum())
        layer_stats = layer_metrics(stage_stats, pp_group)  # every stage's layers, on every pp rank
        dt = time.perf_counter() - t0
        progress_state["step"] = step
        progress_state["tokens_seen"] += tokens_per_step
        progress_state["clipped_heads_total"] += layer_stats.get("clipped_heads", 0)
        metrics = {
            "loss": loss_val,
            "aux_loss": float(aux_mean),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": gnorm_val,
            "tokens_per_s": tokens_per_step / dt,
            "step_time_s": dt,
            "tokens_seen": progress_state["tokens_seen"],
            "skipped_steps": guard.skipped,
            **layer_stats,
            "clipped_heads_total": progress_state["clipped_heads_total"],
        }
        if peak is not None:
            metrics["mfu"] = tokens_per_step / dt * flops_tok / (peak * 1e12 * rt.world_size)
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if spikes.update(loss_val):
            metrics["loss_spike"] = 1
            logger.console(f"step {step}: loss spike {loss_val:.4f} vs running mean {spikes.mean:.4f}")

        history.append(metrics)
        logger.log(step, metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
        if step % t.log_interval == 0 or step == t.steps:
            msg = format_step(step, t.steps, metrics)
            progress.write(msg) if progress is not None else logger.console(msg)

        # --- checkpoint, preemption -------------------------------------------------------
        if t.checkpoint.enable and t.checkpoint.interval and step % t.checkpoint.interval == 0 and step < t.steps:
            ckpt.save(step, state)
        if preempt.should_stop(rt.group("token_mesh") if rt.distributed else None, device):
            logger.console(f"preemption signal: checkpointing at step {step} and exiting")
            if t.checkpoint.enable:
                ckpt.save(step, state, blocking=True)
            break

    if progress is not None:
        progress.close()
    if t.checkpoint.enable and step >= t.steps and history:
        final_dir = ckpt.save(step, state, blocking=True)
        if t.checkpoint.export_hf:
            if rt.rank == 0:
                from .convert import export_hf

                export_hf(final_dir, final_dir / "hf", dtype=t.checkpoint.export_dtype,
                          max_shard_size=t.checkpoint.max_shard_size, progress=False)
            if rt.distributed:
                import torch.distributed as dist

                dist.barrier()
    ckpt.close()
    preempt.uninstall()
    logger.close()
    if hasattr(loader, "close"):
        loader.close()
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()
    return history


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import register_configs, to_job_config
    from .runtime import prepare_hydra_argv

    register_configs()
    # One run folder name for every rank (K2TRAIN_RUN_ID), and Hydra's .hydra/ + log file on rank 0 only.
    sys.argv = prepare_hydra_argv(sys.argv)

    @hydra.main(config_path="pkg://k2train.conf", config_name="config", version_base=None)
    def _main(dcfg) -> None:
        try:
            cfg = to_job_config(dcfg).validate()
        except ValueError as e:
            raise SystemExit(f"config error: {e}") from None
        try:
            hc = HydraConfig.get()
            run_dir = Path(hc.runtime.output_dir)
            # Each job of a multirun sweep keeps its own checkpoints (else job 1 would resume job 0).
            sweep = hc.mode is not None and hc.mode.name == "MULTIRUN"
            run(cfg, run_dir=run_dir, checkpoint_dir=run_dir / "checkpoints" if sweep else None)
        finally:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

    _main()


if __name__ == "__main__":
    main()
