"""ZeRO-1 MuonClip on 2 and 4 gloo ranks (CPU, fp32 Newton-Schulz): bitwise equal to the
single-process optimizer, state sharded (disjoint, complete), resharded 2 -> 4 -> 1 ranks through
the state dict; QK-Clip's MAX reduction over the data-parallel group."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from k2train.config import ModelConfig, OptimConfig
from k2train.optim import build_optimizer
from k2train.optim.distributed import DistributedMuonClip, assign_owners, merge_state_dicts
from k2train.optim.muon import MuonClip

CFG = OptimConfig(lr=0.02, ns_dtype="float32", zero1=True)


class _Net(nn.Module):
    """K2-style names: block matrices (2-D, one 3-D expert stack) for Muon, the rest for AdamW."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed_tokens = nn.Parameter(torch.randn(40, 8, generator=g))
        self.layers = nn.ModuleDict()
        for i in range(3):
            blk = nn.Module()
            blk.q = nn.Parameter(torch.randn(24, 8, generator=g))
            blk.o = nn.Parameter(torch.randn(8, 24, generator=g))
            blk.norm = nn.Parameter(torch.randn(8, generator=g))
            blk.w_gate = nn.Parameter(torch.randn(4, 12, 8, generator=g))
            self.layers[str(i)] = blk
        self.lm_head = nn.Parameter(torch.randn(40, 8, generator=g))


def _set_grads(net, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _reference(steps):
    net = _Net()
    opt = build_optimizer([net], CFG)
    assert type(opt) is MuonClip
    for s in range(steps):
        _set_grads(net, s)
        opt.step()
    return net, opt


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, ckpt_in, ckpt_out, start, stop):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = _Net()
        opt = build_optimizer([net], CFG, replica_group=lambda name: dist.group.WORLD)
        assert isinstance(opt, DistributedMuonClip)
        if ckpt_in:
            ck = torch.load(ckpt_in, weights_only=False)
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optim"])
        for s in range(start, stop):
            _set_grads(net, s)
            opt.step()
        ref_net, ref_opt = _reference(stop)
        for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
            assert torch.equal(p, q), f"rank {rank}: {name} differs from the single-process run"
        # Only owned params have state; all params have an owner; the owners spread over the ranks.
        params = list(net.parameters())
        assert all(bool(opt.state.get(p)) == (opt.owner_of(p) == rank) for p in params)
        assert {opt.owner_of(p) for p in params} == set(range(world))
        full = opt.full_state_dict()
        ref_sd = ref_opt.state_dict()
        assert full["state"].keys() == ref_sd["state"].keys()
        for i, st in ref_sd["state"].items():
            for k, v in st.items():
                assert torch.equal(full["state"][i][k], v), (i, k)
        if world == 2:
            _check_qk_clip_max_reduction(rank)
        if rank == 0 and ckpt_out:
            torch.save({"model": net.state_dict(), "optim": full}, ckpt_out)
        dist.barrier()
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _check_qk_clip_max_reduction(rank):
    from k2train.model.attention import MLA
    from k2train.optim.qk_clip import apply_qk_clip, qk_clip_

    cfg = ModelConfig(
        hidden_size=32, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    )
    torch.manual_seed(1)
    attn = {0: MLA(cfg), 1: MLA(cfg)}
    q0 = [m.q_b_proj.weight.detach().clone() for m in attn.values()]
    kv0 = [m.kv_b_proj.weight.detach().clone() for m in attn.values()]
    per_rank = [
        torch.tensor([[5.0, 1.0, 9.0, 2.0], [1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 6.0, 3.0, 2.0], [1.0, 8.0, 1.0, 1.0]])
    ]
    for row, m in enumerate(attn.values()):
        m.max_logit.copy_(per_rank[rank][row])
    metrics = apply_qk_clip(attn, 4.0, group=dist.group.WORLD)
    s_max = torch.maximum(per_rank[0], per_rank[1])
    assert metrics["clipped_heads"] == int((s_max > 4.0).sum()) == 4
    assert metrics["max_logit"] == 9.0 and metrics["max_logit/layer_1"] == 8.0
    for row, m in enumerate(attn.values()):
        q, kv = q0[row].clone(), kv0[row].clone()
        qk_clip_(q, kv, s_max[row], 4.0, 4, 8, 4, 8)
        assert torch.equal(m.q_b_proj.weight, q) and torch.equal(m.kv_b_proj.weight, kv)


def test_owner_assignment_is_balanced_and_deterministic():
    costs = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert loads == [18.0, 18.0]
    assert sorted(set(assign_owners([1.0] * 5, 8))) == [0, 1, 2, 3, 4]


def test_merge_rejects_overlap():
    sd = {"state": {0: {}}, "param_groups": []}
    with pytest.raises(ValueError, match="overlap"):
        merge_state_dicts([sd, sd])


def test_zero1_2_ranks_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), None, None, 0, 3), nprocs=2, join=True)


@pytest.mark.slow  # 6 processes importing torch: ~30 s on an idle 2-core machine, minutes under load
def test_zero1_reshard_2_to_4_to_1_ranks(tmp_path):
    ck2, ck4 = str(tmp_path / "dp2.pt"), str(tmp_path / "dp4.pt")
    # 2 ranks: steps 0..2 from scratch, bitwise = single process; checkpoint.
    mp.spawn(_worker, args=(2, _free_port(), None, ck2, 0, 3), nprocs=2, join=True)
    # 4 ranks: load the 2-rank checkpoint, steps 3..4, bitwise = 5 single-process steps.
    mp.spawn(_worker, args=(4, _free_port(), ck2, ck4, 3, 5), nprocs=4, join=True)
    # 1 process, plain MuonClip: load the 4-rank checkpoint, step 5 = 6 single-process steps.
    ck = torch.load(ck4, weights_only=False)
    net = _Net()
    net.load_state_dict(ck["model"])
    opt = build_optimizer([net], CFG)
    opt.load_state_dict(ck["optim"])
    _set_grads(net, 5)
    opt.step()
    ref, _ = _reference(6)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
