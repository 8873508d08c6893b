"""Every parallelism, applied to a model built on the meta device, in one fixed order.

    pipeline split (pp > 1)   this rank's stages, each a K2Model with the other layers removed,
                              and the schedule that runs them
    then, on each part:
      tensor parallelism      DTensor plan, sequence-parallel between blocks   (apply_tp)
      context parallelism     Ulysses all-to-alls around the attention core    (apply_cp)
      sequence aux loss       the MoE's balance loss over whole sequences      (install_sequence_aux_loss)
      expert parallelism      this rank's experts + the token all-to-all       (apply_ep)
      activation recompute    none / selective / full per block               (apply_recompute)
      FP8 storage, offload    of what the blocks keep for the backward        (apply_fp8_storage, apply_offload)
      torch.compile           per block                                        (apply_compile)

Why this order: the pipeline split decides which layers this rank holds; TP changes parameter
types (DTensor) and the heads each rank holds, which Ulysses splits again over cp; EP changes the
experts' shapes, which recompute and compile must see as final; compile goes last so that it
traces the parallel code. The parts stay on the meta device: the caller
materializes them (``to_empty`` + ``init_weights``) and builds the optimizer on the result. The
trainer, the tests and the scripts all go through :func:`parallelize`.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..config import ParallelConfig
from .activation_memory import ActivationOffload, apply_fp8_storage, apply_offload
from .compile import apply_compile
from .context_parallel import apply_cp, install_sequence_aux_loss
from .dims import ParallelDims
from .expert_parallel import apply_ep
from .pipeline import Pipeline, build_pipeline
from .recompute import apply_recompute
from .tensor_parallel import apply_tp


@dataclass
class ParallelModel:
    """What this rank holds: its model parts (one, or one per pipeline stage) and the pipeline
    (None without pipeline parallelism)."""

    parts: list[nn.Module]
    pipeline: Optional[Pipeline] = None


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    cfg: ParallelConfig,
    *,
    compile: bool,
    compile_mode: str = "default",
    seq_len: int,
    micro_batch_size: int,
    num_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    head_in_loss: bool = False,
    hidden_dtype: Optional[torch.dtype] = None,
) -> ParallelModel:
    """Apply the layout of ``dims`` (mesh built when there is more than one process) to ``model``
    (a :class:`~k2train.model.K2Model`, on the meta device). ``loss_fn(output, labels)`` is the
    pipeline's last-stage loss (``head_in_loss``: the last stage outputs hidden states and the loss
    runs the LM head, as the chunked loss does); ``seq_len``, ``micro_batch_size`` and
    ``num_microbatches`` size the pipeline's buffers and schedule; ``hidden_dtype`` is the dtype of
    the hidden states between stages (default: the model's, fp32 under autocast; bf16 weights make
    a bf16 residual stream)."""
    pipeline = None
    parts = [model]
    if dims.pp > 1:
        pipeline = build_pipeline(
            model,
            dims.pp_mesh,
            cfg,
            num_microbatches=num_microbatches,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            loss_fn=loss_fn,
            device=device,
            head_in_loss=head_in_loss,
            hidden_dtype=hidden_dtype,
        )
        parts = pipeline.model_parts
    offload = ActivationOffload() if cfg.offload_activations else None  # one side stream for all parts
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, dims.tp_mesh)
        if dims.cp > 1:
            apply_cp(part, dims.cp_mesh)
        if dims.tp * dims.cp > 1:
            install_sequence_aux_loss(part, dims.sequence_mesh.get_group())
        if dims.ep > 1:
            apply_ep(part, dims.ep_mesh)
        if cfg.recompute != "none":
            apply_recompute(part, cfg.recompute)
        if cfg.fp8_moe_inputs:
            apply_fp8_storage(part)
        if offload is not None:
            apply_offload(part, offload, cfg.offload_layers)
        if compile:
            apply_compile(part, mode=compile_mode)
    return ParallelModel(parts, pipeline)
