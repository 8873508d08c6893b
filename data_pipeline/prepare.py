"""Tokenize raw corpora into a Megatron indexed dataset (``PREFIX.bin``/``.idx``) plus a manifest.

    python -m k2train.data_pipeline.prepare --input data/*.jsonl --output shards/web --tokenizer DIR

Inputs are read with HF ``datasets`` in streaming mode: ``.json``/``.jsonl`` (field ``--text-field``),
``.parquet`` (same field), any other file as text (``--text-unit document|line|paragraph``), or a hub
dataset name where a network allows. Worker processes tokenize batches of documents; the main
process writes them in input order, an EOS after each document.

Resuming: records are grouped into parts of ``--part-records``; each finished part is renamed into
``PREFIX.parts/`` and recorded in ``progress.json``. A rerun with the same inputs and tokenizer skips
the recorded records and continues, so no document is lost or written twice. At the end the parts are
merged into ``PREFIX.bin``/``.idx`` and ``PREFIX.json`` (token counts, tokenizer hash, source
fingerprint, counts of skipped empty documents and of documents with invalid UTF-8, which are
decoded with U+FFFD replacement).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from .tokenizer import K2Tokenizer, _write_atomic

_JSON_EXT = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_PARQUET_EXT = (".parquet",)


# -- inputs ----------------------------------------------------------------------------------


def _builder(path: str) -> str:
    if path.endswith(_JSON_EXT):
        return "json"
    if path.endswith(_PARQUET_EXT):
        return "parquet"
    return "text"


def scan_file(path: str, builder: str, text_unit: str) -> dict:
    """One pass over the raw bytes: a content hash and the number of records with invalid UTF-8.

    ``datasets`` decodes with U+FFFD replacement, which hides the damage; counting here keeps it
    visible in the manifest. Records are lines for json/jsonl and text-by-line, the file otherwise.
    """
    digest, invalid, whole_file_bad = hashlib.sha256(), 0, False
    with open(path, "rb") as f:
        for line in f:
            digest.update(line)
            if builder == "parquet":
                continue
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
                whole_file_bad = True
    if builder == "text" and text_unit != "line":
        invalid = int(whole_file_bad)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest(), "invalid_utf8": invalid}


def iter_records(path: str, builder: str, text_field: str, text_unit: str, split: str) -> Iterator[str]:
    """Texts of one input through ``datasets`` (streaming); errors name the file and the field."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if builder == "hub":
            ds = datasets.load_dataset(path, split=split, streaming=True)
        elif builder == "json":
            # A codec name other than the literal "utf-8" makes datasets decode with the given
            # errors policy instead of handing invalid bytes to Arrow (which would stop the run).
            ds = datasets.load_dataset("json", data_files=path, split="train", streaming=True, encoding="utf_8", encoding_errors="replace")
        elif builder == "parquet":
            ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        else:
            ds = datasets.load_dataset(
                "text", data_files=path, split="train", streaming=True, sample_by=text_unit, encoding_errors="replace"
            )
        field = text_field if builder != "text" else "text"
        for i, record in enumerate(ds):
            if field not in record:
                raise KeyError(f"{path}: record {i} has no field {field!r} (fields: {sorted(record)}); set --text-field")
            text = record[field]
            if not isinstance(text, str):
                raise KeyError(f"{path}: record {i} field {field!r} is {type(text).__name__}, not text; set --text-field")
            yield text
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: cannot read this {builder} input ({type(e).__name__}: {e}); the file is corrupt or not {builder}") from e
    except Exception as e:  # pyarrow and datasets raise their own exception types for bad files
        raise ValueError(f"{path}: cannot read this {builder} input ({type(e).__name__}: {e}); the file is corrupt or not {builder}") from e


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
        from .embedded import embedded_tokenizer

        return embedded_tokenizer()
    return K2Tokenizer(path)


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
) -> dict:
    """Run (or resume) a preparation; returns the manifest. See the module docstring."""
    tokenizer = _load_tokenizer(tokenizer_path)
    workers = workers or max(1, (os.cpu_count() or 1))
    sources = []
    for p in inputs:
        builder = _builder(p) if os.path.exists(p) else "hub"
        if builder != "hub" and os.path.isdir(p):
            raise ValueError(f"{p}: give files, not a folder (e.g. {p}/*.jsonl)")
        info = scan_file(p, builder, text_unit) if builder != "hub" else {"path": p, "invalid_utf8": 0}
        sources.append({**info, "builder": builder})
    source_fp = hashlib.sha256(json.dumps([(s["path"], s.get("sha256"), text_field, text_unit) for s in sources]).encode()).hexdigest()[:16]

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

    def records() -> Iterator[str]:
        for s in sources:
            yield from iter_records(s["path"], s["builder"], text_field, text_unit, split)

    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_path)
    from tqdm import tqdm

    bar = tqdm(desc=f"prepare {Path(output).name}", unit="doc", initial=done_records, disable=not progress, smoothing=0.1)
    bar.t0, bar.new_tokens = time.perf_counter(), 0  # for the tokens/s postfix
    try:
        stream = records()
        for _ in range(done_records):  # resume: these records are already in finished parts
            next(stream)
        while True:
            part = _write_part(stream, parts_dir / f"part-{len(state['parts']):05d}", tokenizer, part_records, batch_docs, pool, bar)
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
    return _finish(output, parts_dir, state, sources, tokenizer, source_fp)


def _write_part(stream, prefix: Path, tokenizer, part_records, batch_docs, pool, bar) -> dict | None:
    """Tokenize up to ``part_records`` records into one part; None when the input is exhausted."""
    stats = {"name": prefix.name, "records": 0, "documents": 0, "tokens": 0, "empty": 0}

    def batches():
        batch = []
        while stats["records"] < part_records:
            try:
                text = next(stream)
            except StopIteration:
                break
            stats["records"] += 1
            if not text.strip():
                stats["empty"] += 1
                continue
            batch.append(text)
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
        bar.new_tokens += int(lengths.sum())
        bar.set_postfix_str(f"{bar.new_tokens / (time.perf_counter() - bar.t0):,.0f} tok/s", refresh=False)
        bar.update(len(lengths))
    if stats["records"] == 0:
        writer.finalize()
        for ext in ("bin", "idx"):
            os.remove(f"{prefix}.{ext}")
        return None
    writer.finalize()
    return stats


def _finish(output, parts_dir, state, sources, tokenizer, source_fp) -> dict:
    writer = IndexedDatasetWriter(output, token_dtype(tokenizer.n_vocab))
    for part in state["parts"]:
        writer.add_dataset(parts_dir / part["name"])
    writer.finalize()
    ds = IndexedDataset(output)
    manifest = {
        "format": "megatron-indexed-dataset",
        "prefix": str(output),
        "documents": len(ds),
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
        "records_read": sum(p["records"] for p in state["parts"]),
        "empty_documents_skipped": sum(p["empty"] for p in state["parts"]),
        "invalid_utf8_documents_replaced": sum(s["invalid_utf8"] for s in sources),
        "eos_appended": True,
        "tokenizer": {"path": str(tokenizer.path), "fingerprint": tokenizer.fingerprint, "n_vocab": tokenizer.n_vocab, "eos_id": tokenizer.eos_id},
        "source": {"fingerprint": source_fp, "files": sources},
    }
    _write_atomic(Path(f"{output}.json"), (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(parts_dir)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="json/jsonl/parquet/text files, or a hub dataset name")
    ap.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    ap.add_argument("--tokenizer", default="embedded", help="tiktoken.model file or folder ('embedded': the built-in BPE)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--text-unit", default="document", choices=["document", "line", "paragraph"], help="what one document is in a text file")
    ap.add_argument("--split", default="train", help="split of a hub dataset")
    ap.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per CPU core)")
    ap.add_argument("--part-records", type=int, default=20_000, help="records per resumable part")
    args = ap.parse_args(argv)
    if all(os.path.exists(p) for p in args.input):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    m = prepare(
        args.input, args.output, args.tokenizer, text_field=args.text_field, text_unit=args.text_unit,
        split=args.split, workers=args.workers, part_records=args.part_records,
    )
    print(
        f"wrote {args.output}.bin/.idx: {m['documents']:,} documents, {m['tokens']:,} tokens; "
        f"skipped {m['empty_documents_skipped']} empty, replaced invalid UTF-8 in {m['invalid_utf8_documents_replaced']}"
    )


if __name__ == "__main__":
    main()
