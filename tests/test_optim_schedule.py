"""LR schedules: WSD, cosine, constant, on a real optimizer, against closed-form values."""

import math

import pytest
import torch
from torch import nn

from k2train.config import OptimConfig
from k2train.optim.muon import MuonClip
from k2train.optim.schedule import build_lr_scheduler


def _lrs(cfg, total, n=None):
    p, q = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    opt = MuonClip([{"kind": "muon", "params": [p]}, {"kind": "adamw", "params": [q]}], lr=cfg.lr)
    sched = build_lr_scheduler(opt, cfg, total)
    out = []
    for _ in range(n or total):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == lrs[1]  # Muon and AdamW share the schedule
        out.append(lrs[0])
        opt.step()
        sched.step()
    return out


def test_wsd():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_steps=4, decay_steps=10)
    lrs = _lrs(cfg, 30, 35)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-12)
    assert lrs[4:20] == [1.0] * 16  # stable phase, exactly the peak
    for s in range(20, 31):
        expect = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 20) / 10))
        assert lrs[s] == pytest.approx(expect, abs=1e-12)
    assert lrs[30:] == pytest.approx([0.1] * 5, abs=1e-12)  # stays at min_lr after the end


def test_wsd_decay_fraction():
    cfg = OptimConfig(lr=2e-4, min_lr=2e-5, schedule="wsd", warmup_steps=2, decay_fraction=0.25)
    lrs = _lrs(cfg, 40)
    assert lrs[29] == pytest.approx(2e-4) and lrs[30] == pytest.approx(2e-4)  # decay starts at 40 - 10
    assert lrs[31] < 2e-4
    assert lrs[39] == pytest.approx(2e-5 + 1.8e-4 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_cosine_and_constant():
    lrs = _lrs(OptimConfig(lr=1.0, min_lr=0.0, schedule="cosine", warmup_steps=2), 12, 13)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[7] == pytest.approx(0.5)  # halfway through the 10 decay steps
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)
    lrs = _lrs(OptimConfig(lr=1.0, min_lr=0.0, schedule="constant", warmup_steps=0), 5)
    assert lrs == [1.0] * 5


def test_warmup_longer_than_run_and_errors():
    lrs = _lrs(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=500), 10)
    assert lrs[-1] == pytest.approx(10 / 500)
    with pytest.raises(ValueError, match="decay_steps"):
        _lrs(OptimConfig(decay_steps=50), 10)
    with pytest.raises(ValueError, match="total_steps"):
        _lrs(OptimConfig(), 0)
