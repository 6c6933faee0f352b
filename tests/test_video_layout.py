"""Video as a modality: the part type, its span in both layouts, and a model grown by its tokens."""

import json
import warnings

import numpy as np
import pytest
import torch


from tokenloom.cli import main
from tokenloom.document import MAX_FRAMES, Document, ImagePart, TextPart, Turn, VideoPart
from tokenloom.formats import DecodeError, DecodeWarning
from tokenloom.modalities import add_modality
from tokenloom.pipeline import Pipeline
from tokenloom.vocab import VocabularyError


def _video(rng, frames, h, w, codes=64):
    return VideoPart(rng.integers(0, codes, (frames, h, w)))


def test_video_part_checks_its_frames() -> None:
    assert VideoPart(np.zeros((3, 2, 4), np.int64)).num_frames == 3
    same = VideoPart([ImagePart(np.zeros((2, 2), np.int64)), ImagePart(np.ones((2, 2), np.int64))])
    assert same.codes.shape == (2, 2, 2) and same.frames[1] == ImagePart(np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="one size"):
        VideoPart([ImagePart(np.zeros((2, 2), np.int64)), ImagePart(np.zeros((2, 3), np.int64))])
    with pytest.raises(ValueError, match="frames, height, width"):
        VideoPart(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=f"at most {MAX_FRAMES}"):
        VideoPart(np.zeros((MAX_FRAMES + 1, 1, 1), np.int64))
    with pytest.raises(TypeError, match="integers"):
        VideoPart(np.zeros((2, 2, 2), np.float32))
    # 3-D arrays are videos, 2-D images, in documents built from plain arrays
    doc = Document.from_parts(["a", np.zeros((2, 3, 3), np.int64), np.zeros((3, 3), np.int64)])
    assert [type(p) for p in doc.parts] == [TextPart, VideoPart, ImagePart] and len(doc.videos) == 1


def test_video_round_trips_through_json() -> None:
    doc = Document([Turn("assistant", [_video(np.random.default_rng(0), 2, 3, 4), TextPart("x")])])
    back = Document.from_json(json.dumps(doc.to_json()))
    assert back == doc and back.videos[0].codes.shape == (2, 3, 4)


@pytest.mark.parametrize("layout", ["unirep", "flat"])
def test_video_span_round_trips(layout, pipe, flat_pipe) -> None:
    p = pipe if layout == "unirep" else flat_pipe
    assert p.vocab.has_video
    h, w = (3, 5) if layout == "unirep" else p.config.flat_grid
    rng = np.random.default_rng(1)
    doc = Document([Turn("user", [TextPart("move"), _video(rng, 2, h, w)]),
                    Turn("assistant", [_video(rng, 4, h, w), TextPart("done"), ImagePart(rng.integers(0, 64, (h, w)))])])
    enc = p.format.encode(doc)
    assert p.format.decode(enc.ids, strict=True) == doc
    v = p.vocab
    start = enc.ids.index(v.video_begin)
    # video_begin, the count token, the frames as image spans of the layout, video_end
    assert enc.ids[start + 1] == v.size_token(2)
    frames = p.format.image_ids(doc.videos[0].codes[0]) + p.format.image_ids(doc.videos[0].codes[1])
    assert enc.ids[start + 2:start + 2 + len(frames)] == frames
    assert enc.ids[start + 2 + len(frames)] == v.video_end
    assert p.format.video_length(2, h, w) == len(frames) + 3
    # the assistant's video is trained on, the user's is not
    mask = np.array(enc.loss_mask)
    second = enc.ids.index(v.video_begin, start + 1)
    assert not mask[start] and mask[second]


def test_damaged_video_keeps_what_it_can(pipe) -> None:
    rng = np.random.default_rng(2)
    video = _video(rng, 3, 2, 2)
    ids = pipe.format.encode(Document.from_parts([video]), add_bos=False, add_eos=False).ids
    with pytest.warns(DecodeWarning, match="count token says 3"):
        doc = pipe.format.decode(ids[:-8])  # last frame cut short, video_end gone
    assert doc.videos[0] == VideoPart(video.codes[:2])
    with pytest.raises(DecodeError, match="truncated"):
        pipe.format.decode(ids[:-1], strict=True)
    # a frame of another size is dropped, with a warning naming it
    odd = pipe.format.image_ids(rng.integers(0, 64, (3, 3)))
    frame = pipe.format.image_ids(video.codes[0])
    seq = [pipe.vocab.video_begin, pipe.vocab.size_token(2), *frame, *odd, pipe.vocab.video_end]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = pipe.format.decode(seq)
    assert doc.videos[0] == VideoPart(video.codes[:1])
    assert any("frame of 3x3 codes" in str(w.message) for w in caught)
    # a stray video_end in text is skipped
    with pytest.warns(DecodeWarning, match="stray video_end"):
        assert pipe.format.decode([pipe.vocab.video_end]).parts == []


def test_a_vocabulary_without_video_tokens_says_so(old_pipe) -> None:
    assert not old_pipe.vocab.has_video
    with pytest.raises(ValueError, match="no video tokens.*add-modality"):
        old_pipe.format.encode(Document.from_parts([np.zeros((2, 2, 2), np.int64)]))


def test_add_modality_grows_the_model_and_keeps_what_it_knew(old_pipe) -> None:
    base, grown = old_pipe, add_modality(old_pipe, "video")
    old, new = base.vocab, grown.vocab
    assert (new.video_begin, new.video_end) == (old.size, old.size + 1) and new.size == old.size + 2
    assert grown.model.config.vocab_size == new.size and base.model.config.vocab_size == old.size  # a copy
    emb, head = grown.model.tok_embeddings.weight, grown.model.output_weight
    torch.testing.assert_close(emb[old.size:], base.model.tok_embeddings.weight.mean(0).expand(2, -1))
    torch.testing.assert_close(head[old.size:], base.model.output_weight.mean(0).expand(2, -1))
    ids = torch.tensor([[old.bos, 5, 6, old.image_begin]])
    with torch.no_grad():
        before, after = base.model(ids), grown.model(ids)
    torch.testing.assert_close(after[..., :old.size], before)  # old logits unchanged
    with pytest.raises(VocabularyError, match="already has the video tokens"):
        add_modality(grown, "video")
    with pytest.raises(ValueError, match="unknown modality"):
        add_modality(base, "smell")


def test_add_modality_verb_writes_a_loadable_model(tmp_path, old_pipe, capsys) -> None:
    pipe, base = old_pipe, tmp_path / "base"
    pipe.save_pretrained(base)
    assert main(["add-modality", str(base), str(tmp_path / "grown"), "--modality", "video"]) == 0
    grown = Pipeline.from_pretrained(tmp_path / "grown")
    assert grown.vocab.has_video
    record = json.loads((tmp_path / "grown" / "config.json").read_text())["added_modality"]
    assert record["modality"] == "video" and record["new_ids"] == [pipe.vocab.size, pipe.vocab.size + 2]
    assert main(["add-modality", str(tmp_path / "grown"), str(tmp_path / "again"), "--modality", "video"]) == 2
    assert "already has the video tokens" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
