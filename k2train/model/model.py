"""The Kimi K2 transformer: embedding, one dense block, MoE blocks, final norm, untied head.

Plain ``nn.Module``: builds on the meta device (the 1T config in seconds), is materialized with
``to_empty()`` + :meth:`K2Model.init_weights`, and is parallelized from outside (k2train/parallel).
Layers live in a ``ModuleDict`` keyed by their global index so that names stay stable when a
pipeline stage keeps only some of them.
"""

import zlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .moe import MoE, FeedForward
from .norms import RMSNorm
from .rope import rope_table


_EXPERT_STACKS = ("w_gate", "w_up", "w_down")


def _seeded_normal(shape, std: float, seed: int, name: str, device: torch.device) -> torch.Tensor:
    """N(0, std) from a generator of ``device`` seeded by (seed, name): drawn where the tensor lives
    on CUDA (CPU's generator makes ~70 M numbers a second: a minute for 5B parameters), else on
    the CPU."""
    device = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device=device).mul_(std)


def _copy_full_(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size tensor into ``p``, or this rank's shard of it when tensor parallelism made
    ``p`` a DTensor (whose ``shape`` is the global one). Duck-typed: the model never imports
    torch.distributed; the DTensor brings its own ``redistribute`` machinery."""
    if hasattr(p, "device_mesh") and hasattr(p, "to_local"):
        local = p.to_local()
        full = full.to(local.device)
        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                axis = placement.dim
                n = p.device_mesh.size(dim)
                full = full.tensor_split(n, dim=axis)[p.device_mesh.get_local_rank(dim)]
        local.copy_(full)
    else:
        p.copy_(full)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        if layer_id < cfg.first_k_dense_replace:
            self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_impl)
        else:
            self.mlp = MoE(cfg)

    def forward(self, x, cos, sin, doc_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # RoPE for positions 0 .. max_position_embeddings - 1, computed once (not saved).
        cos, sin = rope_table(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """(Re)initialize every parameter and buffer in place: N(0, initializer_range) for matrices,
        ones for norms, zeros for router biases. Works after ``to_empty()`` from the meta device.

        With a ``seed`` the values do not depend on the layout: each tensor is drawn from a generator
        seeded by (seed, its name), each routed expert by (seed, name, global expert id), and a tensor
        sharded by tensor parallelism (a DTensor) is drawn whole and this rank keeps its shard. A
        pipeline stage, an expert-parallel rank and a single process therefore hold the same weights.
        They depend on the device type: CUDA tensors are drawn by CUDA's generator, the rest by the
        CPU's (the two make different numbers from one seed).
        """
        std = self.cfg.initializer_range
        owners = {id(p): mod for mod in self.modules() for p in mod.parameters(recurse=False)}
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or p.ndim == 1:
                p.fill_(1.0)
            elif seed is None:
                nn.init.normal_(p, 0.0, std)
            elif name.split(".")[-1] in _EXPERT_STACKS:
                offset = getattr(owners[id(p)], "expert_offset", 0)
                for e in range(p.shape[0]):
                    p[e].copy_(_seeded_normal(p.shape[1:], std, seed, f"{name}[{offset + e}]", p.device))
            else:
                _copy_full_(p, _seeded_normal(p.shape, std, seed, name, p.device))
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("tokens_per_expert"):
                b.zero_()
            elif name.endswith("max_logit"):
                b.fill_(float("-inf"))
        cos, sin = rope_table(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        head: bool = True,
    ) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V].

        A pipeline stage without the embedding (``embed_tokens`` set to None) takes ``hidden``
        instead; one without the head returns hidden states, and so does ``head=False`` (the final
        norm applied: a chunked loss runs the head itself, k2train/loss.py).
        """
        x = self.embed_tokens(tokens) if self.embed_tokens is not None else hidden
        B, S = x.shape[:2]
        if position_ids is None:
            if S > self.rope_cos.shape[0]:
                raise ValueError(
                    f"a sequence of {S} tokens exceeds model.max_position_embeddings={self.rope_cos.shape[0]}: "
                    "raise model.max_position_embeddings or shorten the sequence"
                )
            cos, sin = self.rope_cos[:S].expand(B, S, -1), self.rope_sin[:S].expand(B, S, -1)
        else:  # explicit positions (packed documents, sequence shards) index the table
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        for layer in self.layers.values():
            x = layer(x, cos, sin, doc_ids)
        if self.norm is not None:
            x = self.norm(x)
        if self.lm_head is not None and head:
            x = self.lm_head(x)
        return x

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE auxiliary losses of the last forward pass (0 when disabled)."""
        total = torch.zeros((), device=self.rope_cos.device)
        for moe in self.moe_layers():
            total = total + moe.aux_loss.to(total.device)
        return total

    def attention_layers(self) -> Iterator[tuple[int, MLA]]:
        for i, layer in self.layers.items():
            yield int(i), layer.self_attn

    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.layers.values():
            if isinstance(layer.mlp, MoE):
                yield layer.mlp
