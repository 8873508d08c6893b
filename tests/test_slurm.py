"""launch/slurm.sbatch against a real one-node Slurm (slurmctld + slurmd + munge on localhost).

The cluster comes from launch/testing/slurm_local.sh (install: ``slurm_local.sh install`` as root).
Without Slurm the tests skip and say why; with ``K2_REQUIRE_SLURM=1`` (CI) they fail instead.

What is proven, with torchrun's c10d rendezvous and 2 gloo workers per job:
- the batch script starts every rank with the same run id (the job id);
- ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1@120`` does before the time limit)
  reaches the workers and not torchrun, the workers checkpoint and exit 0, the script requeues the
  job, and the requeued job (same id, restart count 1) resumes from that checkpoint and finishes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# A real Slurm cluster shares the machine with whatever else runs: these tests run on their own,
# serially, after the main suite (`python -m pytest -q -m slurm`; see README and .ci/run).
pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "launch" / "testing" / "slurm_local.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"


def _unavailable(reason: str):
    if os.environ.get("K2_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as b:
                    b.bind(("", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a fresh cluster, torn down after the module."""
    missing = [exe for exe in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(exe) is None]
    if missing:
        _unavailable(f"Slurm is not installed ({', '.join(missing)} missing): run `{SETUP} install` as root")
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "K2_SLURM_PORT": str(_free_port_pair())}
    up = subprocess.run([str(SETUP), "up", str(root)], env=env, capture_output=True, text=True, timeout=120)
    if up.returncode != 0:
        subprocess.run([str(SETUP), "down", str(root)], capture_output=True, timeout=60)
        _unavailable(f"could not start a local Slurm cluster:\n{up.stdout}\n{up.stderr}")
    yield str(root / "slurm.conf")
    subprocess.run([str(SETUP), "down", str(root)], capture_output=True, timeout=120)


def _slurm_env(conf: str, **extra: str) -> dict:
    env = {**os.environ, "SLURM_CONF": conf, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _scontrol_job(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    fields = {}
    for tok in out.stdout.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            fields[k] = v
    return fields


def _wait(cond, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _events(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _preempt_requeue_and_wait(env: dict, job: str, ready, log: Path, timeout: float):
    """USR1 to the batch shell once ``ready()``; then skip Slurm's 2-minute requeue delay."""
    _wait(ready, timeout, "the first run to start", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    _wait(lambda: int(_scontrol_job(env, job).get("Restarts", 0)) >= 1, timeout, "the requeue", log)
    # A requeued job becomes eligible only after a fixed delay (about 120 s); start it sooner, but
    # not within the second of the requeue: slurmd compares credential times in whole seconds and
    # would kill the relaunch with "Job credential revoked" (seen in CI).
    _wait(lambda: _scontrol_job(env, job).get("JobState") == "PENDING", 30, "the job to pend", log)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, check=True, timeout=30)
    return _wait(
        lambda: (s := _scontrol_job(env, job).get("JobState")) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
        timeout, "the requeued job to finish", log,
    )


def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """The launcher mechanics with a model-free stand-in trainer (launch/testing/fake_trainer.py)."""
    out, log = tmp_path / "out", tmp_path / "slurm.out"
    env = _slurm_env(slurm, PYTHONPATH=str(REPO / "launch" / "testing"), K2_ENTRY="fake_trainer",
                     GPUS_PER_NODE="2", K2_DEVICE="cpu", OMP_NUM_THREADS="1")
    steps = 40
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=10", f"--output={log}",
         str(SBATCH), f"trainer.output_dir={out}", f"trainer.steps={steps}", "step_s=0.25"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip().split(";")[0]
    events = out / "events.jsonl"
    state = _preempt_requeue_and_wait(
        env, job, lambda: sum(e["event"] == "start" for e in _events(events)) == 2, log, timeout=120
    )
    assert state == "COMPLETED", log.read_text()[-3000:]

    ev = _events(events)
    by = lambda kind, restart: sorted((e for e in ev if e["event"] == kind and e["restart"] == restart), key=lambda e: e["rank"])
    first, preempted, second, done = by("start", "0"), by("preempted", "0"), by("start", "1"), by("done", "1")
    assert [e["rank"] for e in first] == [0, 1] and [e["rank"] for e in preempted] == [0, 1]
    assert {e["run_id"] for e in ev} == {job} and {e["job"] for e in ev} == {job}
    stop_step = preempted[0]["step"]
    assert preempted[1]["step"] == stop_step and 0 < stop_step < steps
    # The requeued job starts where the preempted one checkpointed, and runs to the end.
    assert [e["step"] for e in second] == [stop_step, stop_step] and [e["step"] for e in done] == [steps, steps]
    text = log.read_text()
    assert "trainer exited with status 0 after USR1" in text and "requeueing job" in text
    assert "restart 1 |" in text


@pytest.mark.slow
def test_real_trainer_under_slurm_resumes(slurm, tmp_path):
    """k2train.train itself: k2_tiny on 2 gloo ranks (dp2), checkpoints, USR1, requeue, resume."""
    out, log = tmp_path / "out", tmp_path / "slurm.out"
    env = _slurm_env(slurm, GPUS_PER_NODE="2", K2_DEVICE="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    steps = 40
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=15", f"--output={log}", str(SBATCH),
         f"trainer.output_dir={out}", f"trainer.steps={steps}", "parallel=dp2", "trainer.global_batch_size=4",
         "trainer.micro_batch_size=2", "trainer.seq_len=64", "trainer.checkpoint.interval=5",
         "trainer.checkpoint.export_hf=false", "logging.progress_bar=false", "trainer.log_interval=1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip().split(";")[0]
    metrics = out / "logs" / job / "metrics.jsonl"
    state = _preempt_requeue_and_wait(env, job, lambda: len(_events(metrics)) >= 6, log, timeout=400)
    assert state == "COMPLETED", log.read_text()[-3000:]
    seq = [r["step"] for r in _events(metrics)]
    # Preempted at a step boundary and checkpointed there, the requeued job continues right after
    # it: every step exactly once (a fresh start would repeat 1, 2, ...).
    assert seq == list(range(1, steps + 1)), seq
    assert "restart 1 |" in log.read_text()
    assert list(out.rglob("step-*/COMPLETE")), "no complete checkpoint under the output dir"
