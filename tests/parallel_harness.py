"""Parity harness: the trainer (k2train.trainer.Trainer, the step users run) on the tiny K2 under a
parallel layout (N gloo processes on CPU) and in one process, on the same global batches; returns
each run's losses, step-1 gradients and final parameters (gathered to full tensors).

Setup shared by every run: fp32, identical init (the layout-invariant seeded init), fixed random
tokens. Each data stream gets its micro-batches the way the data loader deals them out (step s,
micro-batch m of stream r = global rows [(m * streams + r) * B, ... + B)), so the union over the
dp x ep streams is the global batch. What a step does is the trainer's: forward/backward over the
micro-batches (or the pipeline schedule), gradient reduction, global-norm clipping, MuonClip
(Newton-Schulz in fp32 so that runs round alike), QK-Clip at a low tau (it fires), the
aux-loss-free router-bias update from the global expert load. Every two steps and after the last,
the validation loss on fixed batches of their own (``valid_batches``), dealt out the same way.

Use: ``run_parallel(dict(tp=2, ep=2))`` -> every rank's result; ``run_reference()`` -> one
process; compare with ``merged(results)``. See test_parallel_parity.py.
"""

import dataclasses
import os
import tempfile
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpu_offload import CpuOffload, install_cpu_offload
from k2train.config import (CheckpointConfig, JobConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
                            TrainerConfig)
from k2train.parallel.expert_parallel import gather_experts, is_expert_param
from k2train.trainer import Trainer

TINY = ModelConfig(
    name="parity_tiny",
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    aux_loss_alpha=0.01,
    bias_update_rate=1e-3,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
)
# lr high enough that QK-Clip (tau below the init max logit) and the router bias both act.
OPTIM = OptimConfig(name="muonclip", lr=5e-3, ns_dtype="float32", qk_clip=True, qk_clip_tau=0.05, zero1=False)
OPTIM_ZERO1 = dataclasses.replace(OPTIM, zero1=True)
TRAINER = TrainerConfig(
    steps=5, seq_len=16, micro_batch_size=2, global_batch_size=8, grad_clip=1.0, seed=1234, device="cpu",
    checkpoint=CheckpointConfig(enable=False), eval_interval=2, eval_steps=2,
)
QUIET = LoggingConfig(console=False, jsonl=False, progress_bar=False, wandb=False)
DATA_SEED = 99


def job(layout: Optional[dict] = None, optim: OptimConfig = OPTIM, trainer: TrainerConfig = TRAINER,
        model: ModelConfig = TINY) -> JobConfig:
    """The run's config: ``layout`` holds ParallelConfig fields (``dict(pp=2, ep=2)``, recompute, ...)."""
    return JobConfig(model=model, optim=optim, parallel=ParallelConfig(**(layout or {})), trainer=trainer, logging=QUIET)


def global_batches(trainer: TrainerConfig = TRAINER, vocab: int = TINY.vocab_size) -> torch.Tensor:
    """[steps, global_batch, seq_len + 1] fixed tokens (inputs = [..., :-1], labels = [..., 1:])."""
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, vocab, (trainer.steps, trainer.global_batch_size, trainer.seq_len + 1), generator=g)


def valid_batches(trainer: TrainerConfig = TRAINER, vocab: int = TINY.vocab_size) -> torch.Tensor:
    """[eval_steps, global_batch, seq_len + 1] fixed validation tokens (not the training ones)."""
    g = torch.Generator().manual_seed(DATA_SEED + 1)
    return torch.randint(0, vocab, (trainer.eval_steps, trainer.global_batch_size, trainer.seq_len + 1), generator=g)


def documents(batch: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents for the rows of one global batch: (doc_ids, position_ids) [rows, S], every
    row cut at its own fixed random boundaries (documents of 3 to S/2 tokens), positions restarting
    at each."""
    rows, S = batch.shape[0], batch.shape[1] - 1
    doc_ids, positions = torch.zeros(rows, S, dtype=torch.long), torch.zeros(rows, S, dtype=torch.long)
    for r in range(rows):
        g = torch.Generator().manual_seed(DATA_SEED * 1000 + step * 100 + r)
        start, doc = 0, 0
        while start < S:
            n = int(torch.randint(3, max(4, S // 2), (1,), generator=g))
            doc_ids[r, start : start + n] = doc
            positions[r, start : start + n] = torch.arange(min(n, S - start))
            start, doc = start + n, doc + 1
    return doc_ids, positions


def stream(batches: torch.Tensor, micro: int, with_documents: bool = False):
    """A data factory for Trainer(data=...): stream r's micro-batches, dealt as the loader does
    (``with_documents``: packed documents, :func:`documents`)."""

    def factory(dp_rank: int, dp_size: int) -> Iterator[dict]:
        for step, batch in enumerate(batches):
            docs = documents(batch, step) if with_documents else None
            for m in range(batch.shape[0] // (micro * dp_size)):
                start = (m * dp_size + dp_rank) * micro
                rows = batch[start : start + micro]
                out = {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}
                if docs is not None:
                    out["doc_ids"] = docs[0][start : start + micro].contiguous()
                    out["position_ids"] = docs[1][start : start + micro].contiguous()
                yield out

    return factory


def nonfinite_output(trainer: Trainer, steps: set, value: float = float("nan")) -> list:
    """The model's output becomes ``value`` (NaN / inf) while the trainer runs the steps ``steps``
    (1 = the first): a forward hook on the final norm (on the last pipeline stage), as a bad batch or
    an overflow would do. Returns the hooks' handles."""
    def hook(module, args, out):
        return out * value if trainer.step in steps else None
    return [part.norm.register_forward_hook(hook) for part in trainer.parts if part.norm is not None]


def train(cfg: JobConfig, batches: torch.Tensor, with_documents: bool = False, nonfinite_step: int = 0) -> dict:
    """Run the trainer over ``batches``; this rank's losses, grad norms and clipped heads per step,
    validation losses, its step-1 gradients (after reduction and clipping: what the optimizer sees),
    final parameters and router biases, as full tensors (tp shards and ep slices gathered).
    ``nonfinite_step``: the model's output is NaN in that step (a hook on the final norm, on the
    last stage)."""
    data = stream(batches, cfg.trainer.micro_batch_size, with_documents)
    valid = stream(valid_batches(cfg.trainer, cfg.model.vocab_size), cfg.trainer.micro_batch_size, with_documents)
    made = len(CpuOffload.instances)
    with tempfile.TemporaryDirectory() as tmp, Trainer(cfg, run_dir=tmp, data=data, valid_data=valid) as trainer:
        nonfinite_output(trainer, {nonfinite_step})
        grads: dict = {}

        def record(optimizer, args, kwargs):
            if not grads:
                grads.update(full_tensors(trainer.parts, trainer.dims, grads=True))

        trainer.optimizer.register_step_pre_hook(record)
        history = trainer.run()
        offloads = [o.stats() for o in CpuOffload.instances[made:]]
        return {
            "loss": [m["loss"] for m in history],
            "grad_norm": [m["grad_norm"] for m in history],
            "clipped_heads": [m["clipped_heads"] for m in history],
            "val_loss": [(v["step"], v["val_loss"]) for v in trainer.val_history],
            "grads": grads,
            "params": full_tensors(trainer.parts, trainer.dims),
            "buffers": {k: v.clone() for part in trainer.parts for k, v in part.named_buffers()
                        if k.endswith("e_score_correction_bias")},
            "optimizer": type(trainer.optimizer).__name__,
            "skipped": trainer.guard.skipped,
            "offload": offloads,  # with cpu_offload: what the offloader moved (parallel.offload_activations)
        }


@torch.no_grad()
def full_tensors(parts, dims, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of this rank's parts as the full, unsharded tensor."""
    result = {}
    for part in parts:
        for name, p in part.named_parameters():
            t = p.grad if grads else p
            if t is None:
                continue
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            if dims.distributed and is_expert_param(name):
                t = gather_experts(t, dims.ep_mesh)
            result[name] = t.detach().clone()
    return result


def merged(results: list[dict]) -> dict:
    """One result from every rank's: the union of the tensors (pipeline ranks hold different layers)."""
    out = dict(results[0])
    for key in ("grads", "params", "buffers"):
        out[key] = {k: v for r in results for k, v in r[key].items()}
    return out


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, init_file: str, out_dir: str, jobs: dict, batches: dict, docs: bool,
            nonfinite_step: int, cpu_offload: bool) -> None:
    torch.set_num_threads(1)
    if cpu_offload:
        install_cpu_offload()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, cfg in jobs.items():
            torch.save(train(cfg, batches[name], docs, nonfinite_step), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def world_size(layout: dict) -> int:
    """Processes for a layout without dp=-1 (dp defaults to 1 here)."""
    return layout.get("pp", 1) * layout.get("dp", 1) * layout.get("ep", 1) * layout.get("tp", 1)


def run_jobs(jobs: dict[str, JobConfig], world: int, documents: bool = False,
             nonfinite_step: int = 0, cpu_offload: bool = False) -> dict[str, list[dict]]:
    """Train every job of ``jobs`` (same world size) in one spawn of ``world`` gloo processes
    (importing torch.distributed costs seconds per process on a loaded 2-core machine); returns
    each job's per-rank results. ``documents``: packed documents in every sequence;
    ``nonfinite_step``: see :func:`train`; ``cpu_offload``: ``parallel.offload_activations`` runs its
    logic on the CPU (tests/cpu_offload.py) instead of passing everything through."""
    batches = {name: global_batches(cfg.trainer, cfg.model.vocab_size) for name, cfg in jobs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init_file, tmp, jobs, batches, documents, nonfinite_step, cpu_offload), nprocs=world,
                 join=True)
        return {name: [torch.load(os.path.join(tmp, f"{name}_rank{r}.pt"), weights_only=False) for r in range(world)]
                for name in jobs}


def run_parallel(layout: dict, optim: OptimConfig = OPTIM, trainer: TrainerConfig = TRAINER,
                 cpu_offload: bool = False) -> dict:
    """The tiny model trained under ``layout`` (ParallelConfig fields; dp defaults to 1) on
    pp*dp*ep*tp gloo processes; returns the ranks' results merged (``offload``: every rank's)."""
    layout = {"dp": 1, **layout}
    ranks = run_jobs({"job": job(layout, optim, trainer)}, world_size(layout), cpu_offload=cpu_offload)["job"]
    return {**merged(ranks), "offload": [o for r in ranks for o in r["offload"]]}


_REFERENCE: dict = {}


def run_reference_job(cfg: JobConfig, documents: bool = False, nonfinite_step: int = 0) -> dict:
    """A job in this process, on one thread like the workers (cached per process)."""
    key = repr((cfg, documents, nonfinite_step))
    if key not in _REFERENCE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _REFERENCE[key] = train(cfg, global_batches(cfg.trainer, cfg.model.vocab_size), documents, nonfinite_step)
        finally:
            torch.set_num_threads(threads)
    return _REFERENCE[key]


def run_reference(trainer: TrainerConfig = TRAINER, optim: OptimConfig = OPTIM) -> dict:
    """The tiny model in one process (the reference of run_parallel)."""
    return run_reference_job(job(None, optim, trainer))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the tensor's scale, so near-zero entries do not blow up)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
