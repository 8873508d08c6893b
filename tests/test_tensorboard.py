"""TensorBoard: the event file a run writes (logging.tensorboard=true) reads back, through
TensorBoard's own reader, with the numbers of metrics.jsonl, validation included."""

import json
import sys

import pytest

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from k2train.config import load_config  # noqa: E402
from k2train.metrics import MetricLogger  # noqa: E402


def test_run_scalars_equal_the_jsonl(tmp_path):
    from k2train.train import run

    cfg = load_config([f"trainer.output_dir={tmp_path / 'out'}", "trainer.seq_len=32", "trainer.micro_batch_size=2",
                       "trainer.global_batch_size=2", "trainer.steps=3", "trainer.checkpoint.enable=false",
                       "logging.progress_bar=false", "logging.wandb=false", "logging.tensorboard=true",
                       "data.valid_split=0.05", "trainer.eval_interval=2", "trainer.eval_steps=1"])
    run(cfg, run_dir=tmp_path / "logs")
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    acc = event_accumulator.EventAccumulator(str(tmp_path / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "max_logit/layer_0", "val_loss", "val_ppl"} <= set(
        acc.Tags()["scalars"])
    for key in ("loss", "grad_norm", "lr", "max_logit/layer_0", "expert_load_max_over_mean/layer_1", "val_loss"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want] != [], key
        assert all(abs(g - w) <= 1e-6 * abs(w) for (_, g), (_, w) in zip(got, want)), key  # stored as fp32
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]


def test_missing_package_is_a_clear_error_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = load_config(["logging.tensorboard=true"]).logging
    for enabled in (True, False):
        with pytest.raises(ValueError, match="logging.tensorboard=true needs the tensorboard package: pip install"):
            MetricLogger(cfg, tmp_path, enabled=enabled)
