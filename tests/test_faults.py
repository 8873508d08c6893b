"""Fault handling: the non-finite guard (the trainer's skipped step: tests/test_trainer.py), spikes;
preemption by a real signal to a real training process, then resume."""

import datetime
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from k2train.faults import (
    LossSpikeDetector,
    NonFiniteError,
    NonFiniteGuard,
    PreemptionHandler,
    collective_timeout,
)


def test_nonfinite_stop_policy_raises_with_values():
    guard = NonFiniteGuard("stop")
    assert guard.check(1.0, 2.0, 1)
    with pytest.raises(NonFiniteError, match="step 7: loss=nan"):
        guard.check(float("nan"), 1.0, 7)
    with pytest.raises(ValueError, match="'maybe'"):
        NonFiniteGuard("maybe")


def test_loss_spike_detector():
    det = LossSpikeDetector(factor=2.0, window=5, min_history=3)
    assert [det.update(v) for v in (4.0, 4.1, 3.9)] == [False] * 3
    assert det.update(9.0)  # > 2 x 4.0
    assert det.update(8.5)  # spikes stay out of the mean
    assert not det.update(4.0) and det.spikes == 2
    fresh = LossSpikeDetector(factor=2.0, window=5, min_history=3)
    fresh.load_state_dict(det.state_dict())
    assert fresh.mean == det.mean and fresh.spikes == 2


def test_preemption_handler_sets_flag_on_signal():
    handler = PreemptionHandler()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.should_stop() and handler.requested == signal.SIGUSR1
    finally:
        handler.uninstall()


def test_collective_timeout():
    assert collective_timeout(90) == datetime.timedelta(seconds=90)
    with pytest.raises(ValueError, match="timeout_s=0"):
        collective_timeout(0)


# A minimal training process: the same calls the trainer makes (CheckpointManager + PreemptionHandler).
_LOOP = textwrap.dedent(
    """
    import sys, time, torch
    from k2train.checkpoint import CheckpointManager
    from k2train.config import CheckpointConfig
    from k2train.faults import PreemptionHandler

    folder, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = {"seen": 0}
    mgr = CheckpointManager(folder, CheckpointConfig(export_hf=False))
    state = {"model": model, "optimizer": opt, "data": data}
    start = mgr.load_latest(state) or 0
    print("start", start, flush=True)
    preempt = PreemptionHandler()
    for step in range(start + 1, steps + 1):
        x = torch.randn(4, 16)
        model(x).pow(2).mean().backward()
        opt.step(); opt.zero_grad()
        data["seen"] += 4
        print("step", step, flush=True)
        time.sleep(0.05)
        if preempt.should_stop():
            mgr.save(step, state)
            print("preempted", step, flush=True)
            sys.exit(0)
    mgr.save(steps, state)
    print("done", steps, flush=True)
    """
)


def test_signal_checkpoints_exits_zero_and_resumes(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(_LOOP)
    folder = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "100000"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3"):
            proc.send_signal(signal.SIGUSR1)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    stopped = int(out.split("preempted")[1].split()[0])
    assert stopped >= 3
    res = subprocess.run(
        [sys.executable, str(script), str(folder), str(stopped + 2)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert f"start {stopped}" in res.stdout and f"done {stopped + 2}" in res.stdout


@pytest.mark.slow  # two trainer processes: ~70 s on a loaded 2-core machine
def test_trainer_preemption_and_resume(tmp_path):
    args = [sys.executable, "-m", "k2train.train", "trainer.steps=100000", "trainer.seq_len=32", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=2", "logging.wandb=false", "logging.progress_bar=false", "data.prefetch=0",
            f"trainer.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", "trainer.log_interval=1",
            "trainer.checkpoint.export_hf=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if re.search(r"step\s+2/", line):
                proc.send_signal(signal.SIGUSR1)
                break
        out = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "preemption signal" in out
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert ckpts, "the preempted run left no checkpoint"
    stopped = int(ckpts[-1].name.split("-")[1])
    res = subprocess.run(args[:3] + [f"trainer.steps={stopped + 1}"] + args[4:], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"at step {stopped}" in res.stdout
    assert (tmp_path / "checkpoints" / f"step-{stopped + 1:08d}" / "COMPLETE").exists()
