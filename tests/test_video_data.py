"""Videos as data: reading and writing them (video_io), video parts in raw JSONL, pre-tokenization."""

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from tokenloom.data import (DataError, DataWarning, RawImage, RawVideo, ShardDataset, pretokenize, read_jsonl,
                            read_manifest)
from tokenloom.document import MAX_FRAMES, VideoPart
from tokenloom.modalities import add_modality
from tokenloom.pipeline import Pipeline
from tokenloom.video_io import frame_files, read_video, stored_frames, write_video
from tokenloom.vocab import Vocabulary
from tokenloom.world.video import video_frames
from tokenloom.world.scene import Obj


def moving(n=4, start="top left", end="center"):
    """Shapes-world frames (64x64): few flat colours, as the world's videos have."""
    return video_frames(Obj("red", "circle", "large", "center"), start, end, n)


def pixels(frames):
    return [np.asarray(f.convert("RGB")) for f in frames]


def same_pixels(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))


def write_frames(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"f{i}.png" for i in range(len(frames))]
    for name, frame in zip(names, frames):
        frame.save(folder / name)
    return [str(folder / n) for n in names]


def write_jsonl(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --------------------------------------------------------------------------- video_io


@pytest.mark.parametrize("name", ["clip.gif", "clip.webp", "clip"])
def test_written_videos_read_back_frame_for_frame(tmp_path, name):
    # The object stops for three frames: GIF and WebP store that run once, and it must come back whole.
    frames = moving(4) + [moving(4)[-1]] * 3 + moving(2)
    path = write_video(frames, tmp_path / name, fps=3)
    back = read_video(path)
    assert same_pixels(back, frames)  # shapes-world frames have few flat colours: even a GIF keeps them
    assert all(f.mode == "RGB" and f.size == (64, 64) for f in back)
    if name == "clip":
        assert sorted(p.name for p in path.iterdir())[:2] == ["frame-000.png", "frame-001.png"]
    else:
        assert stored_frames(path) < len(frames)  # the still run is stored once
    # Rewriting a folder with fewer frames leaves none of the old ones behind.
    write_video(frames[:2], path, fps=3)
    assert same_pixels(read_video(path), frames[:2])


def test_gif_quantises_many_colours_and_lossless_webp_does_not(tmp_path):
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]  # > 256 colours
    assert same_pixels(read_video(write_video(noisy, tmp_path / "n.webp")), noisy)
    assert not same_pixels(read_video(write_video(noisy, tmp_path / "n.gif")), noisy)


def test_a_gif_from_elsewhere_is_read_one_frame_per_stored_frame(tmp_path):
    a, b = moving(2)
    a.save(tmp_path / "plain.gif", save_all=True, append_images=[b, b], duration=100)  # no frame rate recorded
    assert same_pixels(read_video(tmp_path / "plain.gif"), [a, b])


def test_a_folder_is_read_in_natural_order_with_transparency_on_white(tmp_path):
    frames = moving(3)
    write_frames(tmp_path / "v", frames, ["f10.png", "f2.png", "f1.png"])
    assert [p.name for p in frame_files(tmp_path / "v")] == ["f1.png", "f2.png", "f10.png"]
    assert same_pixels(read_video(tmp_path / "v"), [frames[2], frames[1], frames[0]])
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "v" / "f11.png")
    assert np.asarray(read_video(tmp_path / "v")[-1]).min() == 255  # clear pixels read as white, not black


def test_bad_videos_are_refused_naming_the_file(tmp_path):
    frames = moving(4)
    (tmp_path / "text.gif").write_text("not a GIF")
    frames[0].save(tmp_path / "still.png")
    write_frames(tmp_path / "sizes", [frames[0], frames[1].resize((16, 16))])
    (tmp_path / "empty").mkdir()
    write_frames(tmp_path / "stray", frames[:2])
    (tmp_path / "stray" / "notes.txt").write_text("frame notes")
    many = write_video([frames[i % 4] for i in range(MAX_FRAMES + 36)], tmp_path / "many.webp")
    cases = {
        "text.gif": "not an image or video file",
        "still.png": "a PNG image is not a video",
        "sizes": r"f1\.png is 16x16 but .*f0\.png is 64x64",
        "empty": "holds no PNG or JPEG frames",
        "stray": "'notes.txt' is not a PNG or JPEG frame",
        "nothing.gif": "no such file or folder",
        "many.webp": f"has 100 frames, more than the {MAX_FRAMES}",
    }
    for name, problem in cases.items():
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))}.*{problem}"):
            read_video(tmp_path / name)
    assert len(read_video(many, max_frames=100)) == 100
    one = write_video(frames[:1], tmp_path / "one.gif")
    assert len(read_video(one)) == 1
    with pytest.raises(ValueError, match=r"one\.gif: it has 1 frame, at least 2 are needed"):
        read_video(one, min_frames=2)


def test_bad_writes_are_refused(tmp_path):
    frames = moving(2)
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="different sizes"):
        write_video([frames[0], frames[1].resize((8, 8))], tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"unknown video suffix '\.mp4'"):
        write_video(frames, tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="fps must be"):
        write_video(frames, tmp_path / "a.gif", fps=0)
    with pytest.raises(TypeError, match="frame 1 is a ndarray"):
        write_video([frames[0], np.zeros((64, 64, 3), np.uint8)], tmp_path / "a.gif")


# --------------------------------------------------------------------------- raw JSONL


def test_video_parts_parse_into_raw_videos(tmp_path):
    paths = write_frames(tmp_path / "clip", moving(4))
    write_video(moving(3), tmp_path / "clip.gif")
    lines = [{"parts": [{"type": "text", "text": "watch"},
                        {"type": "video", "frames": [f"clip/f{i}.png" for i in range(4)], "width": 16, "height": 24}]},
             {"messages": [{"role": "user", "content": "Animate it."},
                           {"role": "assistant", "content": [{"type": "video", "path": "clip.gif"}]}]},
             {"parts": [{"type": "video", "path": str(tmp_path / "clip")}]}]
    docs = [doc for _, doc in read_jsonl(write_jsonl(tmp_path / "v.jsonl", lines))]
    framed, = docs[0].videos
    assert framed == RawVideo(tuple(RawImage(tmp_path / "clip" / f"f{i}.png") for i in range(4)), None, 16, 24, 4)
    assert [str(f.path) for f in framed.frames] == paths and docs[0].visuals == [framed]
    gif, = docs[1].videos
    assert gif.frames == () and gif.path == tmp_path / "clip.gif" and gif.num_frames == 3
    assert same_pixels(gif.load(), moving(3))
    folder, = docs[2].videos  # a folder becomes its frames, checked as they are
    assert folder.frames == framed.frames and folder.path == tmp_path / "clip" and folder.width is None


BAD_VIDEOS = {
    "missing frame": ({"frames": ["clip/f0.png", "clip/f9.png"]}, r"frame 1 file .*f9\.png does not exist"),
    "empty frames": ({"frames": []}, "empty 'frames' list"),
    "too many frames": ({"frames": ["clip/f0.png"] * (MAX_FRAMES + 1)}, f"{MAX_FRAMES + 1} frames, more than"),
    "frames not a list": ({"frames": "clip/f0.png"}, "'frames' must be a list"),
    "frame not a string": ({"frames": [3]}, "frame 0 must be a non-empty string"),
    "zero width": ({"frames": ["clip/f0.png"], "width": 0}, "part 1 of parts: width must be a positive integer, got 0"),
    "string height": ({"frames": ["clip/f0.png"], "height": "32"}, "height must be a positive integer"),
    "bool width": ({"frames": ["clip/f0.png"], "width": True}, "width must be a positive integer"),
    "frames and path": ({"frames": ["clip/f0.png"], "path": "clip"}, "exactly one of 'frames'"),
    "neither": ({}, "exactly one of 'frames'"),
    "missing path": ({"path": "nope.gif"}, r"nope\.gif: no such file or folder"),
    "still image": ({"path": "clip/f0.png"}, "a PNG image is not a video"),
    "empty folder": ({"path": "empty"}, "holds no PNG or JPEG frames"),
    "unknown key": ({"path": "clip", "fps": 4}, "unknown key 'fps' in video part 1 of parts"),
}


@pytest.mark.parametrize("case", sorted(BAD_VIDEOS))
def test_malformed_video_part_names_line_and_part(tmp_path, case):
    write_frames(tmp_path / "clip", moving(2))
    (tmp_path / "empty").mkdir()
    fields, message = BAD_VIDEOS[case]
    good = {"parts": [{"type": "text", "text": "fine"}]}
    path = write_jsonl(tmp_path / "v.jsonl", [good, {"parts": [{"type": "text", "text": "x"},
                                                               {"type": "video", **fields}]}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        list(read_jsonl(path))
    with pytest.raises(DataError, match="video part 1 of parts"):
        list(read_jsonl(path))


# --------------------------------------------------------------------------- pre-tokenization


def without_video(pipe):
    """`pipe` as a model made before videos: the same ids, no video_begin/video_end roles."""
    data = pipe.vocab.to_dict()
    data["specials"] = {r: i for r, i in data["specials"].items() if r not in ("video_begin", "video_end")}
    return Pipeline(pipe.model, Vocabulary.from_dict(data), pipe.text_tokenizer, pipe.image_tokenizer,
                    dataclasses.replace(pipe.config))


@pytest.fixture(scope="module")
def video_pipe(pipe):
    return add_modality(without_video(pipe), "video")  # as a user's model gains the video tokens


def video_corpus(tmp_path):
    frames = moving(4)
    write_frames(tmp_path / "clip", frames)
    write_video(moving(3, end="bottom right"), tmp_path / "clip.gif")
    frames[0].save(tmp_path / "still.png")
    lines = [
        {"messages": [{"role": "user", "content": "Show the red circle moving to the center."},
                      {"role": "assistant", "content": [{"type": "video",
                                                         "frames": [f"clip/f{i}.png" for i in range(4)]}]}]},
        {"parts": [{"type": "text", "text": "a still"}, {"type": "image", "path": "still.png"}]},
        {"parts": [{"type": "video", "path": "clip.gif", "width": 16, "height": 16},
                   {"type": "text", "text": "it moves"}]},
    ]
    return frames, write_jsonl(tmp_path / "v.jsonl", lines)


def test_pretokenized_videos_decode_to_their_frames_codes(video_pipe, tmp_path):
    pipe = video_pipe
    frames, path = video_corpus(tmp_path)
    summary = pretokenize(path, pipe, tmp_path / "shards", image_batch_size=3, progress=False)
    assert summary["documents"] == 3 and summary["skipped"] == 0
    assert summary["image_sizes"] == {"16x16": 3, "32x32": 5}  # a video's frames are images too
    assert summary["video_sizes"] == {"16x16": 1, "32x32": 1}
    ds = ShardDataset(tmp_path / "shards")

    doc = pipe.format.decode(ds[0][0])
    video, = doc.videos
    assert isinstance(video, VideoPart) and video.num_frames == 4 and not doc.images
    expected = np.stack(pipe.image_tokenizer.encode([Image.open(p) for p in sorted((tmp_path / "clip").iterdir())],
                                                    width=32, height=32))
    assert np.array_equal(video.codes, expected)
    assert doc.turns[1].role == "assistant" and doc.turns[1].parts == [video]

    assert pipe.format.decode(ds[1][0]).images[0] == pipe.encode_image(frames[0])
    gif = pipe.format.decode(ds[2][0])
    assert gif.videos[0].codes.shape == (3, 2, 2) and gif.text == "it moves"
    want = pipe.image_tokenizer.encode(moving(3, end="bottom right"), width=16, height=16)
    assert np.array_equal(gif.videos[0].codes, np.stack(want))


def test_a_video_with_frames_of_two_sizes_is_a_bad_line(video_pipe, tmp_path):
    frames = moving(2)
    write_frames(tmp_path / "clip", [frames[0], frames[1].resize((40, 40))])
    line = {"parts": [{"type": "video", "frames": ["clip/f0.png", "clip/f1.png"]}]}
    path = write_jsonl(tmp_path / "v.jsonl", [{"parts": [{"type": "text", "text": "ok"}]}, line])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: video frame .*f1\.png is 40x40 .* one size"):
        pretokenize(path, video_pipe, tmp_path / "a", progress=False)
    with pytest.warns(DataWarning, match=rf"{re.escape(str(path))}:2:"):
        summary = pretokenize(path, video_pipe, tmp_path / "b", on_error="skip", progress=False)
    assert summary["documents"] == 1 and summary["skipped"] == 1 and "video_sizes" not in summary


def test_a_model_without_video_tokens_refuses_videos_before_writing(pipe, video_pipe, tmp_path):
    _, path = video_corpus(tmp_path)
    old = without_video(pipe)
    for on_error in ("raise", "skip"):  # skipping would quietly drop every video
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: a video part, .*no video tokens.*"
                                            r"tokenloom add-modality"):
            pretokenize(path, old, tmp_path / "never", on_error=on_error, progress=False)
    assert not (tmp_path / "never").exists()
    # Documents without videos are pre-tokenized by it as before.
    text = write_jsonl(tmp_path / "t.jsonl", [{"parts": [{"type": "text", "text": "a video of a circle"}]}])
    assert pretokenize(text, old, tmp_path / "text", progress=False)["documents"] == 1
    assert "video_sizes" not in read_manifest(tmp_path / "text")["counts"]
