"""A training step's memory, traced on the CPU with fake tensors, against the planner.

    python scripts/trace_memory.py long_context              # bench_trainer.py's cases, no GPU needed
    python scripts/trace_memory.py memory --only "muonclip m=8 none|muonclip m=8 fp8$" --top 12
    python scripts/trace_memory.py --set model=k2_1t model.num_hidden_layers=4 model.n_routed_experts=16 \\
        trainer.seq_len=32768 trainer.global_batch_size=1 parallel.recompute=full trainer.loss_chunk_tokens=4096

Each case builds the trainer users run (``k2train.trainer.Trainer``) inside ``FakeTensorMode``: its
weights, batches and activations are shapes without storage, so a step of a model that needs a
140 GB GPU runs on a laptop in seconds. The Triton kernels are torch custom ops (``k2kernels::*``)
whose fake implementations give their outputs' shapes, so the step saves what it saves on the GPU.
:class:`k2train.profiling.TensorMemoryTrace` counts every tensor the step's second launch creates
(the first makes the optimizer states) and prints, per phase, the traced peak beside the planner's
(``k2train.parallel.memory.estimate_memory``): the forward/backward's peak against the larger of
the planner's activation peak and end of the backward, the optimizer step's, and what the
backward leaves (weights, gradients, states); ``--top N`` lists what is alive at the peaks of the forward/backward and
of the optimizer step by source line.

The step takes the paths a GPU takes: the Triton kernels (their launches skipped: fake tensors
have no storage to read; torch allocates their outputs before), the optimizer's fused kernels,
Newton-Schulz in the half precision ``optim.ns_dtype=auto`` picks on a GPU. What it cannot show:
workspace a kernel allocates inside itself, the caching allocator's rounding and fragmentation,
and CPU offload (a no-op on the CPU: those rows trace as no offload). Layouts of one process only.
Rows also go to ``$OUT/trace_memory.jsonl``, one JSON object per line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

# The Triton kernels' custom-op path (the one the GPU runs) is taken on CPU tensors only when the
# kernel modules are imported under the interpreter; fake tensors then reach the ops' fake
# implementations, never the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import SUITES, random_tokens  # noqa: E402

from k2train.config import load_config  # noqa: E402
from k2train.parallel.memory import estimate_memory, trainer_precision  # noqa: E402
from k2train.profiling import TensorMemoryTrace  # noqa: E402
from k2train.trainer import Trainer  # noqa: E402

GiB = 2**30
PHASES = ("k2train.forward_backward", "k2train.optimizer")  # --top lists what is alive at their peaks


@contextlib.contextmanager
def _kernels_skip_fake_tensors():
    """Triton kernels launched directly (not through a custom op: Newton-Schulz, the fused
    optimizers) get fake tensors here: their outputs are allocated by torch before the launch, so
    the launch itself, which would read and write storage that does not exist, is skipped."""
    from triton.runtime.interpreter import InterpretedFunction

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


def trace_case(name: str, overrides: list[str], top: int = 0, fake: bool = True) -> dict:
    """One case: the traced peak of each phase of a training step against the planner's
    (``fake=False``: real tensors, for a model the CPU can hold)."""
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config([*overrides, "trainer.checkpoint.enable=false", "logging.wandb=false",
                           "logging.console=false", "logging.progress_bar=false", "logging.jsonl=false",
                           "trainer.steps=2", f"trainer.output_dir={work}"])
        notes = []
        if fake and cfg.optim.ns_dtype == "auto":  # what "auto" picks on a GPU (fp32 on a CPU)
            cfg.optim.ns_dtype = "float16" if cfg.optim.ns_method == "gram" else "bfloat16"
        if cfg.parallel.offload_activations:
            notes.append("offload is a no-op on the CPU: traced as none, planned as on a GPU")
        if cfg.trainer.compile:
            raise ValueError(f"{name}: trainer.compile=true cannot be traced with fake tensors; drop it")
        t = cfg.trainer
        plan = estimate_memory(cfg.model, cfg.parallel, t, cfg.optim, trainer_precision(t)).peak
        row = {"case": name, "overrides": overrides, "plan_gib": plan.total / GiB,
               "plan_phases_gib": {k: v / GiB for k, v in plan.phases.items()}, "notes": notes,
               # what the backward leaves (its phase less what is alive only at its very end)
               "plan_after_backward_gib": (plan.phases["the end of the backward"] - plan.transient_at_backward_end) / GiB}
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), \
                _fake_materialize() if fake else contextlib.nullcontext(), \
                _kernels_skip_fake_tensors() if fake else contextlib.nullcontext():
            with Trainer(cfg, run_dir=Path(work) / "run",
                         data=random_tokens(cfg.model.vocab_size, t.micro_batch_size, t.seq_len)) as tr:
                if tr.dims.world_size != 1:
                    raise ValueError(f"{name}: {tr.dims.world_size} processes; a fake step traces one-process layouts")
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
                    row["composition"] = {k: [(b / GiB, w) for b, w in trace.composition(k, top)] for k in PHASES
                                          if k in trace.peaks}
        return row


def show(row: dict) -> str:
    traced, planned = row["traced_phases_gib"], row["plan_phases_gib"]
    cells = []
    for phase, plan in (("k2train.forward_backward", max(planned["the activation peak"], planned["the end of the backward"])),
                        ("k2train.optimizer", planned["the optimizer step"])):
        got = traced.get(phase)
        cells.append(f"{got:8.2f} {plan:8.2f} {plan / got - 1:+6.1%}" if got else f"{'':8s} {plan:8.2f} {'':6s}")
    end = row.get("traced_backward_end_gib", float("nan"))
    cells.append(f"{end:8.2f} {row['plan_after_backward_gib']:8.2f}")
    return f"{row['case']:34s} " + "   ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", nargs="?", choices=sorted(SUITES), help="bench_trainer.py's cases (default: one case "
                    "from --set alone)")
    ap.add_argument("--only", default="", help="the cases whose name contains one of these texts, '|'-separated "
                    "(a text ending in '$': the case of exactly that name)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides appended to every case")
    ap.add_argument("--top", type=int, default=0, help="list what is alive at each phase's peak (N lines)")
    args = ap.parse_args()
    if args.suite:
        parts = args.only.split("|")
        cases = [(n, [*o, *args.set]) for n, o in SUITES[args.suite]()
                 if any(n == part[:-1] if part.endswith("$") else part in n for part in parts)]
    else:
        cases = [("--set", args.set)]
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / "trace_memory.jsonl"
    print(f"{'':34s} {'forward/backward peak':^24s}   {'optimizer step':^24s}   {'after the backward':^17s}")
    print(f"{'case':34s} " + "   ".join([f"{'traced':>8s} {'planner':>8s} {'error':>6s}"] * 2)
          + f"   {'traced':>8s} {'planner':>8s}  (GiB)")
    with open(out, "a") as log:
        for name, overrides in cases:
            row = trace_case(name, overrides, args.top)
            print(show(row), flush=True)
            for note in row["notes"]:
                print(f"      ({note})")
            for phase, lines in row.get("composition", {}).items():
                print(f"      at the peak of {phase}:")
                for gib, where in lines:
                    print(f"      {gib:8.2f} GiB  {where}")
            log.write(json.dumps(row) + "\n")
    print(f"rows: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
