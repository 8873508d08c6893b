"""ParallelDims: degree resolution and the early, numbered validation errors (no processes needed)."""

import pytest

from k2train.config import ModelConfig, ParallelConfig, TrainerConfig, load_config
from k2train.parallel.dims import ParallelDims


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return load_config(["model=k2_tiny"]).model


def dims(world: int, **kw) -> ParallelDims:
    return ParallelDims.from_config(ParallelConfig(**kw), world)


def test_dp_inferred_from_world_size():
    d = dims(8, tp=2, ep=2)
    assert (d.pp, d.dp, d.ep, d.tp) == (1, 2, 2, 2)
    assert d.dp_size == 4  # every (dp, ep) coordinate reads its own data
    with pytest.raises(ValueError, match="not divisible by pp\\*ep\\*cp\\*tp"):
        dims(6, tp=4)


def test_world_size_mismatch(tiny):
    with pytest.raises(ValueError, match=r"world size 8 != pp\*dp\*ep\*cp\*tp = 1\*2\*2\*1\*1 = 4"):
        dims(8, dp=2, ep=2).validate(tiny)


def test_heads_vocab_ffn_divisible_by_tp(tiny):
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by tp x cp = 8 x 1"):
        dims(8, tp=8).validate(tiny)
    dims(4, tp=4).validate(tiny)


def test_experts_divisible_by_ep(tiny):
    with pytest.raises(ValueError, match="n_routed_experts=16 is not divisible by expert parallel degree 3"):
        dims(3, ep=3).validate(tiny)


def test_layers_fit_stages(tiny):
    with pytest.raises(ValueError, match=r"num_hidden_layers=4 cannot fill pp\*vpp = 2\*3 = 6"):
        dims(2, pp=2, vpp=3, pp_schedule="Interleaved1F1B").validate(tiny)


def test_microbatches_for_schedule(tiny):
    trainer = TrainerConfig(seq_len=32, micro_batch_size=2, global_batch_size=4)
    d = dims(8, pp=4, dp=2)
    with pytest.raises(ValueError, match="needs at least 4 micro-batches per step"):
        d.validate(tiny, trainer)
    d.validate(tiny, TrainerConfig(seq_len=32, micro_batch_size=1, global_batch_size=8))
    with pytest.raises(ValueError, match="not divisible by trainer.micro_batch_size"):
        d.num_microbatches(TrainerConfig(micro_batch_size=3, global_batch_size=8))


def test_sequence_parallel_needs_divisible_seq_len(tiny):
    with pytest.raises(ValueError, match="seq_len=33 is not divisible by tp x cp = 2 x 1"):
        dims(2, tp=2).validate(tiny, TrainerConfig(seq_len=33, micro_batch_size=1, global_batch_size=1))


def test_mesh_needed_before_groups():
    with pytest.raises(RuntimeError, match="build_mesh"):
        dims(1).ep_mesh


def test_gradient_buckets_bound_the_transient_copy():
    import torch

    from k2train.parallel.data_parallel import buckets_of

    grads = [torch.zeros(n) for n in (10, 20, 300, 5, 5)] + [torch.zeros(4, dtype=torch.float64)]
    buckets = buckets_of(grads, limit=4 * 40)  # 40 fp32 elements
    assert [[g.numel() for g in b] for b in buckets] == [[10, 20], [300], [5, 5], [4]]
    assert [g for b in buckets for g in b] == grads  # order kept, nothing dropped
