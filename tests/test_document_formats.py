"""Documents and sequence formats: round trips, loss masks, tolerant decoding."""

from __future__ import annotations

import json
import random
import re
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tokenloom.document import Document, ImagePart, TextPart, Turn
from tokenloom.formats import (
    DecodeError,
    DecodeWarning,
    Encoded,
    FlatFormat,
    Format,
    UniRepFormat,
    get_format,
    resolution_prompt,
)
from tokenloom.text_tokenizer import TextTokenizer
from tokenloom.vocab import Vocabulary, VocabularyError, build_native

CORPUS = ["a photo of a cat", "a red square on a blue field", "draw me a dog please"] * 4
CODEBOOK = 50
FLAT_GRID = (3, 5)
INJECTIONS = [
    "<|image_begin|>", "<|image_end|>", "<|bos|>", "<|eos|>", "<|turn_end|>", "<|user|>",
    "<|assistant|>", "<|size_3|>", "<|end_of_line|>", "<racm3:break>", "<eoss>", "<s>", "</s>",
    "<pad>", "<reserved08706>", "<reserved08799>", "<reserved08801>", "IMGIMGBZ", "IMGIMGAZ",
]  # fmt: skip


def chameleon_tokenizer(path) -> TextTokenizer:
    """Chameleon-style tokenizer.json: BPE + shuffled IMGIMG codes + Lumina reserved tokens."""
    tok = TextTokenizer.train(CORPUS, 300, ["<s>", "<pad>", "</s>", "<unk>"])
    extra = ["IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(c)) + "Z" for c in range(CODEBOOK)]
    extra += ["<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>"]
    extra += [f"<reserved{8800 + n:05d}>" for n in range(1, 5)]
    random.Random(1).shuffle(extra)
    tok.add_special_tokens(extra)
    tok.backend.save(str(path))
    return TextTokenizer.from_file(path)


@pytest.fixture(scope="module")
def native():
    return build_native(CORPUS, 300, codebook_size=CODEBOOK, max_grid_size=8)


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
    tok = chameleon_tokenizer(tmp_path_factory.mktemp("cham") / "tokenizer.json")
    return tok, Vocabulary.from_chameleon(tok, lumina=True)


@pytest.fixture(scope="module")
def formats(native, chameleon):
    """name -> (format, size step of images it accepts)."""
    ntok, nvocab = native
    ctok, cvocab = chameleon
    return {
        "native-unirep": UniRepFormat(nvocab, ntok),
        "native-flat": FlatFormat(nvocab, ntok, grid=FLAT_GRID),
        "chameleon-lumina": UniRepFormat(cvocab, ctok),
        "chameleon-flat": FlatFormat(cvocab, ctok, grid=FLAT_GRID),
    }


# -- strategies ----------------------------------------------------------------

texts = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(INJECTIONS)), min_size=1, max_size=4).map("".join)


@st.composite
def images(draw, fmt: Format):
    if isinstance(fmt, FlatFormat):
        shape = fmt.grid
    else:
        unit, most = fmt.vocab.size_unit, min(fmt.vocab.max_grid_size, 7)
        shape = (unit * draw(st.integers(1, most)), unit * draw(st.integers(1, most)))
    return ImagePart(draw(hnp.arrays(np.int64, shape, elements=st.integers(0, CODEBOOK - 1))))


def parts(fmt: Format, min_size: int = 1):
    return st.lists(st.one_of(texts.map(TextPart), images(fmt)), min_size=min_size, max_size=4)


@st.composite
def documents(draw, fmt: Format):
    """Normalized documents in the canonical shapes each vocabulary can express."""
    has_roles = fmt.vocab.role_id("user") is not None
    kind = draw(st.sampled_from(["roleless", "chat"]))
    if kind == "roleless":
        doc = Document.from_parts(draw(parts(fmt)))
    elif has_roles:
        roles = draw(st.lists(st.sampled_from(["system", "user", "assistant"]), min_size=1, max_size=4))
        turns = [Turn(role, draw(parts(fmt, 0))) for role in roles]
        if draw(st.booleans()):  # a roleless preamble before the chat
            turns.insert(0, Turn(None, draw(parts(fmt))))
        doc = Document(turns)
    else:  # Chameleon: roles are only implied by alternation
        n = draw(st.integers(1, 4))
        doc = Document([Turn(("user", "assistant")[k % 2], draw(parts(fmt, 0))) for k in range(n)])
    doc = doc.normalized()
    if any(t.role is None and not t.parts for t in doc.turns):  # all-empty text vanished
        doc = Document.from_parts(["x"])
    return doc


def check_round_trip(fmt: Format, doc: Document) -> Encoded:
    enc = fmt.encode(doc)
    assert len(enc.ids) == len(enc.loss_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fmt.decode(enc.ids, strict=True) == doc
        assert fmt.decode(enc.ids) == doc
    return enc


ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", ["native-unirep", "native-flat", "chameleon-lumina", "chameleon-flat"])
def test_round_trip(formats, name) -> None:
    fmt = formats[name]

    @ROUND_TRIP
    @given(documents(fmt))
    def run(doc: Document) -> None:
        enc = check_round_trip(fmt, doc)
        images_len = sum(fmt.image_length(im.height, im.width) for im in doc.images)
        assert images_len <= len(enc.ids)
        assert enc.ids[0] == fmt.vocab.bos and enc.ids[-1] == fmt.vocab.eos

    run()


def test_round_trip_generation_prompt(formats) -> None:
    fmt = formats["native-unirep"]

    @settings(max_examples=30, deadline=None)
    @given(documents(fmt))
    def run(doc: Document) -> None:
        enc = fmt.encode(doc, generation_role="assistant")
        assert enc.ids[-1] == fmt.vocab.role_id("assistant") and fmt.vocab.eos not in enc.ids
        assert fmt.decode(enc.ids, strict=True) == Document([*doc.turns, Turn("assistant", [])])

    run()


def test_text_that_names_specials_stays_text(formats) -> None:
    for fmt in formats.values():
        doc = Document.from_parts(["".join(INJECTIONS)])
        enc = check_round_trip(fmt, doc)
        assert fmt.vocab.image_begin not in enc.ids and fmt.vocab.is_code(np.array(enc.ids)).sum() == 0


# -- layouts and loss masks ----------------------------------------------------------


def test_unirep_layout(native) -> None:
    tok, vocab = native
    fmt = UniRepFormat(vocab, tok)
    codes = np.arange(6).reshape(2, 3)
    ids = fmt.image_ids(codes)
    c = vocab.codes_to_ids(codes).tolist()
    eol = vocab.end_of_line
    assert ids == [vocab.image_begin, vocab.size_token(2), vocab.size_token(3), *c[0], eol, *c[1], eol, vocab.image_end]
    assert fmt.image_length(2, 3) == len(ids)


def test_lumina_size_unit(chameleon) -> None:
    tok, vocab = chameleon
    fmt = UniRepFormat(vocab, tok)
    ids = fmt.image_ids(np.zeros((4, 6), dtype=np.int64))
    assert ids[1:3] == [tok.token_to_id("<reserved08802>"), tok.token_to_id("<reserved08803>")]
    assert len(ids) == fmt.image_length(4, 6)
    with pytest.raises(ValueError, match="multiple"):
        fmt.image_ids(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(VocabularyError):  # 10 units > the 4 size tokens
        fmt.image_ids(np.zeros((20, 2), dtype=np.int64))


def test_flat_layout(native) -> None:
    tok, vocab = native
    fmt = get_format("flat", vocab, tok, grid=(2, 2))
    codes = vocab.codes_to_ids(np.arange(1, 5)).tolist()
    assert fmt.image_ids(np.array([[1, 2], [3, 4]])) == [vocab.image_begin, *codes, vocab.image_end]
    assert fmt.image_length(2, 2) == 6
    with pytest.raises(ValueError, match="2x2"):
        fmt.encode(Document.from_parts([ImagePart(np.zeros((2, 3), dtype=np.int64))]))
    assert get_format("flat", vocab, tok).grid == (32, 32)
    with pytest.raises(ValueError, match="unknown format"):
        get_format("zigzag", vocab, tok)


def test_unirep_needs_lumina_tokens(tmp_path) -> None:
    tok = chameleon_tokenizer(tmp_path / "t.json")
    with pytest.raises(VocabularyError, match="end_of_line"):
        UniRepFormat(Vocabulary.from_chameleon(tok), tok)


def test_encode_rejects_bad_codes(formats) -> None:
    with pytest.raises(ValueError):
        formats["native-unirep"].encode(Document.from_parts([ImagePart(np.full((1, 1), CODEBOOK))]))


def test_chat_layout_and_loss_mask(native) -> None:
    tok, vocab = native
    fmt = UniRepFormat(vocab, tok)
    img = ImagePart(np.arange(6).reshape(2, 3))
    doc = Document.chat(
        [
            ("system", "be brief"),
            ("user", ["draw", img]),
            ("assistant", ["ok", img]),
            ("user", "again"),
            ("assistant", "no"),
        ]
    )
    enc = fmt.encode(doc)
    expected: list[tuple[list[int], bool]] = [([vocab.bos], False)]
    for turn in doc.turns:
        train = turn.role == "assistant"
        expected.append(([vocab.role_id(turn.role)], False))
        for p in turn.parts:
            expected.append((tok.encode(p.text) if isinstance(p, TextPart) else fmt.image_ids(p.codes), train))
        expected.append(([vocab.turn_end], train))
    expected.append(([vocab.eos], False))
    assert enc.ids == [i for ids, _ in expected for i in ids]
    assert enc.loss_mask == [m for ids, m in expected for _ in ids]

    prompt = fmt.encode(doc, generation_role="assistant")
    assert prompt.ids == enc.ids[:-1] + [vocab.role_id("assistant")] and not prompt.loss_mask[-1]
    with pytest.raises(ValueError):
        fmt.encode(doc, generation_role="assistant", add_eos=True)
    with pytest.raises(ValueError):
        fmt.encode(doc, generation_role="robot")


def test_roleless_loss_mask(formats) -> None:
    fmt = formats["native-unirep"]
    doc = Document.from_parts(["a cat", ImagePart(np.ones((2, 2), dtype=np.int64))])
    enc = fmt.encode(doc)
    assert enc.loss_mask == [False] + [True] * (len(enc.ids) - 1)
    assert enc.ids[-1] == fmt.vocab.eos
    bare = fmt.encode(doc, add_bos=False, add_eos=False)
    assert bare.ids == enc.ids[1:-1] and all(bare.loss_mask)
    # a chat without assistant turns trains on everything too
    assert all(fmt.encode(Document.chat([("user", "hi")]), add_bos=False).loss_mask)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_loss_mask_counts(formats, data) -> None:
    fmt = formats["native-unirep"]
    doc = data.draw(documents(fmt))
    enc = fmt.encode(doc)
    if any(t.role == "assistant" for t in doc.turns):
        part_len = lambda p: len(fmt._part_ids(p))  # noqa: E731
        want = sum(sum(map(part_len, t.parts)) + 1 for t in doc.turns if t.role == "assistant")
        assert sum(enc.loss_mask) == want
    else:
        assert sum(enc.loss_mask) == len(enc.ids) - 1


def test_chameleon_chat_roles_alternate(formats) -> None:
    fmt = formats["chameleon-lumina"]
    doc = Document.chat([("user", "draw"), ("assistant", "ok"), ("user", "more")])
    enc = fmt.encode(doc)
    assert enc.ids.count(fmt.vocab.turn_end) == 3
    assert fmt.decode(enc.ids, strict=True) == doc
    # the assistant's answer being generated after the prompt gets the next role
    prompt = fmt.encode(Document.chat([("user", "draw")]), generation_role="assistant")
    got = fmt.decode(prompt.ids + fmt.text_tokenizer.encode("a cat"))
    assert [t.role for t in got.turns] == ["user", "assistant"] and got.turns[1].parts == [TextPart("a cat")]
    # a system turn cannot be told apart here: it decodes as user
    assert fmt.decode(fmt.encode(Document.chat([("system", "s")])).ids).turns[0].role == "user"


def test_resolution_prompt() -> None:
    want = "Generate an image of 768x512 according to the following prompt:\na cat"
    assert resolution_prompt("a cat", 768, 512) == want


# -- tolerant decoding --------------------------------------------------------------------


def decode_warns(fmt: Format, ids, *matches: str) -> Document:
    """Decode expecting DecodeWarnings matching each of `matches`; strict mode must raise instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = fmt.decode(ids)
    assert caught and all(issubclass(w.category, DecodeWarning) for w in caught)
    for match in matches:
        assert any(re.search(match, str(w.message)) for w in caught), (match, [str(w.message) for w in caught])
    with pytest.raises(DecodeError):
        fmt.decode(ids, strict=True)
    return doc


def test_truncated_unirep_image(formats) -> None:
    fmt = formats["native-unirep"]
    codes = np.arange(12).reshape(3, 4)
    ids = fmt.encode(Document.from_parts(["a cat", ImagePart(codes)])).ids
    cut = ids[: ids.index(fmt.vocab.image_begin) + 3 + 2 * 5 + 2]  # two rows and a half
    doc = decode_warns(fmt, cut, "truncated", "incomplete row of 2 codes", "has 2 rows, its size token says 3")
    assert doc == Document.from_parts(["a cat", ImagePart(codes[:2])])
    with pytest.raises(DecodeError) as err:
        fmt.decode(cut, strict=True)
    assert err.value.position == len(cut)


def test_image_with_nothing_left_is_dropped(formats) -> None:
    fmt = formats["native-unirep"]
    ids = fmt.text_tokenizer.encode("cat") + [fmt.vocab.image_begin, fmt.vocab.size_token(2)]
    assert decode_warns(fmt, ids, "no complete row") == Document.from_parts(["cat"])


def test_stray_tokens_in_text(formats) -> None:
    fmt = formats["native-unirep"]
    v, tok = fmt.vocab, fmt.text_tokenizer
    a, b = tok.encode("a photo"), tok.encode(" of a cat")
    code = int(v.codes_to_ids(np.array([3]))[0])
    for stray in (code, v.end_of_line, v.image_end, v.size_token(2)):
        doc = decode_warns(fmt, a + [stray] + b, f"position {len(a)}")
        assert doc == Document.from_parts(["a photo of a cat"])


def test_row_of_wrong_length(formats) -> None:
    fmt = formats["native-unirep"]
    v = fmt.vocab
    ids = fmt.image_ids(np.arange(9).reshape(3, 3))
    row2 = 3 + 4  # start of the second row
    del ids[row2]  # second row now has 2 codes
    doc = decode_warns(fmt, ids, "row of 2 codes")
    assert doc.images[0] == ImagePart(np.array([[0, 1, 2], [6, 7, 8]]))
    assert v.end_of_line in ids


def test_missing_size_tokens_are_inferred(formats) -> None:
    fmt = formats["native-unirep"]
    ids = fmt.image_ids(np.arange(6).reshape(2, 3))
    doc = decode_warns(fmt, [ids[0]] + ids[3:], "lacks its height")
    assert doc.images[0] == ImagePart(np.arange(6).reshape(2, 3))
    doc = decode_warns(fmt, ids[:2] + ids[3:], "lacks its width")
    assert doc.images[0] == ImagePart(np.arange(6).reshape(2, 3))


def test_truncated_flat_image(formats) -> None:
    fmt = formats["native-flat"]
    codes = np.arange(15).reshape(FLAT_GRID)
    ids = fmt.image_ids(codes)
    doc = decode_warns(fmt, ids[:1 + 12], "truncated")  # two full rows and two codes
    assert doc.images[0] == ImagePart(codes[:2])
    doc = decode_warns(fmt, ids[:-1] + fmt.text_tokenizer.encode("cat"), "not closed")
    assert doc == Document.from_parts([ImagePart(codes), "cat"])


def test_out_of_vocabulary_is_an_error(formats) -> None:
    fmt = formats["native-unirep"]
    ids = fmt.encode(Document.from_parts(["a cat"])).ids
    for bad in (fmt.vocab.size, -1, 10**30):
        with pytest.raises(DecodeError, match=str(bad)) as err:
            fmt.decode(ids[:2] + [bad] + ids[2:])
        assert err.value.position == 2
    # after eos nothing is read
    assert fmt.decode(ids + [fmt.vocab.size]) == Document.from_parts(["a cat"])
    for junk in ("abc", [1.5], [[1, 2]], 7):
        with pytest.raises(DecodeError):
            fmt.decode(junk)


def test_specials_skipped_and_inputs(formats) -> None:
    fmt = formats["native-unirep"]
    v = fmt.vocab
    ids = fmt.encode(Document.from_parts(["a cat"]), add_bos=False, add_eos=False).ids
    noisy = [v.bos, v.pad, *ids[:1], v.pad, v.uncond, *ids[1:], v.eos, *ids]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fmt.decode(noisy) == Document.from_parts(["a cat"])
    assert fmt.decode(np.array(ids)) == fmt.decode(torch.tensor(ids)) == Document.from_parts(["a cat"])
    assert fmt.decode([]) == Document([])


def test_ids_unknown_to_the_tokenizer_warn(native) -> None:
    tok, base = native
    # a model vocabulary padded past the tokenizer leaves ids no token names
    padded = Vocabulary(base.size + 8, base.specials, base.code_ids + 8, base.size_token_ids)
    fmt = UniRepFormat(padded, tok)
    doc = decode_warns(fmt, tok.encode("cat") + [tok.vocab_size + 1], "not known")
    assert doc == Document.from_parts(["cat"])


def test_turn_structure_problems(formats) -> None:
    fmt = formats["native-unirep"]
    v, tok = fmt.vocab, fmt.text_tokenizer
    ids = [v.role_id("user"), *tok.encode("hi"), v.role_id("assistant"), *tok.encode("yo"), v.turn_end]
    doc = decode_warns(fmt, ids, "not closed by turn_end")
    assert doc == Document.chat([("user", "hi"), ("assistant", "yo")])
    doc = decode_warns(fmt, tok.encode("hi") + [v.turn_end], "without a role")
    assert doc == Document.from_parts(["hi"])


def mutate(rng: random.Random, ids: list[int], vocab: Vocabulary) -> list[int]:
    specials = list(vocab.specials.values()) + vocab.size_token_ids.tolist()
    ids = list(ids)
    for _ in range(rng.randint(0, 4)):
        op = rng.randrange(5)
        pos = rng.randint(0, len(ids))
        if op == 0:
            ids = ids[:pos]
        elif op == 1 and ids:
            del ids[min(pos, len(ids) - 1)]
        elif op == 2:
            ids.insert(pos, rng.choice(specials))
        elif op == 3:
            ids.insert(pos, int(vocab.code_ids[rng.randrange(vocab.codebook_size)]))
        elif ids:
            ids[min(pos, len(ids) - 1)] = rng.randrange(vocab.size)
    return ids


def test_random_sequences_only_raise_decode_error(formats) -> None:
    rng = random.Random(1234)
    cases = []
    for fmt in formats.values():
        v = fmt.vocab
        real = []
        for k in range(12):
            shape = fmt.grid if isinstance(fmt, FlatFormat) else (2 * (k % 3 + 1), 2 * (k % 2 + 1))
            im = ImagePart(np.random.default_rng(k).integers(0, CODEBOOK, shape))
            chat = Document.chat([("user", ["draw <|image_begin|>", im]), ("assistant", [im, "ok"])])
            real.append(fmt.encode(chat).ids)
            real.append(fmt.encode(Document.from_parts(["caption", im, "more", im])).ids)
        specials = list(v.specials.values()) + v.size_token_ids.tolist()
        cases.append((fmt, real, specials))

    start = time.perf_counter()
    outcomes = {"doc": 0, "error": 0, "warned": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(10_000):
            fmt, real, specials = cases[k % len(cases)]
            v = fmt.vocab
            style = rng.randrange(4)
            if style == 0:  # random ids, now and then one outside the vocabulary
                lo, hi = -1 if rng.random() < 0.05 else 0, v.size + (rng.random() < 0.05)
                ids = [rng.randrange(lo, hi) for _ in range(rng.randint(0, 40))]
            elif style == 1:  # specials and codes only
                pool = specials + v.code_ids[:20].tolist()
                ids = [rng.choice(pool) for _ in range(rng.randint(0, 40))]
            else:  # truncated / mutated real encodings
                ids = mutate(rng, rng.choice(real), v)
            caught.clear()
            try:
                doc = fmt.decode(ids, strict=k % 7 == 0)
            except DecodeError as e:
                assert isinstance(e.position, int) and f"position {e.position}" in str(e)
                outcomes["error"] += 1
                continue
            assert all(issubclass(w.category, DecodeWarning) for w in caught)
            outcomes["warned"] += bool(caught)
            outcomes["doc"] += 1
            for im in doc.images:
                assert im.codes.ndim == 2 and im.codes.size and 0 <= im.codes.min() and im.codes.max() < CODEBOOK
    assert min(outcomes.values()) > 500, outcomes  # every path was exercised
    assert time.perf_counter() - start < 20


# -- documents --------------------------------------------------------------------------


def test_document_basics() -> None:
    img = ImagePart(np.arange(6).reshape(2, 3))
    doc = Document.chat([("user", ["a", "", "b", img, "c"]), ("assistant", [""]), (None, img.codes)])
    assert doc.text == "ab\nc" and doc.images == [img, img] and len(doc.parts) == 7  # parts split by an image: a newline
    norm = doc.normalized()
    assert norm.turns[0].parts == [TextPart("ab"), img, TextPart("c")]
    assert norm.turns[1] == Turn("assistant", []) and len(norm.turns) == 3
    assert doc.turns[0].parts[1] == TextPart("")  # normalized() does not mutate
    assert img.height == 2 and img.width == 3 and img.codes.dtype == np.int64
    with pytest.raises(ValueError):
        Turn("robot", [])
    with pytest.raises(ValueError):
        ImagePart(np.arange(3))


def test_image_equality_ignores_pixels() -> None:
    a = ImagePart(np.arange(4).reshape(2, 2), pixels="decoded")
    assert a == ImagePart(np.arange(4).reshape(2, 2))
    assert a != ImagePart(np.arange(4).reshape(1, 4))
    assert a != ImagePart(np.arange(1, 5).reshape(2, 2))
    assert "decoded" not in repr(a)


def test_json_round_trip() -> None:
    img = ImagePart(np.arange(6).reshape(2, 3), pixels=object())
    doc = Document.chat([("system", "s"), ("user", ["<|image_begin|>", img]), ("assistant", [])])
    data = json.loads(json.dumps(doc.to_json()))
    assert data["turns"][1]["parts"][1] == {"type": "image", "codes": [[0, 1, 2], [3, 4, 5]]}
    assert Document.from_json(data) == doc
    assert Document.from_json(json.dumps(doc.to_json())) == doc
