"""Speech as a modality: the part type, the speech codes in the vocabulary, and the span in both speech
layouts (MIO's blocks, frame-interleaved) under both image layouts."""

import json
import warnings

import numpy as np
import pytest

from tokenloom.document import MAX_SPEECH_FRAMES, Document, ImagePart, SpeechPart, TextPart, Turn
from tokenloom.formats import DecodeError, DecodeWarning, get_format
from tokenloom.vocab import KIND_SPEECH, KIND_TEXT, Vocabulary, VocabularyError, build_native

LEVELS, CODES = 4, 16
CORPUS = ["say a small red circle", "what color is the square", "a large blue triangle at the top left"]


@pytest.fixture(scope="module")
def native():
    return build_native(CORPUS, 300, codebook_size=32, max_grid_size=8, speech_codebooks=LEVELS,
                        speech_codebook_size=CODES)


def _fmt(native, layout="unirep", speech_layout="blocks"):
    tok, vocab = native
    kwargs = {"grid": (2, 3)} if layout == "flat" else {}
    return get_format(layout, vocab, tok, speech_layout=speech_layout, **kwargs)


def _speech(rng, levels=LEVELS, frames=5):
    return SpeechPart(rng.integers(0, CODES, (levels, frames)))


def test_speech_part_checks_its_codes() -> None:
    part = SpeechPart(np.zeros((4, 7), np.int64))
    assert (part.levels, part.num_frames) == (4, 7) and part.content == SpeechPart(np.zeros((1, 7), np.int64))
    assert SpeechPart(np.arange(3)).codes.shape == (1, 3)  # one row: content only
    with pytest.raises(ValueError, match="levels, frames"):
        SpeechPart(np.zeros((2, 0), np.int64))
    with pytest.raises(TypeError, match="integers"):
        SpeechPart(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=f"at most {MAX_SPEECH_FRAMES}"):
        SpeechPart(np.zeros((1, MAX_SPEECH_FRAMES + 1), np.int64))
    doc = Document([Turn("user", [TextPart("hi"), part])])
    back = Document.from_json(json.dumps(doc.to_json()))
    assert back == doc and back.speech == [part] and back.text == "hi"


def test_speech_codes_have_their_own_ids_per_level(native) -> None:
    _, v = native
    assert v.has_speech and (v.speech_codebooks, v.speech_codebook_size) == (LEVELS, CODES)
    ids = v.speech_code_ids
    assert len(set(ids.tolist())) == LEVELS * CODES
    assert not set(ids.tolist()) & set(v.code_ids.tolist())  # never an image code's id
    assert (v.kinds[ids] == KIND_SPEECH).all() and not v.text_mask[ids].any() and not v.code_mask[ids].any()
    grid = np.arange(CODES)[None].repeat(LEVELS, 0)
    as_ids = v.speech_codes_to_ids(grid)
    level, code = v.ids_to_speech(as_ids)
    assert (level == np.arange(LEVELS)[:, None]).all() and (code == grid).all()
    assert v.ids_to_speech(np.array([v.bos, -3, v.size]))[0].tolist() == [-1, -1, -1]
    assert v.speech_codes_to_ids(np.array([3]), first_level=2)[0] == as_ids[2, 3]
    masks = [v.speech_level_mask(k) for k in range(LEVELS)]
    assert all(int(m.sum()) == CODES for m in masks) and not (masks[0] & masks[1]).any()
    assert (sum(m.long() for m in masks).bool() == v.speech_mask).all()
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(VocabularyError, match=r"\[0, 16\)"):
        v.speech_codes_to_ids(np.array([[16]]))
    with pytest.raises(VocabularyError, match="levels 3..4"):
        v.speech_codes_to_ids(np.zeros((2, 1), np.int64), first_level=3)
    with pytest.raises(VocabularyError, match="already has"):
        v.with_speech_codes(2, 8)


def test_a_vocabulary_without_speech_says_how_to_get_it() -> None:
    tok, v = build_native(CORPUS, 300, codebook_size=32, max_grid_size=8)
    assert not v.has_speech and v.speech_codebooks == 0 and "speech_code_ids" not in v.to_dict()
    fmt = get_format("unirep", v, tok)
    with pytest.raises(ValueError, match="add-modality --modality speech"):
        fmt.encode(Document.from_parts([SpeechPart(np.zeros((1, 2), np.int64))]))
    grown = v.with_speech_codes(2, 8)
    assert grown.size == v.size + 16 and (grown.speech_code_ids == np.arange(v.size, v.size + 16)).all()
    assert (grown.kinds[: v.size] == v.kinds).all() and grown.has_speech


@pytest.mark.parametrize("layout", ["unirep", "flat"])
@pytest.mark.parametrize("speech_layout", ["blocks", "interleaved"])
def test_speech_span_round_trips(native, layout, speech_layout) -> None:
    fmt = _fmt(native, layout, speech_layout)
    rng = np.random.default_rng(0)
    image = ImagePart(rng.integers(0, 32, (2, 3)))
    doc = Document([Turn("user", [_speech(rng, 1, 6), TextPart("say it"), image]),
                    Turn("assistant", [TextPart("ok"), _speech(rng, LEVELS, 5)])])
    enc = fmt.encode(doc)
    assert fmt.decode(enc.ids, strict=True) == doc
    v = fmt.vocab
    start = enc.ids.index(v.speech_begin, enc.ids.index(v.speech_begin) + 1)
    body = enc.ids[start + 1:start + 1 + LEVELS * 5]
    assert enc.ids[start + 1 + LEVELS * 5] == v.speech_end
    assert fmt.speech_length(LEVELS, 5) == LEVELS * 5 + 2
    levels = v.ids_to_speech(np.array(body))[0].tolist()
    if speech_layout == "blocks":  # content block, then each timbre block
        assert levels == [k for k in range(LEVELS) for _ in range(5)]
    else:  # one frame's levels after another
        assert levels == list(range(LEVELS)) * 5
    mask = np.array(enc.loss_mask)
    assert mask[start] and not mask[enc.ids.index(v.speech_begin)]  # the assistant's utterance is trained on


def test_blocks_and_interleaved_differ_only_in_order(native) -> None:
    part = _speech(np.random.default_rng(1))
    a = _fmt(native, speech_layout="blocks").speech_ids(part.codes)
    b = _fmt(native, speech_layout="interleaved").speech_ids(part.codes)
    assert a != b and sorted(a) == sorted(b) and a[0] == b[0] and a[-1] == b[-1]


@pytest.mark.parametrize("speech_layout", ["blocks", "interleaved"])
def test_damaged_speech_keeps_what_it_can(native, speech_layout) -> None:
    fmt = _fmt(native, speech_layout=speech_layout)
    v = fmt.vocab
    part = _speech(np.random.default_rng(2), LEVELS, 4)
    ids = fmt.speech_ids(part.codes)
    # truncated: in blocks the whole levels before the cut survive; interleaved keeps the whole frames
    with pytest.warns(DecodeWarning, match="inside speech"):
        doc = fmt.decode(ids[:-3])
    kept = doc.speech[0].codes
    if speech_layout == "blocks":
        assert kept.shape == (LEVELS - 1, 4) and (kept == part.codes[:LEVELS - 1]).all()
    else:
        assert kept.shape == (LEVELS, 3) and (kept == part.codes[:, :3]).all()
    with pytest.raises(DecodeError, match="inside speech"):
        fmt.decode(ids[:-3], strict=True)
    # text inside the span closes it; the text after is still read
    text = fmt.text_tokenizer.encode("ok")
    with pytest.warns(DecodeWarning, match="not closed by speech_end"):
        doc = fmt.decode(ids[:-1] + text)
    assert doc.speech[0] == part and doc.text == "ok"
    # stray codes and markers outside speech are skipped with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = fmt.decode([ids[1], v.speech_end, *text])
    assert doc.text == "ok" and len(caught) == 2 and "outside speech" in str(caught[1].message)
    # an empty utterance is dropped
    with pytest.warns(DecodeWarning, match="no complete frame"):
        assert fmt.decode([v.speech_begin, v.speech_end]).speech == []


def test_blocks_of_the_wrong_length_or_order_end_the_utterance(native) -> None:
    fmt = _fmt(native)
    v = fmt.vocab
    codes = np.random.default_rng(3).integers(0, CODES, (3, 4))
    ids = v.speech_codes_to_ids(codes)
    short = [v.speech_begin, *ids[0], *ids[1], *ids[2][:2], v.speech_end]
    with pytest.warns(DecodeWarning, match="level 2 has 2 codes"):
        assert fmt.decode(short).speech[0] == SpeechPart(codes[:2])
    skipped = [v.speech_begin, *ids[0], *ids[2], v.speech_end]
    with pytest.warns(DecodeWarning, match="level 2 where level 1 belongs"):
        assert fmt.decode(skipped).speech[0] == SpeechPart(codes[:1])


def test_speech_never_reads_as_text(native) -> None:
    fmt = _fmt(native)
    v = fmt.vocab
    assert (v.kinds[v.speech_code_ids] != KIND_TEXT).all()
    with pytest.raises(ValueError, match="1 to 4 codebook levels"):
        fmt.speech_ids(np.zeros((5, 2), np.int64))
    with pytest.raises(ValueError, match="unknown speech layout"):
        _fmt(native, speech_layout="mixed")
