"""MuonClip under tensor parallelism and ZeRO-1 on a dp2 x tp2 gloo mesh (4 processes, one spawn),
against the single-process optimizer on the full tensors (computed in every process).

Parameters are laid out as ``apply_tp`` lays out K2's: q_b-like matrices column-wise (``Shard(0)``),
o-like row-wise (``Shard(1)``), a replicated plain matrix, a plain 3-D expert stack, a vocab-sharded
AdamW embedding, a plain 1-D norm; gradients are the same full tensors, sharded alike.

What is checked (all bitwise: the gathered matrix is the same tensor the single process
orthogonalises, in a batch of the same shape, and elementwise math on shards is elementwise):
1. plain MuonClip with DTensor params: 3 steps equal the single process;
2. ZeRO-1 (DistributedMuonClip from ``build_optimizer(replica_group=replica_groups(dims))``): same result; state only on the
   owners, DTensor state for DTensor params, owners agree over tp (else the gathers would hang);
3. ``full_state_dict`` after 2 steps loads into a plain single-process MuonClip on full tensors and
   into a fresh ZeRO-1 optimizer, and step 3 equals the uninterrupted run;
4. QK-Clip under TP with bf16 weights: each rank clips its local heads of q_b/kv_b after a MAX over
   the dp group, fp32 masters (held by the ZeRO-1 owners only) are clipped too, the next step
   equals the single process, and the metrics count every head;
5. the checkpoint manager (DCP) saves the ZeRO-1 x TP optimizer and a fresh one resumes bitwise.
"""

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from k2train.config import ModelConfig, OptimConfig, ParallelConfig
from k2train.optim import build_optimizer
from k2train.optim.muon import MuonClip
from k2train.optim.qk_clip import apply_qk_clip, attention_modules
from k2train.parallel import replica_groups

CFG = OptimConfig(lr=0.02, ns_dtype="float32", zero1=False)
CFG_ZERO1 = OptimConfig(lr=0.02, ns_dtype="float32", zero1=True)
STEPS = 3

# name -> (shape, placement dim on tp or None for a plain tensor)
LAYOUT = {
    "embed_tokens.weight": ((40, 8), 0),
    "layers.0.attn.q_a.weight": ((12, 8), None),
    "layers.0.attn.q_b.weight": ((24, 12), 0),
    "layers.0.attn.o.weight": ((8, 24), 1),
    "layers.0.norm.weight": ((8,), None),
    "layers.0.mlp.experts.w_gate": ((4, 12, 8), None),
    "layers.1.attn.q_a.weight": ((12, 8), None),
    "layers.1.attn.q_b.weight": ((24, 12), 0),
    "layers.1.attn.o.weight": ((8, 24), 1),
    "layers.1.norm.weight": ((8,), None),
    "layers.1.mlp.experts.w_gate": ((4, 12, 8), None),
    "lm_head.weight": ((40, 8), 0),
}


class _Net(nn.Module):
    """Parameters named like K2's (so the Muon/AdamW grouping applies), optionally tp-sharded."""

    def __init__(self, tp_mesh=None):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        g = torch.Generator().manual_seed(0)
        for name, (shape, dim) in LAYOUT.items():
            full = torch.randn(shape, generator=g)
            t = full if tp_mesh is None or dim is None else distribute_tensor(full, tp_mesh, [Shard(dim)])
            _register(self, name, nn.Parameter(t))


def _register(root: nn.Module, name: str, p: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_parameter(leaf, p)


def _set_grads(net: nn.Module, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        full = torch.randn(p.shape, generator=g).to(p.dtype)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full


def _full(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in net.named_parameters()}


def _reference(steps: int):
    net = _Net()
    opt = build_optimizer([net], CFG)
    for s in range(steps):
        _set_grads(net, s)
        opt.step()
    return net, opt


def _assert_equal(net: nn.Module, ref: nn.Module, what: str) -> None:
    got, want = _full(net), _full(ref)
    for name, w in want.items():
        assert torch.equal(got[name], w), f"{what}: {name} differs by {(got[name] - w).abs().max().item():.3e}"


# ---------------------------------------------------------------------------------------------
# the checks, run on every rank of a dp2 x tp2 mesh
# ---------------------------------------------------------------------------------------------


def check_tp(dims) -> None:
    net = _Net(dims.tp_mesh)
    opt = build_optimizer([net], CFG)
    assert type(opt) is MuonClip
    for s in range(STEPS):
        _set_grads(net, s)
        opt.step()
    _assert_equal(net, _reference(STEPS)[0], "TP MuonClip")
    q_b = getattr(net.layers, "0").attn.q_b.weight
    assert type(opt.state[q_b]["momentum_buffer"]) is type(q_b), "DTensor param needs DTensor state (DCP)"


def check_zero1(dims):
    from k2train.optim.distributed import DistributedMuonClip

    net = _Net(dims.tp_mesh)
    opt = build_optimizer([net], CFG_ZERO1, replica_group=replica_groups(dims))
    assert isinstance(opt, DistributedMuonClip)
    for s in range(STEPS):
        _set_grads(net, s)
        opt.step()
    _assert_equal(net, _reference(STEPS)[0], "ZeRO-1 x TP MuonClip")
    owned = [n for n, p in net.named_parameters() if opt.state.get(p)]
    assert owned and all(opt._owns(p) == bool(opt.state.get(p)) for p in net.parameters())


def check_state_dict(dims) -> None:
    from k2train.optim.distributed import DistributedMuonClip

    net = _Net(dims.tp_mesh)
    opt = build_optimizer([net], CFG_ZERO1, replica_group=replica_groups(dims))
    for s in range(STEPS - 1):
        _set_grads(net, s)
        opt.step()
    full_sd = opt.full_state_dict()
    assert len(full_sd["state"]) == len(LAYOUT), "every param's state, gathered from its owners"
    ref_net, _ = _reference(STEPS)
    # (a) a plain single-process optimizer on full tensors continues the run
    single = _Net()
    single.load_state_dict(_full(net))
    single_opt = build_optimizer([single], CFG)
    single_opt.load_state_dict(copy.deepcopy(full_sd))  # torch's load keeps (aliases) the tensors
    _set_grads(single, STEPS - 1)
    single_opt.step()
    _assert_equal(single, ref_net, "single process resumed from the ZeRO-1 x TP full state dict")
    # (b) a fresh ZeRO-1 x TP optimizer (state resharded over tp and dp) continues the run
    opt2 = build_optimizer([net], CFG_ZERO1, replica_group=replica_groups(dims))
    assert isinstance(opt2, DistributedMuonClip)
    opt2.load_state_dict(copy.deepcopy(full_sd))
    _set_grads(net, STEPS - 1)
    opt2.step()
    _assert_equal(net, ref_net, "ZeRO-1 x TP resumed from its full state dict")
    # the per-rank shard (what DCP sees) keeps DTensor state for DTensor params
    sd = opt2.state_dict()
    for i, p in enumerate(p for g in opt2.param_groups for p in g["params"]):
        for v in sd["state"].get(i, {}).values():
            if torch.is_tensor(v) and v.ndim:
                assert hasattr(v, "device_mesh") == hasattr(p, "device_mesh")


def check_dcp(dims, folder: str) -> None:
    """The checkpoint manager (torch.distributed.checkpoint) saves the ZeRO-1 x TP optimizer (each
    rank its owned state, DTensor state as shards) and a fresh model + optimizer resume from it."""
    from k2train.checkpoint import CheckpointManager
    from k2train.config import CheckpointConfig

    cfg = CheckpointConfig(export_hf=False, async_save=False)
    net = _Net(dims.tp_mesh)
    opt = build_optimizer([net], CFG_ZERO1, replica_group=replica_groups(dims))
    for s in range(STEPS - 1):
        _set_grads(net, s)
        opt.step()
    CheckpointManager(folder, cfg).save(STEPS - 1, {"model": net, "optimizer": opt})
    net2 = _Net(dims.tp_mesh)
    opt2 = build_optimizer([net2], CFG_ZERO1, replica_group=replica_groups(dims))
    assert CheckpointManager(folder, cfg).load_latest({"model": net2, "optimizer": opt2}) == STEPS - 1
    _set_grads(net2, STEPS - 1)
    opt2.step()
    _assert_equal(net2, _reference(STEPS)[0], "ZeRO-1 x TP resumed through DCP")


# -- QK-Clip ----------------------------------------------------------------------------------

ATTN_CFG = ModelConfig(
    name="qk_tiny",
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    first_k_dense_replace=1,
    intermediate_size=64,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=32,
)
TAU = 1.0
# full max logits [H] per dp rank: heads 0 and 3 exceed tau on one dp rank only, head 2 on both
MAX_LOGITS = {0: [3.0, 0.5, 2.0, 0.9], 1: [0.7, 0.4, 4.0, 5.0]}


class _AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        from k2train.model.attention import MLA

        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"0": nn.Module()})
        self.layers["0"].self_attn = MLA(ATTN_CFG)
        self.to(torch.bfloat16)


def _attn_run(dims=None) -> tuple[nn.Module, dict, dict]:
    """Two optimizer steps with a QK-Clip between them; returns the net, the clip's metrics and
    the full fp32 masters of q_b / kv_b after the clip (None where this rank holds none)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    net = _AttnNet()
    attn = net.layers["0"].self_attn
    tp = 1 if dims is None else dims.tp
    if tp > 1:
        parallelize_module(attn, dims.tp_mesh, {"q_b_proj": ColwiseParallel(), "kv_b_proj": ColwiseParallel()})
        attn.num_heads //= tp
    opt = build_optimizer(
        [net], CFG_ZERO1 if dims is not None else CFG, replica_group=replica_groups(dims) if dims is not None else None
    )
    _set_grads(net, 0)
    opt.step()
    if dims is None:
        full_H = torch.tensor(MAX_LOGITS[0]).maximum(torch.tensor(MAX_LOGITS[1]))
        attn.max_logit = full_H.clone()
    else:
        full_H = torch.tensor(MAX_LOGITS[dims.mesh["dp"].get_local_rank()])
        attn.max_logit = full_H.chunk(tp)[dims.tp_mesh.get_local_rank()].clone()
    dp_group = None if dims is None else dims.dense_dp_mesh.get_group()
    tp_group = None if dims is None or tp == 1 else dims.tp_mesh.get_group()
    metrics = apply_qk_clip(attention_modules(net), TAU, group=dp_group, optimizer=opt, tp_group=tp_group)
    masters = {}
    for key in ("q_b_proj", "kv_b_proj"):
        m = opt.master_weight(getattr(attn, key).weight)
        masters[key] = None if m is None else (m.full_tensor() if hasattr(m, "full_tensor") else m).clone()
    _set_grads(net, 1)
    opt.step()
    return net, metrics, masters


def check_qk_clip(dims) -> None:
    ref_net, ref_metrics, ref_masters = _attn_run(None)
    net, metrics, masters = _attn_run(dims)
    assert metrics["clipped_heads"] == ref_metrics["clipped_heads"] == 3, (metrics, ref_metrics)
    assert metrics["max_logit"] == ref_metrics["max_logit"] == 5.0
    # Every tp rank of an owner row holds its master shard: the gathered master equals the reference.
    # (full_tensor is a tp collective: call it only where the whole tp row holds the master.)
    for key, m in masters.items():
        if m is not None:
            assert torch.equal(m, ref_masters[key]), f"clipped fp32 master of {key}"
    _assert_equal(net, ref_net, "bf16 MLA after step, QK-Clip under TP x ZeRO-1, step")


# ---------------------------------------------------------------------------------------------
# one spawn for all checks
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, layout: dict, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from k2train.parallel import ParallelDims

        dims = ParallelDims.from_config(ParallelConfig(**layout), world)
        dims.build_mesh("cpu")
        check_tp(dims)
        check_zero1(dims)
        check_state_dict(dims)
        check_qk_clip(dims)
        check_dcp(dims, folder)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_muonclip_tp_zero1_qk_clip_match_single_process(tmp_path):
    mp.spawn(_worker, args=(4, _free_port(), dict(dp=2, tp=2), str(tmp_path)), nprocs=4, join=True)
