"""build_data_loader: packing, blending, DP split, document masks, exact resume, clear failures."""

import time

import numpy as np
import pytest
import torch

from k2train.config import DataConfig, DatasetSpec
from k2train.data_pipeline.embedded import embedded_tokenizer
from k2train.data_pipeline.indexed import IndexedDataset, IndexedDatasetWriter
from k2train.data_pipeline.loader import build_data_loader, check_vocab
from k2train.data_pipeline.samples import GPTSamples, blend_next

EOS = 4097
SEQ = 16


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def _write(prefix, num_docs, low, high, seed):
    """Documents of random length with ids in [low, high), each ending in EOS (as prepare writes)."""
    rng = np.random.default_rng(seed)
    w = IndexedDatasetWriter(prefix, np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(1, 40))
        w.add_document([*rng.integers(low, high, n).tolist(), EOS])
    w.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _write(root / "a", 300, 0, 1000, 1), _write(root / "b", 200, 2000, 3000, 2)


def _cfg(*prefixes, weights=None, **kw):
    weights = weights or [1.0] * len(prefixes)
    return DataConfig(source="megatron", datasets=[DatasetSpec(p, w) for p, w in zip(prefixes, weights)], **kw)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _loader(cfg, tok, mbs=4, rank=0, dp=1, seq=SEQ):
    return build_data_loader(cfg, tok, seq, mbs, rank, dp, 4352)


def test_packing_matches_the_token_stream(data, tok):
    ds = IndexedDataset(data[0])
    samples = GPTSamples(ds, SEQ, seed=7)
    # Un-shuffle: sample j of epoch 0 is tokens [j*SEQ, j*SEQ+SEQ+1) of the shuffled document stream.
    samples._load_epoch(0)
    stream = np.concatenate([ds.document(int(d)) for d in samples._doc_order])
    for k in range(len(samples)):
        j = int(samples._sample_order[k])
        got = np.concatenate([ds.read(d, o, n) for d, o, n in samples.pieces(k)])
        np.testing.assert_array_equal(got, stream[j * SEQ : j * SEQ + SEQ + 1])
    assert len(samples) == (len(stream) - 1) // SEQ
    # The next epoch reshuffles.
    assert samples.pieces(len(samples)) != samples.pieces(0) or samples.pieces(len(samples) + 1) != samples.pieces(1)


def test_batches_shapes_shift_and_determinism(data, tok):
    cfg = _cfg(data[0], seed=3)
    a, b = _take(_loader(cfg, tok), 5), _take(_loader(cfg, tok), 5)
    for x, y in zip(a, b):
        assert x["tokens"].shape == (4, SEQ) and x["tokens"].dtype == torch.int64
        assert torch.equal(x["tokens"][:, 1:], x["labels"][:, :-1])
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    other = _take(_loader(_cfg(data[0], seed=4), tok), 5)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, other))


def test_dp_ranks_are_disjoint_and_cover_the_global_batch(data, tok):
    cfg = _cfg(*data, weights=[0.6, 0.4])
    single = _take(_loader(cfg, tok, mbs=6, dp=1), 10)
    ranks = [_take(_loader(cfg, tok, mbs=2, rank=r, dp=3), 10) for r in range(3)]
    seen = set()
    for step in range(10):
        joined = torch.cat([ranks[r][step]["tokens"] for r in range(3)])
        assert torch.equal(joined, single[step]["tokens"])
        for r in range(3):
            for row in ranks[r][step]["labels"]:
                key = tuple(row.tolist())
                assert key not in seen
                seen.add(key)


@pytest.mark.parametrize("background", [True, False])
def test_exact_resume(data, tok, background):
    cfg = _cfg(*data, weights=[0.7, 0.3], prefetch=4 if background else 0, document_mask=True)
    reference = _take(_loader(cfg, tok), 12)
    first = _loader(cfg, tok)
    _take(first, 7)
    state = first.state_dict()
    first.close()
    resumed = _loader(cfg, tok)
    resumed.load_state_dict(state)
    for want, got in zip(reference[7:], _take(resumed, 5)):
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_resume_with_another_dp_size(data, tok):
    cfg = _cfg(*data, weights=[0.5, 0.5])
    reference = [_take(_loader(cfg, tok, mbs=2, rank=r, dp=2), 6) for r in range(2)]
    before = _loader(cfg, tok, mbs=2, rank=1, dp=2)
    _take(before, 4)
    resumed = _loader(cfg, tok, mbs=4, rank=0, dp=1)
    resumed.load_state_dict(before.state_dict())
    for step in (4, 5):
        want = torch.cat([reference[0][step]["tokens"], reference[1][step]["tokens"]])
        assert torch.equal(next(resumed)["tokens"], want)


def test_resume_refuses_changed_data(data, tok):
    state = _loader(_cfg(*data), tok).state_dict()
    with pytest.raises(ValueError, match="seq_len: saved 16, now 32"):
        _loader(_cfg(*data), tok, seq=32).load_state_dict(state)
    with pytest.raises(ValueError, match="data configuration changed"):
        _loader(_cfg(*data, weights=[2.0, 1.0]), tok).load_state_dict(state)


def test_blend_follows_weights(data, tok):
    counts = np.zeros(2, dtype=np.int64)
    which, _ = blend_next(np.array([0.75, 0.25]), counts, 0, 400)
    assert counts.tolist() == [300, 100]
    assert max(abs(np.cumsum(which == 0)[i] - 0.75 * (i + 1)) for i in range(400)) <= 1.0
    loader = _loader(_cfg(*data, weights=[3, 1]), tok, mbs=8)
    rows = torch.cat([b["labels"] for b in _take(loader, 25)])
    from_a = ((rows < 1000) | (rows == EOS)).all(dim=1)
    from_b = (((rows >= 2000) & (rows < 3000)) | (rows == EOS)).all(dim=1)
    assert bool((from_a | from_b).all()) and int(from_a.sum()) == 150


def test_document_mask_resets_at_eos(data, tok):
    loader = _loader(_cfg(data[0], document_mask=True), tok, mbs=8)
    for batch in _take(loader, 10):
        t, pos, doc = batch["tokens"], batch["position_ids"], batch["doc_ids"]
        after_eos = torch.zeros_like(t, dtype=torch.bool)
        after_eos[:, 1:] = t[:, :-1] == EOS
        assert torch.equal(pos[:, 1:] == 0, after_eos[:, 1:]) and bool((pos[:, 0] == 0).all())
        assert torch.equal(doc, torch.cumsum(after_eos.long(), dim=1))


def test_token_id_beyond_vocab_names_the_file(tmp_path, tok):
    w = IndexedDatasetWriter(tmp_path / "big", np.int32)
    w.add_document(list(range(4300, 4360)) * 3)
    w.finalize()
    loader = _loader(_cfg(str(tmp_path / "big")), tok)
    with pytest.raises(ValueError, match=r"big\.bin: token id \d+ >= model vocab size 4352"):
        next(loader)


def test_check_vocab(tok):
    check_vocab(tok, 4352)
    check_vocab(tok, 4480)  # padded rows are fine
    with pytest.raises(ValueError, match="set model.vocab_size=4352"):
        check_vocab(tok, 4096)


def test_embedded_default_run(tmp_path, tok):
    t0 = time.perf_counter()
    loader = build_data_loader(DataConfig(cache_dir=str(tmp_path)), tok, 128, 8, 0, 1, 4352)
    batch = next(loader)
    assert time.perf_counter() - t0 < 15
    assert batch["tokens"].shape == (8, 128) and int(batch["tokens"].max()) < 4352
    assert len(list(tmp_path.glob("embedded-*.bin"))) == 1
    text = tok.decode(batch["tokens"][0].tolist())
    assert text.isprintable() or "\n" in text


def _documents(loader, n_batches):
    """The (dataset, document) pairs the next n_batches of a loader read."""
    seen = set()
    for _ in range(n_batches):
        which, index = blend_next(loader.weights, loader._counts, loader._consumed, loader.micro_batch_size)
        loader._consumed += loader.micro_batch_size
        for d, k in zip(which, index):
            seen.update((int(d), doc) for doc, _, _ in loader.streams[int(d)].pieces(int(k)))
    return seen


def test_valid_split_holds_out_the_last_documents_of_every_dataset(data, tok):
    # data.valid_split=0.1: training reads documents [0, 270) of a (300) and [0, 180) of b (200),
    # over more than an epoch, validation only the rest; the blend weights hold for both
    cfg = _cfg(*data, valid_split=0.1, prefetch=0)
    train = _loader(cfg, tok)
    valid = build_data_loader(cfg, tok, SEQ, 4, 0, 1, 4352, split="valid")
    cut = {0: 270, 1: 180}
    trained, held_out = _documents(train, 400), _documents(valid, 40)
    assert all(doc < cut[d] for d, doc in trained) and all(doc >= cut[d] for d, doc in held_out)
    assert {d for d, _ in held_out} == {0, 1} and len(trained) > 400
    # the same batches from a fresh validation loader: every evaluation reads the same tokens
    again = [build_data_loader(cfg, tok, SEQ, 4, 0, 1, 4352, split="valid") for _ in range(2)]
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(_take(again[0], 3), _take(again[1], 3)))
    # a checkpoint of a run without a split does not resume with one: it would read other documents
    with pytest.raises(ValueError, match="documents: saved None"):
        _loader(cfg, tok).load_state_dict(_loader(_cfg(*data), tok).state_dict())
    # without a split, the training stream is what it always was (older checkpoints resume)
    assert "documents" not in _loader(_cfg(*data), tok).state_dict()["signature"]


def test_validation_data_of_its_own_and_bad_validation_configs(data, tok):
    cfg = _cfg(data[0], valid_datasets=[DatasetSpec(data[1], 1.0)], prefetch=0)
    batch = next(build_data_loader(cfg, tok, SEQ, 4, 0, 1, 4352, split="valid"))
    assert batch["tokens"].min() >= 2000  # b's ids only
    assert "documents" not in _loader(cfg, tok).state_dict()["signature"]  # training reads all of a
    with pytest.raises(ValueError, match="no validation data: set data.valid_split"):
        build_data_loader(_cfg(*data), tok, SEQ, 4, 0, 1, 4352, split="valid")
    with pytest.raises(ValueError, match=r"valid_split=0.999 of its 300 documents leaves no training document"):
        _loader(_cfg(*data, valid_split=0.999), tok)
    for bad, match in [(dict(valid_split=1.0), r"valid_split=1.0 must be in \[0, 1\)"),
                       (dict(valid_datasets=[DatasetSpec("", 1.0)]), r"valid_datasets\[0\].path is empty")]:
        with pytest.raises(ValueError, match=match):
            _cfg(*data, **bad).validate()


def test_validation_sets_are_named_after_their_files():
    from k2train.data_pipeline.loader import validation_sets

    assert validation_sets(DataConfig()) == [("embedded", 1.0)]
    assert validation_sets(_cfg("x/web", "y/code", weights=[0.7, 0.3])) == [("web", 0.7), ("code", 0.3)]
    assert validation_sets(_cfg("x/web", "y/web")) == [("web_0", 1.0), ("web_1", 1.0)]
    assert validation_sets(_cfg("x/web", valid_datasets=[DatasetSpec("v/held", 2.0)])) == [("held", 2.0)]
