"""The training data loader: blended, shuffled, DP-split, prefetched and exactly resumable.

Every data-parallel rank walks the same global sample stream (the blend of the datasets' GPT
sample streams). Global batch ``s`` is samples ``[s*B*dp, (s+1)*B*dp)``; rank ``r`` takes the
slice ``[r*B, (r+1)*B)`` of it, so ranks never share a sample. The whole position is the number of
global samples consumed plus the blend counters, which do not depend on B or dp: a run may resume
with another micro-batch size or DP size and continue with exactly the next samples.

Usage (what the trainer does)::

    tokenizer = load_tokenizer(cfg.data)
    loader = build_data_loader(cfg.data, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, vocab_size)
    batch = next(loader)            # {"tokens": [B, S], "labels": [B, S]} int64
    state = loader.state_dict()     # save with the checkpoint; loader.load_state_dict(state) resumes

Validation data (``split="valid"``): ``data.valid_datasets`` when given, else the last
``data.valid_split`` of every training dataset's documents, which training then never reads
(:func:`~.samples.split_documents`, Megatron's ``--split`` boundary).
"""

from __future__ import annotations

import atexit
import json
import queue
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embedded import build_embedded_dataset, embedded_tokenizer
from .indexed import IndexedDataset
from .samples import GPTSamples, blend_next, normalized_weights, split_documents
from .tokenizer import K2Tokenizer

STATE_VERSION = 1

# Prefetch threads must stop before the interpreter tears torch down (else: "terminate called").
_LIVE_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(_LIVE_LOADERS)])


def load_tokenizer(cfg) -> K2Tokenizer:
    """The tokenizer of a DataConfig: ``cfg.tokenizer_path``, else the embedded BPE."""
    return K2Tokenizer(cfg.tokenizer_path) if cfg.tokenizer_path else embedded_tokenizer()


def check_vocab(tokenizer: K2Tokenizer, model_vocab_size: int) -> None:
    """Refuse a model whose embedding cannot hold every token id the tokenizer produces.

    Extra rows are allowed (padding, as Megatron pads the vocabulary to a multiple of 128 x TP).
    """
    if model_vocab_size < tokenizer.n_vocab:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary {tokenizer.n_vocab} "
            f"({tokenizer.n_base} BPE tokens + 256 special tokens, from {tokenizer.path}); "
            f"set model.vocab_size={tokenizer.n_vocab} (or larger: extra rows are padding)"
        )


def build_datasets(cfg, tokenizer: K2Tokenizer) -> tuple[list[IndexedDataset], list[float]]:
    """The indexed datasets and blend weights a DataConfig names (building the embedded cache if needed)."""
    if cfg.source == "embedded":
        return [build_embedded_dataset(cfg.cache_dir, tokenizer)], [1.0]
    datasets, weights = [], []
    for spec in cfg.datasets:
        ds = IndexedDataset(spec.path)
        _check_manifest(spec.path, tokenizer)
        datasets.append(ds)
        weights.append(spec.weight)
    return datasets, weights


def _check_manifest(prefix: str, tokenizer: K2Tokenizer) -> None:
    """If ``prepare`` left a manifest, the data must come from this tokenizer."""
    manifest = Path(f"{prefix}.json")
    if not manifest.is_file():
        return
    info = json.loads(manifest.read_text())
    used = info.get("tokenizer", {}).get("fingerprint")
    if used and used != tokenizer.fingerprint:
        raise ValueError(
            f"{prefix}.bin was tokenized with tokenizer {info['tokenizer'].get('path')} (hash {used}), "
            f"but this run uses {tokenizer.path} (hash {tokenizer.fingerprint}); set data.tokenizer_path to the former"
        )


class DataLoader:
    """Iterator of batches for one DP rank; see the module docstring for the sample order."""

    def __init__(
        self,
        datasets: list[IndexedDataset],
        weights: list[float],
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        vocab_size: int,
        seed: int,
        eos_id: int,
        document_mask: bool = False,
        prefetch: int = 4,
        documents: list[range] | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or seq_len < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} and seq_len={seq_len} must be >= 1")
        # documents: the range of each dataset's documents to read (default: all of them)
        self.streams = [GPTSamples(ds, seq_len, seed, docs) for ds, docs in zip(datasets, documents or [None] * len(datasets))]
        self.weights = normalized_weights(weights)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.vocab_size, self.eos_id = vocab_size, eos_id
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0 (0: no background thread)")
        # prefetch > 0: a background thread keeps that many batches ready.
        self.document_mask, self.prefetch = document_mask, prefetch
        self.signature = {
            "seq_len": seq_len,
            "seed": seed,
            "datasets": [[ds.prefix.name, float(w), len(ds), ds.num_tokens] for ds, w in zip(datasets, self.weights)],
        }
        if documents is not None:  # a held-out range changes what training reads (no key without one: older states)
            self.signature["documents"] = [[d.start, d.stop] for d in documents]
        # Position of the consumer: the next global sample and the blend counters before it.
        self._consumed = 0
        self._counts = np.zeros(len(datasets), dtype=np.int64)
        self._thread: threading.Thread | None = None

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.prefetch:
            batch, self._consumed, self._counts = self._make_batch(self._consumed, self._counts.copy())
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, self._consumed, self._counts = item
        return batch

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._consumed, self._counts.copy(), self._queue, self._stop), daemon=True, name="k2-data"
        )
        self._thread.start()
        _LIVE_LOADERS.add(self)

    def _produce(self, consumed: int, counts: np.ndarray, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch, consumed, counts = self._make_batch(consumed, counts)
                counts = counts.copy()
                while not stop.is_set():
                    try:
                        q.put((batch, consumed, counts.copy()), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surface data errors in the training loop, not a dead thread
            q.put(e)

    def close(self) -> None:
        """Stop the prefetch thread (pending batches are dropped; the state is the consumer's)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- batches -----------------------------------------------------------------------------

    def _make_batch(self, consumed: int, counts: np.ndarray) -> tuple[dict[str, torch.Tensor], int, np.ndarray]:
        """The batch of this rank at global position ``consumed``; returns the position after it."""
        global_batch = self.micro_batch_size * self.dp_size
        which, index = blend_next(self.weights, counts, consumed, global_batch)
        mine = slice(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        rows, positions, segments = [], [], []
        for d, k in zip(which[mine], index[mine]):
            tokens, pos, seg = self._read_sample(int(d), int(k))
            rows.append(tokens)
            positions.append(pos)
            segments.append(seg)
        samples = torch.from_numpy(np.stack(rows))
        batch = {"tokens": samples[:, :-1].contiguous(), "labels": samples[:, 1:].contiguous()}
        if self.document_mask:
            batch["position_ids"] = torch.from_numpy(np.stack(positions))[:, :-1].contiguous()
            batch["doc_ids"] = torch.from_numpy(np.stack(segments))[:, :-1].contiguous()
        return batch, consumed + global_batch, counts

    def _read_sample(self, d: int, k: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        stream = self.streams[d]
        pieces = stream.pieces(k)
        tokens = np.concatenate([stream.dataset.read(doc, off, n) for doc, off, n in pieces]).astype(np.int64)
        top = int(tokens.max())
        if top >= self.vocab_size:
            raise ValueError(
                f"{stream.dataset.bin_file}: token id {top} >= model vocab size {self.vocab_size} "
                f"(documents {[p[0] for p in pieces]}); the data was tokenized with another tokenizer"
            )
        if not self.document_mask:
            return tokens, None, None
        # Each piece is one document (or its tail/head): positions restart and the segment id
        # advances at every piece boundary.
        lengths = [n for _, _, n in pieces]
        seg = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
        starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
        pos = np.arange(len(tokens), dtype=np.int64) - starts
        return tokens, pos, seg

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch this rank returned (identical on every DP rank)."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": int(self._consumed),
            "blend_counts": self._counts.tolist(),
            "signature": self.signature,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the saved position. DP size and micro-batch size may differ from the saved
        run; the data (datasets, weights, seq_len, seed) may not."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = state["signature"]
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self.signature.items() if _norm(saved.get(k)) != _norm(v)]
        if diffs:
            raise ValueError("cannot resume the data loader: the data configuration changed (" + "; ".join(diffs) + ")")
        self.close()
        self._consumed = int(state["consumed_samples"])
        self._counts = np.asarray(state["blend_counts"], dtype=np.int64)


def _norm(x: Any) -> Any:
    return json.loads(json.dumps(x))


def has_validation_data(cfg) -> bool:
    """Whether a DataConfig names validation data (``valid_datasets`` or a ``valid_split``)."""
    return bool(cfg.valid_datasets) or cfg.valid_split > 0


def validation_sets(cfg) -> list[tuple[str, float]]:
    """Name and blend weight of each validation dataset: ``data.valid_datasets``, else the training
    datasets (their held-out documents); a name is its prefix's file name ("embedded" for the
    built-in corpus), numbered where two are alike."""
    specs = cfg.valid_datasets or (cfg.datasets if cfg.source == "megatron" else [])
    named = [(Path(s.path).name, s.weight) for s in specs] or [("embedded", 1.0)]
    names = [n for n, _ in named]
    return [(n if names.count(n) == 1 else f"{n}_{i}", w) for i, (n, w) in enumerate(named)]


def build_data_loader(
    cfg, tokenizer: K2Tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int,
    split: str = "train", dataset: int | None = None,
) -> DataLoader:
    """The loader for one DP rank from a :class:`k2train.config.DataConfig`: of the training data,
    or with ``split="valid"`` of the validation data (module docstring); ``dataset``: of that one
    of its datasets alone (an index into :func:`validation_sets` / ``data.datasets``).

    Yields ``{"tokens", "labels"}`` int64 ``[micro_batch_size, seq_len]`` (plus ``position_ids``
    and ``doc_ids`` when ``cfg.document_mask``). ``cfg.prefetch=0`` reads in the caller's thread;
    otherwise one background thread keeps ``cfg.prefetch`` batches ready.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r} must be 'train' or 'valid'")
    check_vocab(tokenizer, vocab_size)
    documents = None
    if split == "valid" and cfg.valid_datasets:
        datasets = [IndexedDataset(spec.path) for spec in cfg.valid_datasets]
        for spec in cfg.valid_datasets:
            _check_manifest(spec.path, tokenizer)
        weights = [spec.weight for spec in cfg.valid_datasets]
    else:
        if split == "valid" and not cfg.valid_split > 0:
            raise ValueError("no validation data: set data.valid_split (the fraction of each dataset's documents "
                             "held out, e.g. 0.01) or data.valid_datasets, or trainer.eval_interval=0")
        datasets, weights = build_datasets(cfg, tokenizer)
        if cfg.valid_split > 0 and not cfg.valid_datasets:
            halves = [split_documents(len(ds), cfg.valid_split) for ds in datasets]
            documents = [h[split == "valid"] for h in halves]
            for ds, docs in zip(datasets, documents):
                if len(docs) == 0:
                    raise ValueError(f"{ds.bin_file}: data.valid_split={cfg.valid_split} of its {len(ds)} documents leaves "
                                     f"no {'validation' if split == 'valid' else 'training'} document; "
                                     "use another data.valid_split, or data.valid_datasets")
    if dataset is not None:
        datasets, weights = [datasets[dataset]], [1.0]
        documents = None if documents is None else [documents[dataset]]
    return DataLoader(
        datasets,
        weights,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        vocab_size=vocab_size,
        seed=cfg.seed,
        eos_id=tokenizer.eos_id,
        document_mask=cfg.document_mask,
        prefetch=cfg.prefetch,
        documents=documents,
    )
