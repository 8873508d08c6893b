"""trainer.deterministic: the same config, data and seed give the same bits, run after run, across a
crash and resume, in several processes, and on a GPU.

What "the same bits" covers: the loss and grad norm of every step, and every tensor the checkpoint
stores (the DCP shard files byte for byte, the per-rank state). What differs between two runs by
design: the run folder's name and the wandb run id derived from it, and DCP's own save ids and
paths in ``.metadata``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

import parallel_harness as h
from k2train.config import load_config
from k2train.train import run
from k2train.trainer import Trainer

SMALL = ["model=k2_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
         "trainer.deterministic=true", "trainer.checkpoint.export_hf=false", "logging.wandb=false",
         "logging.progress_bar=false", "optim.schedule=constant", "optim.warmup_steps=2"]


def _cli_run(out: Path, steps: int) -> list[dict]:
    """The trainer in its own process (torch's default thread count), as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-m", "k2train.train", f"trainer.steps={steps}", f"trainer.output_dir={out}",
                          *SMALL], capture_output=True, text=True, timeout=300, cwd=out.parent, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics,) = (out / "logs").glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("*.distcp"))
    assert shards and shards == sorted(p.name for p in b.glob("*.distcp"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"
    ma, mb = FileSystemReader(str(a)).read_metadata(), FileSystemReader(str(b)).read_metadata()
    assert ma.state_dict_metadata == mb.state_dict_metadata and ma.storage_data == mb.storage_data
    for extra in sorted((a / "extra").glob("*.pt")):
        ea, eb = (torch.load(d / "extra" / extra.name, weights_only=False) for d in (a, b))
        ea["train"].pop("wandb_run_id"), eb["train"].pop("wandb_run_id")
        assert _equal(ea, eb), f"{extra.name} differs"


def _equal(x, y) -> bool:
    if torch.is_tensor(x):
        return torch.is_tensor(y) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(u, v) for u, v in zip(x, y))
    try:
        return bool(x == y) if not hasattr(x, "shape") else bool((x == y).all())
    except ValueError:
        return False


def test_two_runs_give_the_same_bits(tmp_path):
    a, b = _cli_run(tmp_path / "a", 4), _cli_run(tmp_path / "b", 4)
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]
    assert_same_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004", tmp_path / "b" / "checkpoints" / "step-00000004")


class _Crash(RuntimeError):
    pass


def test_crash_and_resume_give_the_same_bits(tmp_path, monkeypatch):
    """Crash during step 3 of a run that checkpoints every 2 steps, resume: steps 3-4 and the final
    checkpoint are the uninterrupted run's, bit for bit."""
    cfg = lambda out: load_config([*SMALL, "trainer.steps=4", "trainer.checkpoint.interval=2",  # noqa: E731
                                   f"trainer.output_dir={out}"])
    straight = run(cfg(tmp_path / "a"), run_dir=tmp_path / "a" / "logs")
    launch_step = Trainer.launch_step

    def crashing(self, batches):
        if self.step == 2:
            raise _Crash("power cut")
        return launch_step(self, batches)

    monkeypatch.setattr(Trainer, "launch_step", crashing)
    with pytest.raises(_Crash):
        run(cfg(tmp_path / "b"), run_dir=tmp_path / "b" / "logs1")
    monkeypatch.setattr(Trainer, "launch_step", launch_step)
    resumed = run(cfg(tmp_path / "b"), run_dir=tmp_path / "b" / "logs2")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight[2:]]
    assert_same_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000004", tmp_path / "b" / "checkpoints" / "step-00000004")


def test_a_two_process_layout_twice_gives_the_same_bits():
    """EP2 (gloo, two processes), twice: losses, gradients and parameters equal bit for bit."""
    import dataclasses

    trainer = dataclasses.replace(h.TRAINER, deterministic=True)
    jobs = {f"run{i}": h.job(dict(ep=2, dp=1), trainer=trainer) for i in range(2)}
    results = h.run_jobs(jobs, 2)
    a, b = (h.merged(results[name]) for name in jobs)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for key in ("grads", "params", "buffers"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_compile_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="use trainer.compile=false for bitwise reproducible runs"):
        load_config(["trainer.deterministic=true", "trainer.compile=true", "parallel.recompute=full"]).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_runs_give_the_same_bits(tmp_path):
    """One GPU, bf16, the Triton kernels (attention with its dq, MoE, norms, SwiGLU, Newton-Schulz):
    two deterministic runs agree bit for bit, losses and weights."""
    overrides = ["model=k2_tiny", "trainer.seq_len=256", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
                 "trainer.dtype=bfloat16", "trainer.device=cuda", "trainer.deterministic=true", "trainer.steps=6",
                 "trainer.checkpoint.enable=false", "logging.wandb=false", "logging.progress_bar=false",
                 "logging.console=false", "model.attn_impl=triton", "model.moe_impl=triton", "model.norm_impl=triton",
                 "model.mlp_impl=triton", "optim.ns_impl=triton", "optim.ns_method=gram"]
    runs = []
    for name in ("a", "b"):
        cfg = load_config([*overrides, f"trainer.output_dir={tmp_path / name}"])
        with Trainer(cfg, run_dir=tmp_path / name / "logs") as t:
            losses = [m["loss"] for m in t.run()]
            runs.append((losses, {k: v.detach().cpu().clone() for p in t.parts for k, v in p.state_dict().items()}))
    (la, wa), (lb, wb) = runs
    assert la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
