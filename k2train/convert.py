"""Hugging Face <-> k2train checkpoint conversion, streamed so that a 1T model converts in bounded memory.

    python -m k2train.convert to-hf --checkpoint runs/x/checkpoints --output hf_out [--model k2_tiny]
    python -m k2train.convert from-hf --input Kimi-K2-Base --output runs/k2/checkpoints/step-00000000

``to-hf`` reads a k2train checkpoint (a DCP folder written by :class:`k2train.checkpoint.CheckpointManager`)
one tensor at a time and writes ``config.json`` plus size-bounded safetensors shards with a
``model.safetensors.index.json``, and the tokenizer files of the tokenizer it was trained with
(``--tokenizer`` picks another). ``from-hf`` reads an HF folder (bf16/fp32, or K2's released FP8
e4m3 weights with 128x128 block scales, dequantized here) and writes a model-only k2train checkpoint
that the trainer loads with ``trainer.checkpoint.load_path``. Peak memory is one output shard plus
one tensor; for the routed experts one stacked ``[E, out, in]`` tensor of one layer.

Every input is checked before anything is written: truncated or corrupt safetensors files, missing
tensors and shapes that disagree with the config fail with a message naming the file and tensor.
"""

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader, FileSystemWriter
from tqdm import tqdm

from .checkpoint_layout import META_FILE, MODEL_KEY, OPTIM_KEY, mark_complete, resolve_checkpoint, write_json
from .cli import user_errors
from .config import ModelConfig, _build, load_config
from .data_pipeline.embedded import embedded_tokenizer
from .data_pipeline.hf_tokenizer import write_hf_tokenizer
from .data_pipeline.tokenizer import K2Tokenizer
from .hf import from_hf, hf_config_dict, model_config_from_hf, to_hf
from .model import K2Model

INDEX_FILE = "model.safetensors.index.json"
FP8_BLOCK = (128, 128)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; 'GiB' for binary); plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"max shard size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def dequantize_fp8_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """DeepSeek-V3/K2 block FP8 -> fp32: ``w[i, j] = fp8[i, j] * scale_inv[i // bm, j // bn]``.

    ``scale_inv`` has shape ``[ceil(rows / bm), ceil(cols / bn)]``; edge blocks are partial.
    """
    rows, cols = w_fp8.shape
    bm, bn = block
    want = (math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not fit weight {(rows, cols)} with {bm}x{bn} blocks "
            f"(expected {want})"
        )
    scale = scale_inv.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return w_fp8.float() * scale


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse layout (amax / 448 per block), used to build synthetic FP8 checkpoints in tests."""
    rows, cols = w.shape
    bm, bn = block
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(rows / bm), math.ceil(cols / bn))
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            blk = w[bi * bm:(bi + 1) * bm, bj * bn:(bj + 1) * bn].float()
            s = blk.abs().max().clamp(min=1e-12) / fp8_max
            scale[bi, bj] = s
            out[bi * bm:(bi + 1) * bm, bj * bn:(bj + 1) * bn] = (blk / s).to(torch.float8_e4m3fn)
    return out, scale


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our checkpoint names -> (shape, dtype) of the model a config describes (built on meta)."""
    with torch.device("meta"):
        model = K2Model(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _keeps_fp32(name: str) -> bool:
    # The router bias stays fp32 in every format (released K2 checkpoints store it so).
    return name.endswith("e_score_correction_bias")


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the file holds all the bytes it announces."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise ValueError(f"{path} is truncated or corrupt: header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}")
    return header


# ---------------------------------------------------------------------------------------------
# export: k2train checkpoint -> HF folder
# ---------------------------------------------------------------------------------------------


def _model_config_of(ckpt: Path, preset: Optional[str]) -> ModelConfig:
    if preset:
        return load_config([f"model={preset}"]).model
    meta_path = ckpt / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if "model_config" in meta:
            return _build(ModelConfig, meta["model_config"])
    raise ValueError(f"{ckpt} has no model config in {META_FILE}: pass --model PRESET (e.g. k2_tiny)")


def _dcp_reader(ckpt: Path):
    if not (ckpt / ".metadata").exists():
        raise ValueError(f"{ckpt} is not a complete DCP checkpoint (no .metadata file)")
    return FileSystemReader(str(ckpt))


def _load_dcp_tensor(ckpt: Path, key: str, shape, dtype) -> torch.Tensor:
    out = {key: torch.empty(shape, dtype=dtype)}
    try:
        # no_dist: this runs on one rank (also rank 0 of a multi-process save), never collectively.
        dcp.load(out, storage_reader=_dcp_reader(ckpt), no_dist=True)
    except Exception as e:  # DCP wraps I/O errors of every rank in CheckpointException
        raise ValueError(f"could not read {key!r} from {ckpt} (truncated or corrupt shard?): {e}") from e
    return out[key]


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    preset: Optional[str] = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    tokenizer: str | None = None,
) -> Path:
    """Write the model of a k2train checkpoint as an HF ``DeepseekV3ForCausalLM`` folder.

    ``checkpoint`` is a checkpoint folder or a run's checkpoint root (its ``latest`` is used).
    Tensors are read from DCP one at a time and cast to ``dtype`` (the router bias stays fp32). A
    run with bf16 weights (``trainer.param_dtype=bfloat16``) saved fp32 master copies in its
    optimizer state: a wider ``dtype`` than bf16 exports those, not the bf16 weights upcast.
    The tokenizer files go next to ``config.json``: ``tokenizer`` (a rank-file path, or "embedded"),
    else the one the checkpoint's job config trained with; none when the checkpoint records no data config.
    """
    ckpt = resolve_checkpoint(checkpoint)
    cfg = _model_config_of(ckpt, preset)
    tok = _export_tokenizer(ckpt, tokenizer)
    if tok is not None and tok.n_vocab > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.path} has {tok.n_vocab} tokens, more than the model's vocab_size={cfg.vocab_size}: "
            "pass the tokenizer the model was trained with (--tokenizer PATH or 'embedded')"
        )
    out_dtype = _DTYPES[dtype]
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    stored = _dcp_reader(ckpt).read_metadata().state_dict_metadata
    expected = expected_tensors(cfg)
    missing = [n for n in expected if f"{MODEL_KEY}.{n}" not in stored]
    if missing:
        raise ValueError(f"{ckpt} lacks {len(missing)} model tensors of config {cfg.name!r}, e.g. {missing[:3]}")
    for name, (shape, _) in expected.items():
        got = tuple(stored[f"{MODEL_KEY}.{name}"].size)
        if got != shape:
            raise ValueError(f"{ckpt}: {name} has shape {got}, config {cfg.name!r} expects {shape}: wrong --model?")

    # Plan the shards from shapes alone, so file names can carry the shard count.
    plan: list[list[tuple[str, str, int]]] = [[]]  # per shard: (our name, hf name, expert or -1)
    used = 0
    total = 0
    for name, (shape, _) in expected.items():
        t_meta = torch.empty(shape, dtype=torch.float32 if _keeps_fp32(name) else out_dtype, device="meta")
        for e, (hf_name, hf_t) in enumerate(to_hf(name, t_meta)):
            nbytes = hf_t.numel() * hf_t.element_size()
            if plan[-1] and used + nbytes > limit:
                plan.append([])
                used = 0
            expert = e if hf_t.ndim < len(shape) else -1
            plan[-1].append((name, hf_name, expert))
            used += nbytes
            total += nbytes

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    current: tuple[Optional[str], Optional[torch.Tensor]] = (None, None)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="to-hf", disable=not progress)
    for i, shard in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name, hf_name, expert in shard:
            if current[0] != name:  # one tensor (for experts: one layer's stack) in memory at a time
                shape, dt = expected[name]
                key = f"{MODEL_KEY}.{name}"
                master = f"{OPTIM_KEY}.state.{name}.master"  # bf16 weights' fp32 copy, when the run kept one
                if out_dtype != torch.bfloat16 and master in stored and tuple(stored[master].size) == shape:
                    key = master
                current = (name, _load_dcp_tensor(ckpt, key, shape, stored[key].properties.dtype))
            src = current[1] if expert < 0 else current[1][expert]
            t = src.to(torch.float32 if _keeps_fp32(name) else out_dtype).contiguous()
            tensors[hf_name] = t.clone() if t.data_ptr() == src.data_ptr() and expert >= 0 else t
            weight_map[hf_name] = fname
            bar.update(t.numel() * t.element_size())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(out / "config.json", hf_config_dict(cfg, torch_dtype=dtype))
    if tok is not None:
        write_hf_tokenizer(tok, out, model_max_length=cfg.max_position_embeddings)
    else:
        print(
            f"note: {ckpt} records no data config, so {out} has no tokenizer; add one with "
            "`python -m k2train.convert to-hf ... --tokenizer PATH|embedded`",
            file=sys.stderr,
        )
    return out


def _export_tokenizer(ckpt: Path, choice: str | None):
    """The K2Tokenizer ``choice`` names ("embedded" or a rank file), else the one of the checkpoint's
    job config (``data.tokenizer_path``, "" = embedded); None when the checkpoint has no data config."""
    if choice is None:
        meta_path = ckpt / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        data = (meta.get("config") or {}).get("data")
        if data is None:
            return None
        choice = data.get("tokenizer_path") or "embedded"
        source = f"the tokenizer {ckpt / META_FILE} records"
    else:
        source = "the tokenizer given"
    if choice == "embedded":
        return embedded_tokenizer()
    try:
        return K2Tokenizer(choice)
    except FileNotFoundError as e:
        raise ValueError(f"{source} is missing: {e}; pass --tokenizer PATH (or 'embedded')") from None


# ---------------------------------------------------------------------------------------------
# import: HF folder -> k2train checkpoint
# ---------------------------------------------------------------------------------------------


class _HFSource:
    """Name -> tensor access over an HF folder's safetensors files (validated headers, mmap reads)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_FILE
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder} holds no *.safetensors files")
        self.headers: dict[str, dict] = {}
        self.file_of: dict[str, str] = {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise ValueError(f"{INDEX_FILE} in {folder} lists {f}, which does not exist")
            header = read_safetensors_header(path)
            for k, v in header.items():
                if k != "__metadata__":
                    self.headers[k] = v
                    self.file_of[k] = f
        self._open: dict[str, object] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self.headers[name]["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        f = self.file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(str(self.folder / f), framework="pt")
        return self._open[f].get_tensor(name)


def _check_hf_tensor(src: _HFSource, hf_name: str, shape: tuple[int, ...], block) -> None:
    if hf_name not in src.headers:
        raise ValueError(f"{src.folder} is missing tensor {hf_name!r}")
    got = src.shape(hf_name)
    if got != shape:
        raise ValueError(f"{src.folder}: {hf_name} has shape {got}, config.json implies {shape}")
    if src.dtype(hf_name) in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = hf_name + "_scale_inv"
        if scale not in src.headers:
            raise ValueError(f"{src.folder}: FP8 tensor {hf_name} has no block scale {scale!r}")
        want = tuple(math.ceil(s / b) for s, b in zip(shape, block))
        if src.shape(scale) != want:
            raise ValueError(f"{src.folder}: {scale} has shape {src.shape(scale)}, expected {want} for {block} blocks")


def _read_hf(src: _HFSource, hf_name: str, block) -> torch.Tensor:
    t = src.get(hf_name)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return dequantize_fp8_blocks(t, src.get(hf_name + "_scale_inv"), block)
    return t


def import_hf(
    input_dir: str | Path, output: str | Path, dtype: str = "bfloat16", progress: bool = True, name: str = "hf"
) -> Path:
    """Convert an HF DeepseekV3/K2 folder into a model-only k2train (DCP) checkpoint at ``output``.

    FP8 weights with ``<name>_scale_inv`` companions are dequantized with the block size of
    ``config.json``'s ``quantization_config.weight_block_size`` (default 128x128); everything is
    written in ``dtype`` except the fp32 router bias. The DCP writer pulls one tensor (one
    expert stack) at a time from the memory-mapped shards, so memory stays bounded.
    """
    folder = Path(input_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{folder} has no config.json: is it a Hugging Face model folder?")
    hf_cfg = json.loads(cfg_path.read_text())
    cfg = model_config_from_hf(hf_cfg, name=name)
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", FP8_BLOCK))
    out_dtype = _DTYPES[dtype]
    src = _HFSource(folder)
    expected = expected_tensors(cfg)
    # Which HF tensors make each of ours (expert stacks: E of them); all checked before writing.
    sources: dict[str, list[str]] = {}
    for our, (shape, _) in expected.items():
        parts = list(to_hf(our, torch.empty(shape, device="meta")))
        for hf_name, t in parts:
            _check_hf_tensor(src, hf_name, tuple(t.shape), block)
        sources[our] = [p[0] for p in parts]
    used = {n for v in sources.values() for n in v}
    unused = sorted(set(src.headers) - used - {n + "_scale_inv" for n in used})
    unused = [n for n in unused if from_hf(n) is not None]
    if unused:
        raise ValueError(f"{folder} has tensors the config does not explain, e.g. {unused[:3]}: does config.json match?")

    total = sum(math.prod(s) * (4 if _keeps_fp32(n) else out_dtype.itemsize) for n, (s, _) in expected.items())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="from-hf", disable=not progress)

    def materialize(key: str) -> torch.Tensor:
        our = key[len(MODEL_KEY) + 1:]
        dt = torch.float32 if _keeps_fp32(our) else out_dtype
        shape = expected[our][0]
        names = sources[our]
        if len(names) == 1 and len(shape) == len(src.shape(names[0])):
            t = _read_hf(src, names[0], block).to(dt)
        else:  # expert stack: fill expert by expert
            t = torch.empty(shape, dtype=dt)
            for e, hf_name in enumerate(names):
                t[e] = _read_hf(src, hf_name, block).to(dt)
        bar.update(t.numel() * t.element_size())
        return t

    class _LazyPlanner(DefaultSavePlanner):
        # DCP calls resolve_data once per item while writing (documented as the place to
        # materialize lazily), so only the tensor being written is ever in memory.
        def resolve_data(self, write_item):
            return materialize(write_item.index.fqn)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    placeholders = {
        f"{MODEL_KEY}.{n}": torch.empty(s, dtype=torch.float32 if _keeps_fp32(n) else out_dtype, device="meta")
        for n, (s, _) in expected.items()
    }
    dcp.save(placeholders, storage_writer=FileSystemWriter(str(out), single_file_per_rank=True), planner=_LazyPlanner())
    bar.close()
    write_json(out / META_FILE, {"step": 0, "model_config": dataclasses.asdict(cfg), "source": str(folder)})
    mark_complete(out)
    return out


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m k2train.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="k2train checkpoint -> HF safetensors folder")
    a.add_argument("--checkpoint", required=True, help="checkpoint folder, or a checkpoint root with a 'latest' pointer")
    a.add_argument("--output", required=True)
    a.add_argument("--model", default=None, help="model preset (conf/model/*.yaml) if the checkpoint has no config")
    a.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    a.add_argument("--max-shard-size", default="5GB")
    a.add_argument("--tokenizer", default=None,
                   help="tiktoken rank file (or its folder) or 'embedded'; default: the one the checkpoint was trained with")
    b = sub.add_parser("from-hf", help="HF folder (bf16/fp32 or block FP8) -> k2train checkpoint")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    for sp in (a, b):
        sp.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback (also K2TRAIN_TRACEBACK=1)")
    args = p.parse_args(list(argv) if argv is not None else None)
    with user_errors(args.traceback):
        if args.cmd == "to-hf":
            out = export_hf(args.checkpoint, args.output, args.model, args.dtype, args.max_shard_size, tokenizer=args.tokenizer)
        else:
            out = import_hf(args.input, args.output, args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
