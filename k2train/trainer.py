"""The trainer: what one training run builds, in order, and the optimizer step.

    with Trainer(cfg) as trainer:      # builds everything (see Trainer.__init__ for the order)
        history = trainer.run()        # batches -> launch_step -> read -> log -> checkpoint, until trainer.steps

:meth:`Trainer.launch_step` is one optimizer step over this rank's micro-batches, for every layout
(one process, tensor/expert/data/pipeline parallel), queued on the device; :meth:`Trainer.read_step`
reads what it measured; :meth:`Trainer.train_step` is the two at once; :meth:`Trainer.evaluate` is the
validation loss (forward only). The parity, resume and
golden-loss tests and the scripts drive them (or :meth:`Trainer.run`), never a copy of them. Leaving
the ``with`` block, by the end of the run or by an exception, drains the checkpoint writer, stops the
data thread, closes the logs and, if the trainer started it, the process group.

No host sync inside a step: a non-finite loss or norm makes the update a no-op on the device, and
the step's numbers (loss, norm, every per-layer metric) come back in one transfer that the host
reads when it logs (``# host sync``): every ``trainer.log_interval`` steps, one step late.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, load_model_weights
from .checkpoint_layout import git_revision
from .config import CUDA_GRAPH_COMPILE_MODES, JobConfig, job_config_to_dict
from .convert import export_hf
from .data_pipeline.loader import build_data_loader, has_validation_data, load_tokenizer, validation_sets
from .faults import LossSpikeDetector, NonFiniteGuard, PreemptionHandler, collective_timeout, init_distributed
from .flops import flops_per_token, peak_tflops
from .loss import NextTokenLoss
from .metrics import MetricLogger, StepReadout, format_step
from .model import K2Model, update_router_bias_
from .optim import attention_modules, build_lr_scheduler, build_optimizer, describe_param_groups
from .optim.qk_clip import layer_max_logits, qk_clip_layers_, qk_clip_summary
from .optim.schedule import restore_training_settings, training_settings
from .parallel import (ParallelDims, backend_for, clip_grad_norm_, loss_context, reduce_gradients_,
                       replica_groups, sum_expert_load_)
from .parallel.context_parallel import shard_sequence
from .parallel.memory import estimate_memory, host_memory_check, read_meminfo, trainer_precision
from .parallel.parallelize import parallelize
from .parallel.pipeline import pipeline_step
from .parallel.precision import bf16_params_, publish_fp32_grads_
from .profiling import StepProfiler, check_profile_config
from .runtime import GarbageCollector, default_wandb_run_id, deterministic_mode, logging_rank, pick_device

Batch = dict[str, torch.Tensor]
# (dp_rank, dp_size) -> this data stream's micro-batches: {"tokens", "labels"} [B, S] int64, plus
# "position_ids" / "doc_ids" for packed documents. Labels equal to k2train.loss.IGNORE_INDEX add no
# loss.
DataFactory = Callable[[int, int], Iterable[Batch]]


def build_model(cfg, device: torch.device, seed: int) -> K2Model:
    """One whole model: built on the meta device (no memory, any size), materialized and
    initialized on ``device``, as every model part of the trainer is."""
    with torch.device("meta"):
        model = K2Model(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model


# the step's scalars read back with the per-layer numbers: loss, aux loss, grad norm
NUM_SCALARS = 3


@dataclass
class PendingStep:
    """A launched step whose numbers are still on their way: ``rows`` (StepReadout.gather's) in
    pinned host memory, complete once ``ready`` (a CUDA event; None on the CPU) is."""

    step: int
    lr: float
    rows: torch.Tensor
    ready: Optional["torch.cuda.Event"] = None

    def wait(self) -> None:
        """Until ``rows`` are on the host (a host sync on the GPU unless the event is already
        done, as it is for the earlier steps of a read; a step's work is done by then)."""
        if self.ready is not None and not self.ready.query():
            self.ready.synchronize()


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A micro-batch on ``device``, queued without waiting. A copy to the GPU from pageable host
    memory is staged by the driver, which may synchronize with the stream to do it (the host then
    waits for the work queued before the copy, and cannot run ahead of the GPU at every
    micro-batch), so the rows go through pinned memory (the caching host allocator's, released once
    the copy is done)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v).to(device, non_blocking=True)
            for k, v in batch.items()}


def _to_host(rows: torch.Tensor) -> tuple[torch.Tensor, Optional["torch.cuda.Event"]]:
    """``rows`` copied to pinned host memory behind the step's work, and the event that says it
    is there: nothing waits now."""
    if rows.device.type != "cuda":
        return rows, None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@dataclass
class StepStats:
    """One optimizer step, read back to the host once. ``loss`` = cross entropy + MoE aux loss,
    the mean over micro-batches and data streams; ``layers``: per-layer max logit, clipped heads,
    expert load of every pipeline stage, with their summaries (``max_logit``, ``clipped_heads``,
    ``expert_load_max_over_mean``)."""

    step: int
    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool = False
    layers: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Builds a run from a validated :class:`~k2train.config.JobConfig` and trains it.

    ``run_dir`` (default ``<trainer.output_dir>/logs/<time>``) receives the config, the code
    version and the metrics; checkpoints go to ``checkpoint_dir`` (default
    ``<trainer.output_dir>/checkpoints``), where a rerun resumes. ``data`` replaces the loader of
    ``cfg.data`` (tests, demonstrations): a function of (dp_rank, dp_size) returning this data
    stream's micro-batches. ``valid_data`` replaces the validation data the same way; it is called
    anew at each evaluation, which reads its first ``trainer.eval_steps`` global batches.
    """

    def __init__(
        self,
        cfg: JobConfig,
        *,
        run_dir: Optional[Path] = None,
        checkpoint_dir: Optional[Path] = None,
        data: Optional[DataFactory] = None,
        valid_data: Optional[DataFactory] = None,
    ):
        self.cfg = cfg.validate()
        self._started = time.monotonic()  # trainer.exit_after_minutes counts from here
        self._stack = ExitStack()  # teardown, newest first: see close()
        self._tokenizer = None
        try:
            self._build(run_dir, checkpoint_dir, data, valid_data)
        except BaseException:
            self._stack.close()
            raise

    def _build(self, run_dir: Optional[Path], checkpoint_dir: Optional[Path], data: Optional[DataFactory],
               valid_data: Optional[DataFactory]) -> None:
        cfg, t = self.cfg, self.cfg.trainer

        # 1. runtime: device, determinism, process group, degrees and mesh (the layout is checked first)
        self.device = pick_device(t.device)
        if t.deterministic:
            self._stack.enter_context(deterministic_mode(self.device))
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = dims = ParallelDims.from_config(cfg.parallel, world).validate(cfg.model, t)
        if dims.distributed:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                init_distributed(backend_for(self.device.type), cfg.parallel.timeout_s)
                self._stack.push(_destroy_process_group)
            dims.build_mesh(self.device.type)
        self.is_logging_rank = dims.rank == logging_rank(world, dims.pp)
        check_profile_config(t.profile, dims.world_size, self.device)  # before the model, not at the first step
        # the host-side vote on a preemption signal, on the CPU: asking it never waits for a GPU
        self._host_group = None
        if dims.distributed and self.device.type != "cpu":
            self._host_group = dist.new_group(backend="gloo", timeout=collective_timeout(cfg.parallel.timeout_s))
        self.num_microbatches = dims.num_microbatches(t)
        host_warning = self._check_host_memory()  # offload's pinned memory: refused here, not mid-step
        torch.manual_seed(t.seed)
        random.seed(t.seed)  # checkpoints carry every generator's state: the same seed, the same bytes
        np.random.seed(t.seed)

        # 2. model: meta device -> parallelize -> materialize + layout-invariant init (or load)
        with torch.device("meta"):
            model = K2Model(cfg.model)
        # the next-token loss: each cp rank's share of the sequence's mean; with loss_chunk_tokens
        # it runs the LM head itself, chunk by chunk
        self.loss = NextTokenLoss(t.loss_chunk_tokens, cp_group=dims.group("cp_mesh"), impl=cfg.model.loss_impl)
        placed = parallelize(
            model, dims, cfg.parallel, compile=t.compile, compile_mode=t.compile_mode, seq_len=t.seq_len,
            micro_batch_size=t.micro_batch_size, num_microbatches=self.num_microbatches, loss_fn=self.loss, device=self.device,
            head_in_loss=bool(t.loss_chunk_tokens), hidden_dtype=torch.bfloat16 if t.param_dtype == "bfloat16" else None,
        )
        self.parts, self.pipeline = placed.parts, placed.pipeline
        self.loss.head = next((p.lm_head for p in self.parts if p.lm_head is not None), None)
        for part in self.parts:
            part.to_empty(device=self.device)
            part.init_weights(seed=t.seed)
            part.train()
        if t.checkpoint.load_path:  # initial weights; a resume below overrides them
            load_model_weights(t.checkpoint.load_path, self.parts)
        if t.param_dtype == "bfloat16":  # before the optimizer, which makes its fp32 masters from them
            bf16_params_(self.parts)

        # 3. optimizer and LR schedule; the modules QK-Clip and the router-bias update act on
        self.optimizer = build_optimizer(self.parts, cfg.optim, replica_group=replica_groups(dims) if dims.distributed else None)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, total_steps=t.steps)
        self.attention = attention_modules(self.parts)
        self.moes = [m for part in self.parts for m in part.moe_layers()]
        self.moe_layer_ids = [int(i) for part in self.parts for i, blk in part.layers.items() if blk.mlp in self.moes]
        self.preemption: Optional[PreemptionHandler] = None  # installed by run()
        self.readout = StepReadout(list(self.attention), self.moe_layer_ids, dims.group("pp_mesh"))

        # 4. data: this rank's stream (dp x ep coordinates read different data); the validation
        # data's is opened at each evaluation
        if valid_data is None and (t.eval_interval or t.eval_only) and not has_validation_data(cfg.data):
            which = "trainer.eval_only=true" if t.eval_only else f"trainer.eval_interval={t.eval_interval}"
            raise ValueError(f"{which} needs validation data: set data.valid_split (the fraction of each "
                             "dataset's documents held out, e.g. 0.01) or data.valid_datasets"
                             + ("" if t.eval_only else ", or trainer.eval_interval=0"))
        # name -> (data, weight): the blend (""), or each dataset with data.valid_per_dataset
        self._valid_sets: dict[str, tuple[DataFactory, float]] = {"": (valid_data, 1.0)} if valid_data else {}
        if valid_data is None and has_validation_data(cfg.data):
            self._valid_sets = ({name: (partial(self._default_data, split="valid", dataset=i), w)
                                 for i, (name, w) in enumerate(validation_sets(cfg.data))}
                                if cfg.data.valid_per_dataset else {"": (partial(self._default_data, split="valid"), 1.0)})
        # run()'s evaluations: {"step", "val_loss", ["val_loss/<name>", ...], "val_ppl", "val_time_s"}
        self.val_history: list[dict] = []
        self.data = (data or self._default_data)(dims.dp_rank, dims.dp_size)
        if hasattr(self.data, "close"):
            self._stack.callback(self.data.close)
        self._batches: Iterator[Batch] = iter(self.data)

        # 5. checkpointing, then resume
        self.progress = {"step": 0, "tokens_seen": 0, "clipped_heads_total": 0, "wandb_run_id": None}
        self.guard = NonFiniteGuard(t.on_nonfinite)
        self.spikes = LossSpikeDetector(t.spike_factor, t.spike_window)
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(t.output_dir) / "checkpoints"
        self.checkpointer = CheckpointManager(checkpoint_dir, t.checkpoint, job_config=job_config_to_dict(cfg))
        self._stack.callback(self.checkpointer.close)  # drains an asynchronous save
        resumed, settings_changed = None, []
        if t.checkpoint.enable and t.checkpoint.resume:
            settings = training_settings(self.optimizer, self.scheduler)  # the config's
            state = self.checkpoint_state()
            if t.eval_only:  # no training data is read: its position (and its split) do not matter
                state.pop("data", None)
            resumed = self.checkpointer.load_latest(state)
            if resumed is not None and not t.eval_only:  # the config decides the hyperparameters; the checkpoint, the progress
                settings_changed = restore_training_settings(self.optimizer, self.scheduler, settings)

        # 6. metrics: run folder, console / JSONL / wandb (continuing the checkpoint's wandb run)
        self.run_dir = Path(run_dir) if run_dir is not None else Path(t.output_dir) / "logs" / time.strftime("%Y%m%d-%H%M%S")
        if self.is_logging_rank:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(job_config_to_dict(cfg), indent=2))
            (self.run_dir / "git_revision").write_text(git_revision() + "\n")
        run_id = self.progress["wandb_run_id"] or default_wandb_run_id(self.run_dir)
        self.progress["wandb_run_id"] = self.checkpointer.wandb_run_id = run_id
        self.logger = MetricLogger(cfg.logging, self.run_dir, enabled=self.is_logging_rank,
                                   config_dict=job_config_to_dict(cfg), wandb_run_id=run_id)
        self._stack.callback(self.logger.close)
        if resumed is not None:
            self.logger.console(f"resumed from {self.checkpointer.folder} at step {resumed}")
        if settings_changed:
            self.logger.console("resume: the config's settings replace the checkpoint's:\n  " + "\n  ".join(settings_changed))
        if host_warning:
            self.logger.console(f"warning: {host_warning}")
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len, "megatron")
        self.peak_tflops = peak_tflops(self.device)

    def _check_host_memory(self) -> Optional[str]:
        """With offload on a GPU: the planner's pinned host memory for this node's GPUs against the
        node's (ValueError past its total, a warning past what is available now)."""
        cfg = self.cfg
        if not cfg.parallel.offload_activations or self.device.type != "cuda" or (meminfo := read_meminfo()) is None:
            return None
        plan = estimate_memory(cfg.model, cfg.parallel, cfg.trainer, cfg.optim, trainer_precision(cfg.trainer),
                               dp=self.dims.dp)
        # the node's GPUs in this run: torchrun says; a launcher that does not, at most every GPU here
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or min(torch.cuda.device_count(), self.dims.world_size))
        return host_memory_check(plan, max(1, local), *meminfo)

    def _default_data(self, dp_rank: int, dp_size: int, split: str = "train", dataset: Optional[int] = None):
        t = self.cfg.trainer
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.data)
        return build_data_loader(self.cfg.data, self._tokenizer, seq_len=t.seq_len,
                                 micro_batch_size=t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                 vocab_size=self.cfg.model.vocab_size, split=split, dataset=dataset)

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Drain the checkpoint writer, stop the data thread, close the logs and the process
        group the trainer started. Idempotent."""
        self._stack.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    # -- state --------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Optimizer steps done (skipped ones included)."""
        return self.progress["step"]

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint saves and a resume restores."""
        state = {
            "model": self.parts, "optimizer": self.optimizer, "scheduler": self.scheduler, "train": self.progress,
            "nonfinite": self.guard, "spikes": self.spikes,
        }
        if hasattr(self.data, "state_dict"):
            state["data"] = self.data
        return state

    def next_batches(self) -> list[Batch]:
        """This rank's micro-batches of the next step."""
        return [next(self._batches) for _ in range(self.num_microbatches)]

    # -- the step -----------------------------------------------------------------------------

    def train_step(self, batches: list[Batch]) -> StepStats:
        """One optimizer step (:meth:`launch_step`), its numbers read back at once (:meth:`read_step`).
        :meth:`run` reads them later instead, so that the host never waits for the GPU's step."""
        return self.read_step(self.launch_step(batches))

    def launch_step(self, batches: list[Batch]) -> PendingStep:
        """One optimizer step over this rank's ``num_microbatches`` micro-batches, queued on the
        device: forward and backward (or the pipeline schedule), gradient reduction and clipping,
        the step's metrics, and the update (optimizer, QK-Clip, the router-bias update), which a
        non-finite loss or gradient norm turns into a no-op on the device; then the LR schedule.
        Nothing here waits for the device: :meth:`read_step` reads what the step measured."""
        t, dims = self.cfg.trainer, self.dims
        tau = self.cfg.optim.qk_clip_tau if self.cfg.optim.qk_clip else None
        self.progress["step"] += 1
        step = self.progress["step"]
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("k2train.forward_backward"):
            ce, aux = self._forward_backward(batches)

        with record_function("k2train.reduce_and_clip"):
            # gradients: sums over micro-batches and replicas -> the mean's gradient, clipped
            reduce_gradients_(self.parts, dims)
            grad_norm = clip_grad_norm_(self.parts, t.grad_clip if t.grad_clip > 0 else float("inf"), dims,
                                        scale=1.0 / (self.num_microbatches * dims.dp_size))
            # what the step measured, still on the device: max logits (MAX over the ranks that saw
            # other tokens), the expert loads (summed over them)
            logits_LH = layer_max_logits(self.attention, dims.group("dense_dp_mesh")) if self.attention else None
            for part in self.parts:
                sum_expert_load_(part, dims.group("token_mesh"))
            loads = _expert_load_summary([moe.tokens_per_expert for moe in self.moes])
        with record_function("k2train.step_metrics"):
            # every number the host will read, every stage's, in one vector on every rank; the step
            # is skipped where the loss or the norm is not finite (the same rows on every rank: the
            # same decision), on the device
            clip = qk_clip_summary(logits_LH, tau, dims.group("tp_mesh")) if logits_LH is not None else None
            rows = self.readout.gather(torch.stack([ce + aux, aux, grad_norm.float()]), clip, loads)
            skip = ~torch.isfinite(rows[0, :NUM_SCALARS]).all()
        lr = self.optimizer.param_groups[0]["lr"]

        # update: optimizer, QK-Clip, aux-loss-free router bias, LR (a skipped step's are no-ops)
        with record_function("k2train.optimizer"):
            self.optimizer.step(skip=skip)
        with record_function("k2train.qk_clip_and_router_bias"):
            if tau is not None and logits_LH is not None:  # a head that saw -inf is not clipped
                qk_clip_layers_(self.attention, logits_LH.masked_fill(skip, float("-inf")), tau, self.optimizer)
            for m in self.attention.values():
                m.reset_max_logit()
            for moe in self.moes:  # no load, no bias change
                moe.tokens_per_expert.masked_fill_(skip, 0)
                update_router_bias_(moe, self.cfg.model.bias_update_rate)
        self.scheduler.step()
        return PendingStep(step, lr, *_to_host(rows))

    def read_step(self, pending: PendingStep) -> StepStats:
        """What a launched step measured, on the host (waits for the device if the step is not done):
        the non-finite guard's verdict (``trainer.on_nonfinite=stop`` raises here), the tokens seen
        and the clipped heads counted for the steps that were not skipped."""
        with record_function("k2train.read_metrics"):
            pending.wait()  # host sync
            stages, layers = self.readout.decode(pending.rows.tolist(), NUM_SCALARS)
        loss, aux_loss, gnorm = stages[0]  # the same on every stage
        if not self.guard.check(loss, gnorm, pending.step):
            return StepStats(pending.step, loss, aux_loss, gnorm, pending.lr, skipped=True)
        self.progress["tokens_seen"] += self.tokens_per_step
        self.progress["clipped_heads_total"] += layers.get("clipped_heads", 0)
        return StepStats(pending.step, loss, aux_loss, gnorm, pending.lr, layers=layers)

    def evaluate(self) -> dict[str, float]:
        """The validation loss with the weights as they are now: the mean next-token cross entropy
        over ``trainer.eval_steps`` global batches, the first ones of the validation data every
        time (so that evaluations compare), forward only (no aux loss); with
        ``data.valid_per_dataset``, of each validation dataset (``val_loss/<name>``) and their
        weighted mean (``val_loss``). The same on every rank. Leaves the training data's position
        and what the next update reads (the max logits for QK-Clip, the expert loads for the router
        bias) as they were; waits for the device."""
        if not self._valid_sets:
            raise ValueError("no validation data: set data.valid_split or data.valid_datasets (or pass valid_data)")
        for part in self.parts:
            part.eval()
        try:
            with torch.no_grad(), record_function("k2train.evaluate"):
                losses = torch.stack([self._evaluate_set(data) for data, _ in self._valid_sets.values()])
        finally:
            for part in self.parts:
                part.train()
            for m in self.attention.values():  # the forward recorded these: the next step starts afresh
                m.reset_max_logit()
            for moe in self.moes:
                moe.tokens_per_expert.zero_()
        weights = torch.tensor([w for _, w in self._valid_sets.values()], dtype=torch.float64)
        values = losses.tolist()  # host sync
        out = {"val_loss": float((weights / weights.sum() * torch.tensor(values, dtype=torch.float64)).sum())
               if len(values) > 1 else values[0]}
        out.update({f"val_loss/{name}": v for name, v in zip(self._valid_sets, values) if name})
        return out

    def _evaluate_set(self, data: DataFactory) -> torch.Tensor:
        """One validation set's mean loss over ``trainer.eval_steps`` global batches (on the device)."""
        t, dims = self.cfg.trainer, self.dims
        source = data(dims.dp_rank, dims.dp_size)
        batches, total = iter(source), torch.zeros((), device=self.device)
        try:
            for i in range(t.eval_steps):
                try:
                    step_batches = [next(batches) for _ in range(self.num_microbatches)]
                except StopIteration:
                    raise ValueError(f"the validation data ran out after {i} of trainer.eval_steps={t.eval_steps} "
                                     "global batches: lower trainer.eval_steps or give more data") from None
                total += self._forward_backward(step_batches, backward=False)[0]
        finally:
            if hasattr(source, "close"):
                source.close()
        return total / t.eval_steps

    def _forward_backward(self, batches: list[Batch], backward: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross entropy and aux loss, each the mean over this step's micro-batches and data
        streams; the gradients are left as sums over the micro-batches (``backward=False``: the
        forward alone, for :meth:`evaluate`, under ``torch.no_grad()``)."""
        t, dims, device = self.cfg.trainer, self.dims, self.device
        tp_mesh = dims.tp_mesh if dims.tp > 1 else None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
        if len(batches) != self.num_microbatches:
            raise ValueError(f"train_step got {len(batches)} micro-batches, this layout takes {self.num_microbatches}")
        if dims.cp > 1:  # this rank's part of every sequence (global positions, whole document ids)
            batches = [shard_sequence(b, dims.cp, dims.cp_rank) for b in batches]
        if self.pipeline is not None:
            cat = to_device({k: torch.cat([b[k] for b in batches]) for k in batches[0]}, device)
            with loss_context(tp_mesh), autocast:
                res = pipeline_step(self.pipeline, cat["tokens"], cat["labels"], cat.get("position_ids"), cat.get("doc_ids"),
                                    forward_only=not backward)
            stats = torch.stack([res.ce, res.aux])
        else:
            model = self.parts[0]
            stats = torch.zeros(2, device=device)
            head = not t.loss_chunk_tokens
            # one autocast region for the step, as the pipeline's: autocast's cache then holds each
            # weight's bf16 copy from the first micro-batch to the last (the weights do not change
            # in between), which casts every weight once a step instead of once per micro-batch.
            # No forward follows the last backward: the cache goes before it, so each copy goes
            # when its layer's backward is done instead of staying to the end of the step.
            graphs = t.compile and t.compile_mode in CUDA_GRAPH_COMPILE_MODES
            with autocast:
                for i, batch in enumerate(batches):
                    b = to_device(batch, device)
                    if graphs:  # a new replay of the blocks' CUDA graphs: the last micro-batch's outputs are used up
                        torch.compiler.cudagraph_mark_step_begin()
                    with loss_context(tp_mesh):
                        # the model's output (logits, or the final hidden states for a chunked loss)
                        # is not held here: it goes once the loss has what its backward needs
                        ce = self.loss(model(b["tokens"], position_ids=b.get("position_ids"), doc_ids=b.get("doc_ids"),
                                             head=head), b["labels"])
                        aux = model.aux_loss
                        if backward:
                            if i == len(batches) - 1:
                                torch.clear_autocast_cache()
                            (ce + aux).backward()
                    stats += torch.stack([ce.detach(), aux.detach()]).float()
            stats /= self.num_microbatches
        if backward and t.param_dtype == "bfloat16":  # the fp32 sums of the bf16 weights' gradients become .grad
            publish_fp32_grads_(self.parts)
        # each cp rank's cross entropy is its part of the mean (they add up over cp), its aux loss
        # the whole sequence's (the same on every cp rank)
        stats[1] /= dims.cp
        if dims.dp_size * dims.cp > 1:
            dist.all_reduce(stats, group=dims.dense_dp_mesh.get_group())
            stats /= dims.dp_size
        return stats[0], stats[1]

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> list[dict]:
        """Train until ``trainer.steps``, checkpointing at ``trainer.checkpoint.interval`` and at the
        end (plus the HF export), or until a preemption signal (checkpoint, then return). Returns
        the metrics of every step trained.

        The host queues steps without waiting for the device, and reads their numbers once every
        ``trainer.log_interval`` steps, one step late (the GPU has finished that step and is busy
        with the next when the host asks), and at once at a checkpoint, an evaluation or the last
        step, or every step with ``trainer.on_nonfinite=stop``; a step's time is the time between
        two reads over the steps in between (evaluations excluded). Every
        ``trainer.eval_interval`` steps and after the last, :meth:`evaluate` (before that step's
        checkpoint; its numbers are logged at that step and kept in ``val_history``). A
        preemption signal (on any rank: the ranks' host flags are all-reduced after each step, on
        the CPU) ends the run after the step being launched, with a checkpoint. With
        ``trainer.profile.enable``, the profiler runs over its window of steps
        (:class:`~k2train.profiling.StepProfiler`)."""
        t = self.cfg.trainer
        self.logger.console(self._banner())
        if t.eval_only:
            return self._evaluate_only()
        if self.step >= t.steps:
            self.logger.console(
                f"the checkpoint in {self.checkpointer.folder} is at step {self.step} >= trainer.steps={t.steps}: nothing "
                "to train (raise trainer.steps, or use another trainer.output_dir / trainer.checkpoint.resume=false)"
            )
            return []
        history: list[dict] = []
        # The bar only on a terminal: into a log file it would write a redraw per update.
        bar = None
        if self.is_logging_rank and self.cfg.logging.progress_bar and sys.stderr.isatty():
            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.preemption = PreemptionHandler(time_limit_s=60 * t.exit_after_minutes, started=self._started)
        profiler = StepProfiler(t.profile, self.dims.rank, self.dims.world_size, self.device, self.run_dir / "profile")
        ckpt = t.checkpoint
        collector = GarbageCollector(t.gc_interval)
        collector.start()
        pending: list[PendingStep] = []
        last_read, last_read_step = time.perf_counter(), self.step
        try:
            while self.step < t.steps:
                profiler.before_launch(self.step + 1)
                pending.append(self.launch_step(self.next_batches()))
                step = self.step
                collector.after_launch(step)
                if profiled := profiler.after_launch(step):
                    self._rank_note(profiled, bar)
                # a signal or the time limit on any rank: the same answer on every rank
                stop = self.preemption.should_stop(self._host_group, vote=self.dims.distributed)
                checkpoint_due = bool(ckpt.enable and ckpt.interval and step % ckpt.interval == 0)
                eval_due = bool(t.eval_interval and (step % t.eval_interval == 0 or step == t.steps)) and not stop
                now = stop or checkpoint_due or eval_due or step == t.steps or t.on_nonfinite == "stop"
                if now:
                    due, pending = pending, []
                elif any(p.step % t.log_interval == 0 for p in pending[:-1]):
                    due, pending = pending[:-1], pending[-1:]
                else:
                    continue
                with record_function("k2train.read_metrics"):
                    due[-1].wait()  # the steps finish in order: the one wait of this read
                # the time since the last read, over the steps finished since (one step late
                # between reads; a read at once, at a checkpoint or the last step, waits for two)
                seconds = (time.perf_counter() - last_read) / (due[-1].step - last_read_step)
                last_read, last_read_step = time.perf_counter(), due[-1].step
                for pending_step in due:  # each read and logged in turn: the counters are its own
                    stats = self.read_step(pending_step)
                    if stats.skipped:
                        self.logger.console(
                            f"step {stats.step}: non-finite loss={stats.loss} or grad norm={stats.grad_norm}; step skipped")
                        continue
                    metrics = self._metrics(stats, seconds)
                    history.append(metrics)
                    self.logger.log(stats.step, metrics)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
                    if stats.step % t.log_interval == 0 or stats.step == t.steps:
                        line = format_step(stats.step, t.steps, metrics)
                        bar.write(line) if bar is not None else self.logger.console(line)
                if eval_due:
                    line = self._evaluate_and_log(step)
                    bar.write(line) if bar is not None else self.logger.console(line)
                    last_read = time.perf_counter()  # the next steps' time leaves the evaluation out
                if stop:
                    if profiled := profiler.close(step):
                        self._rank_note(profiled, bar)
                    return self._preempted(step, history)
                if checkpoint_due and step < t.steps:
                    self.checkpointer.save(step, self.checkpoint_state())
                    last_read = time.perf_counter()  # and the checkpoint's
            if profiled := profiler.close(self.step):  # the run ended inside the window
                self._rank_note(profiled, bar)
        finally:
            collector.stop()
            profiler.discard()
            self.preemption.uninstall()
            self.preemption = None
            if bar is not None:
                bar.close()
        if t.checkpoint.enable and history:
            self._final_save()
        return history

    def _evaluate_only(self) -> list[dict]:
        """``trainer.eval_only``: one evaluation of the weights the run starts from, logged."""
        t = self.cfg.trainer
        source = (f"the checkpoint of step {self.step} in {self.checkpointer.folder}" if self.step
                  else f"trainer.checkpoint.load_path={t.checkpoint.load_path}" if t.checkpoint.load_path
                  else "the initial weights (no checkpoint in trainer.output_dir, no trainer.checkpoint.load_path)")
        self.logger.console(f"trainer.eval_only=true: evaluating {source}")
        self.logger.console(self._evaluate_and_log(self.step))
        return []

    def _rank_note(self, line: str, bar=None) -> None:
        """A line about this rank (any rank, not only the logging one: where its profile went)."""
        if self.cfg.logging.console:
            bar.write(line) if bar is not None else print(line, flush=True)

    def _evaluate_and_log(self, step: int) -> str:
        """:meth:`evaluate` after ``step``, logged at that step and kept in ``val_history``; returns
        the console line."""
        start = time.perf_counter()
        losses = self.evaluate()
        loss = losses["val_loss"]
        metrics = {**losses, "val_ppl": math.exp(min(loss, 700.0)), "val_time_s": time.perf_counter() - start}
        self.val_history.append({"step": step, **metrics})
        self.logger.log(step, metrics)
        each = "".join(f" | {k[len('val_loss/'):]} {v:.4f}" for k, v in losses.items() if k != "val_loss")
        batches = f"{self.cfg.trainer.eval_steps}{f' x {len(losses) - 1}' if each else ''} batches"
        return (f"eval {step:>6d}/{self.cfg.trainer.steps} | val loss {loss:.4f} | val ppl {metrics['val_ppl']:,.2f}{each} | "
                f"{batches} in {metrics['val_time_s']:.1f} s")

    def _preempted(self, step: int, history: list[dict]) -> list[dict]:
        t = self.cfg.trainer
        why = ("preemption signal" if self.preemption.reason == "signal"
               else f"trainer.exit_after_minutes={t.exit_after_minutes:g} reached")
        if t.checkpoint.enable:
            self.logger.console(f"{why}: checkpointing at step {step} and exiting")
            self.checkpointer.save(step, self.checkpoint_state(), blocking=True)
        else:
            self.logger.console(f"{why}: exiting at step {step} (trainer.checkpoint.enable=false: no checkpoint)")
        return history

    def _final_save(self) -> None:
        """The last checkpoint (blocking) and, with ``trainer.checkpoint.export_hf``, its HF export
        next to it (``<step>/hf``), written by rank 0."""
        c = self.cfg.trainer.checkpoint
        folder = self.checkpointer.save(self.step, self.checkpoint_state(), blocking=True)
        if c.export_hf:
            if self.dims.rank == 0:
                export_hf(folder, folder / "hf", dtype=c.export_dtype, max_shard_size=c.max_shard_size, progress=False)
            if self.dims.distributed:
                dist.barrier()

    def _metrics(self, stats: StepStats, seconds: float) -> dict[str, Any]:
        metrics = {
            "loss": stats.loss,
            "aux_loss": stats.aux_loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_s": self.tokens_per_step / seconds,
            "step_time_s": seconds,
            "tokens_seen": self.progress["tokens_seen"],
            "skipped_steps": self.guard.skipped,
            **stats.layers,
            "clipped_heads_total": self.progress["clipped_heads_total"],
        }
        if self.peak_tflops is not None:
            world = self.dims.world_size
            metrics["mfu"] = self.tokens_per_step / seconds * self.flops_per_token / (self.peak_tflops * 1e12 * world)
            metrics["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.spikes.update(stats.loss):
            metrics["loss_spike"] = 1
            self.logger.console(f"step {stats.step}: loss spike {stats.loss:.4f} vs running mean {self.spikes.mean:.4f}")
        return metrics

    def _banner(self) -> str:
        t, d = self.cfg.trainer, self.dims
        n_params = sum(p.numel() for part in self.parts for p in part.parameters())
        resume = f", resuming at step {self.step}" if self.step else ""
        return (
            f"k2train | model {self.cfg.model.name} | {n_params:,} params on this rank | device {self.device} | "
            f"world {d.world_size} (pp {d.pp}, dp {d.dp}, ep {d.ep}, tp {d.tp})\n"
            f"{t.steps} steps x {self.tokens_per_step:,} tokens ({self.num_microbatches} micro-batches of "
            f"{t.micro_batch_size}x{t.seq_len} per data-parallel rank){resume}\nrun dir {self.run_dir}\n"
            f"{describe_param_groups(self.optimizer)}"
        )


def _expert_load_summary(loads: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per MoE layer, on the device: max / mean routed tokens per expert, and experts that got none
    (``[2, L]``; None without MoE layers)."""
    if not loads:
        return None
    load_LE = torch.stack(loads)
    return torch.stack([load_LE.amax(1) / load_LE.mean(1).clamp_min(1e-9), (load_LE == 0).sum(1).to(load_LE.dtype)])


def _destroy_process_group(exc_type, exc, tb) -> None:
    # A barrier first: without one, gloo rarely aborts at exit. Not after an error: another rank
    # may be gone, and the barrier would wait for it until the collective timeout.
    if dist.is_initialized():
        if exc_type is None:
            dist.barrier()
        dist.destroy_process_group()
