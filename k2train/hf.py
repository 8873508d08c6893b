"""Names and config between k2train and Hugging Face DeepseekV3 / Kimi K2 checkpoints.

Our parameter names are HF's without the ``model.`` prefix, except the routed experts: we store
each MoE layer's experts stacked (``mlp.experts.w_gate [E, I, D]``, ``w_up``, ``w_down [E, D, I]``)
while checkpoints hold one tensor per expert (``mlp.experts.{e}.gate_proj.weight`` ...). The
functions here work one tensor at a time so that conversion can stream a 1T model shard by shard.
"""

import re
from typing import Iterator, Optional

import torch

from .config import ModelConfig, RopeScalingConfig

_EXPERT_STACKS = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_EXPERT_NAMES = {v: k for k, v in _EXPERT_STACKS.items()}
_HF_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_config_dict(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """``config.json`` for ``DeepseekV3ForCausalLM`` with the K2 fields."""
    rs = cfg.rope_scaling
    rope_scaling = None
    if rs.type == "yarn":
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "mscale": rs.mscale,
            "mscale_all_dim": rs.mscale_all_dim,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": "sigmoid",
        "aux_loss_alpha": cfg.aux_loss_alpha,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "use_cache": True,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": torch_dtype,
    }


def model_config_from_hf(hf: dict, name: str = "hf") -> ModelConfig:
    """The inverse of :func:`hf_config_dict` (for ``from-hf`` imports)."""
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1:
        raise ValueError(
            f"group-limited routing (n_group={hf.get('n_group')}, topk_group={hf.get('topk_group')}) is not "
            "supported: k2train implements K2's single-group router"
        )
    rs = hf.get("rope_scaling") or {}
    rope = RopeScalingConfig()
    if rs and rs.get("rope_type", rs.get("type")) == "yarn":
        rope = RopeScalingConfig(
            type="yarn",
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32)),
            beta_slow=float(rs.get("beta_slow", 1)),
            mscale=float(rs.get("mscale", 1)),
            mscale_all_dim=float(rs.get("mscale_all_dim", 0)),
        )
    eos = hf.get("eos_token_id", 0)
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        first_k_dense_replace=hf["first_k_dense_replace"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf["q_lora_rank"],
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_shared_experts=hf["n_shared_experts"],
        routed_scaling_factor=float(hf["routed_scaling_factor"]),
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        aux_loss_alpha=float(hf.get("aux_loss_alpha", 0.001)),
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_scaling=rope,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=int(hf.get("bos_token_id", 0)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
    )


def to_hf(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) -> HF checkpoint (name, tensor) pairs; expert stacks split per expert."""
    if name == "lm_head.weight":
        yield name, tensor
        return
    m = re.match(r"^(layers\.\d+\.mlp\.experts)\.(w_gate|w_up|w_down)$", name)
    if m:
        proj = _EXPERT_STACKS[m.group(2)]
        for e in range(tensor.shape[0]):
            yield f"model.{m.group(1)}.{e}.{proj}.weight", tensor[e]
        return
    yield f"model.{name}", tensor


def from_hf(hf_name: str) -> Optional[tuple[str, Optional[int]]]:
    """HF checkpoint name -> (our name, expert index or None); None for tensors we do not keep
    (multi-token-prediction layers, rotary caches)."""
    if hf_name == "lm_head.weight":
        return hf_name, None
    m = _HF_EXPERT_RE.match(hf_name)
    if m:
        return f"layers.{m.group(1)}.mlp.experts.{_EXPERT_NAMES[m.group(3)]}", int(m.group(2))
    if not hf_name.startswith("model.") or "rotary_emb" in hf_name:
        return None
    return hf_name[len("model."):], None


def hf_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole state dict in HF checkpoint naming (small models and tests; conversion streams)."""
    out = {}
    for name, t in model_state.items():
        for hf_name, hf_t in to_hf(name, t):
            out[hf_name] = hf_t.contiguous()
    return out
