"""Indexed dataset reader/writer (numpy only): round trip and clear errors on damaged files."""

import os

import numpy as np
import pytest

from k2train.data_pipeline.indexed import IndexedDataset, IndexedDatasetWriter


@pytest.fixture
def prefix(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    for n in (5, 1, 17, 3):
        w.add_document(np.arange(n) + 100 * n)
    w.finalize()
    return tmp_path / "d"


def test_round_trip(prefix):
    ds = IndexedDataset(prefix)
    assert len(ds) == 4 and ds.num_tokens == 26 and ds.dtype == np.uint16
    np.testing.assert_array_equal(ds.document(2), np.arange(17) + 1700)
    np.testing.assert_array_equal(ds.read(2, 3, 4), np.arange(3, 7) + 1700)
    assert ds.max_token_id() == 1716
    ds.check_vocab(1717)
    with pytest.raises(ValueError, match=r"d\.bin: token id 1716 >= vocab size 1000"):
        ds.check_vocab(1000)
    assert not list(prefix.parent.glob(".*tmp"))  # temporary files were renamed away


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _truncate(f"{p}.bin", 20), r"d\.bin: 20 bytes, but its index d\.idx describes 52"),
        (lambda p: _truncate(f"{p}.idx", 60), r"d\.idx: corrupt or truncated.*60 bytes"),
        (lambda p: _truncate(f"{p}.idx", 10), r"d\.idx: corrupt or truncated.*shorter than the 34-byte header"),
        (lambda p: open(f"{p}.idx", "r+b").write(b"NOTANIDX"), r"d\.idx: corrupt.*bad magic"),
        (lambda p: os.remove(f"{p}.bin"), r"file missing: .*d\.bin"),
        (lambda p: open(f"{p}.bin", "ab").write(b"\0\0"), r"d\.bin: 54 bytes"),
    ],
)
def test_damaged_files_fail_naming_the_file(prefix, damage, message):
    damage(prefix)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IndexedDataset(prefix)


def test_corrupt_pointers(prefix):
    raw = bytearray(open(f"{prefix}.idx", "rb").read())
    raw[34 + 4 * 4 + 8] ^= 0xFF  # second sequence pointer
    open(f"{prefix}.idx", "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"d\.idx: corrupt.*pointers"):
        IndexedDataset(prefix)


def test_shard_merge(prefix, tmp_path):
    w = IndexedDatasetWriter(tmp_path / "merged", np.uint16)
    w.add_dataset(prefix)
    w.add_document([7, 8])
    w.add_dataset(prefix)
    w.finalize()
    merged = IndexedDataset(tmp_path / "merged")
    assert len(merged) == 9 and merged.num_tokens == 54
    np.testing.assert_array_equal(merged.document(4), [7, 8])
    np.testing.assert_array_equal(merged.document(7), np.arange(17) + 1700)
