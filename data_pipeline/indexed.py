"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) with numpy only.

The byte layout is megatron-core's (``megatron/core/datasets/indexed_dataset.py``), so files written
here are read by its ``IndexedDataset`` and the other way round (``tests/test_data_indexed.py``
proves both directions byte for byte):

``.idx``: magic ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``, sequence count
``<Q``, document count ``<Q``, then int32 sequence lengths, int64 byte pointers into ``.bin``, int64
document indices (sequence index at which each document starts, plus the end).
``.bin``: the token ids of all sequences back to back, in the dtype of the code.

Here every document is one sequence (what Megatron's GPT preprocessing writes). The reader checks
the files against each other, so a truncated or corrupt pair fails with the file's name instead
of producing garbage samples.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_BYTES = len(_MAGIC) + 8 + 1 + 8 + 8
# megatron-core's DType enum: code -> numpy dtype.
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def token_dtype(vocab_size: int) -> type:
    """The dtype megatron-core picks for a vocabulary (``DType.optimal_dtype``)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Append documents to ``PREFIX.bin``; :meth:`finalize` writes ``PREFIX.idx``.

    Both files are written under temporary names and renamed at :meth:`finalize`, ``.idx`` last, so
    an interrupted write never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.int32):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"dtype {self.dtype} is not a Megatron indexed-dataset dtype ({sorted(map(str, _CODES))})")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.prefix.parent / f".{self.prefix.name}.bin.{os.getpid()}.tmp"
        self._bin = open(self._tmp_bin, "wb")
        self.lengths: list[int] = []

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(arr.size)

    def add_dataset(self, prefix: str | os.PathLike) -> None:
        """Append every document of another indexed dataset of the same dtype (shard merging)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other.idx_file}: dtype {other.dtype} differs from the output dtype {self.dtype}")
        with open(other.bin_file, "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)
        self.lengths.extend(other.sequence_lengths.tolist())

    def finalize(self) -> None:
        self._bin.close()
        write_index(self._tmp_bin.with_suffix(".idx.tmp"), self.lengths, self.dtype)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_bin.with_suffix(".idx.tmp"), idx_path(self.prefix))


def write_index(path: str | os.PathLike, lengths: list[int], dtype) -> None:
    """The ``.idx`` file for one document per sequence with the given lengths."""
    dtype = np.dtype(dtype)
    lengths_arr = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths_arr), dtype=np.int64)
    np.cumsum(lengths_arr[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_indices = np.arange(len(lengths_arr) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_MAGIC)
        f.write(struct.pack("<Q", _VERSION))
        f.write(struct.pack("<B", _CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths_arr)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(lengths_arr.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_indices.tobytes(order="C"))


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron indexed dataset.

    ``doc_lengths[d]`` is the number of tokens of document ``d`` and :meth:`read` slices the token
    stream without copying. Construction validates the pair; every error names the bad file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        self.idx_file, self.bin_file = idx_path(prefix), bin_path(prefix)
        for p in (self.idx_file, self.bin_file):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file missing: {p} (expected {self.prefix}.bin and {self.prefix}.idx)")
        self._read_index()
        self._check_bin()
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        if self.bin_file.stat().st_size:
            self._tokens = np.memmap(self.bin_file, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.zeros(0, dtype=self.dtype)

    def _corrupt(self, what: str) -> ValueError:
        return ValueError(f"{self.idx_file}: corrupt or truncated Megatron index ({what}); re-run the preparation")

    def _read_index(self) -> None:
        size = self.idx_file.stat().st_size
        with open(self.idx_file, "rb") as f:
            header = f.read(_HEADER_BYTES)
        if len(header) < _HEADER_BYTES:
            raise self._corrupt(f"{size} bytes, shorter than the {_HEADER_BYTES}-byte header")
        if header[: len(_MAGIC)] != _MAGIC:
            raise self._corrupt(f"bad magic {header[:len(_MAGIC)]!r}, expected {_MAGIC!r}")
        pos = len(_MAGIC)
        (version,) = struct.unpack_from("<Q", header, pos)
        (code,) = struct.unpack_from("<B", header, pos + 8)
        n_seq, n_doc = struct.unpack_from("<QQ", header, pos + 9)
        if version != _VERSION:
            raise self._corrupt(f"version {version}, only {_VERSION} is known")
        if code not in _DTYPES:
            raise self._corrupt(f"dtype code {code} is not one of {sorted(_DTYPES)}")
        self.dtype = np.dtype(_DTYPES[code])
        expected = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        # multimodal datasets append one int8 mode per sequence; their token streams read the same.
        if size not in (expected, expected + n_seq):
            raise self._corrupt(f"{size} bytes, but {n_seq} sequences and {n_doc} documents need {expected}")
        mm = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=_HEADER_BYTES + 4 * n_seq)
        self.document_indices = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
        if n_seq and (self.sequence_lengths < 0).any():
            raise self._corrupt("negative sequence length")
        expected_ptr = np.zeros(n_seq, dtype=np.int64)
        np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=expected_ptr[1:])
        if not np.array_equal(self.sequence_pointers, expected_ptr):
            raise self._corrupt("sequence pointers do not follow the sequence lengths")
        d = self.document_indices
        if n_doc == 0 or d[0] != 0 or d[-1] != n_seq or (np.diff(d) < 0).any():
            raise self._corrupt("document indices must rise from 0 to the sequence count")
        # Document lengths in tokens (a document may span several sequences in Megatron's format).
        seq_cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        self.doc_offsets = seq_cum[d]
        self.doc_lengths = np.diff(self.doc_offsets)

    def _check_bin(self) -> None:
        size = self.bin_file.stat().st_size
        needed = int(self.doc_offsets[-1]) * self.dtype.itemsize
        if size != needed:
            raise ValueError(
                f"{self.bin_file}: {size} bytes, but its index {self.idx_file.name} describes {needed} "
                f"({int(self.doc_offsets[-1])} tokens of {self.dtype}); the .bin is truncated or does not belong to this .idx"
            )

    def __len__(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    def document(self, d: int) -> np.ndarray:
        return self._tokens[self.doc_offsets[d] : self.doc_offsets[d + 1]]

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        start = self.doc_offsets[doc] + offset
        return self._tokens[start : start + length]

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """Largest id in the token stream (a full scan; chunks keep memory flat)."""
        best = -1
        for s in range(0, self.num_tokens, chunk):
            best = max(best, int(self._tokens[s : s + chunk].max()))
        return best

    def check_vocab(self, vocab_size: int) -> None:
        """Fail, naming the file, if any token id is outside ``[0, vocab_size)``."""
        top = self.max_token_id()
        if top >= vocab_size:
            raise ValueError(
                f"{self.bin_file}: token id {top} >= vocab size {vocab_size}; the data was tokenized with a larger vocabulary"
            )
