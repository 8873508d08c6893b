"""trainer.param_dtype=bfloat16: bf16 weights, fp32 gradients accumulated over micro-batches, fp32
masters in the optimizer (k2train.parallel.precision)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from k2train.config import load_config
from k2train.convert import export_hf
from k2train.hf import to_hf
from k2train.parallel.memory import trainer_precision
from k2train.parallel.precision import bf16_params_, publish_fp32_grads_
from k2train.trainer import Trainer

QUIET = ["logging.wandb=false", "logging.progress_bar=false", "trainer.checkpoint.enable=false"]


def test_gradients_accumulate_in_fp32():
    # three micro-batches: the fp32 .grad is the fp32 sum of the three bf16 gradients, bit for bit,
    # accumulated in place (the tensor the first micro-batch made) and published as .grad after the
    # last backward (before: .grad is None, so autograd never adds two dtypes itself)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8))
    assert bf16_params_([model]) == 4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    xs = [torch.randn(5, 16, dtype=torch.bfloat16) for _ in range(3)]
    expected = [torch.zeros(p.shape) for p in model.parameters()]
    for x in xs:  # the reference: each micro-batch's bf16 gradient alone, summed in fp32
        grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        for e, g in zip(expected, grads):
            assert g.dtype == torch.bfloat16
            e += g.float()
    first = None
    for x in xs:
        model(x).square().sum().backward()
        assert all(p.grad is None for p in model.parameters())
        ptrs = [p.main_grad.data_ptr() for p in model.parameters()]
        first = first or ptrs
        assert ptrs == first
    publish_fp32_grads_([model])
    for p, e, ptr in zip(model.parameters(), expected, first):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, e) and p.grad.data_ptr() == ptr
        assert p.main_grad is None
    model.zero_grad(set_to_none=True)  # the next step's sum starts from nothing
    model(xs[0]).square().sum().backward()
    publish_fp32_grads_([model])
    grads = torch.autograd.grad(model(xs[0]).square().sum(), list(model.parameters()))
    assert all(torch.equal(p.grad, g.float()) for p, g in zip(model.parameters(), grads))


def _cfg(tmp_path, *extra):
    # the first overrides are the defaults of this file's tests; a later one for the same key wins
    given = {o.split("=")[0] for o in extra}
    base = ["model=k2_tiny", "trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]
    return load_config([*(o for o in base if o.split("=")[0] not in given), "trainer.dtype=bfloat16",
                        f"trainer.output_dir={tmp_path}", *QUIET, *extra])


def test_trainer_bf16_params_against_autocast(tmp_path):
    # the same run with fp32 weights under autocast: bf16 weights round each weight once (2^-9
    # relative), so five steps stay within 0.1% of the loss; the weights are bf16, the gradients
    # and the optimizer's masters fp32, and the planner plans K2's bf16 precision for it
    runs = {}
    for pd in ("float32", "bfloat16"):
        cfg = _cfg(tmp_path, f"trainer.param_dtype={pd}")
        with Trainer(cfg, run_dir=tmp_path / pd) as trainer:
            runs[pd] = [trainer.train_step(trainer.next_batches()).loss for _ in range(5)]
            params = [p for part in trainer.parts for p in part.parameters()]
            assert {p.dtype for p in params} == {getattr(torch, pd)}
            if pd == "bfloat16":
                trainer._forward_backward(trainer.next_batches())
                assert {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}
                masters = [trainer.optimizer.master_weight(p) for p in params]
                assert all(m is not None and m.dtype == torch.float32 for m in masters)
                assert all(torch.equal(m.bfloat16(), p.detach()) for m, p in zip(masters, params))
        assert trainer_precision(cfg.trainer) == {"float32": "autocast", "bfloat16": "bf16"}[pd]
    for a, b in zip(*runs.values()):
        assert abs(b / a - 1) < 1e-3, runs


def test_bf16_params_need_bf16_compute():
    with pytest.raises(ValueError, match="trainer.dtype=bfloat16"):
        load_config(["trainer.param_dtype=bfloat16"]).validate()


def _bf16_weights_run(tmp_path, name, *extra, steps=5):
    with Trainer(_cfg(tmp_path, "trainer.param_dtype=bfloat16", *extra), run_dir=tmp_path / name) as trainer:
        losses = [trainer.train_step(trainer.next_batches()).loss for _ in range(steps)]
        weights = {n: p.detach().clone() for n, p in trainer.parts[0].named_parameters()}
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    return losses, weights


def test_bf16_params_with_selective_recompute_and_offload(tmp_path):
    # bf16 weights under two of K2's activation-memory switches on CPU: selective recompute and
    # offload (a no-op path on CPU) change nothing, bit for bit, over five steps
    losses, weights = _bf16_weights_run(tmp_path, "plain")
    got, got_weights = _bf16_weights_run(tmp_path, "k2", "parallel.recompute=selective", "parallel.offload_activations=true")
    assert got == losses
    assert all(torch.equal(w, weights[n]) for n, w in got_weights.items())


@pytest.mark.slow  # the FP8 kernels run in Triton's CPU interpreter here: ~75 s
def test_bf16_params_with_k2s_activation_memory(tmp_path):
    # experiment=k2_pretrain's combination with bf16 weights on CPU: FP8 storage of the experts'
    # inputs on top of selective recompute and offload moves three steps' losses by < 1e-4
    # (measured 2e-5 at the third; 4e-5 over five)
    losses, _ = _bf16_weights_run(tmp_path, "plain", steps=3)
    got, _ = _bf16_weights_run(tmp_path, "k2", "parallel.recompute=selective", "parallel.offload_activations=true",
                               "parallel.fp8_moe_inputs=true", steps=3)
    assert got != losses  # FP8 storage did act
    assert all(abs(b / a - 1) < 1e-4 for a, b in zip(losses, got)), (losses, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_params_on_the_gpu(tmp_path):
    # k2_small with every Triton kernel and K2's activation memory (FP8 storage, selective recompute,
    # offload): bf16 weights against fp32 weights under autocast, five steps within 0.5% of the loss
    # (bf16 residual stream and one rounding of each weight; the losses are ~10, then ~7)
    base = ["model=k2_small", "trainer.seq_len=1024", "trainer.micro_batch_size=1", "trainer.global_batch_size=2",
            "model.attn_impl=triton", "model.moe_impl=triton", "model.norm_impl=triton", "model.mlp_impl=triton",
            "optim.ns_impl=triton", "parallel.recompute=selective", "parallel.fp8_moe_inputs=true",
            "parallel.offload_activations=true"]
    runs = {}
    for pd in ("float32", "bfloat16"):
        with Trainer(_cfg(tmp_path, *base, f"trainer.param_dtype={pd}"), run_dir=tmp_path / pd) as trainer:
            runs[pd] = [trainer.train_step(trainer.next_batches()).loss for _ in range(5)]
    for a, b in zip(*runs.values()):
        assert abs(b / a - 1) < 5e-3, runs


def test_offload_leaves_bf16_weights_on_the_device():
    # bf16 weights are saved for the backward as they are (no cast in between): offload must see
    # them as weights, not activations to copy out; activations are not weights, whether made here
    # (a grad_fn) or received (a pipeline stage's input: a leaf that requires grad)
    from k2train.parallel.activation_memory import _from_parameter

    w = nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    x = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = x @ w.t()
        (h.sigmoid() * h).sum()
    assert any(t is w or t._base is w for t in saved)
    kinds = {_from_parameter(t) for t in saved if t is w or t._base is w}
    assert kinds == {True}
    assert not _from_parameter(h) and not _from_parameter(x) and not _from_parameter(torch.randn(2, 3))


def test_fp32_export_of_a_bf16_weights_run_takes_the_masters(tmp_path):
    # the checkpoint keeps bf16 weights and the optimizer's fp32 masters: an fp32 HF export writes
    # the masters (not the bf16 weights upcast), a bf16 export the weights, bit for bit
    cfg = _cfg(tmp_path, "trainer.param_dtype=bfloat16", "trainer.steps=3", "trainer.checkpoint.enable=true",
               "trainer.checkpoint.export_hf=false")
    with Trainer(cfg, run_dir=tmp_path / "run") as trainer:
        trainer.run()
        named = dict(trainer.parts[0].named_parameters())
        masters = {n: trainer.optimizer.master_weight(p).clone() for n, p in named.items()}
        weights = {n: p.detach().clone() for n, p in named.items()}
        root = trainer.checkpointer.folder
    exported = {}
    for dtype in ("float32", "bfloat16"):
        out = export_hf(root, tmp_path / f"hf_{dtype}", dtype=dtype, progress=False)
        exported[dtype] = {}
        for f in sorted(out.glob("*.safetensors")):
            exported[dtype].update(load_file(f))
    differ = 0
    for name in masters:
        for (hf_name, m), (_, w) in zip(to_hf(name, masters[name]), to_hf(name, weights[name])):
            assert torch.equal(exported["float32"][hf_name], m), hf_name
            assert torch.equal(exported["bfloat16"][hf_name], w), hf_name
            differ += not torch.equal(m, w.float())
    assert differ > len(masters) // 2  # the masters are not the bf16 weights: the test can tell them apart
