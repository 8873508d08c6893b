"""Exact resume through the trainer itself: k2train.train.run for 2N steps straight vs N steps
(final save), then a restart that resumes and trains N more. Losses bit for bit (CPU, fp32, and
bf16 weights with fp32 masters: the masters travel in the optimizer state)."""

import pytest

from k2train.config import load_config


def _cfg(out, steps, *precision):
    return load_config([
        "model=k2_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        f"trainer.steps={steps}", f"trainer.output_dir={out}", "trainer.device=cpu",
        *(precision or ("trainer.dtype=float32",)),
        "trainer.checkpoint.export_hf=false", "logging.wandb=false", "logging.progress_bar=false", "data.prefetch=0",
        "optim.warmup_steps=2",
    ])


@pytest.mark.parametrize("precision", [(), ("trainer.dtype=bfloat16", "trainer.param_dtype=bfloat16")],
                         ids=["fp32", "bf16_params"])
def test_trainer_resume_is_bit_exact(tmp_path, one_thread, precision):
    from k2train.train import run

    n = 2
    straight = [m["loss"] for m in run(_cfg(tmp_path / "a", 2 * n, *precision), run_dir=tmp_path / "a" / "logs")]
    first = [m["loss"] for m in run(_cfg(tmp_path / "b", n, *precision), run_dir=tmp_path / "b" / "logs1")]
    assert (tmp_path / "b" / "checkpoints" / f"step-{n:08d}" / "COMPLETE").exists()
    second = [m["loss"] for m in run(_cfg(tmp_path / "b", 2 * n, *precision), run_dir=tmp_path / "b" / "logs2")]
    assert len(straight) == 2 * n and len(first) == n and len(second) == n
    assert first + second == straight, f"{first + second} != {straight}"
