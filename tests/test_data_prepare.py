"""prepare: reading, parallel tokenization, manifest, resume, bad inputs (bad records: test_data_prepare_bad.py)."""

import json

import pytest
from k2train.data_pipeline import prepare as prep
from k2train.data_pipeline.embedded import embedded_tokenizer
from k2train.data_pipeline.indexed import IndexedDataset

TEXTS = [f"Document {i}: naïve café {i * 7} 你好 " * (1 + i % 4) for i in range(45)]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        for i, t in enumerate(TEXTS):
            f.write((json.dumps({"id": i, "text": t}) + "\n").encode())
            if i == 10:
                f.write(b'{"id": -1, "text": "   "}\n')  # empty after stripping: skipped
    return str(path)


def _docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds.document(i).tolist() for i in range(len(ds))]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_jsonl(tmp_path, jsonl, tok, workers):
    m = prep.prepare([jsonl], str(tmp_path / "out"), workers=workers, part_records=16, progress=False)
    want = [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    assert _docs(tmp_path / "out") == want
    assert m["documents"] == 45 and m["tokens"] == sum(map(len, want)) and m["empty_documents_skipped"] == 1
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint and len(m["source"]["fingerprint"]) == 16
    assert json.loads((tmp_path / "out.json").read_text()) == m
    assert not (tmp_path / "out.parts").exists()


def test_resume_after_interruption(tmp_path, jsonl, monkeypatch):
    reference = prep.prepare([jsonl], str(tmp_path / "ref"), workers=1, part_records=8, progress=False)
    real = prep.iter_records

    def dies_after_20(*a, **k):
        for i, text in enumerate(real(*a, **k)):
            if i == 20:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(prep, "iter_records", dies_after_20)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([jsonl], str(tmp_path / "out"), workers=1, part_records=8, progress=False)
    progress = json.loads((tmp_path / "out.parts" / "progress.json").read_text())
    assert [p["records"] for p in progress["parts"]] == [8, 8]
    monkeypatch.setattr(prep, "iter_records", real)
    resumed = prep.prepare([jsonl], str(tmp_path / "out"), workers=1, part_records=8, progress=False)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    assert resumed["tokens"] == reference["tokens"] and resumed["empty_documents_skipped"] == 1


def test_text_parquet_and_invalid_utf8(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_bytes(b"first line\nsecond \xff\xfe line\n\nthird\n")
    pq.write_table(pa.table({"content": ["parquet one", "", "parquet two"]}), tmp_path / "b.parquet")
    m = prep.prepare([str(tmp_path / "a.txt")], str(tmp_path / "t"), text_unit="line", workers=1, progress=False)
    docs = [tok.decode(d[:-1]) for d in _docs(tmp_path / "t")]
    assert docs == ["first line", "second \ufffd\ufffd line", "third"]
    assert m["invalid_utf8_documents_replaced"] == 1 and m["empty_documents_skipped"] == 1
    m = prep.prepare([str(tmp_path / "b.parquet")], str(tmp_path / "p"), text_field="content", workers=1, progress=False)
    assert [tok.decode(d[:-1]) for d in _docs(tmp_path / "p")] == ["parquet one", "parquet two"]


def test_missing_field_and_corrupt_file_name_the_file(tmp_path, jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(prep.BadRecordError, match=r"in\.jsonl:1: no field 'body' \(fields: id, text\); set --text-field"):
        prep.prepare([jsonl], str(tmp_path / "o"), text_field="body", workers=1, progress=False)
    with pytest.raises(ValueError, match=r"b\.parquet: no column 'body' \(columns: content\); set --text-field"):
        prep.prepare([str(tmp_path / "b.parquet")], str(tmp_path / "o1"), text_field="body", workers=1, progress=False)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read"):
        prep.prepare([str(bad)], str(tmp_path / "o2"), workers=1, progress=False)
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_bytes(b'{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(prep.BadRecordError, match=r"broken\.jsonl:2: not valid JSON \(column 10: Unterminated string"):
        prep.prepare([str(bad_json)], str(tmp_path / "o3"), workers=1, progress=False)


def test_resume_refuses_other_inputs(tmp_path, jsonl):
    parts = tmp_path / "o.parts"
    parts.mkdir()
    (parts / "progress.json").write_text(json.dumps({"source_fingerprint": "x", "tokenizer": "y", "parts": []}))
    with pytest.raises(ValueError, match="unfinished run over other inputs"):
        prep.prepare([jsonl], str(tmp_path / "o"), workers=1, progress=False)
