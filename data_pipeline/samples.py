"""Sample indices with Megatron GPTDataset semantics, and Megatron's weighted blending.

One epoch of a dataset: the documents in a seeded random order, concatenated into one token stream;
sample ``i`` of that stream is tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` (consecutive samples
share one token, so every token is once a label); the partial sample at the end is dropped; the
samples are then visited in a seeded random order. Epoch 0 draws from ``RandomState(seed)`` exactly as
megatron-core's GPTDataset does for a one-epoch dataset (document shuffle, then sample shuffle), so
its samples are the same; ``tests/test_data_megatron.py`` checks this. Later epochs reshuffle with
``RandomState(seed + epoch)``: the stream is endless, so the number of epochs is never fixed up front
as Megatron's global multi-epoch shuffle requires.

A stream may use a range of the documents only (:func:`split_documents`: the training documents and
the held-out validation ones), as GPTDataset does for Megatron's ``--split``.
"""

from __future__ import annotations

import numpy as np

from .indexed import IndexedDataset


def split_documents(num_docs: int, valid_fraction: float) -> tuple[range, range]:
    """The training and validation documents of a dataset of ``num_docs`` documents: the first
    ones train, the last ``valid_fraction`` of them validate, with the boundary megatron-core puts
    at ``--split (1 - f),f`` (``round((1 - f) * num_docs)``)."""
    cut = int(round((1.0 - valid_fraction) * float(num_docs)))
    return range(0, cut), range(cut, num_docs)


class GPTSamples:
    """Endless sample stream of one indexed dataset (``documents``: of those documents only, a
    range; default all); sample ``k`` is epoch ``k // len(self)``."""

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int, documents: range | None = None):
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.documents = range(len(dataset)) if documents is None else documents
        n_tokens = int(dataset.doc_lengths[self.documents.start:self.documents.stop].sum())
        self.samples_per_epoch = (n_tokens - 1) // seq_len if n_tokens else 0
        if self.samples_per_epoch < 1:
            which = "" if documents is None else f" (documents {documents.start}..{documents.stop - 1} of {len(dataset)})"
            raise ValueError(
                f"{dataset.bin_file}{which}: {n_tokens} tokens cannot fill one sample of seq_len+1={seq_len + 1} "
                "tokens; use a shorter trainer.seq_len or more data"
                + (" (or another data.valid_split)" if documents is not None else "")
            )
        self._epoch = -1

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _load_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        rng = np.random.RandomState(self.seed + epoch)
        doc_order = np.arange(self.documents.start, self.documents.stop, dtype=np.int32)
        rng.shuffle(doc_order)
        self._doc_order = doc_order
        self._doc_starts = np.concatenate([[0], np.cumsum(self.dataset.doc_lengths[doc_order], dtype=np.int64)])
        # Megatron's shuffle index uses uint32 below 2^32 samples; the dtype does not change the draw.
        self._sample_order = np.arange(self.samples_per_epoch, dtype=np.int64)
        rng.shuffle(self._sample_order)
        self._epoch = epoch

    def pieces(self, k: int) -> list[tuple[int, int, int]]:
        """``(document, offset, length)`` slices whose concatenation is sample ``k`` (seq_len+1 tokens)."""
        epoch, j = divmod(k, self.samples_per_epoch)
        self._load_epoch(epoch)
        start = int(self._sample_order[j]) * self.seq_len
        need = self.seq_len + 1
        pos = int(np.searchsorted(self._doc_starts, start, side="right")) - 1
        offset = start - int(self._doc_starts[pos])
        out = []
        while need:
            doc = int(self._doc_order[pos])
            take = min(need, int(self.dataset.doc_lengths[doc]) - offset)
            if take > 0:
                out.append((doc, offset, take))
                need -= take
            pos, offset = pos + 1, 0
        return out


def blend_next(weights: np.ndarray, counts: np.ndarray, start: int, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset choice and per-dataset sample number for global samples ``start .. start+num-1``.

    Megatron's ``build_blending_indices``: sample ``i`` goes to the dataset whose share lags most,
    ``argmax(weight * max(i, 1) - count)`` (first index on ties). ``counts`` (samples already drawn
    from each dataset before ``start``) is updated in place; it is the blend's whole state.
    """
    if len(weights) == 1:
        index = counts[0] + np.arange(num, dtype=np.int64)
        counts[0] += num
        return np.zeros(num, dtype=np.int64), index
    which = np.empty(num, dtype=np.int64)
    index = np.empty(num, dtype=np.int64)
    for n in range(num):
        i = start + n
        d = int(np.argmax(weights * max(i, 1) - counts))
        which[n], index[n] = d, counts[d]
        counts[d] += 1
    return which, index


def normalized_weights(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()
