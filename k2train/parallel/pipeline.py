"""Pipeline parallelism with ``torch.distributed.pipelining``: split, stages, schedule, one step.

Layout: ``pp`` ranks x ``vpp`` virtual stages each, ``num_stages = pp * vpp``. Stage ``s`` holds a
contiguous run of layers and lives on pp rank ``s % pp`` (interleaved: rank r holds stages r, r+pp,
...). Stage 0 also holds the embedding, the last stage the final norm, the LM head and the loss.

Each stage's model part is the full :class:`~k2train.model.K2Model` with the other layers removed
(``embed_tokens`` / ``norm`` / ``lm_head`` set to None where absent), so parameter names stay the
model's own (``layers.7.mlp...``): the optimizer grouping, QK-Clip and checkpoints see the same
FQNs as in one process. Split a model built on the meta device; the parts stay on meta and are
materialized afterwards (``to_empty`` + init), after TP/EP have been applied to them.

MoE auxiliary loss across stages: the loss function only sees the last stage's output, but every
MoE layer's aux loss must reach the total loss ``CE + sum of aux``. Each stage module attaches the
aux loss of its own layers to its output tensor with :class:`_AttachAuxLoss`, an identity in the
forward whose backward also returns gradient 1 for the aux loss. That is exactly the gradient of
``CE + aux`` with respect to the aux loss; the gradients then hold the sum over micro-batches, as
in the single-process loop, and the trainer divides by their number once.
"""

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig, ParallelConfig
from ..flops import count_params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# layer placement (pure functions)
# ---------------------------------------------------------------------------------------------


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """Forward FLOPs per token of each layer, of the embedding and of the head + loss.

    Counted from the model built on the meta device (:func:`k2train.flops.count_params`): 2 x the
    activated matmul weights + the causal attention scores; the head adds the softmax/CE (~5 V
    flops, small). The embedding is a lookup: no FLOPs, its cost is memory, which the planner
    (:mod:`k2train.parallel.memory`) reports per rank.
    """
    counts = count_params(cfg)
    scores = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    costs = [2.0 * (lc.attention + lc.ffn + lc.router + lc.routed_active) + scores for lc in counts.layers]
    head = 2.0 * counts.head + 5.0 * cfg.vocab_size
    return costs, 0.0, head


def split_layers(
    costs: Sequence[float], num_stages: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> list[list[int]]:
    """Contiguous layers per stage (at least one each) minimizing the most expensive stage.

    Stage 0 also pays ``first_extra`` (embedding) and the last stage ``last_extra`` (head + loss).
    Among the splits with the optimal maximum, the one with the smallest sum of squared stage
    costs is chosen (the most even), so the result does not depend on tie order.
    """
    n = len(costs)
    if num_stages < 1 or n < num_stages:
        raise ValueError(
            f"{n} layers cannot fill {num_stages} pipeline stages (at least one layer each): lower parallel.pp or parallel.vpp"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(s: int, i: int, j: int) -> float:  # stage s holds layers i..j-1
        extra = (first_extra if s == 0 else 0.0) + (last_extra if s == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    def solve(objective, limit: float) -> list[list[int]]:
        # best[s][j]: best objective for layers 0..j-1 over stages 0..s-1 (each stage <= limit).
        inf = math.inf
        best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
        arg = [[-1] * (n + 1) for _ in range(num_stages + 1)]
        best[0][0] = 0.0
        for s in range(1, num_stages + 1):
            for j in range(s, n - (num_stages - s) + 1):
                for i in range(s - 1, j):
                    if best[s - 1][i] == inf:
                        continue
                    c = stage_cost(s - 1, i, j)
                    if c > limit:
                        continue
                    v = objective(best[s - 1][i], c)
                    if v < best[s][j]:
                        best[s][j], arg[s][j] = v, i
        bounds, j = [], n
        for s in range(num_stages, 0, -1):
            i = arg[s][j]
            bounds.append((i, j))
            j = i
        return [list(range(i, j)) for i, j in reversed(bounds)]

    minmax = solve(max, math.inf)
    limit = max(stage_cost(s, st[0], st[-1] + 1) for s, st in enumerate(minmax))
    return solve(lambda acc, c: acc + c * c, limit * (1 + 1e-12))


def stage_ids_for_rank(pp_rank: int, pp: int, vpp: int) -> list[int]:
    """Interleaved placement: rank r holds stages r, r + pp, r + 2 pp, ..."""
    return [pp_rank + v * pp for v in range(vpp)]


# ---------------------------------------------------------------------------------------------
# model split
# ---------------------------------------------------------------------------------------------


def build_stage_part(model: nn.Module, layer_ids: Sequence[int], is_first: bool, is_last: bool) -> nn.Module:
    """A copy of ``model`` that keeps only ``layer_ids`` (plus embedding / norm + head where due).

    The dropped modules are never copied (cheap for a materialized model too); on the meta device
    the copy costs nothing.
    """
    keep = {str(i) for i in layer_ids}
    memo: dict[int, object] = {}
    for name, layer in model.layers.items():
        if name not in keep:
            memo[id(layer)] = None
    if not is_first:
        memo[id(model.embed_tokens)] = None
    if not is_last:
        memo[id(model.norm)] = None
        memo[id(model.lm_head)] = None
    part = copy.deepcopy(model, memo)
    for name in [k for k, v in part.layers._modules.items() if v is None]:
        del part.layers._modules[name]
    return part


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; in the backward, ``aux`` receives gradient 1 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_x, torch.ones(shape, dtype=dtype, device=device)


class PipelineStageModule(nn.Module):
    """What a ``PipelineStage`` runs: the part's forward, plus its layers' MoE aux loss attached.

    ``forward(x, position_ids=None, doc_ids=None)``: ``x`` is tokens [B, S] on the first stage and
    hidden states [B, S, D] elsewhere. ``aux_loss_sum`` accumulates the (detached) aux loss of the
    micro-batches of the current step, for metrics; :func:`pipeline_step` resets it.
    """

    def __init__(self, part: nn.Module, is_first: bool, head: bool = True):
        super().__init__()
        self.part = part
        self.is_first = is_first
        self.head = head
        self.aux_loss_sum = 0.0

    def forward(self, x, position_ids=None, doc_ids=None):
        if self.is_first:
            out = self.part(x, position_ids=position_ids, doc_ids=doc_ids, head=self.head)
        else:
            out = self.part(None, position_ids=position_ids, doc_ids=doc_ids, hidden=x, head=self.head)
        if any(True for _ in self.part.moe_layers()):
            aux = self.part.aux_loss
            self.aux_loss_sum = self.aux_loss_sum + aux.detach()
            if aux.requires_grad and torch.is_grad_enabled():
                out = _AttachAuxLoss.apply(out, aux)
        return out


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """One rank's share of the pipeline. ``model_parts`` go to the optimizer, QK-Clip, router-bias
    updates, grad clipping and checkpoints; ``schedule`` runs a step (see :func:`pipeline_step`)."""

    schedule: object
    model_parts: list[nn.Module]
    stage_modules: list[PipelineStageModule]
    stage_ids: list[int]
    layer_split: list[list[int]]
    num_microbatches: int
    pp_group: Optional[object] = None
    has_first_stage: bool = False
    has_last_stage: bool = False
    stages: list = field(default_factory=list)


def build_pipeline(
    model: nn.Module,
    pp_mesh,
    parallel_cfg: ParallelConfig,
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_len: int,
    loss_fn: LossFn,
    device: Optional[torch.device] = None,
    layer_split: Optional[list[list[int]]] = None,
    head_in_loss: bool = False,
    hidden_dtype: Optional[torch.dtype] = None,
) -> Pipeline:
    """Split ``model`` (a K2Model, ideally on the meta device) into this pp rank's stages and build
    the schedule (``parallel_cfg.pp_schedule``: 1F1B, GPipe, or Interleaved1F1B with ``vpp``).

    ``loss_fn(logits, labels)`` is the next-token cross entropy of one micro-batch (mean over its
    tokens); the MoE aux losses are added through the stage outputs (module docstring). The
    schedule leaves the SUM over micro-batches in the gradients, as the one-process loop does
    (:func:`k2train.parallel.clip_grad_norm_` applies the mean's factor).
    ``layer_split`` overrides the FLOP-balanced placement (:func:`split_layers`). ``head_in_loss``:
    the last stage returns the final hidden states and ``loss_fn`` runs the LM head (chunked loss).
    ``hidden_dtype``: of the hidden states the stages exchange (default: the model's parameters').
    The stage modules hold the parts by reference: apply TP/EP and materialize the parts after this
    call, before the first step. The layout must have passed ``ParallelDims.validate``.
    """
    # torch.distributed.pipelining takes ~1 s to import: only pipeline runs pay for it.
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import get_schedule_class

    pp, vpp = parallel_cfg.pp, parallel_cfg.vpp
    assert pp_mesh.size() == pp and num_microbatches >= pp, "ParallelDims.validate checks the layout"
    num_stages = pp * vpp
    schedule_name = parallel_cfg.pp_schedule
    if layer_split is None:
        costs, first_extra, last_extra = layer_costs(model.cfg, seq_len)
        layer_split = split_layers(costs, num_stages, first_extra, last_extra)
    if len(layer_split) != num_stages or sorted(i for s in layer_split for i in s) != list(range(len(model.layers))):
        raise ValueError(f"layer_split={layer_split} must list every layer once over pp*vpp = {num_stages} stages")

    pp_group = pp_mesh.get_group()
    pp_rank = pp_mesh.get_local_rank()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = hidden_dtype or next(model.parameters()).dtype  # of the hidden states between stages
    # Static shapes (no shape-inference pass). requires_grad tells the stage which tensors have
    # gradients to exchange in the backward. Under context parallelism each rank holds S/cp tokens
    # of a sequence; under tensor (+ sequence) parallelism the hidden states between stages are
    # each tp rank's sequence shard of those [B, S/cp/tp, D].
    local = seq_len // parallel_cfg.cp
    hidden = torch.empty(micro_batch_size, local // parallel_cfg.tp, model.cfg.hidden_size, dtype=dtype, device="meta",
                         requires_grad=True)
    tokens = torch.empty(micro_batch_size, local, dtype=torch.long, device="meta")
    out_dim = model.cfg.hidden_size if head_in_loss else model.cfg.vocab_size
    logits = torch.empty(micro_batch_size, local, out_dim, dtype=dtype, device="meta", requires_grad=True)

    stage_ids = stage_ids_for_rank(pp_rank, pp, vpp)
    parts, modules, stages = [], [], []
    for s in stage_ids:
        is_first, is_last = s == 0, s == num_stages - 1
        part = build_stage_part(model, layer_split[s], is_first, is_last)
        module = PipelineStageModule(part, is_first, head=not head_in_loss)
        stage = PipelineStage(
            module,
            stage_index=s,
            num_stages=num_stages,
            device=device,
            input_args=(tokens if is_first else hidden,),
            output_args=(logits if is_last else hidden,),
            group=pp_group,
        )
        parts.append(part)
        modules.append(module)
        stages.append(stage)

    schedule_cls = get_schedule_class(schedule_name)
    if schedule_name == "Interleaved1F1B":
        schedule = schedule_cls(stages, n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = schedule_cls(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(
        schedule=schedule,
        model_parts=parts,
        stage_modules=modules,
        stage_ids=stage_ids,
        layer_split=layer_split,
        num_microbatches=num_microbatches,
        pp_group=pp_group,
        has_first_stage=0 in stage_ids,
        has_last_stage=num_stages - 1 in stage_ids,
        stages=stages,
    )


@dataclass
class PipelineStepResult:
    """Losses of one step, the same on every pp rank: ``ce`` is the mean over micro-batches of the
    per-micro-batch cross entropy, ``aux`` the mean over micro-batches of the summed MoE aux loss
    (all layers, all stages); ``loss = ce + aux`` is what the gradients are of."""

    ce: torch.Tensor
    aux: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.ce + self.aux


def pipeline_step(
    pipe: Pipeline,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    doc_ids: Optional[torch.Tensor] = None,
    forward_only: bool = False,
) -> PipelineStepResult:
    """Forward + backward of one step over this rank's whole local batch ``tokens`` [B, S]
    (B = num_microbatches x micro_batch_size); gradients end up in the parts' ``.grad``.
    ``forward_only``: the forward alone (the schedule's ``eval``; call it under ``torch.no_grad()``).

    Every pp rank passes the same tokens/labels (only the first stage reads tokens, the last
    labels, every stage the optional position/doc ids). Then one all-reduce over the pp group
    gives every rank the loss (host sync only when the caller calls ``.item()``).
    """
    for m in pipe.stage_modules:
        m.aux_loss_sum = 0.0
    # torch <= 2.11 checks stage inputs' strides against the static shapes: pass contiguous tensors
    # (a [:, :-1] slice of a token block is not).
    kwargs = {k: v.contiguous() for k, v in (("position_ids", position_ids), ("doc_ids", doc_ids)) if v is not None}
    tokens, labels = tokens.contiguous(), labels.contiguous()
    losses: list[torch.Tensor] = []
    args = (tokens,) if pipe.has_first_stage else ()
    target = labels if pipe.has_last_stage else None
    # return_outputs=False: otherwise the last stage keeps every micro-batch's logits until the end
    # of the step (m x B x S x V). Older torch has no such switch.
    if "return_outputs" in inspect.signature(pipe.schedule.step).parameters:
        kwargs["return_outputs"] = False
    (pipe.schedule.eval if forward_only else pipe.schedule.step)(*args, target=target, losses=losses, **kwargs)

    device = tokens.device if tokens.device.type != "meta" else torch.device("cpu")
    stats = torch.zeros(2, dtype=torch.float32, device=device)
    if pipe.has_last_stage:
        stats[0] = torch.stack([loss.detach().float() for loss in losses]).mean()
    for m in pipe.stage_modules:
        if torch.is_tensor(m.aux_loss_sum):
            stats[1] += m.aux_loss_sum.float().to(device) / pipe.num_microbatches
    if pipe.pp_group is not None and dist.get_world_size(pipe.pp_group) > 1:
        dist.all_reduce(stats, group=pipe.pp_group)
    return PipelineStepResult(ce=stats[0], aux=stats[1])
