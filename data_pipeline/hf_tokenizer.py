"""Write a :class:`K2Tokenizer` as a Hugging Face tokenizer folder that loads offline, without remote code.

``AutoTokenizer.from_pretrained(folder)`` then gives a ``PreTrainedTokenizerFast`` over
``tokenizer.json``: the byte-level BPE of :func:`train_tokenizer.build_hf_tokenizer` (merges recovered
from the tiktoken ranks, K2's regex as a Split pre-tokenizer) plus the 256 reserved special tokens at
``n_base..n_base+255``. No BOS/EOS is added on ``add_special_tokens=True``: training documents carry
only a trailing EOS, which the data pipeline appends.

Where the HF ids can differ from ``K2Tokenizer.encode``:

- special-token text: HF turns literal ``[EOS]`` in the input into the special id, K2 encodes it as
  ordinary text unless the caller passes ``allowed_special``;
- very long inputs: K2 encodes in pieces (``split_for_encoding``): windows of 400,000 characters and
  runs of more than 25,000 whitespace or non-whitespace characters cut every 25,000. HF sees the
  whole text, so where such a cut falls inside one regex piece the ids differ. Text without runs
  that long, and shorter than 400,000 characters, encodes identically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken

from .tokenizer import K2Tokenizer, _write_atomic, special_tokens_config
from .train_tokenizer import build_hf_tokenizer

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_hf_tokenizer(tokenizer: K2Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int | None = None) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    ``model_max_length`` (the model's context length) goes into the config; without it transformers
    assumes no limit. Returns the paths written.
    """
    hf = build_hf_tokenizer(tokenizer)
    names = tokenizer.special_names
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for _, name in sorted(names.items())])
    # tokenizer.json keys added tokens by text: a name that is also a BPE token (or a duplicate
    # name) would silently take that token's id.
    wrong = {tid: name for tid, name in names.items() if hf.token_to_id(name) != tid}
    if wrong:
        tid, name = min(wrong.items())
        raise ValueError(
            f"special token {name!r} (id {tid}) of {tokenizer.path} cannot be written for Hugging Face: the name is "
            f"also token {hf.token_to_id(name)}; rename it in the tokenizer_config.json next to the rank file"
        )

    config = special_tokens_config(names)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        # The default cleanup deletes spaces before punctuation, which breaks decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
    )
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if config[key] is not None}

    out = Path(out_dir)
    contents = {
        "tokenizer.json": hf.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=1, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=1, ensure_ascii=False),
    }
    paths = []
    for name in HF_TOKENIZER_FILES:
        _write_atomic(out / name, (contents[name] + "\n").encode("utf-8"))
        paths.append(out / name)
    return paths
