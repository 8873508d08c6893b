"""The entry points: console scripts for each, and a user's mistake ends with one line and exit code 2
(the traceback only when asked for)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ENTRY_POINTS = {
    "k2train-train": "k2train.train:main",
    "k2train-plan": "k2train.plan:main",
    "k2train-convert": "k2train.convert:main",
    "k2train-prepare": "k2train.data_pipeline.prepare:main",
}
TRAIN = ["trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "logging.wandb=false",
         "logging.progress_bar=false", "trainer.checkpoint.export_hf=false"]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **env})


def _one_line_error(res: subprocess.CompletedProcess, fragment: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], res.stderr[-3000:]


def test_every_entry_point_has_a_console_script():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("k2train-")}
    assert scripts == ENTRY_POINTS
    for ep in entry_points(group="console_scripts"):
        if ep.name in ENTRY_POINTS:
            assert callable(ep.load())


def test_config_errors(tmp_path):
    _one_line_error(_run([sys.executable, "-m", "k2train.train", "optim.lr=-3"], tmp_path), "optim.lr=-3.0 must be > 0")
    _one_line_error(_run([sys.executable, "-m", "k2train.train", "model.hidden=3"], tmp_path), "model.hidden")
    _one_line_error(_run([sys.executable, "-m", "k2train.plan", "trainer.steps=0"], tmp_path), "trainer.steps=0 must be > 0")


def test_bad_paths_and_corrupt_checkpoints(tmp_path):
    res = _run([sys.executable, "-m", "k2train.convert", "to-hf", "--checkpoint", str(tmp_path / "nope"), "--output",
                str(tmp_path / "hf")], tmp_path)
    _one_line_error(res, "no valid checkpoint in")
    # A real checkpoint with a shard cut short, given as initial weights.
    out = tmp_path / "run"
    res = _run([sys.executable, "-m", "k2train.train", "trainer.steps=1", f"trainer.output_dir={out}", *TRAIN], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "checkpoints" / "step-00000001"
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = [sys.executable, "-m", "k2train.train", "trainer.steps=1", f"trainer.output_dir={tmp_path / 'other'}",
            f"trainer.checkpoint.load_path={folder}", *TRAIN]
    _one_line_error(_run(args, tmp_path), "is truncated")
    shown = _run(args, tmp_path, K2TRAIN_TRACEBACK="1")  # the traceback when asked for
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "is truncated" in shown.stderr


def test_data_tokenized_with_another_tokenizer(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(50)))
    prefix = tmp_path / "shard"
    res = _run([sys.executable, "-m", "k2train.data_pipeline.prepare", "--input", str(docs), "--output", str(prefix),
                "--workers", "1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads(prefix.with_suffix(".json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 16  # as if another tokenizer had made the shard
    prefix.with_suffix(".json").write_text(json.dumps(manifest))
    res = _run([sys.executable, "-m", "k2train.train", "trainer.steps=1", f"trainer.output_dir={tmp_path / 'out'}",
                "data=megatron", f"+data.datasets=[{{path: {prefix}, weight: 1.0}}]", *TRAIN], tmp_path)
    _one_line_error(res, "was tokenized with tokenizer")


@pytest.mark.parametrize("script", ["k2train-plan"])
def test_console_script_runs(script, tmp_path):
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e . installs it)")
    res = _run([str(exe), "model=k2_tiny"], tmp_path)
    assert res.returncode == 0 and "FLOPs per token" in res.stdout, res.stderr[-2000:]
