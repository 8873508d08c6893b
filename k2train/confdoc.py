"""Generate the configuration reference (docs/configuration.md) from the typed schema.

    python -m k2train.confdoc > docs/configuration.md

Every key of :class:`k2train.config.JobConfig` is listed with its type, the schema default, the
value the default run composes to (``python -m k2train.train`` with no overrides) and the comment
written above the field in ``k2train/config.py``; every Hydra group lists its presets with the
first comment line of their YAML. tests/test_docs.py fails when the committed file differs from
this output, so the schema and its documentation cannot drift apart.
"""

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from . import config as config_module
from .config import JobConfig, load_config

_FIELD_RE = re.compile(r"^\s+(\w+)\s*:\s*[^=]+?(?:=.*)?$")
_CONF_DIR = Path(config_module.__file__).resolve().parent.parent / "conf"


# Descriptions of the keys that k2train/config.py leaves without a comment (mostly the fields named
# after the Hugging Face DeepseekV3 config). A comment in config.py comes first; this text follows it.
# tests/test_docs.py fails on a key missing from both and on an entry here for a key that is gone.
NOTES: dict[str, str] = {
    "model.name": "Label of the preset (logged; not used for anything else).",
    "model.vocab_size": "Embedding and LM-head rows; must cover the tokenizer (checked at start).",
    "model.hidden_size": "Residual stream width.",
    "model.num_hidden_layers": "Transformer blocks: `first_k_dense_replace` dense ones, then MoE.",
    "model.first_k_dense_replace": "Number of leading blocks with a dense SwiGLU FFN instead of MoE (K2: 1).",
    "model.intermediate_size": "FFN width of the dense blocks.",
    "model.moe_intermediate_size": "FFN width of each routed (and shared) expert.",
    "model.num_attention_heads": "MLA heads (no GQA: as many KV heads).",
    "model.q_lora_rank": "Rank of the query down-projection `q_a_proj`.",
    "model.kv_lora_rank": "Rank of the compressed KV latent (`kv_a_proj_with_mqa` minus the rope key).",
    "model.qk_nope_head_dim": "Per-head query/key dims without rotary embedding.",
    "model.qk_rope_head_dim": "Rotary dims: per head for queries, one shared key for all heads.",
    "model.v_head_dim": "Per-head value dims.",
    "model.n_routed_experts": "Routed experts per MoE layer (divisible by parallel.ep).",
    "model.num_experts_per_tok": "Top-k experts per token.",
    "model.n_shared_experts": "Always-on experts per MoE layer.",
    "model.routed_scaling_factor": "Multiplies the routed experts' weighted sum.",
    "model.norm_topk_prob": "Renormalize the top-k sigmoid scores to sum to 1.",
    "model.aux_loss_alpha": "Weight of the sequence-wise balance loss (0 disables it).",
    "model.rope_theta": "RoPE base.",
    "model.max_position_embeddings": "Longest sequence the model accepts (trainer.seq_len must fit).",
    "model.rope_scaling.type": "`yarn` for the long-context stages (experiment=long_context_32k).",
    "model.rope_scaling.factor": "Context extension factor.",
    "model.rope_scaling.original_max_position_embeddings": "Pretraining context the factor extends.",
    "model.rope_scaling.beta_fast": "YaRN ramp: high-frequency boundary (rotations).",
    "model.rope_scaling.beta_slow": "YaRN ramp: low-frequency boundary (rotations).",
    "model.rope_scaling.mscale": "YaRN attention-scale coefficient of the cos/sin cache.",
    "model.rope_scaling.mscale_all_dim": "YaRN softmax-scale coefficient (DeepSeek-V3 rule).",
    "model.rms_norm_eps": "RMSNorm epsilon.",
    "model.initializer_range": "Std of the normal weight initialization.",
    "model.bos_token_id": "Beginning-of-document token id.",
    "model.eos_token_id": "End-of-document token id.",
    "model.moe_impl": "`loop` (reference), `grouped_mm` (torch._grouped_mm), `triton` (GPU kernels).",
    "model.norm_impl": "`triton`: the fused RMSNorm kernel (k2train.kernels.norms); GPU, or CPU under TRITON_INTERPRET=1.",
    "model.loss_impl": ("`triton`: the fused cross entropy (k2train.kernels.cross_entropy): fp32 math from the logits as "
                        "they are, no log-softmax kept (4 bytes per bf16 logit in its backward where torch's holds about "
                        "10); not with parallel.tp > 1. GPU, or CPU under TRITON_INTERPRET=1."),
    "optim.lr": "Peak learning rate (Muon's is RMS-matched to AdamW's, so one lr serves both).",
    "optim.weight_decay": "Decoupled weight decay, Muon and AdamW alike.",
    "optim.momentum": "Momentum coefficient mu of Muon.",
    "optim.nesterov": "Nesterov momentum for Muon.",
    "optim.adam_betas": "AdamW (beta1, beta2).",
    "optim.qk_clip": "Rescale W_q/W_k of heads whose max logit exceeds qk_clip_tau after each step (false: only measure).",
    "optim.schedule": "`wsd` (warmup, constant, decay), `cosine`, or `constant` after the warmup.",
    "optim.ns_steps": "Newton-Schulz iterations.",
    "optim.ns_coefficients": "Newton-Schulz quintic coefficients (a, b, c).",
    "optim.rms_match": "Muon update scale: rms_match * sqrt(max(rows, cols)).",
    "optim.ns_impl": "`triton`: the Newton-Schulz kernels (GPU, half precision).",
    "optim.ns_method": "`gram`: Newton-Schulz on the Gram matrix (about half the FLOPs on wide matrices; docs/muonclip.md).",
    "optim.ns_gram_restarts": "gram: iterations before which X and its Gram matrix are recomputed (stability).",
    "optim.adam_eps": "AdamW epsilon.",
    "optim.qk_clip_tau": "Max-logit threshold tau of QK-Clip.",
    "optim.warmup_steps": "Linear warmup steps.",
    "optim.decay_fraction": "WSD/cosine: fraction of the steps spent decaying when decay_steps is unset.",
    "optim.min_lr": "Learning rate at the end of the decay.",
    "data.datasets": "Megatron shards to blend, each `{path: <prefix>, weight: <w>}`.",
    "data.datasets[].path": "Prefix of the `.bin`/`.idx` pair.",
    "data.datasets[].weight": "Relative sampling weight.",
    "data.valid_datasets[].path": "Prefix of the `.bin`/`.idx` pair.",
    "data.valid_datasets[].weight": "Relative sampling weight.",
    "data.seed": "Shuffling seed of the sample index.",
    "parallel.dp": "Data-parallel degree (ZeRO-1 shards the optimizer state over it); -1 = the rest.",
    "parallel.tp": "Tensor-parallel degree (heads, FFN and vocabulary split; sequence parallel between blocks).",
    "parallel.pp": "Pipeline stages; the world size is pp x dp x ep x tp.",
    "parallel.ep": "Expert-parallel degree (routed experts split, all-to-all dispatch).",
    "parallel.cp": "Context parallelism (reserved: must be 1).",
    "parallel.pp_schedule": "Pipeline schedule; Interleaved1F1B needs vpp > 1.",
    "trainer.steps": "Optimizer steps in the run (a resumed run continues up to this number).",
    "trainer.seq_len": "Tokens per sample.",
    "trainer.micro_batch_size": "Samples per forward/backward on one data-parallel rank.",
    "trainer.grad_clip": "Global gradient-norm clip (0 disables).",
    "trainer.dtype": "`bfloat16`: autocast compute with fp32 weights and optimizer state.",
    "trainer.param_dtype": "`bfloat16` (with `trainer.dtype=bfloat16`): bf16 weights, no per-matmul casts; fp32 "
    "gradients and fp32 master weights in the optimizer (K2's and Megatron's bf16).",
    "trainer.device": "`auto`: CUDA when visible, else CPU.",
    "trainer.seed": "Seed of initialization and dropout-free randomness (layout-invariant init).",
    "trainer.log_interval": ("Print a console line every N steps (JSONL and wandb get every step); the trainer reads "
                             "the steps' numbers from the GPU every N steps, one step late, so the GPU never waits "
                             "for the host."),
    "trainer.compile": "Applied after recompute; the first steps pay the compile time (minutes for k2_tiny on a 2-core CPU).",
    "trainer.output_dir": "Root of the run: `checkpoints/` (resumed automatically) and `logs/<run id>/`.",
    "trainer.checkpoint.enable": "Save checkpoints (and resume from them).",
    "trainer.checkpoint.keep_last": "Newest checkpoints to keep.",
    "trainer.checkpoint.keep_every": "Also keep every checkpoint whose step is a multiple of this (0: none).",
    "trainer.checkpoint.async_save": "Stage to CPU and write in the background (DCP async_save).",
    "trainer.checkpoint.export_dtype": "dtype of the HF safetensors export.",
    "trainer.checkpoint.max_shard_size": "Largest safetensors shard of the HF export.",
    "logging.console": "Print step lines and messages.",
    "logging.jsonl": "Append every step's metrics to `<run dir>/metrics.jsonl`.",
    "logging.progress_bar": "A tqdm bar on the logging rank.",
    "logging.wandb": "Log to Weights & Biases (see wandb_mode).",
    "logging.wandb_mode": "`offline` (default: files under `<run dir>/wandb`, `wandb sync` later), `online`, `disabled`; "
    "the WANDB_MODE environment variable overrides it.",
    "logging.wandb_project": "wandb project.",
    "logging.wandb_entity": "wandb entity (team or user); None = your default.",
    "logging.run_name": "wandb display name; None = wandb's.",
    "experiment": "Name of the experiment preset; the default trainer.output_dir is runs/<experiment>.",
}


def describe(key: str, comment: Optional[str]) -> str:
    """config.py's comment, then the NOTES entry (a section-header comment reads as a prefix)."""
    note = NOTES.get(key)
    text = f"{comment.rstrip('.')}: {note}" if comment and note else (comment or note or "")
    return text.replace("|", "\\|")


def type_name(t: Any) -> str:
    """``Literal["a", "b"]`` -> ``"a" | "b"``, ``Optional[str]`` -> ``str | None``, classes by name."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return " \\| ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin is typing.Union:
        return " \\| ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(t, "__name__", str(t))


def field_comments(cls: type) -> dict[str, str]:
    """The ``#`` comment lines right above each field (and a trailing one on its line)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD_RE.match(line)
        if m and not stripped.startswith(("def ", "@", "return", '"""')):
            text = list(pending)
            if "  # " in line:
                text.append(line.split("  # ", 1)[1].strip())
            if text:
                comments[m.group(1)] = " ".join(text)
        pending = []
    return comments


def _fmt(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        return "(see below)"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, (list, tuple)) and not v:
        return "`[]`"
    if isinstance(v, tuple):
        v = list(v)
    return f"`{v}`".replace("|", "\\|")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    # dataclasses invent "Name(field: type = ...)" docstrings for classes without one
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def _presets(group: str) -> list[tuple[str, str]]:
    out = []
    for p in sorted((_CONF_DIR / group).glob("*.yaml")):
        # the file's leading comment paragraph, up to the first line that is not a comment
        para = []
        for line in p.read_text().splitlines():
            if not line.startswith("#"):
                break
            if "@package" not in line:
                para.append(line.lstrip("#").strip())
        out.append((p.stem, " ".join(para)))
    return out


def _section(cls: type, prefix: str, composed: Any, lines: list[str], nested: list) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines += ["| key | type | schema default | default run | description |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        default = _default(f)
        value = getattr(composed, f.name) if composed is not None else None
        if dataclasses.is_dataclass(t):
            nested.append((t, f"{prefix}{f.name}", value))
            lines.append(f"| `{prefix}{f.name}` | {t.__name__} | (see below) | (see below) | {_doc(t)} |")
            continue
        item = typing.get_args(t)[0] if typing.get_origin(t) is list and typing.get_args(t) else None
        if item is not None and dataclasses.is_dataclass(item):
            nested.append((item, f"{prefix}{f.name}[]", None))
        lines.append(
            f"| `{prefix}{f.name}` | {type_name(t)} | {_fmt(default)} | "
            f"{_fmt(value) if composed is not None else ''} | {describe(f'{prefix}{f.name}', comments.get(f.name))} |"
        )


def render(composed: Optional[JobConfig] = None) -> str:
    """The whole reference as Markdown (``composed``: the default run's config, composed if None)."""
    composed = load_config() if composed is None else composed
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m k2train.confdoc > docs/configuration.md` from k2train/config.py;",
        "     do not edit by hand (tests/test_docs.py checks that it matches the schema). -->",
        "",
        "Every key below can be set on the command line (`python -m k2train.train optim.lr=3e-4`), in a",
        "preset under `conf/<group>/`, or in an `experiment=` file. *schema default* is the dataclass",
        "default; *default run* is what `python -m k2train.train` composes with no overrides",
        "(the presets in `conf/config.yaml`'s defaults list). Print any composed config with",
        "`python -m k2train.train <overrides> --cfg job`. Unknown keys and wrong types fail at",
        "composition; impossible values fail in `validate()` with a message naming the key.",
        "",
    ]
    hints = typing.get_type_hints(JobConfig)
    for f in dataclasses.fields(JobConfig):
        t = hints[f.name]
        if not dataclasses.is_dataclass(t):
            continue
        lines += [f"## `{f.name}` ({t.__name__})", ""]
        if _doc(t):
            lines += [_doc(t), ""]
        presets = _presets(f.name)
        if presets:
            lines.append(f"Presets (`{f.name}=<name>`, files in `conf/{f.name}/`):")
            lines.append("")
            lines += [f"- `{name}`" + (f": {text}" if text else "") for name, text in presets]
            lines.append("")
        nested: list = []
        _section(t, f"{f.name}.", getattr(composed, f.name), lines, nested)
        lines.append("")
        while nested:
            sub, prefix, value = nested.pop(0)
            lines += [f"### `{prefix}` ({sub.__name__})", ""]
            if _doc(sub):
                lines += [_doc(sub), ""]
            _section(sub, prefix + ".", value, lines, nested)
            lines.append("")
    lines += ["## Top-level keys", "", "| key | type | default | description |", "|---|---|---|---|"]
    comments = field_comments(JobConfig)
    for f in dataclasses.fields(JobConfig):
        t = hints[f.name]
        if not dataclasses.is_dataclass(t):
            lines.append(f"| `{f.name}` | {type_name(t)} | {_fmt(_default(f))} | {describe(f.name, comments.get(f.name))} |")
    experiments = _presets("experiment")
    if experiments:
        lines += ["", "Experiments (`experiment=<name>`, files in `conf/experiment/`, applied last):", ""]
        lines += [f"- `{name}`" + (f": {text}" if text else "") for name, text in experiments]
    return "\n".join(lines) + "\n"


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
