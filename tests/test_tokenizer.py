"""K2Tokenizer: rank files, K2 regex, special tokens, chunking, and the offline BPE trainer."""

import json
import time

import pytest
import regex

from k2train.data_pipeline.embedded import embedded_tokenizer
from k2train.data_pipeline.tokenizer import (
    K2_PATTERN,
    MAX_CHUNK_CHARS,
    MAX_RUN_CHARS,
    K2Tokenizer,
    load_rank_file,
    save_rank_file,
    split_for_encoding,
)
from k2train.data_pipeline.train_tokenizer import build_hf_tokenizer, train_bpe_ranks, write_tokenizer

MULTILINGUAL = [
    "The quick brown fox doesn't jump; it's LAZY. McDonald'S I'LL",
    "你好，世界！这是一个测试。東京タワーとカタカナ、ひらがな。",
    "Ünïcödé façade naïve Ελληνικά русский текст עברית العربية हिन्दी 한국어",
    "digits 1234567890 3.14159 1e-10 0x1F 12,345,678",
    "whitespace   runs\t\t\ttabs\n\n\n\r\n  trailing   \u00a0nbsp\u3000ideographic  ",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\tif x != y: pass\n",
    "emoji 😀🎉👩‍💻 and combining e\u0301 a\u0308 ZWJ\u200d",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tok):
    return build_hf_tokenizer(tok)


def test_ids_and_sizes(tok):
    assert (tok.n_base, tok.n_vocab) == (4096, 4352)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (4096, 4097, 4351)
    assert tok.special_names[4096] == "[BOS]" and tok.special_names[4097] == "[EOS]"
    assert tok.special_names[4098] == "<|im_end|>" and tok.special_names[4350] == "[UNK]"
    assert tok.special_names[4351] == "[PAD]" and tok.special_names[4099] == "<|reserved_token_4099|>"
    # The first 256 ranks are the single bytes, so any byte string is encodable.
    assert all(tok.mergeable_ranks[bytes([b])] == b for b in range(256))


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip_and_matches_hf(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_base for i in ids)
    # Same BPE through the HF tokenizers library (Oniguruma regex, merge list): identical ids.
    assert hf_tok.encode(text).ids == ids


def test_regex_engines_agree():
    """The Oniguruma split (HF) equals the `regex` module's V1 reading of the K2 pattern."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(K2_PATTERN), behavior="isolated")
    for text in MULTILINGUAL + ["ABCdef GHI jkl ÀÉÎõü Ǆǅǆ ʰʱ ǅungla 漢字かな混じり文ABC漢"]:
        onig = [p for p, _ in split.pre_tokenize_str(text)]
        ref = regex.findall(K2_PATTERN, text, flags=regex.V1)
        assert onig == ref, text


def test_special_tokens_are_text_unless_allowed(tok):
    text = "a[EOS]b<|im_end|>[BOS]"
    plain = tok.encode(text)
    assert not set(plain) & set(range(tok.n_base, tok.n_vocab))
    assert tok.decode(plain) == text
    only_eos = tok.encode(text, allowed_special={"[EOS]"})
    assert only_eos.count(tok.eos_id) == 1 and tok.bos_id not in only_eos
    everything = tok.encode(text, allowed_special="all")
    assert [i for i in everything if i >= tok.n_base] == [tok.eos_id, 4098, tok.bos_id]
    assert tok.decode(everything) == text
    assert tok.encode("x", bos=True, eos=True) == [tok.bos_id, *tok.encode("x"), tok.eos_id]
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"[NOPE]"})


def test_two_megabyte_single_line(tok):
    line = ("word" * 9_000 + " ") * 60  # 2.2 MB, runs of 36k non-space characters, no newline
    pieces = split_for_encoding(line)
    assert "".join(pieces) == line
    assert max(map(len, pieces)) <= MAX_CHUNK_CHARS + MAX_RUN_CHARS
    t0 = time.perf_counter()
    ids = tok.encode(line)
    assert time.perf_counter() - t0 < 20
    assert tok.decode(ids) == line
    spaces = " " * 60_000 + "x" * 2_000_000
    assert tok.decode(tok.encode(spaces)) == spaces


def test_rank_file_round_trip(tmp_path, tok):
    path = tmp_path / "r.model"
    save_rank_file(tok.mergeable_ranks, path)
    assert load_rank_file(path) == tok.mergeable_ranks
    assert path.read_bytes() == tok.path.read_bytes()


def test_rank_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="bad.model.*ranks must be exactly"):
        load_rank_file(bad)
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.model:2"):
        load_rank_file(bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        K2Tokenizer(tmp_path / "missing")


def test_train_tokenizer_end_to_end(tmp_path):
    texts = [t * 20 for t in MULTILINGUAL if t.strip()]
    ranks = train_bpe_ranks(texts, 300)
    assert len(ranks) == 300 and sorted(ranks.values()) == list(range(300))
    out = write_tokenizer(ranks, tmp_path / "tok")
    tok = K2Tokenizer(out)
    assert (tok.n_base, tok.n_vocab, tok.eos_id) == (300, 556, 301)
    for t in MULTILINGUAL:
        assert tok.decode(tok.encode(t)) == t
        assert build_hf_tokenizer(tok).encode(t).ids == tok.encode(t)
    with pytest.raises(ValueError, match="vocab-size"):
        train_bpe_ranks(texts, 100_000)


def test_tokenizer_config_names(tmp_path, tok):
    out = write_tokenizer(tok.mergeable_ranks, tmp_path / "tok")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"]["4099"]["content"] = "<|im_user|>"
    cfg_path.write_text(json.dumps(cfg))
    renamed = K2Tokenizer(out)
    assert renamed.special_names[4099] == "<|im_user|>"
    assert renamed.encode("<|im_user|>", allowed_special="all") == [4099]
    assert renamed.fingerprint != tok.fingerprint
    cfg["added_tokens_decoder"]["9999"] = {"content": "[X]"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="9999.*outside the reserved"):
        K2Tokenizer(out)
