"""The typed config: presets compose, bad values fail early with messages that say what to change."""

import subprocess
import sys

import pytest

from k2train.config import load_config


def test_default_composes_to_tiny():
    cfg = load_config()
    assert cfg.model.name == "k2_tiny"
    assert cfg.optim.name == "muonclip"
    assert cfg.trainer.output_dir == "runs/default"
    cfg.validate()


def test_k2_1t_is_the_public_config():
    m = load_config(["model=k2_1t"]).model
    expect = dict(
        hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=1, intermediate_size=18432,
        moe_intermediate_size=2048, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384,
        num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.827, vocab_size=163840,
        rope_theta=50000.0, max_position_embeddings=131072, rms_norm_eps=1e-6, bos_token_id=163584,
        eos_token_id=163585, aux_loss_alpha=0.001, norm_topk_prob=True, initializer_range=0.02,
    )
    assert {k: getattr(m, k) for k in expect} == expect
    assert m.rope_scaling.type == "none"


def test_yarn_experiment():
    m = load_config(["model=k2_1t", "experiment=long_context_32k"])
    rs = m.model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow) == ("yarn", 32.0, 4096, 1.0, 1.0)
    assert m.trainer.seq_len == 32768


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
        (["model.num_experts_per_tok=32"], "exceeds model.n_routed_experts=16"),
        (["model.attn_impl=cudnn"], "model.attn_impl='cudnn' is not one of"),
        (["trainer.seq_len=8192"], "exceeds model.max_position_embeddings=4096"),
        (["model.qk_rope_head_dim=15"], "must be even"),
        (["model.bos_token_id=99999"], "outside the vocabulary"),
        (["parallel.vpp=2"], "needs parallel.pp_schedule=Interleaved1F1B"),
        (["optim.ns_dtype=float16"], "optim.ns_dtype=float16 is for optim.ns_method=gram"),
        (["optim.ns_method=gram", "optim.ns_gram_restarts=[5]"], "each restart is an iteration index in [1, optim.ns_steps=5)"),
    ],
)
def test_bad_values_say_what_to_change(overrides, fragment):
    with pytest.raises(ValueError, match=None) as e:
        load_config(overrides).validate()
    assert fragment in str(e.value)


@pytest.mark.parametrize("overrides", [["model=nope"], ["model.hidden=3"], ["optim.lr=fast"]])
def test_unknown_preset_key_or_type_fails_at_composition(overrides):
    with pytest.raises(Exception) as e:
        load_config(overrides)
    assert any(w in str(e.value) for w in ("nope", "hidden", "lr", "fast"))


def test_cli_prints_resolved_config_and_rejects_bad_values():
    out = subprocess.run(
        [sys.executable, "-m", "k2train.train", "--cfg", "job", "model=k2_1t"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "hidden_size: 7168" in out.stdout and "n_routed_experts: 384" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "k2train.train", "optim.lr=-3"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0
    assert "optim.lr=-3.0 must be > 0" in bad.stderr
