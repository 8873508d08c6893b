"""Parity harness: train the tiny K2 under a parallel layout (N gloo processes on CPU) and under one
process, on the same global batches, and return both runs' losses, step-1 gradients and final
parameters (gathered to full tensors) for comparison.

Setup shared by both runs: fp32, identical init (same seed on every rank, then the layout is
applied), fixed random tokens; the union of the dp x ep ranks' micro-batches is the global batch.
Each step: forward/backward over the micro-batches, gradient reduction, global-norm clipping,
MuonClip step (Newton-Schulz in fp32 so that both runs round alike), QK-Clip at a low tau (it
fires), aux-loss-free router-bias update from the global expert load.

Use: ``run_layout(dict(tp=2, ep=2))`` -> (reference, parallel) dicts; see test_parallel_parity.py.
Part B's pipeline layouts plug in through ``step_fn`` (see :func:`train`).
"""

import dataclasses
import os
import socket
import tempfile
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from k2train.config import ModelConfig, OptimConfig, ParallelConfig, TrainerConfig
from k2train.model import K2Model, update_router_bias_
from k2train.optim import build_optimizer
from k2train.optim.qk_clip import apply_qk_clip, attention_modules

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
TRAINER = TrainerConfig(steps=5, seq_len=16, micro_batch_size=2, global_batch_size=8, grad_clip=1.0)
SEED = 1234
DATA_SEED = 99


def global_batches(trainer: TrainerConfig = TRAINER, vocab: int = TINY.vocab_size) -> torch.Tensor:
    """[steps, global_batch, seq_len + 1] fixed tokens (inputs = [..., :-1], labels = [..., 1:])."""
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, vocab, (trainer.steps, trainer.global_batch_size, trainer.seq_len + 1), generator=g)


def build_tiny(cfg: ModelConfig = TINY) -> K2Model:
    torch.manual_seed(SEED)
    model = K2Model(cfg)
    model.init_weights(seed=SEED)
    model.train()
    return model


# ---------------------------------------------------------------------------------------------
# one step, generic over single process and layouts
# ---------------------------------------------------------------------------------------------


def micro_batches(batch: torch.Tensor, dp_rank: int, dp_size: int, micro: int) -> list[torch.Tensor]:
    """This data stream's share of one global batch, cut into micro-batches: contiguous rows."""
    rows = batch.shape[0] // dp_size
    mine = batch[dp_rank * rows : (dp_rank + 1) * rows]
    return list(mine.split(micro))


def train(model, batches, trainer=TRAINER, optim=OPTIM, dims=None, record_grads=True) -> dict:
    """Train ``trainer.steps`` steps; returns losses, step-1 grads and final params (full tensors,
    on every rank). ``dims=None``: single process (one data stream)."""
    from k2train.parallel.data_parallel import clip_grad_norm_, reduce_gradients_
    from k2train.parallel.expert_parallel import moe_modules, sum_expert_load_
    from k2train.parallel.tensor_parallel import local_loss, loss_context

    dp_rank, dp_size = (0, 1) if dims is None else (dims.dp_rank, dims.dp_size)
    tp_mesh = None if dims is None else dims.tp_mesh
    dp_group = None if dims is None or dims.dp_size == 1 else dims.dense_dp_mesh.get_group()
    tp_group = None if dims is None or dims.tp == 1 else tp_mesh.get_group()
    # The real optimizer for every layout: DTensor (tp-sharded) matrices orthogonalised whole,
    # ep-local experts per expert, ZeRO-1 when optim.zero1 (DistributedMuonClip over each param's
    # data-parallel group).
    optimizer = build_optimizer([model], optim, dims=dims)
    attn = attention_modules(model)
    moes = moe_modules(model)
    out = {"loss": [], "grad_norm": [], "clipped_heads": [], "optimizer": type(optimizer).__name__}
    for step, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        mbs = micro_batches(batch, dp_rank, dp_size, trainer.micro_batch_size)
        loss_sum = torch.zeros(())
        for mb in mbs:
            tokens, labels = mb[:, :-1], mb[:, 1:]
            with loss_context(tp_mesh):
                logits = model(tokens)
                ce = local_loss(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
                loss = ce + model.aux_loss
                (loss / len(mbs)).backward()
            loss_sum += loss.detach() / len(mbs)
        if dims is not None:
            reduce_gradients_([model], dims)
            if dp_group is not None:
                dist.all_reduce(loss_sum, group=dp_group)
                loss_sum /= dp_size
            norm = clip_grad_norm_([model], trainer.grad_clip, dims)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip)
        if step == 0 and record_grads:
            out["grads"] = full_tensors(model, dims, grads=True)
        optimizer.step()
        clip = apply_qk_clip(attn, optim.qk_clip_tau, group=dp_group, optimizer=optimizer, tp_group=tp_group)
        if dims is not None:
            sum_expert_load_(model, dims.token_mesh.get_group() if dims.token_mesh.size() > 1 else None)
        for moe in moes:
            update_router_bias_(moe, model.cfg.bias_update_rate)
        out["loss"].append(loss_sum.item())
        out["grad_norm"].append(float(norm))
        out["clipped_heads"].append(clip["clipped_heads"])
    out["params"] = full_tensors(model, dims)
    out["buffers"] = {k: v.clone() for k, v in model.named_buffers() if k.endswith("e_score_correction_bias")}
    return out


@torch.no_grad()
def full_tensors(model, dims, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as the full, unsharded tensor."""
    from k2train.parallel.expert_parallel import gather_experts, is_expert_param

    result = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if dims is not None and is_expert_param(name):
            t = gather_experts(t, dims.ep_mesh)
        result[name] = t.detach().clone()
    return result


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, layout: dict, out_path: str, apply_fn: Optional[Callable], optim: OptimConfig
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from k2train.parallel import ParallelDims
        from k2train.parallel.expert_parallel import apply_ep
        from k2train.parallel.tensor_parallel import apply_tp

        dims = ParallelDims.from_config(ParallelConfig(**layout), world).validate(TINY, TRAINER)
        dims.build_mesh("cpu")
        model = build_tiny()
        # The fixed order: TP, then EP (then the optimizer is built on the final parameters).
        apply_tp(model, dims.tp_mesh, dims.sequence_parallel)
        apply_ep(model, dims.ep_mesh)
        if apply_fn is not None:
            apply_fn(model, dims)
        result = train(model, global_batches(), optim=optim, dims=dims)
        if rank == 0:
            torch.save(result, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_parallel(layout: dict, apply_fn: Optional[Callable] = None, optim: OptimConfig = OPTIM) -> dict:
    """Spawn pp*dp*ep*tp gloo processes training the tiny model under ``layout`` (ParallelConfig
    fields, e.g. ``dict(tp=2, ep=2)``; dp defaults to 1) with ``optim`` (``OPTIM_ZERO1``: ZeRO-1).
    Returns rank 0's result."""
    layout = dict(layout)
    layout.setdefault("dp", 1)
    world = layout.get("pp", 1) * layout["dp"] * layout.get("ep", 1) * layout.get("tp", 1)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, _free_port(), layout, out_path, apply_fn, optim), nprocs=world, join=True)
        return torch.load(out_path, weights_only=False)


_REFERENCE: dict = {}


def run_reference() -> dict:
    """The single-process run (cached per process)."""
    if "ref" not in _REFERENCE:
        torch.set_num_threads(1)
        _REFERENCE["ref"] = train(build_tiny(), global_batches())
    return _REFERENCE["ref"]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative to the tensor's scale, so near-zero entries do not blow up)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
