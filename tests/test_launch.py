"""k2train.runtime and the launch scripts: every rank agrees on one run folder, only rank 0 writes
Hydra's files, the logging rank is the first of the last pipeline stage, ``--cfg job`` and ``-m``
multirun work through ``python -m k2train.train``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2train.runtime import (
    RUN_ID_ENV,
    default_wandb_run_id,
    hydra_overrides_for_rank,
    logging_rank,
    prepare_hydra_argv,
    resolve_run_id,
)

REPO = Path(__file__).resolve().parent.parent


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           (RUN_ID_ENV, "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(kw)
    return env


def test_run_id_precedence():
    assert resolve_run_id({RUN_ID_ENV: "mine", "SLURM_JOB_ID": "7"}) == "mine"
    assert resolve_run_id({"SLURM_JOB_ID": "7"}) == "7"
    assert resolve_run_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"}) == "7_3"
    stamp = resolve_run_id({})
    assert len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit()


def test_several_ranks_without_a_shared_id_fail_clearly():
    with pytest.raises(ValueError, match=f"set {RUN_ID_ENV}"):
        resolve_run_id({"WORLD_SIZE": "2", "RANK": "1"})


def test_only_rank0_writes_hydra_files():
    assert hydra_overrides_for_rank(["train.py", "optim.lr=1"], 0) == []
    assert hydra_overrides_for_rank(["train.py"], 3) == ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    # the user's own choice wins (Hydra rejects a key given twice)
    assert hydra_overrides_for_rank(["t", "hydra.output_subdir=x", "hydra/job_logging=stdout"], 1) == []
    env = {"RANK": "1", "WORLD_SIZE": "2", RUN_ID_ENV: "42"}
    assert prepare_hydra_argv(["t", "-m", "optim.lr=1,2"], env)[-2:] == ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    env = {"SLURM_JOB_ID": "5"}
    assert prepare_hydra_argv(["t", "--help"], env) == ["t", "--help"] and env[RUN_ID_ENV] == "5"


@pytest.mark.parametrize("world, pp, expect", [(1, 1, 0), (8, 1, 0), (8, 2, 4), (16, 4, 12), (4, 4, 3)])
def test_logging_rank_is_first_of_last_stage(world, pp, expect):
    assert logging_rank(world, pp) == expect


def test_logging_rank_rejects_bad_layout():
    with pytest.raises(ValueError, match="not divisible by parallel.pp=3"):
        logging_rank(8, 3)


def test_wandb_id_is_a_function_of_the_run_folder(tmp_path):
    a, b = default_wandb_run_id(tmp_path / "x"), default_wandb_run_id(tmp_path / "y")
    assert a == default_wandb_run_id(tmp_path / "x" / ".." / "x") and a != b
    assert a.startswith("k2-") and len(a) == 15


# Each rank writes its own file: two ranks printing to one pipe can interleave mid-line.
_PRINT_ID = (
    "import sys, pathlib\n"
    "from k2train.runtime import resolve_run_id, rank_from_env\n"
    "pathlib.Path(sys.argv[1], f'rank{rank_from_env()[0]}.txt').write_text(resolve_run_id())\n"
)


def test_torchrun_ranks_agree_on_a_timestamp(tmp_path):
    """No K2TRAIN_RUN_ID, no Slurm: rank 0's timestamp reaches rank 1 through torchrun's store."""
    script = tmp_path / "print_id.py"
    script.write_text(_PRINT_ID)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
        env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ids = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert ids[0] == ids[1] and len(ids[0]) == 15, ids


def test_cfg_job_prints_the_resolved_config(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "k2train.train", "--cfg", "job", "model=k2_1t", f"trainer.output_dir={tmp_path}"],
        env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hidden_size: 7168" in out.stdout and "n_routed_experts: 384" in out.stdout
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


@pytest.mark.slow  # another ~20 s interpreter start; test_config.py covers the messages
def test_config_error_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "k2train.train", "optim.lr=-3", f"trainer.output_dir={tmp_path}"],
        env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode != 0 and "config error: optim.lr=-3.0 must be > 0" in out.stderr


def test_cpu_script_usage():
    out = subprocess.run([str(REPO / "launch" / "cpu.sh")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage:" in out.stderr


def test_cpu_script_trains_dp2_with_one_run_folder(tmp_path):
    """launch/cpu.sh 2 parallel=dp2: one run folder; .hydra/ and train.log from rank 0 only."""
    out = subprocess.run(
        [str(REPO / "launch" / "cpu.sh"), "2", "parallel=dp2", "trainer.steps=2", "trainer.global_batch_size=4",
         "trainer.micro_batch_size=2", "trainer.seq_len=32", "logging.progress_bar=false", "logging.wandb=false",
         "trainer.checkpoint.export_hf=false", f"trainer.output_dir={tmp_path}"],
        env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [run_dir] = list((tmp_path / "logs").iterdir())
    assert [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "config.json").exists()
    assert (run_dir / "git_revision").read_text().strip()
    log = (run_dir / "train.log").read_text()
    assert "saved checkpoint" in log  # rank 0's log lines; rank 1 writes no file
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".log") == ["train.log"]


def test_multirun_sweep_two_jobs(tmp_path):
    """``-m`` sweeps run jobs one after another, each in multirun/<id>/<num> with its own metrics.
    Each job checkpoints into its own folder, so the second job trains instead of resuming the first."""
    out = subprocess.run(
        [sys.executable, "-m", "k2train.train", "-m", "optim.lr=1e-3,2e-3", "trainer.steps=2", "trainer.seq_len=32",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "logging.progress_bar=false",
         "logging.wandb=false", f"trainer.output_dir={tmp_path}"],
        env=_env(**{RUN_ID_ENV: "sweep1"}), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "multirun" / "sweep1"
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        cfg = json.loads((root / str(num) / "config.json").read_text())
        assert cfg["optim"]["lr"] == lr
        steps = [json.loads(l)["step"] for l in (root / str(num) / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert (root / str(num) / "checkpoints" / "latest").exists()
    assert not (tmp_path / "checkpoints").exists()
    assert (root / "multirun.yaml").exists()


def test_pipeline_run_logs_every_stages_layers(tmp_path):
    """Under PP each rank measures its own layers; the logging rank (last stage) reports them all."""
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "k2train.train",
        "model=k2_tiny", "parallel=pp2", "trainer.steps=2", "trainer.seq_len=32", "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.dtype=float32", "trainer.device=cpu", "logging.wandb=false",
        "logging.progress_bar=false", "trainer.checkpoint.enable=false", "data.prefetch=0",
        "optim.qk_clip_tau=0.05", f"trainer.output_dir={tmp_path}",
    ]  # fmt: skip
    out = subprocess.run(args, env=_env(OMP_NUM_THREADS="1", **{RUN_ID_ENV: "pp"}), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "logs" / "pp" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    layers = range(4)  # k2_tiny: layer 0 dense, 1-3 MoE; the first stage holds 0 (and maybe 1)
    assert all(f"max_logit/layer_{i}" in last and f"clipped_heads/layer_{i}" in last for i in layers)
    assert all(f"expert_load_max_over_mean/layer_{i}" in last for i in (1, 2, 3))
    assert last["clipped_heads"] == sum(last[f"clipped_heads/layer_{i}"] for i in layers)
    assert last["max_logit"] == max(last[f"max_logit/layer_{i}"] for i in layers)
    assert last["clipped_heads_total"] == sum(r["clipped_heads"] for r in rows) > 0
