"""The HF tokenizer files: transformers, offline and without remote code, encodes like K2Tokenizer;
the HF export carries them, and a text-generation pipeline runs on a tiny export."""

import dataclasses
import json

import pytest
import torch
from k2train.data_pipeline.embedded import embedded_documents, embedded_tokenizer
from k2train.data_pipeline.hf_tokenizer import HF_TOKENIZER_FILES, write_hf_tokenizer
from k2train.data_pipeline.tokenizer import K2Tokenizer
from k2train.data_pipeline.train_tokenizer import train_bpe_ranks, write_tokenizer

from k2train.checkpoint import CheckpointManager
from k2train.config import CheckpointConfig, load_config
from k2train.convert import export_hf, main
from k2train.model import K2Model

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox doesn't jump; it's LAZY. I'll say We'RE done, McDonald'S, they'd've",
    "MiXeD CaSe wORDS, camelCaseNames and snake_case_names, ALLCAPS and Title Case.",
    "你好，世界！这是一个测试。人工智能正在改变世界。",
    "東京タワーとカタカナ、ひらがな。日本語の文章を書きます。漢字かな混じり文ABC漢",
    "العربية لغة جميلة. עברית היא שפה עתיקה. Ελληνικά русский текст हिन्दी 한국어",
    "emoji 😀🎉👩‍💻🇯🇵 and combining e\u0301 a\u0308 ZWJ\u200d, ✓ ✗ → ∑ ∞",
    "numbers 1234567 1,234,567.89 3.14159 1e-10 0x1F 2024-06-01 007 42nd",
    "def f(x):\n    if x:\n\treturn {'a': [i ** 2 for i in range(10)]}  # comment\n\n\n    pass\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = 1\t\t# tab comment\r\n\r\n        y = 2\n",
    "runs      of     spaces\n\n\n\n\nand newlines   \n  \n\t \t trailing    ",
    "windows\r\nline\r\nendings\r\n\r\n  \r\n",
    "\u00a0nbsp\u3000ideographic space\u2009thin\u2028line sep",
    "punctuation!!! ??? ... --- ((( ))) [[[ ]]] {{{ }}} <<< >>> /// \\\\\\ @@@ ### $$$ %%%",
    "",
    " ",
    "\n",
    "    ",
]


@pytest.fixture(scope="module")
def embedded():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A rank file the project trains itself (BPE of 1,500 tokens with multilingual merges), no names file."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = list(embedded_documents()[:300]) + [t * 5 for t in TEXTS if t.strip()]
    write_tokenizer(train_bpe_ranks(corpus, 1500), folder)
    (folder / "tokenizer_config.json").unlink()  # the specials take their default names
    return K2Tokenizer(folder / "tiktoken.model")


def _auto(tokenizer, folder):
    write_hf_tokenizer(tokenizer, folder, model_max_length=4096)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _held_out_docs():
    # Python source the trained BPE never saw; a few thousand tokens.
    return list(embedded_documents()[-40:])


@pytest.mark.parametrize("which", ["embedded", "trained"])
def test_hf_ids_equal_k2_ids(which, embedded, trained, tmp_path):
    tok = embedded if which == "embedded" else trained
    hf = _auto(tok, tmp_path / "hf")
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    texts = TEXTS + ["\n".join(TEXTS)] + _held_out_docs()
    num_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
        assert hf.decode(ids) == text == tok.decode(ids)
        num_tokens += len(ids)
    assert num_tokens > 5_000
    # Ids the BPE reaches through many merges: every base token decodes to its own bytes.
    some = list(range(0, tok.n_base, 7))
    assert hf.decode(some).encode("utf-8", "surrogatepass") == tok.decode(some).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("which", ["embedded", "trained"])
def test_special_tokens_map_to_the_same_ids(which, embedded, trained, tmp_path):
    tok = embedded if which == "embedded" else trained
    hf = _auto(tok, tmp_path / "hf")
    n = tok.n_base
    assert len(hf) == tok.n_vocab
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == ("[BOS]", "[EOS]", "[PAD]", "[UNK]")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id, n + 254)
    assert hf.convert_tokens_to_ids(["<|im_end|>", f"<|reserved_token_{n + 3}|>"]) == [n + 2, n + 3]
    assert all(hf.convert_ids_to_tokens(tid) == name for tid, name in tok.special_names.items())
    # HF parses special-token text in its input, as K2 does with allowed_special="all".
    text = "[BOS]Hello<|im_end|>world[EOS][PAD]"
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text, allowed_special="all")
    assert [i for i in ids if i >= n] == [tok.bos_id, n + 2, tok.eos_id, tok.pad_id]
    assert hf.decode(ids) == text
    assert hf.decode(ids, skip_special_tokens=True) == "Helloworld"
    # Pretraining documents carry no BOS: the HF tokenizer adds none either.
    assert hf("Hello")["input_ids"] == tok.encode("Hello")
    assert hf.model_max_length == 4096


def test_renamed_specials_and_name_clash(tmp_path, embedded):
    folder = write_tokenizer(embedded.mergeable_ranks, tmp_path / "tok")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"]["4099"]["content"] = "<|im_user|>"
    cfg_path.write_text(json.dumps(cfg))
    hf = _auto(K2Tokenizer(folder), tmp_path / "hf")
    assert hf("<|im_user|>hi", add_special_tokens=False)["input_ids"] == [4099, *embedded.encode("hi")]

    cfg["added_tokens_decoder"]["4099"]["content"] = "self"  # a BPE token of the embedded tokenizer
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'self' \\(id 4099\\).*also token"):
        write_hf_tokenizer(K2Tokenizer(folder), tmp_path / "clash")


# ---------------------------------------------------------------------------------------------
# the HF export
# ---------------------------------------------------------------------------------------------


def _save_tiny(root, job_config=None, **model_overrides):
    cfg = load_config(["model=k2_tiny"])
    model = K2Model(dataclasses.replace(cfg.model, **model_overrides))
    model.init_weights(seed=0)
    if job_config is True:
        job_config = dataclasses.asdict(cfg)
    return CheckpointManager(root, CheckpointConfig(), job_config=job_config).save(0, {"model": model}, blocking=True)


def test_export_carries_the_tokenizer_and_generates(tmp_path, embedded):
    ckpt = _save_tiny(tmp_path / "ckpt", job_config=True)  # data.tokenizer_path "" = embedded
    out = export_hf(ckpt, tmp_path / "hf", dtype="float32", progress=False)
    assert all((out / name).is_file() for name in HF_TOKENIZER_FILES)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))  # next to config.json (deepseek_v3)
    assert hf(TEXTS[7], add_special_tokens=False)["input_ids"] == embedded.encode(TEXTS[7])
    assert hf.model_max_length == 4096

    torch.manual_seed(0)
    generate = transformers.pipeline("text-generation", model=str(out), dtype=torch.float32)
    prompt = "def main():\n    "
    result = generate(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert result.startswith(prompt) and len(result) > len(prompt)


def test_export_tokenizer_choice_and_note(tmp_path, trained, capsys):
    ckpt = _save_tiny(tmp_path / "ckpt", num_hidden_layers=2, vocab_size=trained.n_vocab)  # no job config
    out = export_hf(ckpt, tmp_path / "none", dtype="float32", progress=False)
    assert not (out / "tokenizer.json").exists()
    note = capsys.readouterr().err
    assert "no tokenizer" in note and "--tokenizer" in note and len(note.strip().splitlines()) == 1

    assert main(["to-hf", "--checkpoint", str(ckpt), "--output", str(tmp_path / "given"), "--tokenizer", str(trained.path)]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "given"))
    assert hf(TEXTS[2], add_special_tokens=False)["input_ids"] == trained.encode(TEXTS[2])

    with pytest.raises(ValueError, match="4352 tokens, more than the model's vocab_size=1756"):
        export_hf(ckpt, tmp_path / "big", progress=False, tokenizer="embedded")
    with pytest.raises(ValueError, match="the tokenizer given is missing.*--tokenizer"):
        export_hf(ckpt, tmp_path / "missing", progress=False, tokenizer=str(tmp_path / "nope.model"))
