"""Our model against HF transformers' DeepseekV3ForCausalLM, loaded through its real reader."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from k2train.config import RopeScalingConfig, load_config  # noqa: E402
from k2train.hf import from_hf, hf_config_dict, hf_state_dict, model_config_from_hf  # noqa: E402
from k2train.model import K2Model  # noqa: E402


def _tiny(yarn: bool):
    cfg = load_config(["model=k2_tiny"]).model
    cfg = dataclasses.replace(cfg, vocab_size=512, bos_token_id=0, eos_token_id=1, num_hidden_layers=3)
    if yarn:
        cfg = dataclasses.replace(
            cfg, rope_scaling=RopeScalingConfig(type="yarn", factor=8.0, original_max_position_embeddings=16)
        )
    return cfg


def _randomize_router_bias(model):
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)


@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_logits_match_transformers(tmp_path, yarn):
    cfg = _tiny(yarn)
    torch.manual_seed(0)
    model = K2Model(cfg)
    model.init_weights(seed=1)
    # Larger-than-init weights make routing and attention non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(5.0)
    _randomize_router_bias(model)
    model.eval()

    sd = {k: v for k, v in model.state_dict().items()}
    save_file(hf_state_dict(sd), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, torch_dtype="float32")))

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    # routing must be non-trivial for the comparison to mean anything
    assert ours.std() > 0.1


def test_name_mapping_round_trip():
    cfg = _tiny(False)
    model = K2Model(cfg)
    names = set(model.state_dict())
    hf_names = hf_state_dict({k: torch.zeros(v.shape) for k, v in model.state_dict().items()})
    back = {from_hf(n)[0] for n in hf_names}
    assert back == names
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in hf_names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf_names
    assert model_config_from_hf(hf_config_dict(cfg), name=cfg.name) == cfg
