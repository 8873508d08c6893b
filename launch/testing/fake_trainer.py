"""A stand-in for ``k2train.train`` with the same launch contract and no model (for launcher tests).

    K2_ENTRY=fake_trainer PYTHONPATH=launch/testing sbatch launch/slurm.sbatch trainer.output_dir=DIR trainer.steps=60

Every rank joins a gloo process group (so the torchrun rendezvous is real), installs the trainer's
:class:`~k2train.faults.PreemptionHandler`, and counts steps (``step_s`` seconds each). Rank 0
"checkpoints" the step to ``DIR/checkpoint.json`` every ``trainer.checkpoint.interval`` steps and on
preemption; a new run starts from it. Each rank appends what it did to ``DIR/events.jsonl``.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from k2train.faults import PreemptionHandler
from k2train.runtime import rank_from_env, resolve_run_id


def parse(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a)


def main() -> int:
    args = parse(sys.argv[1:])
    out = Path(args["trainer.output_dir"])
    steps = int(args.get("trainer.steps", 50))
    interval = int(args.get("trainer.checkpoint.interval", 0))
    step_s = float(args.get("step_s", 0.5))
    rank, _, world = rank_from_env()
    run_id = resolve_run_id()
    preempt = PreemptionHandler()
    dist.init_process_group("gloo")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.json"

    def event(kind: str, **kw) -> None:
        rec = {"event": kind, "rank": rank, "world": world, "run_id": run_id, "time": time.time(),
               "job": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), **kw}
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    event("start", step=start, args=sys.argv[1:])
    step = start
    while step < steps:
        time.sleep(step_s)
        step += 1
        stop = preempt.should_stop()
        if (interval and step % interval == 0) or stop or step == steps:
            dist.barrier()
            if rank == 0:
                tmp = ckpt.with_suffix(".tmp")
                tmp.write_text(json.dumps({"step": step}))
                os.replace(tmp, ckpt)
        if stop:
            event("preempted", step=step)
            break
    else:
        event("done", step=step)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
