"""Vocabulary: native, LLM-expanded and Chameleon/Lumina vocabularies; vectorised code lookups."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tokenloom.text_tokenizer import TextTokenizer
from tokenloom.vocab import (
    NATIVE_SPECIAL_TOKENS,
    SPECIAL_ROLES,
    Vocabulary,
    VocabularyError,
    build_native,
    chameleon_code,
    native_size_token,
)

CORPUS = ["a red square on a blue field", "two cats and a dog", "hello world"] * 4
CHAMELEON_CODES = 300
LUMINA_SIZES = 6


def chameleon_name(code: int) -> str:
    # Written out independently of the library: digits as letters A..J, then "Z".
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


def make_chameleon_tokenizer(path, codebook: int = CHAMELEON_CODES, sizes: int = LUMINA_SIZES, drop=()):
    """A Chameleon-style tokenizer.json: small BPE plus shuffled IMGIMG, reserved and special tokens."""
    tok = TextTokenizer.train(CORPUS, 300, [t for t in ["<s>", "<pad>", "</s>", "<unk>"] if t not in drop])
    extra = [chameleon_name(c) for c in range(codebook)]
    extra += ["<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08796>", "<reserved08799>"]
    extra += [f"<reserved{8800 + n:05d}>" for n in range(1, sizes + 1)]
    extra.append(f"<reserved{8800 + sizes + 2:05d}>")  # after a hole: not a size token
    extra = [t for t in extra if t not in drop]
    random.Random(0).shuffle(extra)
    tok.add_special_tokens(extra)
    tok.backend.save(str(path))
    return TextTokenizer.from_file(path)


@pytest.fixture(scope="module")
def chameleon_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chameleon") / "text_tokenizer.json"
    make_chameleon_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def native():
    return build_native(CORPUS, 300, codebook_size=64, max_grid_size=8)


# -- Chameleon -------------------------------------------------------------------


def test_chameleon_code_rule() -> None:
    assert chameleon_code("IMGIMGBCDZ") == 123
    assert chameleon_code("IMGIMGAZ") == 0
    assert chameleon_code("IMGIMGIJAAZ") == 8900
    with pytest.raises(VocabularyError):
        chameleon_code("IMGIMGxyZ")


def test_from_chameleon_maps_every_code(chameleon_file) -> None:
    tok = TextTokenizer.from_file(chameleon_file)
    vocab = Vocabulary.from_chameleon(chameleon_file)
    assert vocab.codebook_size == CHAMELEON_CODES
    assert vocab.size == tok.vocab_size
    expected = np.array([tok.token_to_id(chameleon_name(c)) for c in range(CHAMELEON_CODES)])
    assert not np.array_equal(np.sort(expected), expected), "fixture should scatter the code ids"

    codes = np.arange(CHAMELEON_CODES)
    np.testing.assert_array_equal(vocab.codes_to_ids(codes), expected)
    np.testing.assert_array_equal(vocab.ids_to_codes(expected), codes)
    t = vocab.codes_to_ids(torch.arange(CHAMELEON_CODES).view(10, 30))
    assert isinstance(t, torch.Tensor) and t.shape == (10, 30)
    assert torch.equal(t.flatten(), torch.from_numpy(expected))
    assert torch.equal(vocab.ids_to_codes(t), torch.arange(CHAMELEON_CODES).view(10, 30))

    # every other id is not a code
    all_ids = np.arange(vocab.size)
    is_code = vocab.is_code(all_ids)
    assert is_code.sum() == CHAMELEON_CODES and is_code[expected].all()
    assert (vocab.ids_to_codes(all_ids)[~is_code] == -1).all()


def test_from_chameleon_specials(chameleon_file) -> None:
    tok = TextTokenizer.from_file(chameleon_file)
    vocab = Vocabulary.from_chameleon(tok)
    assert vocab.bos == tok.token_to_id("<s>")
    assert vocab.eos == tok.token_to_id("</s>")
    assert vocab.pad == tok.token_to_id("<pad>")
    assert vocab.image_begin == tok.token_to_id("<racm3:break>")
    assert vocab.image_end == tok.token_to_id("<eoss>")
    assert vocab.turn_end == tok.token_to_id("<reserved08706>")
    assert vocab.end_of_line is None and vocab.uncond is None and vocab.max_grid_size == 0
    assert all(vocab.role_id(r) is None for r in ("user", "assistant", "system"))
    assert vocab.size_unit == 1


def test_from_chameleon_lumina(chameleon_file) -> None:
    tok = TextTokenizer.from_file(chameleon_file)
    vocab = Vocabulary.from_chameleon(chameleon_file.parent / "text_tokenizer.json", lumina=True)
    assert vocab.end_of_line == tok.token_to_id("<reserved08799>")
    assert vocab.max_grid_size == LUMINA_SIZES  # the scan stops at the hole
    for n in range(1, LUMINA_SIZES + 1):
        assert vocab.size_token(n) == tok.token_to_id(f"<reserved{8800 + n:05d}>")
        assert vocab.size_of_token(vocab.size_token(n)) == n
    assert vocab.size_unit == 2  # Lumina sizes count 32-pixel patches = 2 codes
    assert Vocabulary.from_chameleon(tok, lumina=True, max_grid_size=3).max_grid_size == 3
    with pytest.raises(VocabularyError, match="reserved08807"):
        Vocabulary.from_chameleon(tok, lumina=True, max_grid_size=LUMINA_SIZES + 1)


def test_from_chameleon_directory_and_errors(tmp_path) -> None:
    make_chameleon_tokenizer(tmp_path / "tokenizer.json", codebook=20)
    assert Vocabulary.from_chameleon(tmp_path).codebook_size == 20
    with pytest.raises(FileNotFoundError):
        Vocabulary.from_chameleon(tmp_path / "absent")
    make_chameleon_tokenizer(tmp_path / "no_eoss.json", codebook=20, drop={"<eoss>"})
    with pytest.raises(VocabularyError, match="eoss"):
        Vocabulary.from_chameleon(tmp_path / "no_eoss.json")
    make_chameleon_tokenizer(tmp_path / "hole.json", codebook=20, drop={chameleon_name(7)})
    with pytest.raises(VocabularyError, match="0..N-1"):
        Vocabulary.from_chameleon(tmp_path / "hole.json")
    with pytest.raises(VocabularyError, match="IMGIMG"):
        Vocabulary.from_chameleon(TextTokenizer.train(CORPUS, 300, ["<s>"]))


# -- native and expand_llm ---------------------------------------------------------------


def test_native_appends_codes(native) -> None:
    tok, vocab = native
    first = tok.vocab_size
    assert vocab.size == first + 64 and vocab.codebook_size == 64 and vocab.max_grid_size == 8
    np.testing.assert_array_equal(vocab.codes_to_ids(np.arange(64)), np.arange(first, first + 64))
    for role in SPECIAL_ROLES:
        assert vocab.role_id(role) == tok.token_to_id(NATIVE_SPECIAL_TOKENS[role])
    assert vocab.size_token(5) == tok.token_to_id(native_size_token(5))
    assert vocab.uncond is not None and vocab.end_of_line is not None


def test_native_missing_specials_named() -> None:
    names = [v for r, v in NATIVE_SPECIAL_TOKENS.items() if r != "uncond"] + [native_size_token(1)]
    tok = TextTokenizer.train(CORPUS, 300, names)
    with pytest.raises(VocabularyError, match=r"<\|uncond\|>.*<\|size_2\|>"):
        Vocabulary.native(tok, 16, 2)


def test_expand_llm() -> None:
    tok = TextTokenizer.train(CORPUS, 300, ["<bos>", "<eos>", "<pad>"])
    before = tok.vocab_size
    vocab = Vocabulary.expand_llm(tok, 32, 4, bos_token="<bos>", eos_token="<eos>")
    assert vocab.bos == tok.token_to_id("<bos>") and vocab.eos == tok.token_to_id("<eos>")
    assert vocab.pad is None
    added = len(SPECIAL_ROLES) - 3 + 4
    assert tok.vocab_size == before + added
    assert tok.token_to_id("<|bos|>") is None  # the LLM's own bos is used, not ours
    for role in ("image_begin", "image_end", "end_of_line", "turn_end", "uncond", "user", "assistant", "system"):
        assert vocab.role_id(role) == tok.token_to_id(NATIVE_SPECIAL_TOKENS[role])
        assert before <= vocab.role_id(role) < tok.vocab_size
    np.testing.assert_array_equal(vocab.code_ids, np.arange(tok.vocab_size, tok.vocab_size + 32))
    assert vocab.image_begin not in tok.encode("<|image_begin|>")  # added tokens are not injectable

    with_pad = Vocabulary.expand_llm(tok, 32, 4, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert with_pad.pad == tok.token_to_id("<pad>")
    assert with_pad.code_ids[0] == vocab.code_ids[0]  # second expansion adds nothing
    with pytest.raises(VocabularyError, match="<s>"):
        Vocabulary.expand_llm(tok, 32, 4, bos_token="<s>", eos_token="<eos>")


# -- the Vocabulary object itself ------------------------------------------------------


def test_dict_round_trip(native, chameleon_file) -> None:
    tok = TextTokenizer.train(CORPUS, 300, ["<bos>", "<eos>"])
    vocabs = [
        native[1],
        Vocabulary.expand_llm(tok, 16, 3, bos_token="<bos>", eos_token="<eos>"),
        Vocabulary.from_chameleon(chameleon_file, lumina=True),
    ]
    for vocab in vocabs:
        data = json.loads(json.dumps(vocab.to_dict()))
        again = Vocabulary.from_dict(data)
        assert again == vocab
        np.testing.assert_array_equal(again.codes_to_ids(np.arange(vocab.codebook_size)), vocab.code_ids)
        assert again.size_unit == vocab.size_unit and again.max_grid_size == vocab.max_grid_size
    assert vocabs[0].to_dict()["code_ids"] == {"start": native[0].vocab_size, "count": 64}
    assert isinstance(vocabs[2].to_dict()["code_ids"], list)  # scattered ids are kept one by one


def test_validation() -> None:
    ok = {"image_begin": 0, "image_end": 1}
    Vocabulary(10, ok, [2, 3], [4])
    with pytest.raises(VocabularyError, match="twice"):
        Vocabulary(10, ok, [2, 3], [3])
    with pytest.raises(VocabularyError, match="twice"):
        Vocabulary(10, {**ok, "eos": 2}, [2, 3])
    with pytest.raises(VocabularyError, match="outside"):
        Vocabulary(10, ok, [2, 10])
    with pytest.raises(VocabularyError, match="image_end"):
        Vocabulary(10, {"image_begin": 0}, [2])
    with pytest.raises(VocabularyError, match="unknown"):
        Vocabulary(10, {**ok, "boi": 5}, [2])
    with pytest.raises(VocabularyError):
        Vocabulary(10, ok, [])


def test_masks_partition(native) -> None:
    tok, vocab = native
    code, text, special = vocab.code_mask, vocab.text_mask, vocab.special_mask
    assert code.dtype == torch.bool and code.shape == (vocab.size,)
    assert torch.equal(code.int() + text.int() + special.int(), torch.ones(vocab.size, dtype=torch.int))
    assert int(code.sum()) == 64
    assert int(special.sum()) == len(SPECIAL_ROLES) + 8
    assert int(vocab.size_mask.sum()) == 8
    assert text[tok.encode("hello")].all() and special[vocab.image_begin] and not text[vocab.eos]
    assert vocab.code_mask is code  # cached


def test_code_lookups_edge_cases(native) -> None:
    _, vocab = native
    for bad in (np.array([0, 64]), np.array([-1]), torch.tensor([[3, 64]])):
        with pytest.raises(VocabularyError):
            vocab.codes_to_ids(bad)
    ids = torch.tensor([-5, 0, vocab.size, vocab.size + 100, int(vocab.code_ids[3])])
    assert vocab.ids_to_codes(ids).tolist() == [-1, -1, -1, -1, 3]
    assert vocab.is_code(ids).dtype == torch.bool
    assert vocab.is_code(np.array([int(vocab.code_ids[0])])).dtype == np.bool_
    assert vocab.codes_to_ids(np.zeros((2, 0), dtype=np.int64)).shape == (2, 0)
    grid = np.random.default_rng(0).integers(0, 64, (5, 7))
    np.testing.assert_array_equal(vocab.ids_to_codes(vocab.codes_to_ids(grid)), grid)


def test_size_tokens(native) -> None:
    _, vocab = native
    ids = [vocab.size_token(n) for n in range(1, 9)]
    assert len(set(ids)) == 8 and [vocab.size_of_token(i) for i in ids] == list(range(1, 9))
    assert vocab.size_of_token(vocab.bos) is None
    for bad in (0, 9, -1, 2.0):
        with pytest.raises(VocabularyError):
            vocab.size_token(bad)
    with pytest.raises(VocabularyError):
        vocab.role_id("boi")
