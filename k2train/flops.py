"""Exact parameter counts (from the model built on the meta device) and FLOPs per token.

Two FLOP conventions, both per token for a forward+backward pass (x6 = 2 forward + 4 backward):
- Megatron: 6 x (activated matmul weights: attention, dense FFN, 8 routed + shared experts,
  LM head; no embedding lookup, no router) + attention scores 6 x L x H x (d_qk + d_v) x S / 2
  (causal: half the pairs). K2 at S=4096: 204.5 GFLOP. MFU is reported with this one.
- TorchTitan: 6 x (activated parameters minus the embedding, router and norms included)
  + 6 x L x H x (d_qk + d_v) x S, with no causal discount (about 8% more for K2).
"""

from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .model import K2Model, MoE


@dataclass
class LayerCount:
    index: int
    kind: str  # "dense" or "moe"
    attention: int
    norms: int
    ffn: int  # dense FFN, or the shared experts of an MoE layer
    router: int = 0
    routed_experts: int = 0  # all experts of the layer
    routed_active: int = 0  # the top-k experts one token goes through

    @property
    def total(self) -> int:
        return self.attention + self.norms + self.ffn + self.router + self.routed_experts

    @property
    def active(self) -> int:
        return self.attention + self.norms + self.ffn + self.router + self.routed_active


@dataclass
class ParamCount:
    embedding: int
    head: int
    final_norm: int
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.final_norm + sum(layer.total for layer in self.layers)

    @property
    def active(self) -> int:
        return self.embedding + self.head + self.final_norm + sum(layer.active for layer in self.layers)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count every tensor of the real model, built on the meta device (no memory, seconds for 1T)."""
    with torch.device("meta"):
        model = K2Model(cfg)
    counts = ParamCount(
        embedding=_numel(model.embed_tokens), head=_numel(model.lm_head), final_norm=_numel(model.norm)
    )
    for i, block in model.layers.items():
        attn = block.self_attn
        norms = _numel(block.input_layernorm) + _numel(block.post_attention_layernorm)
        norms += _numel(attn.q_a_layernorm) + _numel(attn.kv_a_layernorm)
        attention = _numel(attn) - _numel(attn.q_a_layernorm) - _numel(attn.kv_a_layernorm)
        if isinstance(block.mlp, MoE):
            experts = _numel(block.mlp.experts)
            counts.layers.append(
                LayerCount(
                    index=int(i),
                    kind="moe",
                    attention=attention,
                    norms=norms,
                    ffn=_numel(block.mlp.shared_experts) if block.mlp.shared_experts is not None else 0,
                    router=block.mlp.gate.weight.numel(),
                    routed_experts=experts,
                    routed_active=experts * cfg.num_experts_per_tok // cfg.n_routed_experts,
                )
            )
        else:
            counts.layers.append(LayerCount(int(i), "dense", attention, norms, _numel(block.mlp)))
    return counts


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal_discount: bool) -> float:
    per_layer = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return cfg.num_hidden_layers * per_layer * (0.5 if causal_discount else 1.0)


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "megatron", counts: ParamCount | None = None) -> float:
    counts = counts or count_params(cfg)
    if convention == "megatron":
        matmul = counts.head + sum(layer.attention + layer.ffn + layer.routed_active for layer in counts.layers)
        return 6.0 * matmul + attention_flops_per_token(cfg, seq_len, causal_discount=True)
    if convention == "torchtitan":
        return 6.0 * (counts.active - counts.embedding) + attention_flops_per_token(cfg, seq_len, causal_discount=False)
    raise ValueError(f"unknown FLOP convention {convention!r}: use 'megatron' or 'torchtitan'")


# Dense bf16 peak of the accelerators we run on (TFLOP/s), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
