"""A training step's memory, measured on the CPU: the trainer's step run on fake tensors and traced.

    python -m k2train.plan <overrides> --trace [--top 20]      # the plan, then the traced step beside it
    python scripts/trace_memory.py long_context                 # the GPU benchmark's cases

:func:`trace_step` builds the trainer users run (``k2train.trainer.Trainer``) inside
``FakeTensorMode``: weights, batches and activations are shapes without storage, so a step of a
model that needs a 140 GB GPU runs on a laptop in seconds. The step takes a GPU's paths: our
Triton kernels are torch custom ops whose fake implementations give their outputs' shapes, the
kernels launched directly (Newton-Schulz, the fused optimizer passes) have their launches skipped
(torch allocates their outputs before), and Newton-Schulz runs in the half precision
``optim.ns_dtype=auto`` picks on a GPU. :class:`k2train.profiling.TensorMemoryTrace` counts every
tensor the step's second launch creates (the first makes the optimizer states), per phase.

What it cannot show: workspace a kernel allocates inside itself, the caching allocator's rounding
and fragmentation, and CPU offload (a no-op on the CPU: such a step traces as no offload).
One-process layouts only. On the K2-width proxy the traced peaks were within 0.5% of the H200's
``max_memory_allocated``. Autocast differs between the CPU and CUDA for the cross entropy (CUDA
keeps the log-softmax in bf16): the trace takes CUDA's way (:func:`_cuda_autocast_cross_entropy`),
without which it read one fp32 [chunk x vocabulary] tensor more than the GPU where the loss's
backward is the peak (k2_small at 32K: 6% above).

The Triton kernels take their custom-op path on CPU tensors only when their modules are imported
under ``TRITON_INTERPRET=1`` (``python -m k2train.plan --trace`` and the script set it first).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .config import JobConfig
from .model.moe import grouped_mm_supported
from .parallel.memory import estimate_memory, trainer_precision
from .profiling import TensorMemoryTrace

GiB = 2**30
PHASES = ("k2train.forward_backward", "k2train.optimizer")  # the compositions reported


@contextlib.contextmanager
def _kernels_skip_fake_tensors():
    """Triton kernels launched directly (not through a custom op) get fake tensors here: the
    launch, which would read and write storage that does not exist, is skipped."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no triton: every kernel takes its torch path
        yield
        return

    def run(self, *args, **kwargs):
        if any(isinstance(a, FakeTensor) for a in (*args, *kwargs.values())):
            return None
        return saved(self, *args, **kwargs)

    saved = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = saved


@contextlib.contextmanager
def _cuda_autocast_cross_entropy():
    """``F.cross_entropy`` under autocast as CUDA runs it. CPU autocast casts the logits to fp32
    first (``cross_entropy_loss`` is on its fp32 list), so the log-softmax, its saved output and
    its input's gradient are fp32. CUDA autocast lists only the ops inside: ``cross_entropy_loss``
    calls ``log_softmax`` with the logits' own dtype, which CUDA's policy keeps (bf16 log-probs),
    then ``nll_loss``, on both fp32 lists (its input cast to fp32). Under this context the CPU
    takes CUDA's path: one [tokens x vocabulary] tensor is bf16 where the CPU's is fp32."""
    import torch.nn.functional as F

    saved = F.cross_entropy

    def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                      reduction="mean", label_smoothing=0.0):
        if (not torch.is_autocast_enabled("cpu") or input.dtype == torch.float32 or weight is not None
                or label_smoothing or size_average is not None or reduce is not None):
            return saved(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        log_probs = torch.log_softmax(input, 0 if input.dim() == 1 else 1, dtype=input.dtype)
        return F.nll_loss(log_probs, target, ignore_index=ignore_index, reduction=reduction)

    F.cross_entropy = cross_entropy
    try:
        yield
    finally:
        F.cross_entropy = saved


@contextlib.contextmanager
def _fake_materialize():
    """``Module.to_empty`` under FakeTensorMode: the trainer builds its model on the meta device
    and materializes it with ``to_empty``, whose parameter swap a fake tensor refuses (the fake
    mode holds a weak reference to every tensor it converted). New parameters instead; nothing
    holds the meta ones at that point (hooks come later, on the materialized weights)."""

    def to_empty(module, *, device, recurse=True):
        for m in module.modules() if recurse else [module]:
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = torch.empty_like(b, device=device)
        return module

    saved = torch.nn.Module.to_empty
    torch.nn.Module.to_empty = to_empty
    try:
        yield
    finally:
        torch.nn.Module.to_empty = saved


def random_tokens(vocab: int, micro: int, seq: int):
    """A data factory for ``Trainer(data=...)``: each data stream's endless micro-batches of random
    token ids (its own seed), for runs whose numbers do not depend on the text (memory, speed)."""

    def factory(dp_rank: int, dp_size: int):
        g = torch.Generator().manual_seed(1000 + dp_rank)
        while True:
            rows = torch.randint(0, vocab, (micro, seq + 1), generator=g)
            yield {"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}

    return factory


def trace_step(cfg: JobConfig, top: int = 0, fake: bool = True) -> dict:
    """One training step of ``cfg``, traced: ``traced_phases_gib`` (the peak of each ``k2train.*``
    phase), ``traced_backward_end_gib`` (alive when the forward/backward ends), with ``top`` the
    ``composition`` at the peaks of :data:`PHASES` (GiB, source line), beside the planner's
    ``plan_phases_gib`` and ``plan_after_backward_gib``. ``fake=False``: real tensors, for a model
    the CPU can hold (the same numbers: tests/test_memory_model.py)."""
    from .trainer import Trainer  # (the trainer imports this package's profiling)

    cfg = copy.deepcopy(cfg)  # the changes below are the trace's, not the caller's
    t, p = cfg.trainer, cfg.parallel
    if p.tp * p.ep * p.pp * p.cp * max(p.dp, 1) != 1:
        raise ValueError(f"tracing a step runs one process; this layout has tp={p.tp} ep={p.ep} pp={p.pp} cp={p.cp} "
                         f"dp={p.dp}: trace a one-process configuration (parallel.*=1) or read the planner's estimate")
    if t.dtype != "bfloat16" or cfg.model.moe_impl == "loop":
        # the routed experts would loop over the tokens each expert got: a count fake tensors do not have
        raise ValueError(f"trainer.dtype={t.dtype}, model.moe_impl={cfg.model.moe_impl}: a traced step needs the "
                         "routed experts' grouped GEMMs, which take bf16: set trainer.dtype=bfloat16 and "
                         "model.moe_impl=grouped_mm or triton")
    if cfg.model.moe_impl == "grouped_mm" and not grouped_mm_supported(torch.empty(0, dtype=torch.bfloat16)):
        raise ValueError(f"model.moe_impl=grouped_mm: torch {torch.__version__} has no grouped GEMM on the CPU (2.13 "
                         "has), which a traced step runs: trace with model.moe_impl=triton (the GPU's path)")
    if t.compile:
        raise ValueError("trainer.compile=true cannot be traced on fake tensors: set trainer.compile=false (the "
                         "memory a compiled block holds is about the eager one's)")
    notes = []
    if fake and cfg.optim.ns_dtype == "auto":  # what "auto" picks on a GPU (fp32 on a CPU)
        cfg.optim.ns_dtype = "float16" if cfg.optim.ns_method == "gram" else "bfloat16"
    if p.offload_activations:
        notes.append("offload is a no-op on the CPU: traced as none, planned as on a GPU")
    plan = estimate_memory(cfg.model, p, t, cfg.optim, trainer_precision(t)).peak
    row = {"plan_gib": plan.total / GiB, "plan_phases_gib": {k: v / GiB for k, v in plan.phases.items()},
           # what the backward leaves (its phase less what is alive only at its very end)
           "plan_after_backward_gib": (plan.phases["the end of the backward"] - plan.transient_at_backward_end) / GiB,
           "notes": notes}
    with tempfile.TemporaryDirectory() as work:
        # nothing written, nothing evaluated: two steps of random tokens
        t.checkpoint.enable, t.eval_interval, t.steps, t.output_dir = False, 0, max(t.steps, 2), work
        cfg.logging.wandb = cfg.logging.console = cfg.logging.progress_bar = cfg.logging.jsonl = False
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), \
                _fake_materialize() if fake else contextlib.nullcontext(), \
                _kernels_skip_fake_tensors() if fake else contextlib.nullcontext(), \
                _cuda_autocast_cross_entropy():  # real tensors too: both trace what a GPU holds
            with Trainer(cfg, run_dir=Path(work) / "run",
                         data=random_tokens(cfg.model.vocab_size, t.micro_batch_size, t.seq_len)) as tr:
                if fake and getattr(tr.optimizer, "fused", False) is None:  # the fused kernels, as on a GPU
                    tr.optimizer.fused = True
                tr.launch_step(tr.next_batches())  # makes the optimizer states
                batches = tr.next_batches()
                gc.collect()
                trace = TensorMemoryTrace(stacks=top > 0)
                with trace:
                    params = [p for part in tr.parts for p in part.parameters()]
                    trace.track(params, "weights")
                    trace.track((getattr(p, "main_grad", None) for p in params), "fp32 gradient sums (main_grad)")
                    trace.track((p.grad for p in params), "gradients of the last step")
                    trace.track((v for s in tr.optimizer.state.values() for v in s.values()
                                 if isinstance(v, torch.Tensor)), "optimizer states")
                    del params
                    tr.launch_step(batches)
    row["traced_phases_gib"] = {k: b / GiB for k, (b, _) in trace.peaks.items()}
    if "k2train.forward_backward" in trace.at_exit:
        row["traced_backward_end_gib"] = trace.at_exit["k2train.forward_backward"] / GiB
    row["traced_gib"] = trace.peak / GiB
    if top:
        row["composition"] = {k: [(b / GiB, w) for b, w in trace.composition(k, top)] for k in PHASES if k in trace.peaks}
    return row


def format_header(label: str = "case") -> str:
    """The two header lines of :func:`format_row`'s table."""
    cells = "   ".join([f"{'traced':>8s} {'planner':>8s} {'error':>6s}"] * 2)
    return (f"{'':34s} {'forward/backward peak':^24s}   {'optimizer step':^24s}   {'after the backward':^17s}\n"
            f"{label:34s} {cells}   {'traced':>8s} {'planner':>8s}  (GiB)")


def format_row(name: str, row: dict, top: bool = True) -> str:
    """One line of :func:`format_header`'s table (the planner's error against the trace), then the notes
    and, when traced with ``top``, what is alive at each peak."""
    traced, planned = row["traced_phases_gib"], row["plan_phases_gib"]
    cells = []
    for phase, plan in (("k2train.forward_backward", max(planned["the activation peak"], planned["the end of the backward"])),
                        ("k2train.optimizer", planned["the optimizer step"])):
        got = traced.get(phase)
        cells.append(f"{got:8.2f} {plan:8.2f} {plan / got - 1:+6.1%}" if got else f"{'':8s} {plan:8.2f} {'':6s}")
    end = row.get("traced_backward_end_gib", float("nan"))
    cells.append(f"{end:8.2f} {row['plan_after_backward_gib']:8.2f}")
    lines = [f"{name:34s} " + "   ".join(cells)]
    lines += [f"      ({note})" for note in row["notes"]]
    for phase, composition in row.get("composition", {}).items() if top else ():
        lines.append(f"      at the peak of {phase}:")
        lines += [f"      {gib:8.2f} GiB  {where}" for gib, where in composition]
    return "\n".join(lines)
