"""HF export/import: transformers loads our export with matching logits; FP8 block-scale import;
clear errors for broken inputs."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from k2train.checkpoint import CheckpointManager, load_model_weights
from k2train.config import CheckpointConfig, load_config
from k2train.convert import INDEX_FILE, dequantize_fp8_blocks, export_hf, import_hf, main, quantize_fp8_blocks
from k2train.hf import hf_config_dict, hf_state_dict
from k2train.model import K2Model


def _cfg():
    cfg = load_config(["model=k2_tiny"]).model
    return dataclasses.replace(cfg, vocab_size=512, bos_token_id=0, eos_token_id=1, num_hidden_layers=3)


def _model(cfg, seed=1):
    model = K2Model(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger weights: non-trivial routing and attention
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(5.0)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _save(model, root):
    mgr = CheckpointManager(root, CheckpointConfig(export_hf=False))
    return mgr.save(7, {"model": model})


def _tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))


def test_export_loads_in_transformers_with_matching_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _cfg()
    model = _model(cfg)
    _save(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32", max_shard_size="300KB", progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3, "the size bound should split this model into several shards"
    for s in shards:  # every shard respects the bound unless it holds a single larger tensor
        from safetensors import safe_open

        with safe_open(str(out / s), "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).nbytes for k in keys)
        assert size <= 300_000 or len(keys) == 1
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == cfg.n_routed_experts

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32, attn_implementation="eager")
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf.eval()(tokens).logits
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    assert ours.std() > 0.1


def test_round_trip_is_exact_and_bf16_export_keeps_fp32_bias(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    _save(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="float32", max_shard_size="1MB", progress=False)
    imported = import_hf(tmp_path / "hf", tmp_path / "imported", dtype="float32", progress=False)
    fresh = K2Model(cfg)
    fresh.init_weights(seed=99)
    assert load_model_weights(imported, fresh) == 0
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k

    # bf16 export: matrices bf16, the router bias stays fp32 (as in released checkpoints)
    assert main(["to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "bf16")]) == 0
    from safetensors import safe_open

    index = json.loads((tmp_path / "bf16" / INDEX_FILE).read_text())["weight_map"]
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(str(tmp_path / "bf16" / index[name]), "pt") as f:
        assert f.get_tensor(name).dtype == torch.float32
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    with safe_open(str(tmp_path / "bf16" / index[name]), "pt") as f:
        t = f.get_tensor(name)
    assert t.dtype == torch.bfloat16 and torch.equal(t, model.layers["1"].mlp.experts.w_up[3].bfloat16())


def test_dequantize_matches_per_element_definition():
    torch.manual_seed(0)
    w = torch.randn(200, 300) * 3
    fp8, scale = quantize_fp8_blocks(w)
    assert scale.shape == (2, 3)  # ceil(200/128), ceil(300/128): partial edge blocks
    rows = torch.arange(200) // 128
    cols = torch.arange(300) // 128
    ref = fp8.float() * scale[rows][:, cols]
    assert torch.equal(dequantize_fp8_blocks(fp8, scale), ref)
    assert ((ref - w).norm() / w.norm()) < 0.05  # e4m3 keeps ~3 mantissa bits
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        dequantize_fp8_blocks(fp8, scale[:1])


def _fp8_quantized(name, t):
    # K2's release quantizes the linear weights; embeddings, head, norms and the router stay high precision.
    return t.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name and not name.endswith("mlp.gate.weight")


def _write_fp8_folder(folder, cfg, model):
    folder.mkdir()
    tensors = {}
    for name, t in hf_state_dict(model.state_dict()).items():
        if _fp8_quantized(name, t):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(t.bfloat16().float())
        else:
            tensors[name] = t.bfloat16() if not name.endswith("e_score_correction_bias") else t
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_cfg = hf_config_dict(cfg)
    hf_cfg["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
    }
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    return tensors


def test_fp8_block_scaled_import(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    tensors = _write_fp8_folder(tmp_path / "k2fp8", cfg, model)
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    ckpt = import_hf(tmp_path / "k2fp8", tmp_path / "imported", dtype="float32", progress=False)
    fresh = K2Model(cfg)
    load_model_weights(ckpt, fresh)
    sd = fresh.state_dict()
    # q_b_proj is [192, 64]: one full and one partial 128-row block
    name = "model.layers.0.self_attn.q_b_proj.weight"
    fp8, scale = tensors[name], tensors[name + "_scale_inv"]
    assert scale.shape == (math.ceil(192 / 128), 1)
    expect = fp8.float() * scale[torch.arange(192) // 128][:, torch.arange(64) // 128]
    assert torch.equal(sd["layers.0.self_attn.q_b_proj.weight"], expect)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    expect = tensors[name].float() * tensors[name + "_scale_inv"][torch.arange(128) // 128][:, torch.arange(64) // 128]
    assert torch.equal(sd["layers.2.mlp.experts.w_down"][5], expect)
    assert torch.equal(sd["layers.1.mlp.gate.e_score_correction_bias"], model.layers["1"].mlp.gate.e_score_correction_bias)
    assert torch.equal(sd["embed_tokens.weight"], model.embed_tokens.weight.bfloat16().float())
    # every dequantized matrix is the original to e4m3 precision (~3 mantissa bits)
    for k, v in model.state_dict().items():
        assert (sd[k] - v).norm() <= 0.05 * v.norm(), k


def _hf_folder(tmp_path, cfg):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(hf_state_dict(_model(cfg).state_dict()), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    return folder


def test_truncated_missing_and_misshapen_inputs_fail_clearly(tmp_path):
    cfg = _cfg()
    folder = _hf_folder(tmp_path, cfg)
    path = folder / "model.safetensors"
    good = path.read_bytes()

    path.write_bytes(good[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        import_hf(folder, tmp_path / "o1", progress=False)
    with pytest.raises(SystemExit) as e:
        main(["from-hf", "--input", str(folder), "--output", str(tmp_path / "o1")])
    assert e.value.code == 2

    tensors = hf_state_dict(_model(cfg).state_dict())
    del tensors["model.layers.2.mlp.experts.9.gate_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.2.mlp.experts.9.gate_proj.weight'"):
        import_hf(folder, tmp_path / "o2", progress=False)

    hf_cfg = hf_config_dict(dataclasses.replace(cfg, q_lora_rank=32))
    path.write_bytes(good)
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match="q_a_proj.weight has shape \\(64, 128\\), config.json implies \\(32, 128\\)"):
        import_hf(folder, tmp_path / "o3", progress=False)


def test_export_rejects_incomplete_checkpoint_and_wrong_preset(tmp_path):
    cfg = _cfg()
    folder = _save(_model(cfg), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="lacks 17 model tensors of config 'k2_tiny'"):
        export_hf(folder, tmp_path / "hf", preset="k2_tiny", progress=False)  # vocab 4352 vs 512
    (folder / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="no valid checkpoint|not usable"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
