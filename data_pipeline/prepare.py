"""Tokenize raw corpora into a Megatron indexed dataset (``PREFIX.bin``/``.idx``) plus a manifest.

    python -m k2train.data_pipeline.prepare --input data/*.jsonl --output shards/web --tokenizer DIR

Inputs, in the order given (a folder is expanded to its ``.json``/``.jsonl``(``.gz``)/``.parquet``/
``.txt`` files, sorted by path; hidden and ``_``-prefixed files are ignored, any other file is an
error): ``.json``/``.jsonl``(``.gz``) are read here line by line, so that errors give the line an
editor shows (a ``.json`` file whose first character is ``[`` is read whole as one array);
``.parquet`` (field ``--text-field``), other files as text (``--text-unit document|line|paragraph``)
and hub dataset names go through HF ``datasets`` (streaming). Worker processes tokenize batches of
documents; the main process writes them in input order, an EOS after each document.

Bad records: a JSON line that does not parse (``invalid_json``), is not an object
(``not_an_object``), lacks the text field (``missing_field``), or whose text is null (``null_text``)
or not a string (``not_a_string``); a parquet/hub row with a null or non-string text. With
``--on-bad-record fail`` (the default) the first one stops the run with a one-line error naming
file and line; with ``skip`` it is counted by kind, the first FIRST_BAD_LISTED are listed (file:line,
kind) in the manifest, and the run goes on. Repaired, not skipped: invalid UTF-8 and lone surrogates
(JSON ``"\\ud800"``) become U+FFFD and are counted. Whitespace-only texts are skipped and counted;
zero-width and control characters are kept as text. Refused before any work, whatever the mode: a
missing input, a folder holding files of no known format, a text or JSON input that looks binary
(a NUL byte in its first 8 KiB) or is UTF-16.

Resuming: records are grouped into parts of ``--part-records``; each finished part is renamed into
``PREFIX.parts/`` and recorded in ``progress.json`` (with its skip counts). A rerun with the same
inputs and tokenizer skips the recorded records and continues, so no document is lost or written
twice and the output is the same bytes as an uninterrupted run. At the end the parts are merged into
``PREFIX.bin``/``.idx`` and ``PREFIX.json`` (token counts, tokenizer hash, source fingerprint, the
counts above).

Progress goes to stderr: a tqdm bar on a terminal, else one plain line every PROGRESS_EVERY_S
seconds (no carriage returns in log files). The command prints ``error: ...`` and exits with code 2
on a bad input; ``--traceback`` (or ``K2TRAIN_TRACEBACK=1``) shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..cli import EXIT_USER_ERROR, USER_ERRORS, report_error, traceback_requested
from .embedded import embedded_tokenizer
from .indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from .tokenizer import K2Tokenizer, _write_atomic

_JSON_EXT = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_PARQUET_EXT = (".parquet",)
_FOLDER_EXT = _JSON_EXT + _PARQUET_EXT + (".txt",)  # what a folder given as --input is expanded to
# Bumped when the record stream of the same files changes, so that an unfinished run of an older
# version is refused instead of resumed at the wrong record.
_READER_VERSION = 2

FIRST_BAD_LISTED = 20  # bad records listed by file:line in the manifest and the summary
PROGRESS_EVERY_S = 30.0  # plain progress lines when stderr is not a terminal
_BINARY_PROBE_BYTES = 8192

_DECODER = json.JSONDecoder(strict=False)  # raw tabs and other control characters inside strings are kept
_JSON_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Lone surrogates that surrogateescape decoding cannot have produced (it maps bytes to U+DC80..U+DCFF).
_NOT_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class BadRecordError(ValueError):
    """A record prepare cannot use while ``on_bad_record="fail"``; the message is one line."""


class _Bad(NamedTuple):
    where: str  # "file:line" (json) or "file row N" (parquet, hub)
    kind: str  # invalid_json | not_an_object | missing_field | null_text | not_a_string
    detail: str

    def message(self) -> str:
        hint = "set --text-field if the text is in another field, " if self.kind == "missing_field" else ""
        what = "line" if self.where.rpartition(":")[2].isdigit() else "record"
        return f"{self.where}: {self.detail}; {hint}use --on-bad-record skip to skip such records, or fix the {what}"


class _Repaired(NamedTuple):
    text: str
    fixes: tuple[str, ...]  # invalid_utf8 and/or lone_surrogate


# -- inputs ----------------------------------------------------------------------------------


def _builder(path: str) -> str:
    if path.endswith(_JSON_EXT):
        return "json"
    if path.endswith(_PARQUET_EXT):
        return "parquet"
    return "text"


def resolve_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """``(path, builder)`` per input file, folders expanded; a missing input is refused here."""
    out = []
    for p in map(os.fspath, inputs):
        if os.path.isdir(p):
            out += [(f, _builder(f)) for f in _folder_files(p)]
        elif os.path.isfile(p):
            out.append((p, _builder(p)))
        elif os.path.exists(p):
            raise ValueError(f"{p}: not a regular file or folder")
        elif _looks_like_hub_name(p):
            out.append((p, "hub"))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _looks_like_hub_name(p: str) -> bool:
    """``owner/name`` or ``name`` without a file extension, whose first part is no local folder."""
    ext = os.path.splitext(p)[1].lower()
    return bool(_HUB_NAME.fullmatch(p)) and ext not in (".json", ".jsonl", ".gz", ".parquet", ".txt") and not (
        "/" in p and os.path.isdir(p.split("/")[0])
    )


def _folder_files(folder: str) -> list[str]:
    # Hidden and _-prefixed names are bookkeeping (.crc, _SUCCESS, _metadata), as for Spark and Arrow.
    found = sorted(
        f.relative_to(folder).as_posix()
        for f in Path(folder).rglob("*")
        if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(folder).parts)
    )
    unknown = [f for f in found if not f.endswith(_FOLDER_EXT)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"{folder}: holds files of no known format ({shown}); a folder may hold .json/.jsonl(.gz), "
            ".parquet and .txt files: move the others out, or give the files one by one (read as text)"
        )
    if not found:
        raise ValueError(f"{folder}: holds no .json/.jsonl(.gz), .parquet or .txt files")
    return [os.path.join(folder, f) for f in found]


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _check_not_binary(path: str, builder: str) -> None:
    """Refuse a text/JSON input that is binary or UTF-16 before it turns into records of garbage."""
    try:
        with _open_bytes(path) as f:
            head = f.read(_BINARY_PROBE_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is truncated or corrupt") from e
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(
            f"{path}: is UTF-16 (it starts with a UTF-16 byte-order mark); "
            "convert it to UTF-8, e.g. with iconv -f UTF-16 -t UTF-8"
        )
    nul = head.find(b"\0")
    if nul >= 0:
        what = "JSON" if builder == "json" else "text"
        raise ValueError(f"{path}: looks binary (a NUL byte at offset {nul}), not {what}; remove it from --input")


def scan_file(path: str, builder: str, text_unit: str) -> dict:
    """A content hash and, for text inputs, the number of records with invalid UTF-8.

    ``datasets`` decodes text with U+FFFD replacement, which hides the damage; counting here keeps
    it visible in the manifest (records are lines with ``--text-unit line``, the file otherwise;
    a ``.gz`` is read a second time, decompressed). JSON inputs count theirs while they are read.
    """
    if builder != "parquet":
        _check_not_binary(path, builder)
    digest, invalid = hashlib.sha256(), 0
    count_lines = builder == "text" and not path.endswith(".gz")  # else a second pass, on the decompressed lines
    with open(path, "rb") as f:
        for chunk in f if count_lines else iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            if count_lines and not _is_utf8(chunk):
                invalid += 1
    if builder == "text" and not count_lines:
        with _open_bytes(path) as f:
            invalid = sum(not _is_utf8(line) for line in f)
    if text_unit != "line":
        invalid = min(invalid, 1)
    info = {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    return {**info, "invalid_utf8": invalid} if builder == "text" else info


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- records ---------------------------------------------------------------------------------


def iter_records(path: str, builder: str, text_field: str, text_unit: str, split: str) -> Iterator[str | _Repaired | _Bad]:
    """Records of one input in order: a text, a ``_Repaired`` text, or a ``_Bad`` record."""
    if builder == "json":
        return _iter_json(path, text_field)
    return _iter_datasets(path, builder, text_field, text_unit, split)


def _iter_json(path: str, field: str) -> Iterator[str | _Repaired | _Bad]:
    """JSON Lines, or one array of objects in a ``.json`` file; blank lines are no records."""
    array_ok = path.endswith((".json", ".json.gz"))
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                if not raw.strip():
                    continue
                if array_ok and raw.lstrip().startswith(b"["):
                    yield from _iter_json_array(path, field, raw + f.read(), lineno)
                    return
                array_ok = False
                yield _json_line_record(raw, f"{path}:{lineno}", field)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is truncated or corrupt") from e


def _decode_utf8(raw: bytes) -> tuple[str, bool]:
    """Text of ``raw`` and whether it held invalid UTF-8 (those bytes become U+DC80..U+DCFF for now)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), True


def _json_line_record(raw: bytes, where: str, field: str) -> str | _Repaired | _Bad:
    line, invalid_utf8 = _decode_utf8(raw)
    try:
        value = _DECODER.decode(line)
    except json.JSONDecodeError as e:
        return _Bad(where, "invalid_json", f"not valid JSON (column {e.colno}: {e.msg})")
    except (ValueError, RecursionError) as e:  # a number of over 4,300 digits, nesting too deep
        return _Bad(where, "invalid_json", f"not valid JSON ({type(e).__name__}: {str(e)[:100]})")
    return _json_record(value, where, field, invalid_utf8)


def _iter_json_array(path: str, field: str, data: bytes, first_line: int) -> Iterator[str | _Repaired | _Bad]:
    """Elements of a JSON array file (read whole) with the line each starts on.

    A syntax error stops the file in either mode: past it there is no telling where the next element starts.
    """
    text, invalid_utf8 = _decode_utf8(data)

    def line_at(pos: int) -> int:
        return first_line + text.count("\n", 0, pos)

    def broken(pos: int, what: str) -> ValueError:
        return ValueError(
            f"{path}:{line_at(pos)}: {what}; a broken JSON array cannot be skipped past: "
            "fix it, or convert the file to JSON Lines"
        )

    pos = _JSON_WS.match(text, _JSON_WS.match(text).end() + 1).end()  # past "["
    line, counted = first_line, 0
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise broken(e.pos, f"not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise broken(pos, f"not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield _json_record(value, f"{path}:{line}", field, invalid_utf8)
        pos = _JSON_WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
        elif text.startswith("]", pos) and _JSON_WS.match(text, pos + 1).end() == len(text):
            return
        else:
            raise broken(pos, "expected ',' or the closing ']' of the array")


def _json_type(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _json_record(value: object, where: str, field: str, invalid_utf8: bool) -> str | _Repaired | _Bad:
    if not isinstance(value, dict):
        return _Bad(where, "not_an_object", f"a JSON {_json_type(value)}, not an object with a {field!r} field")
    if field not in value:
        names = sorted(value)
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        return _Bad(where, "missing_field", f"no field {field!r} (fields: {shown or 'none'})")
    return _text_record(value[field], where, field, invalid_utf8)


def _text_record(text: object, where: str, field: str, invalid_utf8: bool) -> str | _Repaired | _Bad:
    """The text of one record, with invalid UTF-8 and lone surrogates replaced by U+FFFD."""
    if text is None:
        return _Bad(where, "null_text", f"field {field!r} is null")
    if not isinstance(text, str):
        kind = _json_type(text)
        return _Bad(where, "not_a_string", f"field {field!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a string")
    if text.isascii() or not _SURROGATE.search(text):
        return text
    # Surrogates cannot be encoded as UTF-8; tiktoken would silently substitute them.
    fixes = []
    lone = _NOT_ESCAPED_BYTE if invalid_utf8 else _SURROGATE
    if lone.search(text):
        text = lone.sub("\ufffd", text)
        fixes.append("lone_surrogate")
    if invalid_utf8 and _SURROGATE.search(text):
        # Back to the original bytes, then the same replacement datasets and str.decode apply.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        fixes.append("invalid_utf8")
    return _Repaired(text, tuple(fixes))


def _iter_datasets(path, builder, text_field, text_unit, split) -> Iterator[str | _Repaired | _Bad]:
    """Parquet, text and hub inputs through ``datasets`` (streaming); errors name the file."""
    import datasets  # the optional `data` extra: only parquet, text and hub inputs need it

    datasets.disable_progress_bars()
    try:
        if builder == "hub":
            ds = datasets.load_dataset(path, split=split, streaming=True)
        elif builder == "parquet":
            ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        else:
            ds = datasets.load_dataset(
                "text", data_files=path, split="train", streaming=True, sample_by=text_unit, encoding_errors="replace"
            )
        for i, record in enumerate(ds, 1):
            if builder == "text":
                yield record["text"]
                continue
            if text_field not in record:  # a column: every row lacks it, so no record could be kept
                raise KeyError(f"{path}: no column {text_field!r} (columns: {', '.join(sorted(record))}); set --text-field")
            yield _text_record(record[text_field], f"{path} row {i}", text_field, False)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except Exception as e:  # pyarrow and datasets raise their own exception types for bad files
        what = "not a local file or folder, and cannot be loaded as a hub dataset" if builder == "hub" else (
            f"cannot read this {builder} input; the file is corrupt or not {builder}"
        )
        raise ValueError(f"{path}: {what} ({type(e).__name__}: {_one_line(str(e))[:300]})") from e


def _one_line(s: str) -> str:
    return " ".join(s.split())


# -- tokenization workers ----------------------------------------------------------------------

_WORKER_TOKENIZER: K2Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer(tokenizer_path)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of non-empty texts, EOS appended, as one flat array plus per-document lengths."""
    tok = _WORKER_TOKENIZER
    dtype = token_dtype(tok.n_vocab)
    docs = [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts, eos=True)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return (np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)), lengths


def _load_tokenizer(path: str) -> K2Tokenizer:
    if path in ("", "embedded"):
        return embedded_tokenizer()
    return K2Tokenizer(path)


class _Progress:
    """tqdm on a terminal; elsewhere a plain line every PROGRESS_EVERY_S seconds (a log file gets no '\\r')."""

    def __init__(self, name: str, enabled: bool, documents: int, bad: int):
        self.name, self.enabled, self.documents, self.bad, self.tokens = name, enabled, documents, bad, 0
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        if enabled and getattr(sys.stderr, "isatty", lambda: False)():
            self.bar = tqdm(desc=f"prepare {name}", unit="doc", initial=documents, smoothing=0.1)

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        rate = f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate}, {self.bad:,} bad skipped" if self.bad else rate, refresh=False)
            self.bar.update(documents)
        elif self.enabled and now - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = now
            print(
                f"prepare {self.name}: {self.documents:,} documents, {rate}, {self.bad:,} bad records skipped",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the run -----------------------------------------------------------------------------------


def prepare(
    inputs: list[str],
    output: str,
    tokenizer_path: str = "embedded",
    *,
    text_field: str = "text",
    text_unit: str = "document",
    split: str = "train",
    workers: int = 0,
    batch_docs: int = 256,
    part_records: int = 20_000,
    progress: bool = True,
    on_bad_record: str = "fail",
) -> dict:
    """Run (or resume) a preparation; returns the manifest. See the module docstring.

    ``on_bad_record``: "fail" raises ``BadRecordError`` at the first bad record, "skip" counts it.
    """
    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record={on_bad_record!r}: use 'fail' or 'skip'")
    inputs = resolve_inputs(inputs)  # a missing file stops here, before any file is read
    tokenizer = _load_tokenizer(tokenizer_path)
    workers = workers or max(1, (os.cpu_count() or 1))
    sources = [{**scan_file(p, b, text_unit), "builder": b} if b != "hub" else {"path": p, "builder": b} for p, b in inputs]
    source_fp = hashlib.sha256(
        json.dumps([_READER_VERSION] + [(s["path"], s.get("sha256"), text_field, text_unit) for s in sources]).encode()
    ).hexdigest()[:16]

    parts_dir = Path(f"{output}.parts")
    progress_file = parts_dir / "progress.json"
    state = {"source_fingerprint": source_fp, "tokenizer": tokenizer.fingerprint, "parts": []}
    if progress_file.is_file():
        saved = json.loads(progress_file.read_text())
        if (saved["source_fingerprint"], saved["tokenizer"]) != (source_fp, tokenizer.fingerprint):
            raise ValueError(
                f"{parts_dir} holds an unfinished run over other inputs or another tokenizer; "
                "delete that folder to start over, or rerun with the same --input and --tokenizer"
            )
        state = saved
    parts_dir.mkdir(parents=True, exist_ok=True)
    done_records = sum(p["records"] for p in state["parts"])

    def records() -> Iterator[str | _Repaired | _Bad]:
        for path, builder in inputs:
            yield from iter_records(path, builder, text_field, text_unit, split)

    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_path)
    bar = _Progress(
        Path(output).name, progress, sum(p["documents"] for p in state["parts"]),
        sum(sum(p["bad"].values()) for p in state["parts"]),
    )
    try:
        stream = records()
        for _ in range(done_records):  # resume: these records are already in finished parts
            next(stream)
        while True:
            prefix = parts_dir / f"part-{len(state['parts']):05d}"
            part = _write_part(stream, prefix, tokenizer, part_records, batch_docs, pool, bar, on_bad_record)
            if part is None:
                break
            state["parts"].append(part)
            _write_atomic(progress_file, json.dumps(state, indent=1).encode())
            if part["records"] < part_records:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return _finish(output, parts_dir, state, sources, tokenizer, source_fp, on_bad_record)


def _write_part(stream, prefix: Path, tokenizer, part_records, batch_docs, pool, bar, on_bad_record) -> dict | None:
    """Tokenize up to ``part_records`` records into one part; None when the input is exhausted."""
    stats = {
        "name": prefix.name, "records": 0, "documents": 0, "tokens": 0, "empty": 0,
        "bad": {}, "bad_first": [], "repaired": {},
    }

    def batches():
        # With a pool this runs in the pool's task thread; an exception here reaches imap's caller.
        batch = []
        while stats["records"] < part_records:
            try:
                item = next(stream)
            except StopIteration:
                break
            stats["records"] += 1
            if type(item) is not str:
                if isinstance(item, _Bad):
                    if on_bad_record == "fail":
                        raise BadRecordError(item.message())
                    stats["bad"][item.kind] = stats["bad"].get(item.kind, 0) + 1
                    if len(stats["bad_first"]) < FIRST_BAD_LISTED:
                        stats["bad_first"].append(item._asdict())
                    bar.bad += 1
                    continue
                for fix in item.fixes:
                    stats["repaired"][fix] = stats["repaired"].get(fix, 0) + 1
                item = item.text
            if not item.strip():
                stats["empty"] += 1
                continue
            batch.append(item)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    writer = IndexedDatasetWriter(prefix, token_dtype(tokenizer.n_vocab))
    results = pool.imap(_encode, batches()) if pool is not None else map(_encode, batches())
    for flat, lengths in results:
        for doc in np.split(flat, np.cumsum(lengths)[:-1]):
            writer.add_document(doc)
        stats["documents"] += len(lengths)
        stats["tokens"] += int(lengths.sum())
        bar.update(len(lengths), int(lengths.sum()))
    writer.finalize()
    if stats["records"] == 0:
        for ext in ("bin", "idx"):
            os.remove(f"{prefix}.{ext}")
        return None
    return stats


def _finish(output, parts_dir, state, sources, tokenizer, source_fp, on_bad_record) -> dict:
    writer = IndexedDatasetWriter(output, token_dtype(tokenizer.n_vocab))
    for part in state["parts"]:
        writer.add_dataset(parts_dir / part["name"])
    writer.finalize()
    ds = IndexedDataset(output)

    def total(key: str) -> dict:
        out: dict[str, int] = {}
        for part in state["parts"]:
            for kind, n in part[key].items():
                out[kind] = out.get(kind, 0) + n
        return dict(sorted(out.items()))

    repaired = total("repaired")
    manifest = {
        "format": "megatron-indexed-dataset",
        "prefix": str(output),
        "documents": len(ds),
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
        "records_read": sum(p["records"] for p in state["parts"]),
        "empty_documents_skipped": sum(p["empty"] for p in state["parts"]),
        "on_bad_record": on_bad_record,
        "bad_records_skipped": total("bad"),
        "bad_records_first": [b for p in state["parts"] for b in p["bad_first"]][:FIRST_BAD_LISTED],
        "invalid_utf8_documents_replaced": repaired.get("invalid_utf8", 0) + sum(s.get("invalid_utf8", 0) for s in sources),
        "lone_surrogate_documents_replaced": repaired.get("lone_surrogate", 0),
        "eos_appended": True,
        "tokenizer": {
            "path": str(tokenizer.path), "fingerprint": tokenizer.fingerprint,
            "n_vocab": tokenizer.n_vocab, "eos_id": tokenizer.eos_id,
        },
        "source": {"fingerprint": source_fp, "files": sources},
    }
    _write_atomic(Path(f"{output}.json"), (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(parts_dir)
    return manifest


def summary_line(m: dict) -> str:
    """The one line the command prints at the end: counts, and the first bad records by file:line."""
    line = (
        f"wrote {m['prefix']}.bin/.idx: {m['documents']:,} documents, {m['tokens']:,} tokens; "
        f"skipped {m['empty_documents_skipped']:,} empty"
    )
    bad = m["bad_records_skipped"]
    if bad:
        n = sum(bad.values())
        first = ", ".join(f"{b['where']} {b['kind']}" for b in m["bad_records_first"])
        which = f"first {len(m['bad_records_first'])}" if n > len(m["bad_records_first"]) else "all"
        line += f", {n:,} bad ({', '.join(f'{k} {v:,}' for k, v in bad.items())}; {which}: {first})"
    return (
        line + f"; replaced invalid UTF-8 in {m['invalid_utf8_documents_replaced']:,}, "
        f"lone surrogates in {m['lone_surrogate_documents_replaced']:,} documents"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--input", nargs="+", required=True,
        help="json/jsonl(.gz)/parquet/text files, folders of them, or a hub dataset name",
    )
    ap.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    ap.add_argument("--tokenizer", default="embedded", help="tiktoken.model file or folder ('embedded': the built-in BPE)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument(
        "--text-unit", default="document", choices=["document", "line", "paragraph"],
        help="what one document is in a text file",
    )
    ap.add_argument("--split", default="train", help="split of a hub dataset")
    ap.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per CPU core)")
    ap.add_argument("--part-records", type=int, default=20_000, help="records per resumable part")
    ap.add_argument(
        "--on-bad-record", default="fail", choices=["fail", "skip"],
        help="a record that is not JSON, lacks the text field or has null/non-string text: "
        "stop (fail) or count it and go on (skip)",
    )
    ap.add_argument("--traceback", action="store_true", help="on an error, show the Python traceback (also K2TRAIN_TRACEBACK=1)")
    args = ap.parse_args(argv)
    show_traceback = traceback_requested(args.traceback)
    if not show_traceback:  # datasets logs a broken file as ERROR before raising; our error line says it once
        os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    if all(os.path.exists(p) for p in args.input):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        m = prepare(
            args.input, args.output, args.tokenizer, text_field=args.text_field, text_unit=args.text_unit,
            split=args.split, workers=args.workers, part_records=args.part_records, on_bad_record=args.on_bad_record,
        )
    except KeyboardInterrupt:
        if show_traceback:
            raise
        print(f"interrupted: rerun the same command to continue from the finished parts in {args.output}.parts/", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if show_traceback:
            raise
        report_error(_one_line(str(e)))
        raise SystemExit(EXIT_USER_ERROR) from None
    print(summary_line(m))


if __name__ == "__main__":
    main()
