"""Which parameter gets Muon and which AdamW, and the optimizer built from that grouping.

The rule (Kimi K2's MuonClip): Muon for every matrix inside the transformer blocks, i.e. a
parameter whose FQN starts with ``layers.`` and that is 2-D (attention projections, dense FFN,
router gate, shared expert) or a 3-D expert stack ``[E, out, in]`` (each expert a matrix).
AdamW for the rest: embedding, LM head, final norm, every norm scale and bias. The router's
``e_score_correction_bias`` is a buffer, not a parameter: no optimizer touches it.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from k2train.config import OptimConfig
from k2train.kernels.newton_schulz import zeropower_gram_batched, zeropower_ns_batched

from .distributed import DistributedMuonClip
from .muon import MuonClip
from .newton_schulz import GRAM_RESTARTS, ns_flops, zeropower_via_gram_newtonschulz, zeropower_via_newtonschulz

# Wrappers that torch.compile / activation checkpointing / DDP insert into FQNs.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def clean_param_name(name: str) -> str:
    """The model-level FQN of a parameter, without wrapper modules' path components."""
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon for block matrices (2-D) and expert stacks (3-D) whose FQN starts with ``layers.``."""
    return clean_param_name(name).startswith("layers.") and p.ndim in (2, 3)


def _resolve_ns_fn(impl: str, ns_dtype: str, method: str = "standard", restarts: tuple[int, ...] = GRAM_RESTARTS):
    """MuonClip's ``ns_fn``: None (our torch standard NS) or a function ``(G, steps, coefficients,
    dtype)`` for the Triton kernels and/or Gram Newton-Schulz.

    With ``method="gram"`` each batch (one matrix shape) runs Gram NS only where it needs fewer FLOPs
    than standard NS (wide matrices: experts, MLA down/up-projections); near-square ones (o_proj)
    run standard NS, in bf16 when the Gram dtype is fp16 (standard NS keeps X at unit norm, where
    fp16 would make the small entries subnormal)."""
    if impl == "torch" and method == "standard":
        return None
    if impl == "triton":
        if ns_dtype == "float32":
            raise ValueError(f"optim.ns_impl={impl!r} runs in half precision; set optim.ns_dtype=auto or optim.ns_impl=torch")

        def standard(G, steps, coefficients, dtype):
            return zeropower_ns_batched(G, steps=steps, coefficients=coefficients)

        def gram(G, steps, coefficients, dtype):
            return zeropower_gram_batched(G, steps, coefficients, dtype=dtype, restarts=restarts, impl="triton")
    else:

        def standard(G, steps, coefficients, dtype):
            return zeropower_via_newtonschulz(G, steps, coefficients, dtype=dtype)

        def gram(G, steps, coefficients, dtype):
            return zeropower_via_gram_newtonschulz(G, steps, coefficients, dtype=dtype, restarts=restarts)

    if method == "standard":
        return standard
    symmetric = impl == "triton"

    def ns_fn(G, steps, coefficients, dtype):
        rows, cols = G.shape[-2:]
        if ns_flops(rows, cols, steps, "gram", symmetric, restarts) < ns_flops(rows, cols, steps, "standard", symmetric):
            return gram(G, steps, coefficients, dtype)
        half = torch.bfloat16 if dtype == torch.float16 else dtype
        return standard(G.to(half), steps, coefficients, half)

    return ns_fn


def build_param_groups(model_parts: list[nn.Module], cfg: OptimConfig) -> list[dict]:
    """The explicit grouping: ``muon`` (block matrices), ``adamw`` (other params with >= 2 dims, and
    1-D ones when ``cfg.no_decay_1d`` is off), ``adamw_no_decay`` (1-D params, weight decay 0).

    ``cfg.name == "adamw"`` puts every parameter in the AdamW groups. Each group carries the FQNs
    of its params in ``names``. A parameter shared by two parts is listed once.
    """
    groups: dict[str, dict] = {
        "muon": {"kind": "muon", "name": "muon", "params": [], "names": []},
        "adamw": {"kind": "adamw", "name": "adamw", "params": [], "names": []},
        "adamw_no_decay": {"kind": "adamw", "name": "adamw_no_decay", "params": [], "names": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for part in model_parts:
        for name, p in part.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if cfg.name != "adamw" and is_muon_param(name, p):
                key = "muon"
            elif p.ndim < 2 and cfg.no_decay_1d:
                key = "adamw_no_decay"
            else:
                key = "adamw"
            groups[key]["params"].append(p)
            groups[key]["names"].append(clean_param_name(name))
    return [g for g in groups.values() if g["params"]]


def resolve_ns_dtype(ns_dtype: str, model_parts: list[nn.Module], method: str = "standard") -> str:
    """``auto``: on GPUs bf16 (as K2 trains) for standard NS, fp16 for Gram NS (same rate, 3 more
    mantissa bits; see zeropower_via_gram_newtonschulz); fp32 on CPUs, whose half-precision matmuls
    are emulated (~8x slower)."""
    if ns_dtype != "auto":
        return ns_dtype
    on_gpu = any(p.is_cuda for part in model_parts for p in part.parameters())
    if not on_gpu:
        return "float32"
    return "float16" if method == "gram" else "bfloat16"


def build_optimizer(
    model_parts: list[nn.Module], cfg: OptimConfig, replica_group: Optional[Callable[[str], object]] = None
) -> MuonClip:
    """MuonClip over the params of ``model_parts`` (the pipeline stages this rank holds).

    Tensor-parallel (DTensor) matrices are orthogonalised whole and expert-parallel slices per
    expert by :class:`MuonClip` itself. ``replica_group(fqn)`` gives the process group whose ranks
    hold replicas of a parameter (under any layout: ``k2train.parallel.replica_groups(dims)``; plain
    data parallelism: ``lambda fqn: group``). With ``cfg.zero1`` and some parameter replicated on
    more than one rank, the result is a :class:`~k2train.optim.distributed.DistributedMuonClip`,
    which shards each parameter's state over its group. The caller must have reduced the gradients
    before ``step``.
    """
    cfg.validate()
    ns_dtype = resolve_ns_dtype(cfg.ns_dtype, model_parts, cfg.ns_method)
    kwargs = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        ns_coefficients=tuple(cfg.ns_coefficients),
        ns_dtype=getattr(torch, ns_dtype),
        rms_match=cfg.rms_match,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        ns_fn=_resolve_ns_fn(cfg.ns_impl, ns_dtype, cfg.ns_method, tuple(cfg.ns_gram_restarts)),
    )
    groups = build_param_groups(model_parts, cfg)
    label = f"{cfg.ns_method}, {ns_dtype}, {cfg.ns_impl}, {cfg.ns_steps} steps" + (
        f", restart before iteration {', '.join(map(str, cfg.ns_gram_restarts))}" if cfg.ns_method == "gram" else "")
    sharded = None
    if cfg.zero1 and replica_group is not None:
        sharded = [{**g, "dp_groups": [replica_group(n) for n in g["names"]]} for g in groups]
        if all(dist.get_world_size(pg) == 1 for g in sharded for pg in g["dp_groups"]):
            sharded = None  # every param lives on one rank: nothing to shard
    opt = DistributedMuonClip(sharded, **kwargs) if sharded else MuonClip(groups, **kwargs)
    opt.ns_label = label
    return opt


def describe_param_groups(optimizer: torch.optim.Optimizer, max_names: int = 3) -> str:
    """A printable table: group, kind, number of tensors, number of params, lr, wd, example FQNs."""
    rows = [("group", "kind", "tensors", "params", "lr", "wd", "examples")]
    total_t = total_p = 0
    for i, g in enumerate(optimizer.param_groups):
        n_t = len(g["params"])
        n_p = sum(p.numel() for p in g["params"])
        total_t += n_t
        total_p += n_p
        names = g.get("names", [])
        ex = ", ".join(names[:max_names]) + (", ..." if len(names) > max_names else "")
        lr = g.get("initial_lr", g["lr"])
        rows.append((g.get("name", str(i)), g.get("kind", "-"), str(n_t), f"{n_p:,}", f"{lr:g}", f"{g['weight_decay']:g}", ex))
    rows.append(("total", "", str(total_t), f"{total_p:,}", "", "", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ns = getattr(optimizer, "ns_label", None)
    if ns and any(g.get("kind") == "muon" for g in optimizer.param_groups):
        lines.append(f"Newton-Schulz: {ns}")
    return "\n".join(lines)
