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


def test_resume_takes_the_configs_hyperparameters_and_the_checkpoints_progress(tmp_path, capsys):
    # A checkpoint holds the hyperparameters of the run that saved it; a run resumed with another
    # peak lr, weight decay and schedule length trains with the config's from the resumed step: the
    # same lrs as a fresh run of that config at those steps. Resumed with the saving run's own config
    # (the exact-resume test above), nothing is reported.
    from k2train.train import run

    new = ["optim.lr=2e-3", "optim.weight_decay=0.05", "optim.schedule=wsd", "optim.decay_steps=2"]
    run(_cfg(tmp_path / "b", 2, "optim.lr=1e-3"), run_dir=tmp_path / "b" / "logs1")
    capsys.readouterr()
    resumed = run(_cfg(tmp_path / "b", 4, *new), run_dir=tmp_path / "b" / "logs2")
    out = capsys.readouterr().out
    fresh = run(_cfg(tmp_path / "c", 4, *new), run_dir=tmp_path / "c" / "logs")
    assert [m["lr"] for m in resumed] == [m["lr"] for m in fresh[2:]] and resumed[0]["lr"] != resumed[1]["lr"]
    assert "resume: the config's settings replace the checkpoint's:" in out
    assert "muon.weight_decay: 0.1 -> 0.05" in out and "adamw_no_decay.weight_decay" not in out
    assert "lr at step 2: 0.001 -> 0.002 (peak 0.001 -> 0.002)" in out
    run(_cfg(tmp_path / "b", 4, *new), run_dir=tmp_path / "b" / "logs3")  # at step 4: nothing to train
    out = capsys.readouterr().out
    assert "nothing to train" in out and "resume: the config's settings" not in out
    # a longer run moves WSD's decay: the lr at the resumed step is the new schedule's, and said so
    run(_cfg(tmp_path / "b", 8, *new), run_dir=tmp_path / "b" / "logs4")
    assert "lr at step 4: 0.0003 -> 0.002 (peak 0.002 -> 0.002)" in capsys.readouterr().out


def test_resume_with_another_optimizer_is_refused_and_the_weights_load_alone(tmp_path):
    # MuonClip's state resumed as AdamW's: one clear error before any step, naming a parameter, both
    # param groups and the way out; that way out (the weights with a fresh optimizer) trains
    from k2train.train import run

    run(_cfg(tmp_path / "b", 2), run_dir=tmp_path / "b" / "logs1")
    with pytest.raises(ValueError, match=r"holds another optimizer's state: 44 parameters are in other param groups, "
                                         r"e.g. .* was in 'muon' \(muon\), this config puts it in 'adamw' \(adamw\)"
                                         r".*trainer.checkpoint.load_path=.*step-00000002 trainer.checkpoint.resume=false"):
        run(_cfg(tmp_path / "b", 4, "optim=adamw"), run_dir=tmp_path / "b" / "logs2")
    weights = str(tmp_path / "b" / "checkpoints" / "step-00000002")
    history = run(_cfg(tmp_path / "c", 2, "optim=adamw", f"trainer.checkpoint.load_path={weights}",
                       "trainer.checkpoint.resume=false"), run_dir=tmp_path / "c" / "logs")
    assert len(history) == 2
