"""prepare meets bad input: bad records (fail / skip, resume), broken text, binary and missing files,
folders, the command's one-line errors and its log-friendly progress."""

import gzip
import json
import os
import re
import subprocess
import sys

import pytest
from k2train.data_pipeline import prepare as prep
from k2train.data_pipeline.embedded import embedded_tokenizer
from k2train.data_pipeline.indexed import IndexedDataset

BAD_LINES = {  # kind -> (line, what the error says)
    "invalid_json": (b'{"text": "unterminated\n', r"not valid JSON \(column 10: Unterminated string starting at\)"),
    "not_an_object": (b'["text", "in a list"]\n', r"a JSON list, not an object with a 'text' field"),
    "missing_field": (b'{"body": "x", "id": 3}\n', r"no field 'text' \(fields: body, id\); set --text-field"),
    "null_text": (b'{"text": null}\n', r"field 'text' is null"),
    "not_a_string": (b'{"text": {"en": "x"}}\n', r"field 'text' is an object, not a string"),
}


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def _texts(prefix, tok):
    ds = IndexedDataset(prefix)
    docs = [ds.document(i).tolist() for i in range(len(ds))]
    assert all(d[-1] == tok.eos_id for d in docs)
    return [tok.decode(d[:-1]) for d in docs]


def _run(inputs, out, **kw):
    kw = {"workers": 1, "progress": False, **kw}
    return prep.prepare([str(p) for p in inputs], str(out), **kw)


def _mixed_corpus(path, num_good=44):
    """Good records with every kind of bad one, and blank lines, in between; returns (good texts, bad (line, kind))."""
    kinds = list(BAD_LINES)
    good, bad, lines = [], [], []
    for i in range(num_good):
        text = f"record {i}: " + "naïve 你好 " * (1 + i % 3)
        lines.append(json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n")
        good.append(text)
        if i % 2 == 1:
            kind = kinds[len(bad) % len(kinds)]
            lines.append(BAD_LINES[kind][0])
            bad.append((len(lines), kind))
        if i % 7 == 3:
            lines.append(b"   \n")  # blank lines are no records
    path.write_bytes(b"".join(lines))
    return good, bad


# -- bad records -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_fail_names_file_line_and_fix(tmp_path, kind):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good"}\n\n' + BAD_LINES[kind][0] + b'{"text": "never read"}\n')
    with pytest.raises(prep.BadRecordError) as e:
        _run([path], tmp_path / "o")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:3: ")
    assert re.search(BAD_LINES[kind][1], msg), msg
    assert msg.endswith("use --on-bad-record skip to skip such records, or fix the line")


def test_fail_through_worker_processes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n' * 5 + b"not json\n")
    with pytest.raises(prep.BadRecordError, match=r"bad\.jsonl:6: not valid JSON \(column 1: Expecting value\)"):
        _run([path], tmp_path / "o", workers=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_counts_lists_and_keeps_order(tmp_path, tok, workers):
    path = tmp_path / "mixed.jsonl"
    good, bad = _mixed_corpus(path)
    m = _run([path], tmp_path / "out", part_records=7, on_bad_record="skip", workers=workers)
    assert _texts(tmp_path / "out", tok) == good
    assert len(bad) > prep.FIRST_BAD_LISTED
    assert m["bad_records_skipped"] == {k: sum(1 for _, b in bad if b == k) for k in sorted(BAD_LINES)}
    assert [(b["where"], b["kind"]) for b in m["bad_records_first"]] == [
        (f"{path}:{n}", k) for n, k in bad[: prep.FIRST_BAD_LISTED]
    ]
    assert m["records_read"] == len(good) + len(bad) and m["documents"] == len(good) and m["on_bad_record"] == "skip"
    line = prep.summary_line(m)
    assert "\n" not in line and f"{len(bad)} bad (invalid_json " in line
    assert f"first 20: {path}:{bad[0][0]} {bad[0][1]}, {path}:{bad[1][0]} {bad[1][1]}," in line


def test_skip_resume_gives_the_uninterrupted_output(tmp_path, monkeypatch):
    path = tmp_path / "mixed.jsonl"
    _mixed_corpus(path)
    ref = _run([path], tmp_path / "ref", part_records=6, on_bad_record="skip")
    real = prep.iter_records

    def dies_after_29(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 29:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(prep, "iter_records", dies_after_29)
    with pytest.raises(KeyboardInterrupt):
        _run([path], tmp_path / "out", part_records=6, on_bad_record="skip")
    progress = json.loads((tmp_path / "out.parts" / "progress.json").read_text())
    assert [p["records"] for p in progress["parts"]] == [6] * 4 and sum(sum(p["bad"].values()) for p in progress["parts"]) > 0
    monkeypatch.setattr(prep, "iter_records", real)
    out = _run([path], tmp_path / "out", part_records=6, on_bad_record="skip")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    same = ["documents", "tokens", "records_read", "empty_documents_skipped", "bad_records_skipped", "bad_records_first",
            "invalid_utf8_documents_replaced", "lone_surrogate_documents_replaced", "source"]
    assert {k: out[k] for k in same} == {k: ref[k] for k in same}


def test_parquet_null_rows(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two"]}), path)
    with pytest.raises(prep.BadRecordError, match=r"t\.parquet row 2: field 'text' is null; .* or fix the record$"):
        _run([path], tmp_path / "o")
    m = _run([path], tmp_path / "o", on_bad_record="skip")
    assert _texts(tmp_path / "o", tok) == ["one", "two"]
    assert m["bad_records_first"] == [{"where": f"{path} row 2", "kind": "null_text", "detail": "field 'text' is null"}]


# -- text that is damaged or unusual -----------------------------------------------------------


def test_invalid_utf8_and_lone_surrogates_become_replacement_characters(tmp_path, tok):
    lines = [
        (b'{"text": "caf\xe9 ok"}', "caf\ufffd ok"),  # invalid UTF-8: replaced, counted
        (b'{"t\xffx": 1, "text": "fine"}', "fine"),  # invalid byte outside the text: not counted
        (b'{"text": "cut \xe4\xbd here"}', "cut \ufffd here"),  # a cut character: one U+FFFD, as str.decode
        (b'{"text": "a\\ud800b"}', "a\ufffdb"),  # lone surrogate escape: replaced, counted
        (b'{"text": "\\ud83d\\ude00 ok"}', "\U0001f600 ok"),  # a surrogate pair is one character
        (b'{"text": "\\ude00\\ud83d"}', "\ufffd\ufffd"),  # a reversed pair is two lone ones
        (b'{"text": "\\ud800 and \xff"}', "\ufffd and \ufffd"),  # both in one record
    ]
    path = tmp_path / "u.jsonl"
    path.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    m = _run([path], tmp_path / "o")
    assert _texts(tmp_path / "o", tok) == [want for _, want in lines]
    assert m["invalid_utf8_documents_replaced"] == 3 and m["lone_surrogate_documents_replaced"] == 3
    assert "replaced invalid UTF-8 in 3, lone surrogates in 3 documents" in prep.summary_line(m)


def test_zero_width_and_control_characters_are_kept(tmp_path, tok):
    texts = [
        "zero\u200bwidth\u200c non\u200djoiner \ufeffbom \u2060wj",
        "nul \x00 soh \x01 esc \x1b[31mred\x1b[0m del \x7f nel \x85 ls \u2028 ps \u2029 vt \x0b ff \x0c cr \r end",
        "bidi \u202eevil\u202c rlm \u200f",
    ]
    path = tmp_path / "c.jsonl"
    with open(path, "wb") as f:
        # literal U+2028 and U+0085 in the file: lines end at \n only
        f.writelines(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts)
        f.write(b'{"text": "raw\ttab and raw \x01 inside the string"}\n')  # unescaped control characters
    _run([path], tmp_path / "o")
    got = _texts(tmp_path / "o", tok)
    assert got == texts + ["raw\ttab and raw \x01 inside the string"]
    for t in got:
        assert tok.decode(tok.encode(t)) == t


def test_empty_texts_are_skipped_and_counted(tmp_path, tok):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"text": ""}\n{"text": " \\n\\t "}\n{"text": "kept"}\n{"text": "\\u200b"}\n')
    m = _run([path], tmp_path / "o")
    assert _texts(tmp_path / "o", tok) == ["kept", "\u200b"]  # a zero-width space is not whitespace
    assert m["empty_documents_skipped"] == 2 and m["records_read"] == 4


def test_json_array_gz_and_byte_order_mark(tmp_path, tok):
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"text": "first"},\n  {"text": "second",\n   "id": 2},\n  {"text": null}\n]\n')
    with pytest.raises(prep.BadRecordError, match=r"a\.json:5: field 'text' is null"):
        _run([arr], tmp_path / "o")
    m = _run([arr], tmp_path / "o", on_bad_record="skip")
    assert _texts(tmp_path / "o", tok) == ["first", "second"] and m["bad_records_skipped"] == {"null_text": 1}
    arr.write_text('[{"text": "first"},\n {"text": "sec\n')
    with pytest.raises(ValueError, match=r"a\.json:2: not valid JSON .*cannot be skipped past"):
        _run([arr], tmp_path / "o2", on_bad_record="skip")

    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"text": "zipped"}\n{"text": oops}\n')
    with pytest.raises(prep.BadRecordError, match=r"g\.jsonl\.gz:2: not valid JSON"):
        _run([gz], tmp_path / "o3")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "after a BOM"}\n')
    _run([gz, bom], tmp_path / "o4", on_bad_record="skip")
    assert _texts(tmp_path / "o4", tok) == ["zipped", "after a BOM"]
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "x"}\n' * 5000)[:-40])
    with pytest.raises(ValueError, match=r"t\.jsonl\.gz: cannot read .*truncated or corrupt"):
        _run([truncated], tmp_path / "o5")


# -- files that are not inputs -----------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00" + bytes(range(256)) * 4


@pytest.mark.parametrize("name, data, error", [
    ("logo.png", PNG, r"logo\.png: looks binary \(a NUL byte at offset 8\), not text; remove it from --input"),
    ("random.jsonl", os.urandom(3000) + b"\0", r"random\.jsonl: looks binary \(a NUL byte at offset \d+\), not JSON"),
    ("wide.txt", "hello".encode("utf-16"), r"wide\.txt: is UTF-16 .*convert it to UTF-8"),
])
@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_binary_inputs_are_refused_before_any_work(tmp_path, name, data, error, mode):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=error):
        _run([tmp_path / name], tmp_path / "o", on_bad_record=mode)
    assert not (tmp_path / "o.parts").exists()


def test_missing_input_is_refused_before_any_work(tmp_path, monkeypatch):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"^\S*nope/missing\.jsonl: no such file or folder$"):
        _run([good, tmp_path / "nope" / "missing.jsonl"], tmp_path / "o")
    assert not (tmp_path / "o.parts").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="^data/texts: no such file"):  # not taken for a hub name
        _run(["data/texts"], tmp_path / "o")
    assert prep.resolve_inputs(["allenai/c4", "wikitext"]) == [("allenai/c4", "hub"), ("wikitext", "hub")]


def test_folder_of_mixed_formats(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "from jsonl"}\n')
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write('{"text": "from gz"}\n')
    (d / "c.txt").write_text("from text\n")
    pq.write_table(pa.table({"text": ["from parquet"]}), d / "sub" / "d.parquet")
    (d / ".e.jsonl.crc").write_bytes(b"\0\1")  # bookkeeping files are ignored
    (d / "_SUCCESS").write_bytes(b"")
    m = _run([d], tmp_path / "o")
    assert _texts(tmp_path / "o", tok) == ["from jsonl", "from gz", "from text\n", "from parquet"]
    assert [os.path.basename(s["path"]) for s in m["source"]["files"]] == ["a.jsonl", "b.jsonl.gz", "c.txt", "d.parquet"]
    (d / "sub" / "logo.png").write_bytes(PNG)
    with pytest.raises(ValueError, match=r"corpus: holds files of no known format \(sub/logo\.png\)"):
        _run([d], tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: holds no \.json"):
        _run([tmp_path / "empty"], tmp_path / "o3")


# -- the command -----------------------------------------------------------------------------


def _cli(tmp_path, *args):
    return ["--output", str(tmp_path / "o"), "--workers", "1", *map(str, args)]


def test_cli_one_line_error_exit_2_and_traceback_on_request(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(SystemExit) as e:
        prep.main(_cli(tmp_path, "--input", path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == f"error: {path}:2: field 'text' is null; use --on-bad-record skip to skip such records, or fix the line\n"
    with pytest.raises(SystemExit) as e:
        prep.main(_cli(tmp_path, "--input", tmp_path / "missing.jsonl"))
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path}/missing.jsonl: no such file or folder\n"
    with pytest.raises(prep.BadRecordError):
        prep.main(_cli(tmp_path, "--input", path, "--traceback"))
    monkeypatch.setenv("K2TRAIN_TRACEBACK", "1")
    with pytest.raises(prep.BadRecordError):
        prep.main(_cli(tmp_path, "--input", path))


def test_cli_skip_to_log_files_has_no_carriage_returns(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good, bad = _mixed_corpus(path, num_good=10)
    cmd = [sys.executable, "-m", "k2train.data_pipeline.prepare", *_cli(tmp_path, "--input", path, "--on-bad-record", "skip")]
    with open(tmp_path / "stdout.log", "wb") as out, open(tmp_path / "stderr.log", "wb") as err:
        rc = subprocess.run(cmd, check=False, stdout=out, stderr=err, timeout=120).returncode
    stdout, stderr = (tmp_path / "stdout.log").read_bytes(), (tmp_path / "stderr.log").read_bytes()
    assert rc == 0, stderr.decode()
    assert b"\r" not in stdout and b"\r" not in stderr
    assert stdout.decode().count("\n") == 1 and f"{len(good)} documents" in stdout.decode()
    assert f"{path}:{bad[0][0]} {bad[0][1]}" in stdout.decode()
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not parquet")
    cmd = [sys.executable, "-m", "k2train.data_pipeline.prepare", *_cli(tmp_path, "--input", broken)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"error: {broken}: cannot read this parquet input") and run.stderr.count("\n") == 1, run.stderr


def test_gzipped_text(tmp_path, tok):
    path = tmp_path / "t.txt.gz"
    path.write_bytes(gzip.compress("fine\nnaïve\n".encode()))
    m = _run([path], tmp_path / "o", text_unit="line")  # invalid UTF-8 is looked for in the decompressed lines
    assert _texts(tmp_path / "o", tok) == ["fine", "naïve"] and m["invalid_utf8_documents_replaced"] == 0
    # datasets reads compressed text strictly: invalid UTF-8 stops the run (one line, naming the file)
    path.write_bytes(gzip.compress(b"fine\nbad \xff byte\n"))
    with pytest.raises(ValueError, match=r"t\.txt\.gz: cannot read this text input.*UnicodeDecodeError"):
        _run([path], tmp_path / "o2", text_unit="line")


def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    path = tmp_path / "mixed.jsonl"
    _, bad = _mixed_corpus(path, num_good=10)
    monkeypatch.setattr(prep, "PROGRESS_EVERY_S", 0.0)
    _run([path], tmp_path / "o", progress=True, on_bad_record="skip", batch_docs=4)
    err = capsys.readouterr().err
    assert "\r" not in err and re.fullmatch(
        rf"prepare o: 10 documents, [\d,]+ tok/s, {len(bad)} bad records skipped", err.splitlines()[-1]
    )
