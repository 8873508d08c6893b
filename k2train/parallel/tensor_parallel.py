"""Tensor + sequence parallelism with DTensor's ``parallelize_module`` (Megatron-style layout).

Between blocks the residual stream is a plain local tensor ``[B, S/tp, D]`` (sequence-sharded).
Per block:
- norms: ``SequenceParallel`` (each rank normalizes its S/tp tokens; weights replicated);
- MLA: the input is all-gathered to the full sequence; the low-rank down projections
  (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms stay plain replicated modules; ``q_b_proj``
  and ``kv_b_proj`` are column-wise (whole heads per rank, rows are head-major); ``o_proj`` is
  row-wise with a reduce-scatter back to ``[B, S/tp, D]``. The module runs with its H/tp local
  heads: ``num_heads`` and the per-head ``max_logit`` buffer are resized, and QK-Clip clips each
  rank's own heads;
- dense FFN and shared expert: all-gather, column-wise gate/up, row-wise down, reduce-scatter;
- routed experts are not tensor-split (as in K2): the MoE takes the local S/tp tokens, so each tp
  rank routes its own tokens (see :mod:`expert_parallel`); the router's sequence-wise aux loss is
  made to count whole sequences by ``context_parallel.install_sequence_aux_loss`` (over tp x cp).
Embedding: vocab-parallel (row-wise on the vocabulary) with a reduce-scatter to the sequence shard.
Head: column-wise on the vocabulary with DTensor logits for ``loss_parallel`` cross entropy.

Tensor parallelism is always sequence-parallel here. It needs explicit full-length
``position_ids`` inside the model, which a pre-hook supplies when the caller passes none.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from k2train.model.moe import MoE


def _full_position_ids(tp: int):
    """The model derives positions from its input's length, which under sequence parallelism is
    S/tp for a pipeline stage that receives hidden states (and S/tp after the embedding shards the
    tokens): give it the full-length positions when the caller passes none."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if kwargs.get("position_ids") is not None or len(args) >= 2:
            return args, kwargs
        if args and args[0] is not None:  # tokens [B, S]
            (B, S), device = args[0].shape, args[0].device
        elif kwargs.get("hidden") is not None:  # a later pipeline stage: this rank's [B, S/tp, D]
            B, S, device = kwargs["hidden"].shape[0], kwargs["hidden"].shape[1] * tp, kwargs["hidden"].device
        else:
            return args, kwargs
        return args, dict(kwargs, position_ids=torch.arange(S, device=device).expand(B, S))

    return hook


def _block_plan(block: nn.Module) -> dict:
    attn_inputs = (Shard(1), None, None, None)
    plan = {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(
            input_layouts=attn_inputs,
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=True,
        ),
        "self_attn.q_b_proj": ColwiseParallel(),
        "self_attn.kv_b_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
    }
    ffn_plan = lambda prefix: {  # noqa: E731
        prefix: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
        f"{prefix}.gate_proj": ColwiseParallel(),
        f"{prefix}.up_proj": ColwiseParallel(),
        f"{prefix}.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    if isinstance(block.mlp, MoE):
        # Local tokens in, local tokens out: router and routed experts work on this rank's S/tp tokens.
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True)
        if block.mlp.shared_experts is not None:
            plan.update(ffn_plan("mlp.shared_experts"))
    else:
        plan.update(ffn_plan("mlp"))
    return plan


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Install the tensor/sequence-parallel plan on ``model`` in place (no-op for one tp rank).

    Call before :func:`~k2train.parallel.expert_parallel.apply_ep` and before building the optimizer
    (:func:`k2train.parallel.parallelize` keeps that order), on a layout that passed
    ``ParallelDims.validate``. Compute the loss inside :func:`loss_context` (the logits are a
    vocab-sharded DTensor).
    """
    tp = tp_mesh.size()
    if tp == 1:
        return
    top = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k, None) is not None})
    if getattr(model, "embed_tokens", None) is not None:
        model.embed_tokens.register_forward_hook(_wait_for_embedding)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block))
        attn = block.self_attn
        assert attn.num_heads % tp == 0, "ParallelDims.validate checks the heads"
        attn.num_heads //= tp
        attn.max_logit = torch.full((attn.num_heads,), float("-inf"), device=attn.max_logit.device)
        attn.kv_a_proj_with_mqa.register_forward_hook(_rope_key_grad_hook(attn.qk_rope_head_dim, tp_mesh.get_group()))
    model.register_forward_pre_hook(_full_position_ids(tp), with_kwargs=True)


def _wait_for_embedding(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    """The embedding's output as a plain tensor. ``RowwiseParallel`` reduce-scatters it
    asynchronously and hands on an ``AsyncCollectiveTensor``; a compiled block that takes one as
    its input gives the redistribution behind it a plain tensor for a gradient in the backward,
    where a DTensor is expected (``'Tensor' object has no attribute '_local_tensor'``, torch 2.13).
    Copying it (``[B, S/tp, D]``, once per micro-batch) waits for the collective and leaves the
    autograd path through DTensor's own conversion."""
    return out.clone()


class _SumRopeKeyGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last ``dr`` features (the rope
    key shared by every head): each tp rank's local heads contribute only their share of it. The
    latent part needs nothing: its gradient arrives complete through kv_b's column-parallel input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dr: int, group) -> torch.Tensor:
        ctx.dr, ctx.group = dr, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        rope = grad[..., -ctx.dr :].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        grad[..., -ctx.dr :] = rope
        return grad, None, None


def _rope_key_grad_hook(dr: int, group):
    def hook(_mod, _inputs, output):
        return _SumRopeKeyGrad.apply(output, dr, group)

    return hook


def loss_context(tp_mesh):
    """``loss_parallel()`` when the logits are vocab-sharded (tp > 1), else a no-op context. Wrap
    both the cross entropy and its ``backward()``."""
    return loss_parallel() if tp_mesh is not None and tp_mesh.size() > 1 else contextlib.nullcontext()


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor loss as a plain tensor (same value on every tp rank), gradient kept."""
    return loss.to_local() if hasattr(loss, "to_local") else loss
