"""Train a byte-level BPE offline and write it as a K2-style tiktoken rank file.

    python -m k2train.data_pipeline.train_tokenizer --input corpus.txt --vocab-size 4096 --output DIR

The HF ``tokenizers`` trainer does the counting and merging, with K2's pre-tokenization regex
(``tokenizers`` speaks Oniguruma, which understands the regex's ``&&`` class intersections as
written; tests compare its splits with tiktoken's). Its merges become ranks: byte ``b`` has rank
``b`` (so every byte string is encodable) and merge ``k`` produces the token of rank ``256 + k``.
DIR receives ``tiktoken.model`` and ``tokenizer_config.json``, loadable by :class:`K2Tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .embedded import embedded_documents
from .tokenizer import K2_PATTERN, K2Tokenizer, _write_atomic, default_special_names, save_rank_file, special_tokens_config


def _byte_decoder() -> dict[str, int]:
    """The printable character -> byte map of byte-level BPE (the inverse of GPT-2's bytes_to_unicode)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps printable ASCII/Latin-1 bytes to themselves and the rest to U+0100 and up, in
    # byte order; rebuild that map and check it covers the alphabet the library reports.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    if set(mapping) != set(alphabet):
        raise RuntimeError("tokenizers' ByteLevel alphabet is not the expected GPT-2 byte map")
    return mapping


def train_bpe_ranks(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """BPE ranks for ``vocab_size`` base tokens (256 single bytes + vocab_size - 256 merges).

    Deterministic for a given input; raises if the corpus is too small to reach ``vocab_size``.
    """
    if vocab_size < 257:
        raise ValueError(f"--vocab-size={vocab_size} must be > 256 (the single bytes take the first 256 ranks)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    decode = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(decode[c] for c in left + right)
        if token in ranks:  # a second merge path to an existing token adds nothing for tiktoken
            continue
        ranks[token] = len(ranks)
    if len(ranks) < vocab_size:
        raise ValueError(
            f"the corpus only supports {len(ranks)} BPE tokens, fewer than --vocab-size={vocab_size}: "
            "give more text or a smaller vocabulary"
        )
    return ranks


def write_tokenizer(ranks: dict[bytes, int], output: str | os.PathLike) -> Path:
    """Write ``tiktoken.model`` + ``tokenizer_config.json`` into the folder ``output``."""
    out = Path(output)
    save_rank_file(ranks, out / "tiktoken.model")
    config = special_tokens_config(default_special_names(len(ranks)))
    _write_atomic(out / "tokenizer_config.json", (json.dumps(config, indent=1) + "\n").encode())
    return out


def build_hf_tokenizer(tokenizer: K2Tokenizer):
    """An HF ``tokenizers.Tokenizer`` that encodes ordinary text exactly like ``tokenizer``.

    Used by the benchmark and the equivalence tests. Merges are recovered from the ranks: a token of
    rank r is the merge of the two parts BPE leaves when only ranks below r may be used.
    """
    ranks = tokenizer.mergeable_ranks
    to_char = {b: c for c, b in _byte_decoder().items()}

    def as_str(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        left, right = _split_by_lower_ranks(token, ranks, rank)
        merges.append((as_str(left), as_str(right)))
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} of rank {max_rank} is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def _read_texts(paths: list[str], text_field: str) -> Iterator[str]:
    """Plain text files line-grouped into paragraphs, or jsonl records' ``text_field``."""
    for p in paths:
        if p.endswith((".jsonl", ".json")):
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[text_field]
        else:
            yield Path(p).read_text(encoding="utf-8", errors="replace")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="text or jsonl files (or 'embedded' for the built-in corpus)")
    ap.add_argument("--vocab-size", type=int, required=True, help="BPE tokens, including the 256 single bytes")
    ap.add_argument("--output", required=True, help="folder for tiktoken.model and tokenizer_config.json")
    ap.add_argument("--text-field", default="text", help="field of jsonl records holding the text")
    args = ap.parse_args(argv)
    if args.input == ["embedded"]:
        texts: Iterable[str] = embedded_documents()
    else:
        texts = _read_texts(args.input, args.text_field)
    ranks = train_bpe_ranks(texts, args.vocab_size)
    out = write_tokenizer(ranks, args.output)
    tok = K2Tokenizer(out)
    print(f"wrote {out}/tiktoken.model: n_base={tok.n_base} n_vocab={tok.n_vocab} bos={tok.bos_id} eos={tok.eos_id}")


if __name__ == "__main__":
    main()
