"""The planner's memory model: bytes per GPU for a model, a parallel layout and a batch.

Per pipeline rank (ranks differ: embedding on the first, head + loss on the last, more in-flight
micro-batches early in the pipeline):
- weights, gradients, fp32 master copies and optimizer states, from the parameters this rank
  really holds: the model is built on the meta device, split with the pipeline's own placement
  (:func:`k2train.parallel.pipeline.split_layers`), experts divided by ``ep``, TP-sharded matrices
  by ``tp``. ZeRO-1 shards masters and states over the replicas of each parameter (dense: dp x ep,
  experts: dp x tp);
- activations: bytes saved for the backward per token and layer, by recompute mode, counted
  tensor by tensor for this code base's layers (docs/planner.md lists them), times the micro-batches
  in flight under the schedule (1F1B: ``pp - rank``; interleaved: torch's warm-up count + 1 chunks;
  GPipe: all);
- transient buffers: the head's logits and log-softmax (last stage), EP all-to-all buffers,
  pipeline send/receive buffers, one gradient bucket of the DP all-reduce.

Precision modes: ``fp32`` (everything fp32), ``autocast`` (fp32 weights/grads/states, bf16
activations: ``trainer.dtype=bfloat16``), ``bf16`` (K2/Megatron: bf16 weights, fp32 gradients,
fp32 masters inside the ZeRO-1-sharded optimizer state: ``trainer.param_dtype=bfloat16`` too).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, OptimConfig, ParallelConfig, TrainerConfig
from ..model import K2Model
from ..optim.grouping import is_muon_param
from ..optim.muon import ns_chunks
from .data_parallel import BUCKET_BYTES
from .activation_memory import offloaded_blocks
from .expert_parallel import is_expert_param
from .pipeline import build_stage_part, layer_costs, split_layers

GiB = 1024**3
# Parameters that the TP plan shards over tp (docs/parallelism.md); the rest are replicated.
_TP_SHARDED = ("q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")
PRECISIONS = {
    # name: (param bytes, grad bytes, master bytes, activation bytes)
    "fp32": (4, 4, 0, 4),
    "autocast": (4, 4, 0, 2),
    "bf16": (2, 4, 4, 2),
}


@dataclass
class RankMemory:
    """One pp rank's bytes (every dp/ep/tp rank of that pipeline position holds the same)."""

    pp_rank: int
    stage_ids: list[int]
    num_layers: int
    num_params: int  # held by this rank (experts / ep, TP-sharded / tp)
    params: float
    grads: float
    master: float
    optimizer: float
    activations_per_microbatch: float  # one micro-batch through all of this rank's stages
    in_flight: float  # micro-batches whose activations are alive at the peak
    activations: float
    transient: float  # head logits / log-softmax, all-to-all, p2p and gradient buckets
    host: float = 0.0  # pinned CPU memory holding the offloaded activations (offload_activations)
    # Gradients alive at the activation peak: all of them once an earlier micro-batch's backward
    # has run on this rank (gradient accumulation, pipeline steady state); with one micro-batch per
    # step only the LM head's, the backward's first (the rest are allocated as activations free).
    grads_at_activation_peak: Optional[float] = None
    # What else is alive when the backward ends: under autocast with a pipeline, the dense weights'
    # bf16 copies (autocast's cache holds them to the end of the step; the one-process loop drops
    # it before the last backward).
    transient_at_backward_end: float = 0.0
    # The optimizer step's workspace beside every gradient: Muon's largest Newton-Schulz batch.
    optimizer_transient: float = 0.0

    @property
    def total(self) -> float:
        """The largest of the three phases: the activation peak (end of the forward), the end of the
        backward (every gradient, activations gone) and the optimizer step."""
        return max(self.phases.values())

    @property
    def phases(self) -> dict[str, float]:
        """Bytes alive at the end of the forward, the end of the backward and in the optimizer step."""
        static = self.params + self.master + self.optimizer
        grads = self.grads if self.grads_at_activation_peak is None else self.grads_at_activation_peak
        return {
            "the activation peak": static + grads + self.activations + self.transient,
            "the end of the backward": static + self.grads + self.transient_at_backward_end,
            "the optimizer step": static + self.grads + self.optimizer_transient,
        }


@dataclass
class MemoryPlan:
    ranks: list[RankMemory]
    precision: str
    recompute: str
    dp: int
    world_size: int
    num_microbatches: int
    tokens_per_step: int
    bubble_fraction: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)


# ---------------------------------------------------------------------------------------------
# activations (pure functions)
# ---------------------------------------------------------------------------------------------


def norm_bytes(dim: int, a: int, input_bytes: Optional[int] = None, consumers: int = 1) -> float:
    """RMSNorm (fp32 inside): the fp32 input (a copy when the input is bf16), the normalized value
    in the input's dtype (saved by the weight multiply) and the output (saved by the next matmul).
    Under autocast with an fp32 input (the residual stream: ``input_bytes=4``, ``a=2``) the
    normalized value and the output are fp32 and each of the output's ``consumers`` (matmuls) keeps
    its own bf16 copy of it (measured on the K2-width proxy on an H200: scripts/saved_tensors.py)."""
    if input_bytes == 4 and a == 2:
        return 4 * dim + 4 * dim + consumers * a * dim
    return 4 * dim + 2 * a * dim


def layer_activation_bytes(
    cfg: ModelConfig,
    moe: bool,
    seq_len: int,
    recompute: str,
    a: int,
    tp: int = 1,
    fp8_moe_inputs: bool = False,
    residual_bytes: Optional[int] = None,
) -> float:
    """Bytes one token leaves saved for the backward in one block, per the ops of k2train.model.

    ``a``: activation bytes (2 bf16, 4 fp32). Eager attention also saves the fp32 softmax
    probabilities (H x S per token); the fused kernels (sdpa/triton) save q, k, v, out and the
    log-sum-exp instead. ``fp8_moe_inputs``: the routed experts keep only their input and the SwiGLU
    inputs, as FP8 (e4m3, 1x128 tiles + fp32 scales; k2train.kernels.moe.expert_mlp_saved), and the
    combine keeps the expert outputs.
    ``residual_bytes``: bytes of the residual stream (the block input), default ``a``; under
    autocast it stays fp32 (4) since the embedding and the residual adds run outside autocast.
    Recompute modes are k2train/parallel/recompute.py's (tests/test_recompute.py measures them).
    """
    D, H = cfg.hidden_size, cfg.num_attention_heads // tp
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qr, kr = cfg.q_lora_rank, cfg.kv_lora_rank
    E, K, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    Is = cfg.moe_intermediate_size * cfg.n_shared_experts // tp
    F = cfg.intermediate_size // tp
    eager = cfg.attn_impl == "eager"
    # bytes of the expert input and of the SwiGLU inputs (gate, up outputs) per element
    e = 1 + 4 / 128 if fp8_moe_inputs else a
    probs = 4 * H * seq_len if eager else 0
    # the fp32 router (k2train.kernels.split_matmul) keeps its input as it comes: under autocast
    # the norm's fp32 output (or its two bf16 parts), which the other consumers keep only as bf16
    # copies; a bf16 input is the norm's output that the others keep too
    residual = residual_bytes or a
    router_copy = 4 * D if a == 2 and residual == 4 else 0
    fused_swiglu = 3 if cfg.moe_impl == "triton" else 4  # gate, up, h (+ silu(gate) unfused)
    ffn_saved = 3 if cfg.mlp_impl == "triton" else 4  # the same for the dense/shared SwiGLU FFN
    if recompute == "full":
        return residual * D  # the block input; the layer is recomputed in its backward
    if recompute == "selective":
        # K2 (k2train/parallel/recompute.py): norms, SwiGLU, RoPE, the MLA up-projections (q_b,
        # kv_b and what follows up to attention) and casts are recomputed; their inputs stay.
        attn = a * (qr + kr + dr + H * dv) + 4 * H + probs
        # routed experts: the grouped GEMMs' outputs (gate, up, down); with FP8 storage the expert
        # MLP is one kept op: its FP8 input, gate and up, and its bf16 output
        experts = e * (K * D + 2 * K * I) + (a * K * D if fp8_moe_inputs else 0)
        mlp = experts + a * 2 * Is + 4 * E + router_copy if moe else a * 2 * F
        return a * D + attn + mlp  # + o_proj's output (the FFN's down_proj output is not kept)
    if recompute != "none":
        raise ValueError(f"parallel.recompute={recompute!r} must be none, selective or full")
    attn = (
        norm_bytes(qr, a)  # q_a_layernorm
        + a * (kr + dr)  # kv_a output (the norm reads a view of it, rope the k_rope view)
        + norm_bytes(kr, a) - 4 * kr * (a == 4)  # kv_a_layernorm: its input is the view above
        + 2 * a * H * (dn + dr)  # q and k after cat (rope saves only its cos/sin: buffer rows)
        + a * H * dv  # v, made contiguous for the attention (the kv_b output itself is not kept)
        + a * H * dv  # attention output, reshaped for o_proj
        + (probs if eager else a * H * dv + 4 * H)  # fused kernels keep their own output and the lse
    )
    if moe:
        # permuted input, gate, up | down output (kept by the combine), silu, h; with FP8 storage
        # only the first three (as FP8) and the down output
        experts = e * (K * D + 2 * K * I) + (a * K * D if fp8_moe_inputs else a * (K * D + (fused_swiglu - 2) * K * I))
        mlp = (
            4 * E + router_copy  # sigmoid scores (fp32)
            + experts
            + a * ffn_saved * Is  # shared expert
            + 16 * K  # expert indices (int64), gate weights
        )
        mlp_norm = norm_bytes(D, a, residual, consumers=2 if Is else 0)  # shared gate_proj, up_proj
    else:
        mlp = a * ffn_saved * F
        mlp_norm = norm_bytes(D, a, residual, consumers=2)  # gate_proj, up_proj
    return norm_bytes(D, a, residual, consumers=2) + attn + mlp_norm + mlp  # q_a_proj, kv_a_proj read the first


def layer_backward_bytes(
    cfg: ModelConfig,
    moe: bool,
    seq_len: int,
    recompute: str,
    a: int,
    tp: int = 1,
    fp8_moe_inputs: bool = False,
    residual_bytes: Optional[int] = None,
) -> float:
    """Bytes per token a block's backward holds beyond what the block kept: with full recompute
    the whole forward's activations again; in every mode the gradient stream (the gradient of the
    block's output and the sum building up for its input, in the residual's dtype, and the
    gradient's cast into the MLP) and the MLP's largest temporaries: the routed experts'
    output gradients (K x D) when their backward starts, or d(h), d(gate) and d(up) in the SwiGLU
    backward (for the dense FFN: its d(h), d(gate), d(up)); with FP8 storage the experts' MLP is one
    backward op, holding at its end the output gradients, its input's and d(gate), d(up). Traced
    (scripts/trace_memory.py) on the K2-width proxy: the peak is where the routed experts' backward
    starts."""
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    residual = residual_bytes or a
    stream = (2 * residual + a) * D
    if moe and fp8_moe_inputs:  # the FP8-stored MLP's backward is one op: at its end d(y), d(x), d(gate), d(up)
        mlp = a * K * (2 * D + 2 * cfg.moe_intermediate_size)
    elif moe:
        mlp = max(a * K * D, 3 * a * K * cfg.moe_intermediate_size)
    else:
        mlp = 3 * a * cfg.intermediate_size // tp
    recomputed = 0.0
    if recompute == "full":
        recomputed = layer_activation_bytes(cfg, moe, seq_len, "none", a, tp, fp8_moe_inputs, residual_bytes)
        if moe and cfg.n_shared_experts:
            # the shared expert runs after the routed ones, so its backward runs before theirs: by
            # then it has let go of what it kept (its SwiGLU's tensors and, under autocast, its
            # own bf16 copies of its input)
            Is = cfg.moe_intermediate_size * cfg.n_shared_experts // tp
            ffn_saved = 3 if cfg.mlp_impl == "triton" else 4
            recomputed -= a * ffn_saved * Is + (2 * a * D if residual == 4 and a == 2 else 0)
    return recomputed + stream + mlp


def head_activation_bytes(cfg: ModelConfig, a: int, tp: int = 1) -> float:
    """Final norm + LM head + cross entropy, per token: norm, bf16 logits, fp32 log-softmax; under
    autocast also the fp32 gradient of the upcast logits, alive beside the log-softmax in the
    cross entropy's backward (measured on k2_small at micro-batch 1 x 4096: without it the estimate
    was 12% under the 29.1 GiB peak). With the fused cross entropy (``model.loss_impl=triton``) the
    logits, kept for its backward, and their gradient, with one fp32 log-sum-exp and loss a token."""
    V = cfg.vocab_size // tp
    if cfg.loss_impl == "triton":
        return norm_bytes(cfg.hidden_size, a) + 2 * a * V + 8
    return norm_bytes(cfg.hidden_size, a) + (a * V + 4 * V if a != 4 else 0) + 4 * V


def in_flight_microbatches(schedule: str, pp: int, vpp: int, pp_rank: int, num_microbatches: int) -> float:
    """Micro-batches (in units of this rank's whole share of layers) alive at the activation peak.

    1F1B: ``min(pp - rank, m)``. Interleaved: torch's warm-up count ``(vpp-1) x per-round + 2 x
    (pp-1-rank)`` forwards plus the steady-state one, in chunks of 1/vpp of the rank's layers.
    GPipe: all micro-batches.
    """
    m = num_microbatches
    if pp == 1:
        return 1.0
    if schedule == "GPipe":
        return float(m)
    if schedule == "1F1B" and vpp == 1:
        return float(min(pp - pp_rank, m))
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = min((vpp - 1) * per_round + 2 * (pp - 1 - pp_rank), m * vpp)
    return min(warmup + 1, m * vpp) / vpp


def bubble_fraction(pp: int, vpp: int, num_microbatches: int) -> float:
    """Idle share of a step: (pp - 1) / (vpp x m + pp - 1) (Narayanan et al. 2021)."""
    if pp == 1:
        return 0.0
    return (pp - 1) / (vpp * num_microbatches + pp - 1)


# ---------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------


_STAGE_CACHE: dict[str, tuple] = {}


def _stage_params(model_cfg: ModelConfig, num_stages: int, seq_len: int, adamw_only: bool):
    """Per stage: the layer ids and ``(numel, is_expert, tp_sharded, is_muon, cast, shape, layer)`` of
    every parameter, from the model built on the meta device and split like the pipeline does
    (cached: the 1T model takes seconds). ``cast``: a matmul reads it, so autocast makes a bf16 copy
    (not the embedding table, which a lookup reads as it is); ``layer``: its block's index, or -1."""
    key = repr((model_cfg, num_stages, seq_len, adamw_only))
    if key in _STAGE_CACHE:
        return _STAGE_CACHE[key]
    with torch.device("meta"):
        model = K2Model(model_cfg)
    costs, first, last = layer_costs(model_cfg, seq_len)
    split = split_layers(costs, num_stages, first, last)
    stages = []
    for s, ids in enumerate(split):
        part = build_stage_part(model, ids, s == 0, s == num_stages - 1)
        stages.append(
            [
                (t.numel(), is_expert_param(name), any(k in name for k in _TP_SHARDED),
                 not adamw_only and is_muon_param(name, t), "embed_tokens" not in name, tuple(t.shape),
                 int(name.split(".")[1]) if name.startswith("layers.") else -1)
                for name, t in part.named_parameters()
            ]
        )
    _STAGE_CACHE[key] = (split, stages)
    return split, stages


def newton_schulz_workspace(shapes: list[torch.Size], optim_cfg: OptimConfig) -> float:
    """Bytes the optimizer step allocates beside the gradients: Muon orthogonalises its matrices one
    batch at a time (:func:`k2train.optim.muon.ns_chunks` over ``shapes``, the Muon matrices this rank
    updates), and the largest batch sets the peak: the batch itself, the iterate and its next one
    (Gram keeps about as many), plus two ``M x M`` products per matrix. Measured on the H200: 6.4
    GiB on the proxy while the previous batch's result was still held (a fourth batch)."""
    if not shapes:
        return 0.0
    elt = 4 if optim_cfg.ns_dtype == "float32" else 2
    worst = 0.0
    for (M, K), idx in ns_chunks([(sh, "any") for sh in shapes]):
        matrices = sum(shapes[i].numel() for i in idx) // (M * K)
        worst = max(worst, elt * matrices * (3 * M * K + 2 * M * M))
    return worst


def trainer_precision(trainer_cfg: TrainerConfig) -> str:
    """The precision the trainer runs: fp32; bf16 autocast over fp32 weights for
    trainer.dtype=bfloat16; K2's ``bf16`` (bf16 weights, fp32 gradients and masters) with
    trainer.param_dtype=bfloat16 too."""
    if trainer_cfg.dtype != "bfloat16":
        return "fp32"
    return "bf16" if trainer_cfg.param_dtype == "bfloat16" else "autocast"


def estimate_memory(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    trainer_cfg: TrainerConfig,
    optim_cfg: OptimConfig,
    precision: Optional[str] = None,
    dp: Optional[int] = None,
) -> MemoryPlan:
    """Per-rank memory of one training step. ``precision``: see the module docstring (default: what
    the trainer runs, :func:`trainer_precision`). ``dp``: the data-parallel degree
    when ``parallel.dp`` is -1 (default 1, the smallest run; ZeRO-1 shards shrink with more).

    ``parallel.fp8_moe_inputs`` changes what the MoE layers keep (:func:`layer_activation_bytes`);
    ``parallel.offload_activations`` moves what the blocks keep to CPU memory, and the GPU holds
    two blocks' worth: the one computing and the one being copied (out in the forward, back in the
    backward), plus, with ``parallel.offload_layers``, all of what the blocks past the offloaded
    ones keep."""
    precision = precision or trainer_precision(trainer_cfg)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {sorted(PRECISIONS)}")
    pb, gb, mb, a = PRECISIONS[precision]
    residual = pb if precision == "bf16" else 4  # autocast keeps the residual stream fp32
    p = parallel_cfg
    notes = []
    if dp is None:
        dp = p.dp if p.dp > 0 else 1
        if p.dp == -1:
            notes.append("parallel.dp=-1: assuming dp=1 (ZeRO-1 shards shrink as dp grows)")
    tp, ep, pp, vpp, cp = p.tp, p.ep, p.pp, p.vpp, p.cp
    world = pp * dp * ep * cp * tp
    dp_size = dp * ep
    seqs_per_micro = trainer_cfg.micro_batch_size
    if trainer_cfg.global_batch_size % (seqs_per_micro * dp_size):
        raise ValueError(
            f"trainer.global_batch_size={trainer_cfg.global_batch_size} is not divisible by micro_batch_size x dp x ep "
            f"= {seqs_per_micro} x {dp} x {ep}"
        )
    m = trainer_cfg.global_batch_size // (seqs_per_micro * dp_size)
    if pp > 1 and m < pp:
        notes.append(
            f"only {m} micro-batches per step for pp={pp}: the schedule needs at least {pp} (raise trainer.global_batch_size)"
        )
    S = trainer_cfg.seq_len
    tokens_mb = seqs_per_micro * S // cp  # this rank's tokens of a micro-batch (cp: a part of each sequence)
    zero_dense = dp * ep * cp if optim_cfg.zero1 else 1
    zero_expert = dp * cp * tp if optim_cfg.zero1 else 1

    split, stage_params = _stage_params(model_cfg, pp * vpp, S, optim_cfg.name == "adamw")
    ranks = []
    for r in range(pp):
        stage_ids = [r + v * pp for v in range(vpp)]
        n_local = n_cast = n_cast_expert = expert_stack = 0.0
        opt_bytes = master_bytes = 0.0
        largest_grad = 0.0
        muon_shapes = []
        layer_params: dict[int, float] = {}  # this rank's share of each block's parameters
        block_copies: dict[int, float] = {}  # bytes of their bf16 copies (not the routed experts')
        expert_copies: dict[int, float] = {}  # and of the routed experts' (which they cast themselves)
        for s in stage_ids:
            for n, expert, tp_sharded, muon, cast, shape, layer in stage_params[s]:
                if muon:  # expert stacks hold their local experts; tp-sharded matrices are gathered whole
                    muon_shapes.append(torch.Size((shape[0] // ep, *shape[1:]) if expert and len(shape) == 3 else shape))
                if expert:
                    n /= ep
                if tp > 1 and tp_sharded:
                    n /= tp
                n_local += n
                layer_params[layer] = layer_params.get(layer, 0.0) + n
                if cast and layer >= 0:
                    copies_of = expert_copies if expert else block_copies
                    copies_of[layer] = copies_of.get(layer, 0.0) + 2 * n
                n_cast += n if cast else 0.0
                if expert:
                    n_cast_expert += n
                    expert_stack = max(expert_stack, n)
                shard = zero_expert if expert else zero_dense
                states = 1 if muon else 2
                opt_bytes += 4 * states * n / shard
                master_bytes += mb * n / shard
                largest_grad = max(largest_grad, gb * n)
        layers = [i for s in stage_ids for i in split[s]]

        def layer_mb(i: int) -> float:  # bytes one micro-batch leaves in layer i
            moe = i >= model_cfg.first_k_dense_replace
            return layer_activation_bytes(model_cfg, moe, S, p.recompute, a, tp, p.fp8_moe_inputs, residual) * tokens_mb

        act_mb = sum(layer_mb(i) for i in layers)
        inflight = in_flight_microbatches(p.pp_schedule, pp, vpp, r, m)
        backward_before_peak = m > inflight  # an earlier micro-batch's backward made the gradients
        host = 0.0
        if p.offload_activations and layers:
            # Each part's first blocks offload (offloaded_blocks), the rest keep theirs. On the GPU:
            # the kept blocks of every micro-batch in flight, but the block before the loss of one
            # only (its backward follows its forward at once), and two blocks' worth of traffic (the
            # one computing, the one crossing PCIe) less the kept blocks computing after the last
            # offloaded one (each about one block's copy time).
            kept_mb = off_mb = last_mb = 0.0
            n_kept = n_off = 0
            for s in stage_ids:
                ids, head_part = split[s], s == pp * vpp - 1
                n = offloaded_blocks(len(ids), head_part, p.offload_layers)
                off_mb += sum(layer_mb(i) for i in ids[:n])
                kept_mb += sum(layer_mb(i) for i in ids[n:len(ids) - head_part])
                last_mb += layer_mb(ids[-1]) if head_part and ids else 0.0
                n_off, n_kept = n_off + n, n_kept + len(ids) - n
            crossing = min(off_mb * inflight, off_mb / n_off * max(0, 2 - n_kept)) if n_off else 0.0
            on_gpu = kept_mb * inflight + last_mb * min(1.0, inflight) + crossing
            host = act_mb * inflight - on_gpu
            inflight = on_gpu / act_mb if act_mb else 0.0
        # The loss and each layer's backward come one after the other: the largest counts. Going
        # down the layers of one micro-batch's backward (the step's first backward: no gradient
        # exists yet), each layer's backward makes its gradients and frees what it kept; with full
        # recompute a layer makes more (3.2 GiB at K2's width) than it kept (its input), so the
        # backward's peak is in the lowest MoE layer, beside the gradients of every layer above it.
        #
        # Under autocast, the bf16 copies of the weights its matmuls read (not the embedding's: a
        # lookup) are in autocast's cache at the end of the forward. The routed experts cast their
        # stacks themselves: autograd keeps those copies only when nothing recomputes them and
        # they are not FP8-stored (which recasts in the backward), else one layer's exist at a time.
        # The one-process loop empties the cache before a step's last backward: from then on a
        # copy lives while its layer keeps it for the backward (no recompute), or while its layer's
        # backward recomputes it. A pipeline's cache lives to the end of the step.
        copies = 0.0
        if precision == "autocast":
            copies = 2 * (n_cast if p.recompute == "none" and not p.fp8_moe_inputs
                          else n_cast - n_cast_expert + min(n_cast_expert, 3 * expert_stack))
        transient = copies
        if pp * vpp - 1 in stage_ids:  # the logits: of one loss chunk with trainer.loss_chunk_tokens
            chunk = min(trainer_cfg.loss_chunk_tokens or tokens_mb, tokens_mb)
            head = head_activation_bytes(model_cfg, a, tp) * chunk
            if not backward_before_peak and chunk >= tokens_mb:
                # The phase counts the LM head's gradient (the backward's first), but the cross
                # entropy's temporaries are gone when the head's backward makes it. Its matmul's
                # backward holds the logits' gradient and the weight gradient (bf16 under autocast),
                # not yet the fp32 one; the cast to fp32 comes after the logits' gradient and the
                # weight's bf16 copy are gone. (In chunks, the first chunk's backward makes it,
                # beside the next ones'.)
                V, D = model_cfg.vocab_size // tp, model_cfg.hidden_size
                head_grad = gb * V * D
                matmul_backward = a * V * chunk + (2 * V * D if precision != "fp32" else 0)
                head = max(head, matmul_backward, head_grad) - head_grad
            transient += head

        def kept_copies(i: int) -> float:  # the bf16 weight copies block i keeps for its backward
            if precision != "autocast" or p.recompute != "none":
                return 0.0
            return block_copies.get(i, 0.0) + (0.0 if p.fp8_moe_inputs else expert_copies.get(i, 0.0))

        def recast_copies(i: int) -> float:  # the copies block i's backward makes again
            if precision != "autocast":
                return 0.0
            return (block_copies.get(i, 0.0) if p.recompute != "none" else 0.0) + (
                expert_copies.get(i, 0.0) if p.recompute != "none" or p.fp8_moe_inputs else 0.0)

        made = 0.0  # gradients made less activations freed by the layers whose backward has run
        kept_below = sum(kept_copies(i) for i in layers)  # copies kept by the blocks not yet done
        for i in reversed(layers):
            moe = i >= model_cfg.first_k_dense_replace
            alive = kept_below + recast_copies(i) if pp == 1 else copies
            kept_below -= kept_copies(i)
            # the FP8-stored experts' backward (one op) returns their three weight gradients at once
            # (bf16 for bf16 weights, else cast to the weights' fp32 as each is made)
            expert_grads = expert_copies.get(i, 0.0) * (1 if precision == "bf16" else 2) if p.fp8_moe_inputs else 0.0
            transient = max(transient, made + alive + expert_grads + layer_backward_bytes(
                model_cfg, moe, S, p.recompute, a, tp, p.fp8_moe_inputs, residual) * tokens_mb)
            if not backward_before_peak and pp == 1:  # (in a pipeline other micro-batches interleave)
                made += gb * layer_params.get(i, 0.0) - layer_mb(i) * inflight
        if cp > 1:  # Ulysses: one layer's q, k, v and output before their all-to-alls
            H = model_cfg.num_attention_heads // tp
            transient += a * tokens_mb * H * (2 * model_cfg.qk_head_dim + 2 * model_cfg.v_head_dim)
        if ep > 1:  # dispatch + combine buffers of one MoE layer (balanced load)
            transient += 2 * a * tokens_mb * model_cfg.num_experts_per_tok * model_cfg.hidden_size
        if pp > 1:  # activation and gradient send/recv buffers of each local stage
            transient += 2 * len(stage_ids) * a * tokens_mb * model_cfg.hidden_size
        backward_end = 2 * (n_cast - n_cast_expert) if precision == "autocast" and pp > 1 else 0.0
        if precision == "bf16":  # the backward's last bf16 gradient (the embedding's), before it joins its fp32 sum
            backward_end += pb * largest_grad / gb
        if dp_size * cp > 1:  # reduce_gradients_ concatenates gradients into flat buckets
            transient += min(BUCKET_BYTES, largest_grad)
        optimizer_transient = newton_schulz_workspace(muon_shapes, optim_cfg)
        grads_at_peak = None
        if not backward_before_peak:
            head = pp * vpp - 1 in stage_ids
            grads_at_peak = gb * model_cfg.vocab_size * model_cfg.hidden_size / tp if head else 0.0
        ranks.append(
            RankMemory(
                pp_rank=r,
                stage_ids=stage_ids,
                num_layers=len(layers),
                num_params=int(n_local),
                params=pb * n_local,
                grads=gb * n_local,
                master=master_bytes,
                optimizer=opt_bytes,
                activations_per_microbatch=act_mb,
                in_flight=inflight,
                activations=act_mb * inflight,
                transient=transient,
                host=host,
                grads_at_activation_peak=grads_at_peak,
                transient_at_backward_end=backward_end,
                optimizer_transient=optimizer_transient,
            )
        )
    return MemoryPlan(
        ranks=ranks,
        precision=precision,
        recompute=p.recompute,
        dp=dp,
        world_size=world,
        num_microbatches=m,
        tokens_per_step=trainer_cfg.global_batch_size * S,
        bubble_fraction=bubble_fraction(pp, vpp, m),
        notes=notes,
    )


def host_memory_check(plan: MemoryPlan, gpus_per_node: int, mem_total: float, mem_available: float) -> Optional[str]:
    """Offloaded activations wait in pinned host memory, which cannot be swapped: a node's GPUs
    together, each at the plan's largest per-GPU amount, against the node's memory (bytes, as
    ``/proc/meminfo`` gives them). Raises ValueError when they exceed the node's total (the run
    would die mid-step, not at start); returns a warning when they exceed what is available now;
    else None."""
    per_gpu = max(r.host for r in plan.ranks)
    need = per_gpu * gpus_per_node
    if need <= mem_available:
        return None
    what = (f"offloaded activations need up to {per_gpu / GiB:.1f} GiB of pinned host memory per GPU, "
            f"{need / GiB:.0f} GiB for the {gpus_per_node} GPU(s) of this node")
    fix = ("offload fewer blocks (parallel.offload_layers=N), keep less per block (parallel.recompute=selective, "
           "parallel.fp8_moe_inputs=true), or spread the model over more ranks (pp, ep, cp); "
           "python -m k2train.plan shows the host term for each")
    if need > mem_total:
        raise ValueError(f"{what}, more than the node has ({mem_total / GiB:.0f} GiB): {fix}")
    return f"{what}; {mem_available / GiB:.0f} GiB of {mem_total / GiB:.0f} are available now: {fix}"


def read_meminfo() -> Optional[tuple[float, float]]:
    """(MemTotal, MemAvailable) in bytes from ``/proc/meminfo``; None where there is none (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return tuple(float(fields[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _gb(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _context_parallel_options(model_cfg, p, trainer_cfg, optim_cfg, precision, gpu_memory_gib) -> list[str]:
    """The context-parallel degrees this layout can take (heads and sequence divisible by tp x cp),
    each with its peak and the GPUs one model replica then needs; the smallest that fits is marked."""
    lines = ["", f"  context parallelism at seq_len {trainer_cfg.seq_len:,d} (the rest of the layout as configured):"]
    best = None
    cp = 1
    while cp * p.tp <= model_cfg.num_attention_heads:
        shards = cp * p.tp
        if model_cfg.num_attention_heads % shards == 0 and trainer_cfg.seq_len % shards == 0:
            q = estimate_memory(model_cfg, dataclasses.replace(p, cp=cp), trainer_cfg, optim_cfg, precision)
            fits = q.peak.total / GiB <= gpu_memory_gib
            mark = ""
            if fits and best is None:
                best, mark = cp, "  <- smallest that fits"
            replica = p.pp * p.ep * cp * p.tp
            lines.append(f"    cp={cp:>3}: peak {q.peak.total / GiB:8.2f} GiB ({'fits' if fits else 'does NOT fit'}), "
                         f"{replica:,d} GPUs per model replica, {trainer_cfg.seq_len // cp:,d} tokens per rank{mark}")
        cp *= 2
    if best is None:
        lines.append("    no context-parallel degree fits: add pipeline stages, recompute or a shorter sequence")
    return lines


def format_memory_report(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    trainer_cfg: TrainerConfig,
    optim_cfg: OptimConfig,
    precision: Optional[str] = None,
) -> str:
    """The planner's text: per-pp-rank breakdown (GiB), bubble, tokens per step, the fit on GPUs of
    ``parallel.gpu_memory_gb`` (not judged when 0), and for ``dp=-1`` layouts the GPU counts the
    global batch allows."""
    p = parallel_cfg
    plan = estimate_memory(model_cfg, p, trainer_cfg, optim_cfg, precision)
    gpu_memory_gib = p.gpu_memory_gb * 1e9 / GiB if p.gpu_memory_gb > 0 else None
    lines = [
        f"memory per GPU: pp={p.pp} vpp={p.vpp} ({p.pp_schedule}) ep={p.ep} cp={p.cp} tp={p.tp} dp={plan.dp} "
        f"-> {plan.world_size} GPUs; precision {plan.precision}, recompute {plan.recompute}, ZeRO-1 {optim_cfg.zero1}",
        f"  micro-batch {trainer_cfg.micro_batch_size} x {trainer_cfg.seq_len}, {plan.num_microbatches} micro-batches per step "
        f"per data stream, {plan.tokens_per_step:,d} tokens per step, pipeline bubble {100 * plan.bubble_fraction:.2f}%",
        "",
        f"  {'pp rank':>7} {'layers':>6} {'params':>14} {'weights':>8} {'grads':>8} {'master':>8} {'optim':>8} "
        f"{'act/mb':>8} {'in-flt':>6} {'acts':>8} {'buffers':>8} {'total':>8}  GiB",
    ]
    shown = plan.ranks if len(plan.ranks) <= 8 else plan.ranks[:3] + plan.ranks[-3:]
    for r in shown:
        if len(plan.ranks) > 8 and r is plan.ranks[-3]:
            lines.append(f"  {'...':>7}")
        lines.append(
            f"  {r.pp_rank:>7} {r.num_layers:>6} {r.num_params:>14,d} {_gb(r.params)} {_gb(r.grads)} {_gb(r.master)} "
            f"{_gb(r.optimizer)} {_gb(r.activations_per_microbatch)} {r.in_flight:>6.1f} {_gb(r.activations)} "
            f"{_gb(r.transient)} {_gb(r.total)}"
        )
    peak = plan.peak
    phase = max(peak.phases, key=peak.phases.get)
    where = f"at {phase}" + (f", Newton-Schulz workspace {peak.optimizer_transient / GiB:.2f} GiB beside every gradient"
                             if phase == "the optimizer step" else "")
    lines.append(f"  peak: pp rank {peak.pp_rank}, {peak.total / GiB:.2f} GiB ({where})")
    if peak.grads_at_activation_peak is not None:
        lines.append("  (one micro-batch in flight per step: the gradients are allocated during the backward as the "
                     "activations free, so the peak counts the larger of the forward's end, with only the LM head's "
                     "gradient, and the backward's end, with every gradient)")
    if p.offload_activations:
        host = max(plan.ranks, key=lambda r: r.host)
        lines.append(
            f"  offloaded activations in pinned host memory: up to {host.host / GiB:.2f} GiB per GPU (pp rank "
            f"{host.pp_rank}), {8 * host.host / GiB:.0f} GiB on a node of 8 such GPUs"
        )
    if gpu_memory_gib is not None:
        margin = gpu_memory_gib - peak.total / GiB
        lines.append(
            f"  on {gpu_memory_gib:.1f} GiB GPUs ({gpu_memory_gib * GiB / 1e9:.0f} GB), as configured (recompute "
            f"{p.recompute}, FP8 MoE inputs {p.fp8_moe_inputs}, offload {p.offload_activations}"
            f"{f' of the first {p.offload_layers} blocks per part' if p.offload_activations and p.offload_layers > 0 else ''}): "
            f"{'fits' if margin >= 0 else 'does NOT fit'}, {'headroom' if margin >= 0 else 'over by'} {abs(margin):.2f} GiB"
        )
        lines += _context_parallel_options(model_cfg, p, trainer_cfg, optim_cfg, precision, gpu_memory_gib)
    if p.dp == -1:
        unit = p.pp * p.ep * p.cp * p.tp
        seqs = trainer_cfg.global_batch_size
        lines += ["", f"  GPUs for a global batch of {seqs:,d} x {trainer_cfg.seq_len} ({plan.tokens_per_step:,d} tokens):"]
        dp = 1
        while True:
            per_step = trainer_cfg.micro_batch_size * dp * p.ep
            if seqs % per_step:
                break
            m = seqs // per_step
            if m < p.pp or (p.pp_schedule == "Interleaved1F1B" and m % p.pp):
                break
            q = estimate_memory(model_cfg, p, trainer_cfg, optim_cfg, precision, dp=dp)
            lines.append(
                f"    dp={dp:>4}: {unit * dp:>6,d} GPUs, {m:>5} micro-batches/step, bubble "
                f"{100 * q.bubble_fraction:5.2f}%, peak {q.peak.total / GiB:7.2f} GiB"
            )
            dp *= 2
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
