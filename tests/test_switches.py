"""Every configuration switch changes what it says (or is refused with a fix that works)."""

import threading

import pytest
import torch

from k2train.config import load_config
from k2train.data_pipeline.loader import build_data_loader, load_tokenizer
from k2train.model import K2Model
from k2train.model.rope import rope_inv_freq
from k2train.parallel import ParallelDims
from k2train.parallel.memory import format_memory_report


def test_max_position_embeddings_sizes_the_rope_table_and_bounds_the_sequence():
    cfg = load_config(["model=k2_tiny", "model.max_position_embeddings=16"]).model
    model = K2Model(cfg)
    model.init_weights(seed=0)
    assert model.rope_cos.shape == (16, cfg.qk_rope_head_dim // 2)
    inv_freq, _ = rope_inv_freq(cfg)
    torch.testing.assert_close(model.rope_cos[7], (7.0 * inv_freq).cos(), rtol=0, atol=0)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds model.max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="trainer.seq_len=32 exceeds model.max_position_embeddings=16"):
        load_config(["model.max_position_embeddings=16", "trainer.seq_len=32"]).validate()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_data_prefetch_zero_reads_in_the_loop_else_a_thread(prefetch):
    cfg = load_config([f"data.prefetch={prefetch}"])
    before = {t for t in threading.enumerate() if t.name == "k2-data"}
    loader = build_data_loader(cfg.data, load_tokenizer(cfg.data), seq_len=32, micro_batch_size=2, dp_rank=0,
                               dp_size=1, vocab_size=cfg.model.vocab_size)
    try:
        batch = next(loader)
        assert batch["tokens"].shape == (2, 32)
        threads = {t for t in threading.enumerate() if t.name == "k2-data"} - before
        assert len(threads) == (1 if prefetch else 0)
    finally:
        loader.close()


def test_plain_muon_is_muonclip_without_the_clip():
    muon, muonclip = load_config(["optim=muon"]).optim, load_config(["optim=muonclip"]).optim
    assert muon.name == muonclip.name == "muonclip" and not muon.qk_clip and muonclip.qk_clip
    with pytest.raises(ValueError, match=r"optim.name='muon' is not one of \['muonclip', 'adamw'\]"):
        load_config(["optim.name=muon"])


def test_gpu_memory_gb_gives_the_planner_a_verdict():
    cfg = load_config(["model=k2_1t", "parallel=k2_h800", "trainer.seq_len=4096", "trainer.micro_batch_size=1",
                       "trainer.global_batch_size=16384", "trainer.dtype=bfloat16"])
    assert cfg.parallel.gpu_memory_gb == 80
    report = format_memory_report(cfg.model, cfg.parallel, cfg.trainer, cfg.optim)
    assert "on 74.5 GiB GPUs (80 GB)" in report and "fit" in report
    cfg.parallel.gpu_memory_gb = 0
    assert "GiB GPUs" not in format_memory_report(cfg.model, cfg.parallel, cfg.trainer, cfg.optim)


def test_layout_errors_name_a_fix_that_works():
    cfg = load_config(["parallel=tp2", "trainer.seq_len=33", "trainer.micro_batch_size=1", "trainer.global_batch_size=2"])
    with pytest.raises(ValueError, match="make trainer.seq_len a multiple of 2"):
        ParallelDims.from_config(cfg.parallel, 2).validate(cfg.model, cfg.trainer)
    cfg.trainer.seq_len = 34  # the fix the message names
    ParallelDims.from_config(cfg.parallel, 2).validate(cfg.model, cfg.trainer)
    bad = load_config(["parallel=pp2_vpp2", "trainer.micro_batch_size=1", "trainer.global_batch_size=3"])
    with pytest.raises(ValueError, match="make it a multiple of|a multiple of 2"):
        ParallelDims.from_config(bad.parallel, 2).validate(bad.model, bad.trainer)
