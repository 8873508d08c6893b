"""Typed configuration schema for k2train.

Hydra composes the YAML files under ``conf/`` against these dataclasses (registered with the
ConfigStore in :func:`register_configs`), so an unknown key or a wrong type fails at composition
time. :func:`to_job_config` then turns the composed ``DictConfig`` into plain dataclasses and
:meth:`JobConfig.validate` checks the values that types alone cannot (divisibility, ranges). Past
the entry point nothing sees Hydra or OmegaConf: each component receives only its own sub-config.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _positive(section: str, **values: float) -> None:
    for name, v in values.items():
        if v is None or v <= 0:
            _fail(f"{section}.{name}={v} must be > 0")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


@dataclass
class RopeScalingConfig:
    """YaRN context extension (DeepSeek-V3 / Kimi K2 variant). ``type=none`` is plain RoPE."""

    type: Literal["none", "yarn"] = "none"
    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    """The Kimi K2 / DeepSeek-V3 architecture. Field names follow the HF config where one exists."""

    name: str = "k2_tiny"
    vocab_size: int = 163840
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_attention_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.001
    # Aux-loss-free balancing: after each step, bias_i += rate * sign(mean_load - load_i).
    bias_update_rate: float = 1e-3
    rope_theta: float = 50000.0
    max_position_embeddings: int = 131072
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int = 163584
    eos_token_id: int = 163585
    # Implementation switches (the plain torch path is the reference and the CPU fallback).
    attn_impl: Literal["eager", "sdpa", "triton"] = "eager"
    moe_impl: Literal["loop", "grouped_mm", "triton"] = "grouped_mm"
    norm_impl: Literal["torch", "triton"] = "torch"
    # SwiGLU of the dense FFN and the shared expert (the routed experts' is inside moe_impl=triton).
    mlp_impl: Literal["torch", "triton"] = "torch"
    # The next-token loss's cross entropy: torch's, or the fused kernel (fp32 math from bf16 logits,
    # no log-softmax kept: kernels/cross_entropy.py).
    loss_impl: Literal["torch", "triton"] = "torch"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def validate(self) -> None:
        s = "model"
        _positive(
            s,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_attention_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.qk_rope_head_dim % 2:
            _fail(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            _fail(
                f"model.first_k_dense_replace={self.first_k_dense_replace} must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.num_moe_layers > 0:
            _positive(s, n_routed_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok)
            if self.num_experts_per_tok > self.n_routed_experts:
                _fail(
                    f"model.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                    f"model.n_routed_experts={self.n_routed_experts}: lower the top-k or add experts"
                )
        if self.n_shared_experts < 0:
            _fail(f"model.n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.aux_loss_alpha < 0 or self.bias_update_rate < 0:
            _fail("model.aux_loss_alpha and model.bias_update_rate must be >= 0")
        for name in ("bos_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if not 0 <= tid < self.vocab_size:
                _fail(f"model.{name}={tid} is outside the vocabulary [0, {self.vocab_size})")
        rs = self.rope_scaling
        if rs.type == "yarn":
            _positive("model.rope_scaling", factor=rs.factor,
                      original_max_position_embeddings=rs.original_max_position_embeddings)


# ---------------------------------------------------------------------------------------------
# optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    # muonclip: Muon for the block matrices, AdamW for the rest, QK-Clip when ``qk_clip`` (plain
    # Muon is ``qk_clip=false``, the optim=muon preset); adamw: AdamW for every parameter.
    name: Literal["muonclip", "adamw"] = "muonclip"
    lr: float = 2e-4
    weight_decay: float = 0.1
    # Muon (2-D matrices inside the blocks)
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    # auto: on GPUs bf16 for standard NS (K2's choice), fp16 for gram NS (same tensor-core rate,
    # 3 more mantissa bits); fp32 on CPUs (no native half-precision matmul there).
    ns_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    rms_match: float = 0.2
    ns_impl: Literal["torch", "triton"] = "torch"
    # standard: X <- a X + (b A + c A^2) X on every M x K matrix (torch.optim.Muon's NS5).
    # gram: the same NS5 iterated on the M x M Gram matrix (fewer FLOPs for wide matrices; shapes
    # where it saves nothing run standard), restarted before the listed iterations for stability.
    ns_method: Literal["standard", "gram"] = "standard"
    ns_gram_restarts: tuple[int, ...] = (3,)
    # AdamW (embedding, head, norms, everything that is not a block matrix)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    # Megatron convention: 1-D params (norm scales, biases) get no weight decay.
    no_decay_1d: bool = True
    # QK-Clip
    qk_clip: bool = True
    qk_clip_tau: float = 100.0
    # ZeRO-1: shard optimizer state over the data-parallel ranks
    zero1: bool = True
    # LR schedule
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 500
    # WSD: constant until (steps - decay_steps), then cosine down to min_lr.
    decay_steps: Optional[int] = None
    decay_fraction: float = 0.2
    min_lr: float = 2e-5

    def validate(self) -> None:
        _positive("optim", lr=self.lr, ns_steps=self.ns_steps, qk_clip_tau=self.qk_clip_tau, adam_eps=self.adam_eps)
        if self.weight_decay < 0:
            _fail(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            _fail(f"optim.momentum={self.momentum} must be in [0, 1)")
        if any(not 0 <= b < 1 for b in self.adam_betas):
            _fail(f"optim.adam_betas={list(self.adam_betas)} must each be in [0, 1)")
        if self.warmup_steps < 0:
            _fail(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            _fail(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if not 0 <= self.decay_fraction <= 1:
            _fail(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if len(self.ns_coefficients) != 3:
            _fail(f"optim.ns_coefficients needs 3 values (a, b, c), got {list(self.ns_coefficients)}")
        if any(not 0 < r < self.ns_steps for r in self.ns_gram_restarts):
            _fail(
                f"optim.ns_gram_restarts={list(self.ns_gram_restarts)}: each restart is an iteration "
                f"index in [1, optim.ns_steps={self.ns_steps})"
            )
        if self.ns_dtype == "float16" and self.ns_method != "gram":
            _fail("optim.ns_dtype=float16 is for optim.ns_method=gram; standard Newton-Schulz runs in bfloat16 or float32")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """One prepared dataset: a Megatron indexed-dataset prefix (``path.bin``/``path.idx``)."""

    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # "embedded": the corpus and tokenizer the package builds offline (the default run).
    # "megatron": prepared .bin/.idx shards listed in `datasets`, blended by weight.
    source: Literal["embedded", "megatron"] = "embedded"
    # tiktoken rank file; empty = the tokenizer that matches the source (embedded: built in).
    tokenizer_path: str = ""
    datasets: list[DatasetSpec] = field(default_factory=list)
    # Where derived files (the embedded corpus shards, sample indices) are cached.
    cache_dir: str = "~/.cache/k2train"
    seed: int = 1234
    # Reset positions and mask attention at document boundaries inside packed samples.
    document_mask: bool = False
    # Batches a background thread keeps ready (0: read them in the training loop, no thread).
    prefetch: int = 4
    # Held out for validation: the last fraction of every dataset's documents (Megatron's
    # `--split` boundary), which training then never reads (0: none held out).
    valid_split: float = 0.0
    # Validation datasets of their own (prepared .bin/.idx prefixes and weights, like `datasets`);
    # used instead of a valid_split when given.
    valid_datasets: list[DatasetSpec] = field(default_factory=list)
    # Evaluate each validation dataset on its own, trainer.eval_steps global batches each: a
    # val_loss/<name> per dataset (its prefix's file name) and val_loss their weighted mean;
    # false: val_loss on batches of the blend.
    valid_per_dataset: bool = False

    def validate(self) -> None:
        if self.source == "megatron" and not self.datasets:
            _fail("data.source=megatron needs at least one entry in data.datasets (path prefix and weight)")
        for i, d in enumerate(self.datasets):
            if not d.path:
                _fail(f"data.datasets[{i}].path is empty: give the prefix of a .bin/.idx pair")
            if d.weight <= 0:
                _fail(f"data.datasets[{i}].weight={d.weight} must be > 0")
        if self.prefetch < 0:
            _fail(f"data.prefetch={self.prefetch} must be >= 0 (0 reads batches in the training loop)")
        if not 0 <= self.valid_split < 1:
            _fail(f"data.valid_split={self.valid_split} must be in [0, 1): the fraction of each dataset's documents "
                  "held out for validation")
        for i, d in enumerate(self.valid_datasets):
            if not d.path:
                _fail(f"data.valid_datasets[{i}].path is empty: give the prefix of a .bin/.idx pair")
            if d.weight <= 0:
                _fail(f"data.valid_datasets[{i}].weight={d.weight} must be > 0")


# ---------------------------------------------------------------------------------------------
# parallelism
# ---------------------------------------------------------------------------------------------


@dataclass
class ParallelConfig:
    """Parallel degrees. ``dp=-1`` means: whatever the world size leaves over. Tensor parallelism
    always shards the sequence between blocks (sequence parallelism)."""

    dp: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # Context parallelism (DeepSpeed Ulysses): each rank holds seq_len / cp tokens of every sequence.
    cp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B when > 1).
    vpp: int = 1
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe"] = "1F1B"
    # Activation recompute (k2train/parallel/recompute.py): none; selective (K2: norms, SwiGLU,
    # RoPE and the MLA up-projections recomputed, matmul/attention outputs kept); full (each block
    # keeps only its input).
    recompute: Literal["none", "selective", "full"] = "none"
    # K2's FP8 storage: the routed experts keep their input and SwiGLU inputs for the backward as
    # FP8 E4M3 in 1 x 128 tiles with fp32 scales (compute stays bf16). With selective recompute
    # (K2's recipe) what stays is FP8; with full recompute the block being recomputed keeps FP8.
    fp8_moe_inputs: bool = False
    # What the blocks keep for the backward lives in pinned CPU memory, copied on a side CUDA stream
    # and back ahead of its backward: the GPU holds about two blocks' worth (the one computing, the
    # one crossing PCIe; a block's forward waits for the copies of the block two before). Nothing
    # to do on a CPU device. With recompute=selective the outputs it keeps are offloaded; not with
    # recompute=full (a block keeps only its input).
    offload_activations: bool = False
    # With offload_activations: how many blocks of each model part (a pipeline stage's chunk, or the
    # whole model) offload, counted from its first, whose backward comes last (Megatron's
    # cpu_offloading_num_layers); the rest keep their activations on the GPU. -1: every block but
    # the last one before the loss (its backward follows its forward at once). Fewer blocks: less
    # PCIe traffic and more GPU memory; python -m k2train.plan shows both.
    offload_layers: int = -1
    # Memory of one GPU the layout is meant for, in GB (1e9 bytes; an H800 has 80): the planner
    # (python -m k2train.plan) says whether the layout fits. 0: no verdict.
    gpu_memory_gb: float = 0.0
    # Collective timeout (NCCL/gloo), seconds.
    timeout_s: int = 600

    def validate(self) -> None:
        for name in ("tp", "pp", "ep", "cp", "vpp"):
            if getattr(self, name) < 1:
                _fail(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.dp == 0 or self.dp < -1:
            _fail(f"parallel.dp={self.dp} must be >= 1, or -1 to use the rest of the world size")
        if self.vpp > 1 and self.pp_schedule != "Interleaved1F1B":
            _fail(f"parallel.vpp={self.vpp} needs parallel.pp_schedule=Interleaved1F1B (got {self.pp_schedule})")
        _positive("parallel", timeout_s=self.timeout_s)
        if self.gpu_memory_gb < 0:
            _fail(f"parallel.gpu_memory_gb={self.gpu_memory_gb} must be >= 0 (0: the planner judges no fit)")
        if self.offload_layers == 0 or self.offload_layers < -1:
            _fail(f"parallel.offload_layers={self.offload_layers} must be >= 1, or -1 for every block but the last "
                  "before the loss (to offload nothing, set parallel.offload_activations=false)")


# ---------------------------------------------------------------------------------------------
# trainer, checkpoints, logging
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointConfig:
    enable: bool = True
    # Save every N steps (0 = only the final save).
    interval: int = 0
    keep_last: int = 3
    keep_every: int = 0
    async_save: bool = False
    # Resume from the latest valid checkpoint under the run's checkpoint folder.
    resume: bool = True
    # Load model weights from here (a k2train checkpoint or an HF folder) before training.
    load_path: str = ""
    # The final save also writes an HF safetensors folder (<step>/hf) in this dtype.
    export_hf: bool = True
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_shard_size: str = "5GB"


@dataclass
class ProfileConfig:
    # torch.profiler over steps [start_step, start_step + steps): a Chrome/Perfetto trace and an
    # ops table per profiled rank in <run dir>/profile/ (k2train/profiling.py).
    enable: bool = False
    # The first profiled step (leave the first steps out: compilation and kernel autotuning run there).
    start_step: int = 5
    # How many steps the window holds.
    steps: int = 2
    # Global ranks that profile ([]: every rank).
    ranks: list[int] = field(default_factory=lambda: [0])
    # Record each op's Python call stack too (larger traces).
    with_stack: bool = False
    # Also record the CUDA caching allocator's history over the window and dump it next to the
    # trace (<trace>_memory.pickle, for pytorch.org/memory_viz); GPU runs only.
    memory_snapshot: bool = False

    def validate(self) -> None:
        if self.start_step < 1 or self.steps < 1:
            _fail(f"trainer.profile.start_step={self.start_step} and trainer.profile.steps={self.steps} must be >= 1")
        if any(r < 0 for r in self.ranks):
            _fail(f"trainer.profile.ranks={list(self.ranks)} must list ranks >= 0 ([]: every rank)")


# trainer.compile_mode: torch.compile's modes, and those that replay the blocks as CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainerConfig:
    steps: int = 200
    seq_len: int = 128
    micro_batch_size: int = 8
    # Global batch in sequences; gradient accumulation = global / (micro * dp).
    global_batch_size: int = 8
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    # How weights are stored with dtype=bfloat16: float32 (autocast casts them for each matmul) or
    # bfloat16 (no casts; fp32 gradients, accumulated over the micro-batches, and fp32 master
    # weights in the optimizer, as Megatron's bf16 and Kimi K2 train).
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_interval: int = 10
    # Non-finite loss or grad norm: skip the step (its update is a no-op on the device), or stop
    # the run (then every step is read at once).
    on_nonfinite: Literal["skip", "stop"] = "skip"
    # A loss above spike_factor x its running mean is logged as a spike.
    spike_factor: float = 3.0
    # ... its running mean over this many recent non-spike steps.
    spike_window: int = 100
    # Evaluate the validation loss every this many steps and after the last one (0: never); the
    # validation data comes from data.valid_split or data.valid_datasets.
    eval_interval: int = 0
    # Global batches per evaluation: the first ones of the validation data, the same every time,
    # so that evaluations compare.
    eval_steps: int = 10
    # Evaluate the weights a run would start from (the newest checkpoint in trainer.output_dir, or
    # trainer.checkpoint.load_path) once, log it, and exit: no step, no checkpoint.
    eval_only: bool = False
    # Stop (checkpoint, exit 0) after the first step that ends this many minutes after the trainer
    # started, on every rank at the same step, as after a preemption signal; 0: no limit. For
    # schedulers that do not signal before their time limit (Slurm's `--signal` does).
    exit_after_minutes: float = 0.0
    # Python's garbage collector runs every this many steps (generation 1; all generations every
    # 20th time), while the device works, not at random points, where one rank's pause stalls every
    # rank's collectives; 0: Python's own schedule.
    gc_interval: int = 50
    # torch.compile each transformer block (k2train/parallel/compile.py).
    compile: bool = False
    # torch.compile's mode for the blocks: default, max-autotune-no-cudagraphs (inductor times
    # its GEMM and kernel configurations at the first step), reduce-overhead or max-autotune (each
    # block's forward and backward replayed as CUDA graphs: no launch gaps; with bf16 weights,
    # without pipeline parallelism or full recompute).
    compile_mode: str = "default"
    # The LM head and the cross entropy on chunks of this many tokens, each recomputed in the
    # backward: the logits of the whole micro-batch never exist at once (0: in one piece).
    loss_chunk_tokens: int = 0
    # The same config, data, seed, world size and CPU thread count give the same losses, gradients
    # and checkpoint tensors bit for bit, run after run and across a kill and resume (on CPU and on
    # GPUs): torch's deterministic algorithms, cuBLAS' deterministic workspace, and fixed kernel
    # configurations instead of autotuning. Costs some speed on GPUs (docs/performance.md).
    deterministic: bool = False
    output_dir: str = "runs"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        self.profile.validate()
        _positive(
            "trainer",
            steps=self.steps,
            seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            log_interval=self.log_interval,
        )
        if self.grad_clip < 0:
            _fail(f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if self.param_dtype == "bfloat16" and self.dtype != "bfloat16":
            _fail("trainer.param_dtype=bfloat16 stores the weights for bf16 compute: set trainer.dtype=bfloat16 too")
        if self.exit_after_minutes < 0 or self.gc_interval < 0:
            _fail(f"trainer.exit_after_minutes={self.exit_after_minutes} and trainer.gc_interval={self.gc_interval} "
                  "must be >= 0 (0: no limit / Python's own collection schedule)")
        if self.eval_interval < 0 or self.eval_steps < 1:
            _fail(f"trainer.eval_interval={self.eval_interval} must be >= 0 (0: no evaluation) and "
                  f"trainer.eval_steps={self.eval_steps} >= 1")
        if self.loss_chunk_tokens < 0:
            _fail(f"trainer.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: the loss in one piece)")
        if self.checkpoint.interval < 0 or self.checkpoint.keep_last < 1 or self.checkpoint.keep_every < 0:
            _fail("trainer.checkpoint: interval >= 0, keep_last >= 1 and keep_every >= 0 are required")


@dataclass
class LoggingConfig:
    console: bool = True
    jsonl: bool = True
    progress_bar: bool = True
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "k2train"
    wandb_entity: Optional[str] = None
    run_name: Optional[str] = None
    # The same numbers as TensorBoard scalars in <run dir>/tensorboard (`tensorboard --logdir
    # runs/default/logs`); needs `pip install tensorboard`.
    tensorboard: bool = False


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: str = "default"

    def validate(self) -> "JobConfig":
        """Every section's own checks, then the checks across sections that need no world size
        (the layout's, which do, are :meth:`k2train.parallel.ParallelDims.validate`)."""
        self.model.validate()
        self.optim.validate()
        self.data.validate()
        self.parallel.validate()
        self.trainer.validate()
        m, t = self.model, self.trainer
        if self.parallel.tp > 1 and "triton" in (m.norm_impl, m.mlp_impl):
            _fail(
                f"model.norm_impl={m.norm_impl} / model.mlp_impl={m.mlp_impl}: the fused norm and SwiGLU kernels "
                f"take plain tensors, not the DTensors of tensor parallelism (parallel.tp={self.parallel.tp}); "
                "use model.norm_impl=torch model.mlp_impl=torch"
            )
        if self.parallel.tp > 1 and m.loss_impl == "triton":
            _fail(
                f"model.loss_impl=triton: the fused cross entropy takes whole rows of logits, and tensor parallelism "
                f"(parallel.tp={self.parallel.tp}) splits the vocabulary over its ranks (its loss is torch's "
                "loss_parallel); use model.loss_impl=torch"
            )
        p = self.parallel
        if p.offload_activations and p.recompute == "full":
            _fail(
                "parallel.offload_activations=true with parallel.recompute=full: a fully recomputed block keeps only "
                "its input, so there is nothing to offload; use parallel.recompute=selective (its kept outputs are "
                "offloaded) or none with it"
            )
        if p.offload_activations and t.compile:
            _fail("parallel.offload_activations=true with trainer.compile=true: the offload hooks run in Python around "
                  "each block and cannot be compiled into it; use trainer.compile=false")
        if t.loss_chunk_tokens and self.parallel.tp > 1:
            _fail(
                f"trainer.loss_chunk_tokens={t.loss_chunk_tokens} with parallel.tp={self.parallel.tp}: the vocabulary-"
                "parallel loss already splits the logits over the tp ranks; set trainer.loss_chunk_tokens=0"
            )
        if t.compile_mode not in COMPILE_MODES:
            _fail(f"trainer.compile_mode={t.compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
        if t.compile_mode != "default" and not t.compile:
            _fail(f"trainer.compile_mode={t.compile_mode} without trainer.compile=true: set trainer.compile=true, "
                  "or leave trainer.compile_mode=default")
        if t.compile_mode in CUDA_GRAPH_COMPILE_MODES:
            if self.parallel.pp > 1:
                _fail(f"trainer.compile_mode={t.compile_mode} with parallel.pp={self.parallel.pp}: CUDA graphs replay "
                      "into one memory pool, and a pipeline schedule runs several micro-batches' forwards before "
                      "their backwards, whose outputs a replay would overwrite; use trainer.compile_mode="
                      "max-autotune-no-cudagraphs or default")
            if t.param_dtype != "bfloat16":
                _fail(f"trainer.compile_mode={t.compile_mode} with trainer.param_dtype={t.param_dtype}: the fp32 "
                      "gradient of an fp32 weight comes out of the backward's CUDA graph and would stay in the graphs' "
                      "memory pool from one micro-batch to the next, where the next replay writes; use "
                      "trainer.param_dtype=bfloat16 (each bf16 gradient is added into the fp32 main_grad as it "
                      "arrives) or trainer.compile_mode=max-autotune-no-cudagraphs")
            if self.parallel.recompute == "full":
                _fail(f"trainer.compile_mode={t.compile_mode} with parallel.recompute=full: the compiled forward runs "
                      "again inside the backward, where its CUDA graph would replay over the outputs the backward "
                      "still reads; use parallel.recompute=selective (recomputed inside the compiled backward) "
                      "or trainer.compile_mode=max-autotune-no-cudagraphs")
        if t.compile and t.deterministic:
            _fail(
                "trainer.deterministic=true with trainer.compile=true: compiled kernels choose their reduction "
                "configurations by timing, so the order of their sums can change from run to run; use "
                "trainer.compile=false for bitwise reproducible runs"
            )
        if t.seq_len > m.max_position_embeddings:
            _fail(f"trainer.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
        return self


# ---------------------------------------------------------------------------------------------
# Hydra plumbing (the only place that knows about OmegaConf)
# ---------------------------------------------------------------------------------------------


def _schema(cls: type) -> type:
    """An OmegaConf-compatible twin of a config dataclass.

    OmegaConf cannot type ``Literal`` fields, so they become ``str`` here and :func:`_build` checks
    the allowed values afterwards; nested dataclasses are converted recursively.
    """
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if typing.get_origin(t) is Literal:
            t = str
        elif dataclasses.is_dataclass(t):
            t = _schema(t)
        elif typing.get_origin(t) is list and dataclasses.is_dataclass(typing.get_args(t)[0]):
            t = list[_schema(typing.get_args(t)[0])]
        if f.default_factory is not dataclasses.MISSING:
            factory = f.default_factory
            if dataclasses.is_dataclass(t) and isinstance(t, type):
                factory = t
            spec = field(default_factory=factory)
        else:
            spec = field(default=f.default)
        fields.append((f.name, t, spec))
    twin = dataclasses.make_dataclass(cls.__name__, fields)
    _SCHEMAS[cls] = twin
    return twin


_SCHEMAS: dict[type, type] = {}


def register_configs() -> None:
    """Register the schema so that Hydra type-checks every YAML file and override against it."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=_schema(JobConfig))


def _build(cls: type, data: Any, where: str = "") -> Any:
    """Plain containers -> dataclass instances, checking ``Literal`` choices with a clear message."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{where}{k}"
        if k not in hints:
            _fail(f"unknown config key {key!r}; valid keys here: {sorted(hints)}")
        t = hints[k]
        if typing.get_origin(t) is Literal and v not in typing.get_args(t):
            _fail(f"{key}={v!r} is not one of {list(typing.get_args(t))}")
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = _build(t, v, f"{key}.")
        elif typing.get_origin(t) is list and isinstance(v, list):
            (item,) = typing.get_args(t)
            if dataclasses.is_dataclass(item):
                v = [_build(item, x, f"{key}[{i}].") for i, x in enumerate(v)]
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def to_job_config(cfg: Any) -> JobConfig:
    """Composed Hydra config (DictConfig or dict) -> validated :class:`JobConfig`."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    return _build(JobConfig, cfg)


def job_config_to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_config(overrides: Optional[list[str]] = None, config_name: str = "config") -> JobConfig:
    """Compose ``conf/`` with Hydra's compose API (for tests, notebooks and the planner)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="k2train.conf", version_base=None):
        composed = compose(config_name=config_name, overrides=list(overrides or []))
    return to_job_config(composed)


def num_params_fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n)) if math.isfinite(n) else str(n)
