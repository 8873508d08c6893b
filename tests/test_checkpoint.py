"""CheckpointManager in one process: round trip, retention, corrupt-checkpoint fallback, async save,
final safetensors export, and bit-exact resume of a MuonClip training loop."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k2train.checkpoint import CheckpointManager
from k2train.checkpoint_layout import DONE_FILE, LATEST_FILE, list_checkpoints, validate_checkpoint
from k2train.config import CheckpointConfig, load_config
from k2train.model import K2Model, update_router_bias_


def _small_cfg():
    cfg = load_config(["model=k2_tiny"]).model
    return dataclasses.replace(cfg, vocab_size=256, bos_token_id=0, eos_token_id=1, num_hidden_layers=2)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = K2Model(_small_cfg())
    model.init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_()
    return model, opt


def test_round_trip_restores_everything(tmp_path):
    model, opt = _trained(0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sched.step()
    mgr = CheckpointManager(tmp_path, CheckpointConfig(export_hf=False), job_config={"model": dataclasses.asdict(_small_cfg())})
    mgr.wandb_run_id = "abc123"
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    mgr.save(
        2, {"model": model, "optimizer": opt, "lr_scheduler": sched, "data": {"pos": 17}, "train": {"step": 2, "tokens_seen": 64}}
    )
    expect_rng = (random.random(), np.random.rand(), torch.rand(1))

    model2, opt2 = _trained(1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    data = {}
    mgr2 = CheckpointManager(tmp_path, CheckpointConfig())
    assert mgr2.load_latest({"model": model2, "optimizer": opt2, "lr_scheduler": sched2, "data": data}) == 2
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect_rng
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k  # includes the router biases (persistent buffers)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][i][key], s2["state"][i][key])
    assert s2["param_groups"][0]["lr"] == s1["param_groups"][0]["lr"] == 0.5e-3
    assert sched2.state_dict()["last_epoch"] == 1 and data == {"pos": 17}
    meta = mgr2.loaded_meta
    assert meta["tokens_seen"] == 64 and meta["config"]["model"]["num_hidden_layers"] == 2
    assert mgr2.wandb_run_id == "abc123" and meta["git_revision"]
    assert (tmp_path / LATEST_FILE).read_text().strip('"\n') == "step-00000002"


def test_retention_keep_last_and_every(tmp_path):
    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, keep_every=4))
    for step in range(1, 10):
        mgr.save(step, {"model": model})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8, 9]


def test_corrupt_checkpoints_are_skipped(tmp_path, caplog):
    model = torch.nn.Linear(4, 4)
    mgr = CheckpointManager(tmp_path, CheckpointConfig(keep_last=10))
    saved = {}
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        saved[step] = mgr.save(step, {"model": model})
    (tmp_path / ".tmp-step-00000005").mkdir()  # an interrupted save
    shard = next(saved[4].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated shard
    (saved[3] / DONE_FILE).unlink()  # never finished
    (saved[2] / ".metadata").unlink()
    assert "truncated" in validate_checkpoint(saved[4])

    fresh = torch.nn.Linear(4, 4)
    assert CheckpointManager(tmp_path, CheckpointConfig()).load_latest({"model": fresh}) == 1
    assert torch.all(fresh.weight == 1)
    log = caplog.text
    assert "truncated" in log and "COMPLETE" in log and ".metadata" in log
    assert not (tmp_path / ".tmp-step-00000005").exists()


def test_a_checkpoint_of_another_model_is_refused_before_loading(tmp_path):
    # a resume with other model dims: one clear error naming a tensor, both shapes and the way out,
    # and the current weights untouched (nothing was loaded)
    CheckpointManager(tmp_path, CheckpointConfig()).save(1, {"model": torch.nn.Linear(4, 6)})
    other = torch.nn.Linear(4, 5)
    before = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"saved from another model: 2 tensors differ in shape, e.g. model.weight: "
                                         r"saved \[6, 4\], this config \[5, 4\].*trainer.checkpoint.resume=false"):
        CheckpointManager(tmp_path, CheckpointConfig()).load_latest({"model": other})
    assert torch.equal(other.weight, before)


def test_no_checkpoint_returns_none(tmp_path):
    assert CheckpointManager(tmp_path / "none", CheckpointConfig()).load_latest({"model": torch.nn.Linear(2, 2)}) is None


def test_async_save_snapshots_state_at_call_time(tmp_path):
    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    mgr = CheckpointManager(tmp_path, CheckpointConfig(async_save=True))
    mgr.save(1, {"model": model})
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the save is in flight
    mgr.wait()
    fresh = torch.nn.Linear(64, 64)
    assert CheckpointManager(tmp_path, CheckpointConfig()).load_latest({"model": fresh}) == 1
    assert torch.equal(fresh.weight, before)


def test_saved_checkpoint_exports_hf_safetensors(tmp_path):
    from k2train.convert import export_hf

    model, opt = _trained(0)
    mgr = CheckpointManager(tmp_path, CheckpointConfig())
    folder = mgr.save(5, {"model": model, "optimizer": opt}, blocking=True)
    export_hf(folder, folder / "hf", dtype="float32", progress=False)
    index = json.loads((folder / "hf" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    from safetensors import safe_open

    fname = index["weight_map"]["lm_head.weight"]
    with safe_open(str(folder / "hf" / fname), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight)


# ---------------------------------------------------------------------------------------------
# exact resume: 2N steps straight == N steps, save, fresh objects, resume, N more (bit for bit)
# ---------------------------------------------------------------------------------------------


class _Tokens:
    """A deterministic, resumable token stream (the real loader has its own resume tests)."""

    def __init__(self, vocab: int):
        self.vocab, self.pos = vocab, 0

    def __next__(self):
        t = torch.randint(0, self.vocab, (2, 17), generator=torch.Generator().manual_seed(self.pos))
        self.pos += 1
        return {"tokens": t[:, :-1], "labels": t[:, 1:]}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def _build(job):
    from k2train.optim import apply_qk_clip, attention_modules, build_optimizer

    torch.manual_seed(0)
    model = K2Model(job.model)
    model.init_weights(seed=0)
    opt = build_optimizer([model], job.optim)
    # k2train.optim's LR scheduler is not there yet: a stateful LambdaLR warmup stands in.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    loader = _Tokens(job.model.vocab_size)

    def step_fn():
        for m in attention_modules(model).values():
            m.reset_max_logit()
        batch = next(loader)
        logits = model(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()) + model.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        apply_qk_clip(attention_modules(model), 0.5, optimizer=opt)  # tiny tau: clipping really fires
        for moe in model.moe_layers():
            update_router_bias_(moe, 0.01)
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, opt, sched, loader, step_fn


def test_exact_resume_muonclip_bit_for_bit(tmp_path, one_thread):
    pytest.importorskip("k2train.optim.qk_clip")
    job = load_config(["model=k2_tiny", "optim=muonclip"])
    job.model = _small_cfg()
    n = 3
    model, opt, sched, loader, step_fn = _build(job)
    straight = [step_fn() for _ in range(2 * n)]
    final_straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched, loader, step_fn = _build(job)
    first = [step_fn() for _ in range(n)]
    mgr = CheckpointManager(tmp_path, CheckpointConfig(export_hf=False), job_config=dataclasses.asdict(job))
    mgr.save(n, {"model": model, "optimizer": opt, "lr_scheduler": sched, "dataloader": loader, "train": {"step": n}})
    del model, opt, sched, loader, step_fn

    torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
    model, opt, sched, loader, step_fn = _build(job)
    state = {"model": model, "optimizer": opt, "lr_scheduler": sched, "dataloader": loader}
    assert CheckpointManager(tmp_path, CheckpointConfig()).load_latest(state) == n
    resumed = first + [step_fn() for _ in range(n)]
    assert resumed == straight, f"{resumed} != {straight}"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final_straight.values()))


def test_pipeline_stage_parts_reshard_to_one_model(tmp_path):
    """PP2 -> PP1 and back, by FQN: the stage parts of k2train.parallel.pipeline keep the global names."""
    from k2train.parallel.pipeline import build_stage_part

    full, opt_full = _trained(0)
    base = K2Model(_small_cfg())  # split an untouched model (a forward leaves non-leaf aux losses behind)
    parts = [build_stage_part(base, [0], True, False), build_stage_part(base, [1], False, True)]
    for part in parts:
        part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
    opt_parts = torch.optim.AdamW([p for part in parts for p in part.parameters()], lr=1e-3)
    opt_parts.load_state_dict(opt_full.state_dict())  # same param order: embed, layer 0 | layer 1, norm, head
    CheckpointManager(tmp_path / "pp2", CheckpointConfig()).save(2, {"model": parts, "optimizer": opt_parts})

    one, opt_one = _trained(1)
    assert CheckpointManager(tmp_path / "pp2", CheckpointConfig()).load_latest({"model": one, "optimizer": opt_one}) == 2
    for (k, a), b in zip(full.state_dict().items(), one.state_dict().values()):
        assert torch.equal(a, b), k
    names = dict(one.named_parameters())
    for name, p in full.named_parameters():
        assert torch.equal(opt_full.state[p]["exp_avg"], opt_one.state[names[name]]["exp_avg"]), name

    CheckpointManager(tmp_path / "pp1", CheckpointConfig()).save(2, {"model": one, "optimizer": opt_one})
    fresh = K2Model(_small_cfg())
    fresh.init_weights(seed=2)
    parts2 = [build_stage_part(fresh, [0], True, False), build_stage_part(fresh, [1], False, True)]
    assert CheckpointManager(tmp_path / "pp1", CheckpointConfig()).load_latest({"model": parts2}) == 2
    assert torch.equal(parts2[1].layers["1"].mlp.experts.w_up, full.layers["1"].mlp.experts.w_up)
    assert torch.equal(parts2[0].embed_tokens.weight, full.embed_tokens.weight)
