"""Our numpy indexed-dataset files and sample order against megatron-core 0.16.1 itself.

megatron-core is imported here only (its import pulls in much of torch.distributed: ~10 s).
"""

import types

import numpy as np
import pytest
import torch

from k2train.data_pipeline.indexed import IndexedDataset, IndexedDatasetWriter
from k2train.data_pipeline.samples import GPTSamples

mcore_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(seed, n=120, high=4000):
    rng = np.random.default_rng(seed)
    return [[*rng.integers(0, high, int(rng.integers(1, 50))).tolist(), 4097] for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_files_are_byte_identical_to_megatron_builder(tmp_path, dtype):
    docs = _docs(0)
    builder = mcore_indexed.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    for d in docs:
        builder.add_item(torch.tensor(d))
        builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    writer = IndexedDatasetWriter(tmp_path / "o", dtype)
    for d in docs:
        writer.add_document(d)
    writer.finalize()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"o.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes()


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    docs = _docs(1)
    writer = IndexedDatasetWriter(tmp_path / "o", np.uint16)
    for d in docs:
        writer.add_document(d)
    writer.finalize()
    theirs = mcore_indexed.IndexedDataset(str(tmp_path / "o"))
    assert len(theirs) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], np.array(d, dtype=np.uint16))
    # A Megatron dataset with several sequences per document (add_document with lengths).
    builder = mcore_indexed.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    builder.add_document(torch.tensor(docs[0] + docs[1]), [len(docs[0]), len(docs[1])])
    builder.add_document(torch.tensor(docs[2]), [len(docs[2])])
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    assert len(ours) == 2 and ours.doc_lengths.tolist() == [len(docs[0]) + len(docs[1]), len(docs[2])]
    np.testing.assert_array_equal(ours.document(0), np.array(docs[0] + docs[1]))
    np.testing.assert_array_equal(ours.document(1), np.array(docs[2]))


def _dataset_and_config(tmp_path, docs_seed: int, num_docs: int, seq: int, seed: int, **kw):
    """One dataset of ``num_docs`` random documents at ``tmp_path/a``, and a GPTDatasetConfig for
    it (``kw``: ``split``, ``blend``)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    writer = IndexedDatasetWriter(tmp_path / "a", np.uint16)
    for d in _docs(docs_seed, n=num_docs):
        writer.add_document(d)
    writer.finalize()
    tok = types.SimpleNamespace(vocab_size=4352, eod=4097, pad=4351, unique_identifiers={"class": "k2"})
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq, tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=str(tmp_path / "cache"), **kw,
    )


def test_samples_equal_megatron_gpt_dataset(tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import Split

    seq, seed = 24, 11
    cfg = _dataset_and_config(tmp_path, 2, 150, seq, seed, split="100,0,0")
    theirs_low = mcore_indexed.IndexedDataset(str(tmp_path / "a"))
    theirs = GPTDataset(theirs_low, str(tmp_path / "a"), np.arange(150, dtype=np.int32), None, Split.train, cfg)
    ours = GPTSamples(IndexedDataset(tmp_path / "a"), seq, seed)
    assert len(theirs) == len(ours)
    for k in range(len(ours)):
        sample = np.concatenate([ours.dataset.read(*p) for p in ours.pieces(k)]).astype(np.int64)
        ref = theirs[k]
        assert torch.equal(ref["tokens"], torch.from_numpy(sample[:-1])), k
        assert torch.equal(ref["labels"], torch.from_numpy(sample[1:])), k


@pytest.mark.parametrize("valid_split, split", [(0.05, "95,5,0"), (0.1, "90,10,0"), (0.3, "70,30,0")])
def test_valid_split_documents_and_samples_equal_megatron_split(tmp_path, valid_split, split):
    # data.valid_split=f holds out the documents megatron-core's builder gives the validation split
    # of --split (1-f),f,0, and both halves' samples are GPTDataset's for that split
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from k2train.data_pipeline.samples import split_documents

    seq, seed = 16, 5
    cfg = _dataset_and_config(tmp_path, 3, 173, seq, seed, split=split, blend=([str(tmp_path / "a")], None))
    theirs = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, cfg).build()
    ours_ds = IndexedDataset(tmp_path / "a")
    for half, docs in zip(theirs[:2], split_documents(len(ours_ds), valid_split)):
        assert half.indices.tolist() == list(docs)
        ours = GPTSamples(ours_ds, seq, seed, docs)
        assert len(half) == len(ours)
        for k in range(len(ours)):
            sample = np.concatenate([ours_ds.read(*p) for p in ours.pieces(k)]).astype(np.int64)
            assert torch.equal(half[k]["tokens"], torch.from_numpy(sample[:-1])), k
