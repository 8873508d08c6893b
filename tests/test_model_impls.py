"""The kernel switches of the model compute what the torch path computes (CPU: Triton's interpreter)."""

import dataclasses

import pytest
import torch

from k2train.config import load_config
from k2train.model import K2Model

pytest.importorskip("triton")


def _cfg(**kw):
    cfg = load_config().model
    return dataclasses.replace(cfg, vocab_size=300, hidden_size=32, q_lora_rank=16, kv_lora_rank=16, num_hidden_layers=2,
                               intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                               qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=2,
                               bos_token_id=0, eos_token_id=1, **kw)


@pytest.mark.parametrize("switch", [dict(norm_impl="triton"), dict(mlp_impl="triton")], ids=["norm", "mlp"])
def test_kernel_switch_matches_torch(switch):
    ref, fused = K2Model(_cfg()), K2Model(_cfg(**switch))
    ref.init_weights(seed=3)
    fused.init_weights(seed=3)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    out_r, out_f = ref(tokens), fused(tokens)
    out_r.square().mean().backward()
    out_f.square().mean().backward()
    assert (out_f - out_r).norm() / out_r.norm() < 1e-5
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        assert (pf.grad - pr.grad).norm() <= 1e-5 * pr.grad.norm() + 1e-12, name


def test_fused_kernels_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="use model.norm_impl=torch"):
        load_config(["model.norm_impl=triton", "parallel=tp2"]).validate()
    with pytest.raises(ValueError, match="use model.loss_impl=torch"):
        load_config(["model.loss_impl=triton", "parallel=tp2"]).validate()


def test_fused_loss_through_the_trainer(tmp_path):
    """model.loss_impl=triton: the trainer's steps (bf16 autocast, two micro-batches, the loss in
    chunks) train as torch's loss does on the CPU (where CPU autocast runs torch's in fp32; on CUDA
    its log-softmax is bf16, the kernel's math fp32 there too)."""
    from k2train.trainer import Trainer

    losses = {}
    for impl in ("torch", "triton"):
        cfg = load_config(["model=k2_tiny", "trainer.steps=2", "trainer.seq_len=32", "trainer.micro_batch_size=2",
                           "trainer.global_batch_size=4", "trainer.dtype=bfloat16", "trainer.loss_chunk_tokens=32",
                           f"model.loss_impl={impl}", "trainer.checkpoint.enable=false", "logging.wandb=false",
                           "logging.progress_bar=false", "logging.console=false", f"trainer.output_dir={tmp_path / impl}"])
        with Trainer(cfg, run_dir=tmp_path / impl / "run") as t:
            losses[impl] = [m["loss"] for m in t.run()]
    # step 1: the same fp32 math (CPU autocast casts torch's logits to fp32 first); then the updates
    # differ by the gradients' summation order (measured 1.3e-4 at step 2)
    assert abs(losses["triton"][0] / losses["torch"][0] - 1) < 1e-6, losses
    assert all(abs(a / b - 1) < 5e-4 for a, b in zip(losses["triton"], losses["torch"])), losses


def test_router_scores_stay_fp32_under_autocast():
    """The routing decision is made in fp32 also under bf16 autocast (which would otherwise run the
    router's matmul in bf16 and flip near-tied top-k choices)."""
    from k2train.model.moe import Router

    cfg = load_config(["model=k2_tiny"]).model
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.02)
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    ref_scores, ref_idx, ref_w = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, idx, w = router(x)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.equal(scores, ref_scores) and torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


def test_seeded_init_is_layout_free():
    # each tensor from its own (seed, name) generator: two models agree, expert e of a stack is the
    # same draw wherever the stack starts (an expert-parallel rank's slice)
    cfg = _cfg()
    a, b = K2Model(cfg), K2Model(cfg)
    a.init_weights(seed=5)
    b.init_weights(seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    b.layers["1"].mlp.experts.expert_offset = 2  # what expert parallelism sets on a rank holding experts 2..
    b.init_weights(seed=5)
    assert torch.equal(b.layers["1"].mlp.experts.w_up[0], a.layers["1"].mlp.experts.w_up[2])
    q = a.layers["0"].self_attn.q_a_proj.weight
    assert q.std().item() == pytest.approx(cfg.initializer_range, rel=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_seeded_init_is_drawn_on_the_device_and_repeatable():
    cfg = _cfg()
    a, b, on_cpu = K2Model(cfg).cuda(), K2Model(cfg).cuda(), K2Model(cfg)
    for m in (a, b, on_cpu):
        m.init_weights(seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.device.type == "cuda" and torch.equal(pa, pb), name
    q = a.layers["0"].self_attn.q_a_proj.weight
    assert q.std().item() == pytest.approx(cfg.initializer_range, rel=0.1)
    # CUDA's generator drew it, not the CPU's (the same seed makes other numbers there)
    assert not torch.equal(q.cpu(), on_cpu.layers["0"].self_attn.q_a_proj.weight)
