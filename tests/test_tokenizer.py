"""TextTokenizer and the synthetic word-level tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from caopd_megatron.data.tokenizer import (
    CONFIDENCE_TOKENS,
    TextTokenizer,
    TokenizerError,
    build_synthetic_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return build_synthetic_tokenizer(extra_words=["digits", "sum", "mod", "10"])


def test_round_trip_normalises_whitespace(tok):
    text = "  Q 3 4 5 =\n2   Confidence: 0.7 "
    assert tok.decode(tok.encode(text)) == " ".join(text.split())
    assert tok.decode(tok.encode("digits sum mod 10")) == "digits sum mod 10"
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_ids_are_fixed_and_independent_of_extra_word_order():
    plain = build_synthetic_tokenizer()
    ids = {t: plain.token_to_id(t) for t in ["<pad>", "<bos>", "<eos>", "<unk>", "0", "9", "0.0", "1.0", "Q", "A"]}
    assert ids == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "0": 4, "9": 13,
                   "0.0": 14, "1.0": 24, "Q": 25, "A": 30}
    assert (plain.pad_id, plain.bos_id, plain.eos_id, plain.vocab_size) == (0, 1, 2, 31)
    a = build_synthetic_tokenizer(["zeta", "alpha", "Q", "alpha"])
    b = build_synthetic_tokenizer({"alpha", "zeta"})
    assert a.backend.get_vocab() == b.backend.get_vocab()
    assert (a.token_to_id("alpha"), a.token_to_id("zeta"), a.vocab_size) == (31, 32, 33)


def test_confidence_values_are_single_tokens(tok):
    assert CONFIDENCE_TOKENS == tuple(f"{i / 10:.1f}" for i in range(11))
    ids = [tok.encode(c) for c in CONFIDENCE_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 11
    assert tok.encode("Confidence:") == [tok.token_to_id("Confidence:")]


def test_unknown_words_map_to_unk_and_vanish_on_decode(tok):
    ids = tok.encode("3 banana 4")
    assert ids == [tok.token_to_id("3"), tok.unk_id, tok.token_to_id("4")]
    assert tok.decode(ids) == "3 4"
    assert tok.decode([tok.bos_id, *tok.encode("5"), tok.eos_id, tok.pad_id]) == "5"


def test_decode_validates_ids(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizerError, match="not an integer"):
        tok.decode([1.5])
    assert tok.decode(torch.tensor(tok.encode("1 2"))) == "1 2"


def test_save_and_reload(tok, tmp_path):
    folder = tok.save(tmp_path / "tk")
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    text = "Q 1 2 3 = 6 Confidence: 0.4 banana digits"
    for loaded in (TextTokenizer.from_file(folder), TextTokenizer.from_file(folder / "tokenizer.json")):
        assert loaded.encode(text) == tok.encode(text)
        assert (loaded.eos_id, loaded.pad_id, loaded.bos_id, loaded.vocab_size) == (
            tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size)


def test_hugging_face_loads_the_saved_tokenizer(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    folder = tok.save(tmp_path / "tk")
    text = "Q 9 9 = 8 Confidence: 1.0 banana"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))
    hf_dir = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert hf_dir(text)["input_ids"] == tok.encode(text)
    assert (hf_dir.eos_token_id, hf_dir.pad_token_id, hf_dir.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)


def test_from_file_reads_hf_style_configs(tok, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.backend.save(str(folder / "tokenizer.json"))
    # special_tokens_map only, AddedToken-object form, no pad: pad falls back to eos.
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<bos>", "special": True}, "bos_token": None}), encoding="utf-8")
    loaded = TextTokenizer.from_file(folder)
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id) == (tok.bos_id, tok.bos_id, None)
    # tokenizer_config.json takes precedence.
    config = {"eos_token": "<eos>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    loaded = TextTokenizer.from_file(folder)
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id) == (tok.eos_id, tok.pad_id, None)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="eos token '</s>' is not in the tokenizer's vocabulary"):
        TextTokenizer.from_file(folder)


def test_from_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer.from_file(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        TextTokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        TextTokenizer.from_file(bad)


def test_extra_words_are_validated():
    with pytest.raises(TokenizerError, match="whitespace"):
        build_synthetic_tokenizer(["two words"])
    with pytest.raises(TypeError, match="not a single string"):
        build_synthetic_tokenizer("word")  # type: ignore[arg-type]
