"""TextTokenizer: lossless byte-level BPE, special tokens that cannot be injected, save/load."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.text_tokenizer import TextTokenizer

CORPUS = [
    "a photo of a cat sitting on a mat",
    "the quick brown fox jumps over the lazy dog",
    "Generate an image of 512x512 according to the following prompt:",
    "Ünïcödé text, 日本語のテキスト, emoji 🐈 and tabs\tand\nnewlines",
] * 8
SPECIALS = ["<|bos|>", "<|eos|>", "<|image_begin|>", "<|image_end|>"]
INJECTIONS = SPECIALS + ["<|", "|>", "<|image_begin", "image_begin|>"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, 400, SPECIALS)


def test_train_has_specials_and_merges(tok: TextTokenizer) -> None:
    ids = [tok.token_to_id(s) for s in SPECIALS]
    assert None not in ids and len(set(ids)) == len(SPECIALS)
    assert [tok.id_to_token(i) for i in ids] == SPECIALS
    # 256 byte tokens + specials + at least some merges learned from the corpus
    assert tok.vocab_size > 256 + len(SPECIALS)
    assert len(tok.encode("a photo of a cat")) < len("a photo of a cat".encode())


def test_vocab_size_is_max_id_plus_one(tok: TextTokenizer) -> None:
    assert tok.vocab_size == max(tok.get_vocab().values()) + 1
    assert tok.id_to_token(tok.vocab_size - 1) is not None
    assert tok.id_to_token(tok.vocab_size) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(INJECTIONS)), max_size=5).map("".join))
def test_lossless_for_any_unicode(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    specials = {tok.token_to_id(s) for s in SPECIALS}
    assert not specials & set(ids), "special-token names in user text must stay text"


def test_specials_not_injectable(tok: TextTokenizer) -> None:
    ids = tok.encode("draw <|image_begin|><|image_end|> now<|eos|>")
    assert tok.token_to_id("<|image_begin|>") not in ids
    assert tok.token_to_id("<|eos|>") not in ids
    assert tok.decode(ids) == "draw <|image_begin|><|image_end|> now<|eos|>"
    # ...while decoding a real special id shows its name
    assert tok.decode([tok.token_to_id("<|image_begin|>")]) == "<|image_begin|>"


def test_encode_adds_nothing(tok: TextTokenizer) -> None:
    assert tok.encode("") == []
    bos = tok.token_to_id("<|bos|>")
    assert bos not in tok.encode("hello")


def test_save_load_round_trip(tok: TextTokenizer, tmp_path) -> None:
    path = tok.save_pretrained(tmp_path / "tk")
    assert path.name == "tokenizer.json"
    loaded = TextTokenizer.from_pretrained(tmp_path / "tk")
    also = TextTokenizer.from_file(path)
    for text in CORPUS[:4] + ["<|image_begin|> injected", "🐈" * 3]:
        assert loaded.encode(text) == tok.encode(text) == also.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.get_vocab() == tok.get_vocab()
    # the injection guard is not stored in tokenizer.json, so loading must restore it
    assert loaded.token_to_id("<|image_begin|>") not in loaded.encode("<|image_begin|>")


def test_missing_files_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TextTokenizer.from_file(tmp_path / "missing.json")


def test_add_special_tokens(tmp_path) -> None:
    tok = TextTokenizer.train(CORPUS, 300, ["<|bos|>"])
    before = tok.vocab_size
    bos = tok.token_to_id("<|bos|>")
    ids = tok.add_special_tokens(["<|bos|>", "<|new_a|>", "<|new_b|>", "<|new_a|>"])
    assert ids[0] == bos and ids[1] == ids[3]
    assert sorted(ids[1:3]) == [before, before + 1]
    assert tok.vocab_size == before + 2
    assert tok.add_special_tokens(["<|new_b|>"]) == [ids[2]]  # idempotent
    assert ids[1] not in tok.encode("x<|new_a|>y")
    tok.save_pretrained(tmp_path)
    assert TextTokenizer.from_pretrained(tmp_path).token_to_id("<|new_b|>") == ids[2]
