"""The Kimi K2 tokenizer: tiktoken BPE from a rank file plus 256 reserved special tokens.

A rank file (``tiktoken.model``) has one line per base token: the token's bytes in base64, a space,
its rank. The ranks must be exactly ``0..n_base-1``; the special tokens then take the ids
``n_base..n_base+255`` (as Kimi K2's tokenizer). The same code path loads the real K2 file
(n_base = 163,584) and the small BPEs the project trains itself (``train_tokenizer.py``).

Everything here is offline: tiktoken's ``Encoding`` is built from an in-memory dict of ranks, so it
never looks for a cached or downloadable file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken

NUM_RESERVED_SPECIAL_TOKENS = 256

# The pre-tokenization regex of Kimi K2 (its released tokenizer). The `&&` class intersections are
# understood by tiktoken (fancy-regex), by Oniguruma (the HF `tokenizers` Split pre-tokenizer) and
# by the `regex` module in V1 mode; tests check the engines agree.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
K2_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTIONS}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTIONS}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# tiktoken's regex engine backtracks badly on very long inputs and very long runs of one character
# class; K2 encodes in chunks of at most this many characters (as its released tokenizer code does).
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Named special tokens by offset from n_base; every other reserved id is <|reserved_token_{id}|>.
_DEFAULT_SPECIAL_NAMES = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 254: "[UNK]", 255: "[PAD]"}

# Unicode White_Space code points (what `\s` means to tiktoken's regex engine).
_WHITESPACE = np.array(
    [9, 10, 11, 12, 13, 32, 133, 160, 5760, *range(8192, 8203), 8232, 8233, 8239, 8287, 12288],
    dtype=np.uint32,
)


def load_rank_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file. Errors name the file and line; ranks must be ``0..n-1``."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                token = base64.b64decode(token_b64, validate=True)
                ranks[token] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken rank line (base64 token, space, rank): {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"{path}: the rank file is empty")
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        first_bad = next(i for i, v in enumerate(values) if v != i)
        raise ValueError(
            f"{path}: ranks must be exactly 0..{len(values) - 1} without gaps or duplicates "
            f"(first problem near rank {first_bad}); special tokens go right after the last rank"
        )
    return ranks


def save_rank_file(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ranks in tiktoken's format, sorted by rank (atomic: written to a temp file first)."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    _write_atomic(Path(path), "".join(lines).encode("ascii"))


def default_special_names(n_base: int) -> dict[int, str]:
    """id -> name of the 256 reserved special tokens when no tokenizer_config.json says otherwise."""
    return {
        n_base + i: _DEFAULT_SPECIAL_NAMES.get(i, f"<|reserved_token_{n_base + i}|>")
        for i in range(NUM_RESERVED_SPECIAL_TOKENS)
    }


def load_special_names(config_path: str | os.PathLike, n_base: int) -> dict[int, str]:
    """Special-token names from an HF ``tokenizer_config.json`` (``added_tokens_decoder``).

    Ids outside ``n_base..n_base+255`` are an error (they would collide with BPE ranks); reserved ids
    the file does not name keep their default names.
    """
    names = default_special_names(n_base)
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key, entry in cfg.get("added_tokens_decoder", {}).items():
        tid = int(key)
        if tid not in names:
            raise ValueError(
                f"{config_path}: added token id {tid} ({entry.get('content')!r}) is outside the reserved "
                f"special range [{n_base}, {n_base + NUM_RESERVED_SPECIAL_TOKENS}) of this rank file"
            )
        names[tid] = entry["content"]
    return names


def special_tokens_config(names: dict[int, str]) -> dict:
    """The ``tokenizer_config.json`` content describing ``names`` (HF ``added_tokens_decoder`` layout)."""
    by_name = {v: k for k, v in names.items()}
    return {
        "tokenizer_class": "TikTokenTokenizer",
        "bos_token": names[min(names)],
        "eos_token": names[min(names) + 1],
        "unk_token": "[UNK]" if "[UNK]" in by_name else None,
        "pad_token": names[max(names)],
        "added_tokens_decoder": {
            str(tid): {
                "content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False
            }
            for tid, name in sorted(names.items())
        },
    }


class K2Tokenizer:
    """tiktoken BPE with K2's regex, chunked encoding and the 256 reserved special tokens.

    ``path`` is a ``tiktoken.model`` file or a folder holding one (plus, optionally,
    ``tokenizer_config.json`` whose ``added_tokens_decoder`` names the special tokens). Literal
    special-token text in the input ("[EOS]") is encoded as ordinary text unless the caller lists
    it in ``allowed_special``: pretraining text must never inject control tokens.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        rank_path = path / "tiktoken.model" if path.is_dir() else path
        if not rank_path.is_file():
            raise FileNotFoundError(f"tokenizer rank file not found: {rank_path} (give a tiktoken.model file or its folder)")
        self.path = rank_path
        ranks = load_rank_file(rank_path)
        self.n_base = len(ranks)
        config_path = rank_path.parent / "tokenizer_config.json"
        if config_path.is_file():
            self.special_names = load_special_names(config_path, self.n_base)
        else:
            self.special_names = default_special_names(self.n_base)
        self.special_ids = {name: tid for tid, name in self.special_names.items()}
        self._enc = tiktoken.Encoding(
            name=f"k2_{self.n_base}",
            pat_str=K2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )
        digest = hashlib.sha256(rank_path.read_bytes())
        digest.update(json.dumps(sorted(self.special_names.items())).encode())
        self.fingerprint = digest.hexdigest()[:16]

    # -- ids ---------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """BPE tokens plus the 256 reserved specials; the model's vocab_size must be at least this."""
        return self.n_base + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def bos_id(self) -> int:
        return self.n_base

    @property
    def eos_id(self) -> int:
        return self.n_base + 1

    @property
    def pad_id(self) -> int:
        return self.n_base + NUM_RESERVED_SPECIAL_TOKENS - 1

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self._enc._mergeable_ranks

    # -- encoding ----------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        *,
        bos: bool = False,
        eos: bool = False,
        allowed_special: Collection[str] | str = (),
    ) -> list[int]:
        """Token ids of ``text``; ``allowed_special`` ("all" or names) enables special-token parsing."""
        if allowed_special == "all":
            allowed = set(self.special_ids)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_ids)
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens: {sorted(unknown)}")
        ids: list[int] = [self.bos_id] if bos else []
        for chunk in split_for_encoding(text):
            if allowed:
                ids.extend(self._enc.encode(chunk, allowed_special=allowed, disallowed_special=()))
            else:
                ids.extend(self._enc.encode_ordinary(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], *, eos: bool = False, num_threads: int = 1) -> list[list[int]]:
        """Ordinary-text encoding of many documents (tiktoken's Rust threads when ``num_threads`` > 1)."""
        if num_threads > 1 and all(len(t) <= MAX_CHUNK_CHARS for t in texts) and not any(map(_has_long_run, texts)):
            out = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        else:
            out = [self.encode(t) for t in texts]
        if eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences (cut multi-byte characters) become U+FFFD."""
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def __repr__(self) -> str:
        return f"K2Tokenizer(path={str(self.path)!r}, n_base={self.n_base}, n_vocab={self.n_vocab})"


def split_for_encoding(text: str) -> list[str]:
    """Cut ``text`` into pieces tiktoken encodes quickly; concatenating them gives ``text`` back.

    Pieces hold at most MAX_CHUNK_CHARS characters, and no run of whitespace or non-whitespace longer
    than MAX_RUN_CHARS (a 2 MB single line of minified JSON would otherwise take minutes).
    """
    pieces = []
    for start in range(0, max(len(text), 1), MAX_CHUNK_CHARS):
        window = text[start : start + MAX_CHUNK_CHARS]
        pieces.extend(_split_long_runs(window) if _has_long_run(window) else [window])
    return pieces


def _space_mask(text: str) -> np.ndarray:
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return np.isin(codepoints, _WHITESPACE)


def _run_bounds(is_space: np.ndarray) -> np.ndarray:
    """Start offsets of the maximal runs of one class, plus len at the end."""
    changes = np.flatnonzero(is_space[1:] != is_space[:-1]) + 1
    return np.concatenate([[0], changes, [len(is_space)]])


def _has_long_run(text: str) -> bool:
    if len(text) <= MAX_RUN_CHARS:
        return False
    return bool(np.diff(_run_bounds(_space_mask(text))).max() > MAX_RUN_CHARS)


def _split_long_runs(text: str) -> list[str]:
    bounds = _run_bounds(_space_mask(text))
    pieces, piece_start = [], 0
    for run_start, run_end in zip(bounds[:-1], bounds[1:]):
        if run_end - run_start <= MAX_RUN_CHARS:
            continue
        # Cut the long run into MAX_RUN_CHARS slices; text before it stays with its first slice.
        cuts = range(int(run_start) + MAX_RUN_CHARS, int(run_end), MAX_RUN_CHARS)
        for cut in cuts:
            pieces.append(text[piece_start:cut])
            piece_start = cut
    pieces.append(text[piece_start:])
    return pieces


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
