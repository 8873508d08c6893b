"""wandb, offline: the run the trainer writes reads back with the same numbers as metrics.jsonl, and a
run restarted from its checkpoint (in another run folder, as a new Slurm job would be) continues the
same wandb run id, which the checkpoint's meta.json carries.

wandb >= 0.2x no longer ships a Python reader for its ``.wandb`` files, so :func:`read_wandb` parses
the container (a LevelDB-style log: a 7-byte ``:W&B`` header, then 32 KiB blocks of records with a
7-byte header: checksum, length, kind full/first/middle/last) into ``wandb_internal_pb2.Record``.
"""

import json
import struct
import time
from pathlib import Path

import pytest

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

from k2train.config import load_config  # noqa: E402
from k2train.metrics import MetricLogger  # noqa: E402
from k2train.runtime import default_wandb_run_id  # noqa: E402

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Yield the protobuf ``Record`` messages of an offline ``run-<id>.wandb`` file."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown record kind {kind} at byte {pos}")
        rec = wandb_pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _complete_records(path: Path, timeout_s: float = 60.0) -> list:
    """The file's records once its ``exit`` record is on disk.

    ``wandb.finish()`` can return before wandb-core has flushed the offline log (seen with 0.31:
    an empty file right after ``finish()``, complete a moment later), so wait for the last record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            recs = list(wandb_records(path))
        except ValueError:  # header not written yet
            recs = []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.2)


def read_wandb(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows) of every offline wandb run under ``run_dir``, oldest first."""
    runs = []
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for rec in _complete_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        runs.append((run_id, rows))
    return runs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def assert_same_metrics(jsonl: list[dict], rows: list[dict]) -> None:
    """Every numeric JSONL value is in wandb's row of that step, exactly (JSON floats round-trip)."""
    by_step = {r["_step"]: r for r in rows}
    assert sorted(by_step) == [r["step"] for r in jsonl]
    for rec in jsonl:
        row = by_step[rec["step"]]
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                assert row[k] == v, (rec["step"], k, row[k], v)


def test_reader_roundtrip_and_resume_same_id(tmp_path, monkeypatch):
    """MetricLogger alone: values written through wandb read back exactly; a second logger with the
    same id (a restart) writes to the same run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(["logging.progress_bar=false"]).logging
    logged = []
    for attempt, steps in enumerate(([1, 2], [3])):
        run_dir = tmp_path / f"job{attempt}"
        log = MetricLogger(cfg, run_dir, enabled=True, config_dict={"a": 1}, wandb_run_id="k2-test-id")
        for s in steps:
            m = {"loss": 1 / (s + 2), "lr": 3e-4 * s, "dead_experts/layer_1": s, "note": "text is jsonl-only"}
            log.log(s, m)
        log.close()
        [(rid, rows)] = read_wandb(run_dir)
        assert rid == "k2-test-id"
        assert_same_metrics(read_jsonl(run_dir / "metrics.jsonl"), rows)
        logged += rows
    assert [r["_step"] for r in logged] == [1, 2, 3]


def test_disabled_rank_writes_nothing(tmp_path):
    cfg = load_config().logging
    log = MetricLogger(cfg, tmp_path / "rank1", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "rank1").exists()


EXPECTED_KEYS = {
    "loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps", "max_logit", "clipped_heads",
    "max_logit/layer_0", "clipped_heads/layer_0", "expert_load_max_over_mean/layer_1", "dead_experts/layer_1",
    "expert_load_max_over_mean",
}


def test_trainer_offline_run_reads_back_and_restart_continues_it(tmp_path, monkeypatch):
    """k2train.train.run twice: 2 steps, then a new job (another run folder) asked for 3 steps
    resumes from the checkpoint at step 2 and continues the same wandb run."""
    from k2train.train import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    common = [f"trainer.output_dir={out}", "trainer.seq_len=32", "trainer.micro_batch_size=2",
              "trainer.global_batch_size=2", "logging.progress_bar=false", "trainer.checkpoint.export_hf=false"]
    first, second = tmp_path / "logs" / "job1", tmp_path / "logs" / "job2"
    run(load_config(common + ["trainer.steps=2"]), run_dir=first)
    run(load_config(common + ["trainer.steps=3"]), run_dir=second)

    [(id1, rows1)] = read_wandb(first)
    [(id2, rows2)] = read_wandb(second)
    assert id1 == id2 == default_wandb_run_id(first)
    meta = json.loads((out / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["wandb_run_id"] == id1
    j1, j2 = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    assert [r["step"] for r in j1] == [1, 2] and [r["step"] for r in j2] == [3]
    assert_same_metrics(j1, rows1)
    assert_same_metrics(j2, rows2)
    missing = EXPECTED_KEYS - set(rows1[0])
    assert not missing, f"metrics not logged to wandb: {sorted(missing)}"
