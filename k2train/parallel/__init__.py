"""Parallelism applied from outside the model, in one fixed order (docs/parallelism.md):
ParallelDims + build_mesh -> apply_tp -> apply_ep -> optimizer -> per step: reduce_gradients_,
clip_grad_norm_, step, QK-Clip, sum_expert_load_ + router-bias update."""

from .data_parallel import clip_grad_norm_, reduce_gradients_, replica_groups
from .dims import MESH_AXES, ParallelDims, backend_for
from .expert_parallel import apply_ep, gather_experts, is_expert_param, sum_expert_load_
from .tensor_parallel import apply_tp, local_loss, loss_context

__all__ = [
    "MESH_AXES",
    "ParallelDims",
    "backend_for",
    "apply_tp",
    "apply_ep",
    "loss_context",
    "local_loss",
    "reduce_gradients_",
    "clip_grad_norm_",
    "replica_groups",
    "sum_expert_load_",
    "gather_experts",
    "is_expert_param",
]
