"""Shapes-world videos (spec: shapes-world.md, "Videos"): the scorer must accept every render, clean,
anti-aliased or mildly blurred, at any canvas size and frame count, and reject videos that break any
one of its rules; motion captions and questions must round-trip; the video tasks must be right,
deterministic and written with their frame files."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tokenloom.world import (
    CELLS,
    COLORS,
    SHAPES,
    SIZES,
    Motion,
    MotionQuery,
    Obj,
    Scene,
    Video,
    cell_centre,
    draw,
    find_regions,
    frames_right,
    motion_caption,
    parse,
    parse_motion_caption,
    random_motion,
    render_video,
    score_frames,
    score_video,
    video_answer,
    video_frames,
    video_questions,
    video_right,
)
from tokenloom.world.tasks import (
    CONTINUE_VIDEO,
    IMAGE_TASKS,
    MAX_VIDEO_PIXELS,
    NEXT_FRAMES_GIVEN,
    TASKS,
    VIDEO_FRAMES,
    VIDEO_SIZES,
    VIDEO_TASKS,
    build_dataset,
    heldout_samples,
    motion_query_of,
    read_meta,
    training_sample,
    video_sizes,
)
from tokenloom.world.video import centres, motion_of

CANVASES = ((64, 64), (96, 64), (48, 48), (128, 128))
BLUR = ImageFilter.GaussianBlur(0.6)


def blurred(frames):
    return [f.filter(BLUR) for f in frames]


def motions(seed, n):
    rng = np.random.default_rng(seed)
    return [random_motion(rng, int(rng.integers(2, 17))) for _ in range(n)]


def draw_at(motion, places, width, height):
    """Frames of the motion's object at given centres (one list of (x, y) per frame)."""
    obj = Obj(motion.color, motion.shape, motion.size, motion.start)
    return [draw([(obj, x, y) for x, y in frame], width, height) for frame in places]


# ----------------------------------------------------------------------------- the scorer accepts renders


@pytest.mark.parametrize("width,height", CANVASES)
def test_every_cell_pair_is_right_clean_hard_edged_and_blurred(width, height):
    rng = np.random.default_rng([width, height])
    for a in CELLS:
        for b in CELLS:
            if a == b:
                continue
            color, shape, size = (list(v)[int(rng.integers(len(v)))] for v in (COLORS, SHAPES, SIZES))
            motion = Motion(color, shape, size, a, b, int(rng.integers(2, 17)))
            frames = render_video(motion, width, height)
            assert len(frames) == motion.frames and all(f.size == (width, height) for f in frames)
            query = MotionQuery.from_motion(motion)
            for variant in (frames, blurred(frames), render_video(motion, width, height, antialias=False)):
                assert score_video(variant, query, motion.frames) == {"right": True, "reason": None, "frame": None}
                assert video_right(variant, motion)  # a Motion states its own frame count
                assert video_right(variant, MotionQuery.from_motion(motion, with_size=False), motion.frames)


@pytest.mark.parametrize("width,height", CANVASES)
def test_every_object_and_frame_count_is_right(width, height):
    # every (color, shape, size) and every frame count 2..16 at least once, blurred and not
    objs = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]
    rng = np.random.default_rng([7, width, height])
    for i, (color, shape, size) in enumerate(objs):
        start = CELLS[int(rng.integers(9))]
        end = [c for c in CELLS if c != start][int(rng.integers(8))]
        motion = Motion(color, shape, size, start, end, 2 + i % 15)
        frames = render_video(motion, width, height)
        assert video_right(frames, motion) and video_right(blurred(frames), motion)
        for k in {1, motion.frames // 2, motion.frames - 1}:
            assert frames_right(frames[k:], motion, k) and frames_right(blurred(frames)[k:], motion, k)


def test_parsed_centres_are_the_specs_positions_within_a_pixel():
    # the 0.06 x min(W, H) tolerance is a margin, not what the renderer needs
    for motion in motions(1, 30):
        for width, height in CANVASES:
            frames = render_video(motion, width, height)
            for frame, (x, y) in zip(frames, centres(motion, motion.frames, width, height)):
                (obj,) = parse(frame).objects
                assert (obj.color, obj.shape, obj.size) == (motion.color, motion.shape, motion.size)
                (r,) = find_regions(frame)
                assert abs((r.left + r.right) / 2 - x) <= 1 and abs((r.top + r.bottom) / 2 - y) <= 1
            assert parse(frames[0]) == Scene((Obj(motion.color, motion.shape, motion.size, motion.start),))
            assert parse(frames[-1]) == Scene((Obj(motion.color, motion.shape, motion.size, motion.end),))
    motion = Motion("red", "square", "large", "top left", "bottom right", 5)
    assert np.allclose(centres(motion, 5, 96, 64), [(16 + 16 * k, 32 / 3 * (1 + k)) for k in range(5)])


# ----------------------------------------------------------------------------- the scorer rejects wrong videos


def _reason(frames, query, n_frames=None):
    result = score_video(frames, query, n_frames)
    assert result["right"] is False and result["reason"]
    return result["reason"]


@pytest.mark.parametrize("width,height", CANVASES)
def test_wrong_videos_are_wrong(width, height):
    for motion in motions([2, width, height], 12):
        F = motion.frames
        frames = render_video(motion, width, height)
        query = MotionQuery.from_motion(motion)
        assert video_right(frames, query, F)
        # wrong colour, shape, size (the size only when the caption names it)
        other = [c for c in COLORS if c != motion.color][0]
        assert "shows" in _reason(render_video(Motion(other, motion.shape, motion.size, motion.start, motion.end, F),
                                               width, height), query, F)
        shape = [s for s in SHAPES if s != motion.shape][0]
        assert not video_right(render_video(Motion(motion.color, shape, motion.size, motion.start, motion.end, F),
                                            width, height), query, F)
        size = [z for z in SIZES if z != motion.size][0]
        resized = render_video(Motion(motion.color, motion.shape, size, motion.start, motion.end, F), width, height)
        assert not video_right(resized, query, F)
        assert video_right(resized, MotionQuery.from_motion(motion, with_size=False), F)
        # wrong end cell
        end = [c for c in CELLS if c not in (motion.start, motion.end)][0]
        assert not video_right(render_video(Motion(motion.color, motion.shape, motion.size, motion.start, end, F),
                                            width, height), query, F)
        # reversed, and standing still in cell A
        assert "frame 0" in _reason(frames[::-1], query, F)
        assert not video_right([frames[0]] * F, query, F)
        # a frame dropped, one too many, and a count the caption's task did not ask for
        dropped = frames[:F // 2] + frames[F // 2 + 1:]
        assert "frames, asked for" in _reason(dropped, query, F)
        assert not video_right(dropped, motion)
        assert not video_right(frames + frames[-1:], query, F)
        assert not video_right(frames, query, F + 1) and not video_right(frames[:1], query)
        # one frame shifted by 0.1 x min(W, H), towards the canvas middle so that it stays whole
        places = [[p] for p in centres(motion, F, width, height)]
        k = F // 2
        x, y = places[k][0]
        places[k] = [(x + (0.1 if x < width / 2 else -0.1) * min(width, height), y)]
        result = score_video(draw_at(motion, places, width, height), query, F)
        assert result["right"] is False and result["frame"] == k
        if 0 < k < F - 1:
            assert "from its place" in result["reason"]
        # two objects in one frame
        places = [[p] for p in centres(motion, F, width, height)]
        far = max(CELLS, key=lambda c: np.hypot(*np.subtract(cell_centre(c, width, height), places[k][0])))
        extra = draw([(Obj(other, shape, "small", far), *cell_centre(far, width, height)),
                      (Obj(motion.color, motion.shape, motion.size, motion.start), *places[k][0])], width, height)
        two = frames[:k] + [extra] + frames[k + 1:]
        assert "2 objects" in _reason(two, query, F)
        # frames of two sizes
        assert "one size" in _reason(frames[:-1] + [frames[-1].resize((width + 8, height))], query, F)


def test_frames_right_checks_count_place_and_object():
    motion = Motion("purple", "triangle", "small", "top right", "bottom left", 6)
    frames = render_video(motion)
    for k in range(6):
        assert frames_right(frames[k:], motion, k)
        assert score_frames(frames[k:], motion, k)["right"]
    assert not frames_right(frames[2:], motion, 3)  # one too many
    assert not frames_right(frames[3:], motion, 2)  # one too few
    assert not frames_right(frames[1:5], motion, 2)  # the right count, one frame early each
    assert not frames_right(frames[:1:-1], motion, 2)  # reversed
    large = render_video(Motion("purple", "triangle", "large", "top right", "bottom left", 6))
    assert "shows a large" in score_frames(large[2:], motion, 2)["reason"]
    with pytest.raises(ValueError):
        frames_right(frames, motion, 6)


# ----------------------------------------------------------------------------- motions and text


def test_motion_rules():
    with pytest.raises(ValueError):
        Motion("red", "circle", "small", "top", "top")
    for n in (1, 17):
        with pytest.raises(ValueError):
            Motion("red", "circle", "small", "top", "left", n)
    with pytest.raises(ValueError):
        Motion("pink", "circle", "small", "top", "left")
    rng = np.random.default_rng(0)
    drawn = [random_motion(rng) for _ in range(2000)]
    assert all(m.start != m.end and m.frames == 6 for m in drawn)
    assert {(m.start, m.end) for m in drawn} == {(a, b) for a in CELLS for b in CELLS if a != b}
    assert {m.color for m in drawn} == set(COLORS) and {m.size for m in drawn} == set(SIZES)
    assert random_motion(np.random.default_rng(3), 9) == random_motion(np.random.default_rng(3), 9)
    assert Motion(**drawn[0].to_json()) == drawn[0]


def test_video_frames_is_render_video():
    motion = Motion("green", "circle", "large", "left", "top right", 7)
    a = video_frames(Obj("green", "circle", "large", "center"), "left", "top right", 7, 96, 64)
    b = render_video(motion, 96, 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)) and len(a) == 7


def test_motion_captions_round_trip_for_every_object_and_cell_pair():
    assert motion_caption(Motion("red", "circle", "small", "top left", "center")) == \
        "a small red circle moves from the top left to the center"
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                for a in CELLS:
                    for b in CELLS:
                        if a == b:
                            continue
                        motion = Motion(color, shape, size, a, b)
                        full, bare = motion_caption(motion), motion_caption(motion, with_size=False)
                        assert parse_motion_caption(full) == MotionQuery(color, shape, size, a, b)
                        assert parse_motion_caption(bare) == MotionQuery(color, shape, None, a, b)
                        assert bare == full.replace(f" {size} ", " ", 1)
                        assert motion_caption(parse_motion_caption(bare)) == bare


@pytest.mark.parametrize("text", [
    "a red circle moves from the top to the top",  # A and B must differ
    "a red circle moves to the top",  # a story's change sentence
    "the red circle moves from the top to the left",
    "a small red circle moves from the top left to the center.",
    "A small red circle moves from the top left to the center",
    "a huge red circle moves from the top to the left",
    "a red circle moves from the middle to the left",
    "a small red circle at the top left",  # an image caption
    "",
])
def test_non_motion_captions_are_rejected(text):
    with pytest.raises(ValueError, match="motion caption"):
        parse_motion_caption(text)


def test_video_questions_and_answers():
    motion = Motion("cyan", "square", "large", "bottom", "top right")
    assert video_questions(motion) == [
        ("Where does the cyan square start?", "the bottom"),
        ("Where does the cyan square end up?", "the top right"),
        ("Describe the video.", "a large cyan square moves from the bottom to the top right"),
    ]
    assert video_answer(motion, "Where does the cyan square end up?") == "the top right"
    assert video_answer(motion, "Where does the red square start?") is None
    assert video_answer(motion, "Describe the image.") is None
    # a caption without the size cannot answer "Describe the video." (its answer names the size)
    bare = MotionQuery.from_motion(motion, with_size=False)
    assert [q for q, _ in video_questions(bare)] == [q for q, _ in video_questions(motion)][:2]
    for m in motions(4, 50):
        for question, ans in video_questions(m):
            assert video_answer(m, question) == ans
        assert parse_motion_caption(video_answer(m, "Describe the video.")) == MotionQuery.from_motion(m)


# ----------------------------------------------------------------------------- tasks

N = 30


def samples(task, n=N, seed=0, **kw):
    return [training_sample(task, j, seed, **kw) for j in range(n)]


def video_parts(sample):
    return [p for m in sample.document["messages"] for p in m["content"] if p["type"] == "video"]


def check_video_sample(s):
    """Frames are the motion's render at the declared size, each with its scene; parts index them in order."""
    motion = motion_of(s)
    assert motion.frames == VIDEO_FRAMES and s.size in VIDEO_SIZES
    expected = render_video(motion, *s.size)
    assert [np.asarray(f).tobytes() for f in s.images] == [np.asarray(f).tobytes() for f in expected]
    assert s.scenes == [parse(f) for f in s.images] and len(s.scenes) == VIDEO_FRAMES
    assert s.scenes[0].objects[0].cell == motion.start and s.scenes[-1].objects[0].cell == motion.end
    indices = [k for p in video_parts(s) for k in p["frames"]]
    assert indices == list(range(VIDEO_FRAMES))
    for part in video_parts(s):
        assert set(part) == {"type", "frames", "width", "height"} and (part["width"], part["height"]) == s.size
    assert not any(p["type"] == "image" for m in s.document["messages"] for p in m["content"])
    json.dumps(s.info)


def test_video_tasks_follow_the_image_tasks():
    # a task's place in TASKS is part of its documents' seeds: the image tasks keep theirs
    assert tuple(TASKS)[:5] == IMAGE_TASKS and tuple(TASKS)[5:9] == VIDEO_TASKS


def test_t2v_prompt_is_a_motion_caption_its_video_satisfies():
    variants = set()
    for s in samples("t2v"):
        check_video_sample(s)
        (prompt,), (video,) = s.prompt, s.answer
        assert isinstance(video, Video) and not isinstance(video, Image.Image) and len(video) == VIDEO_FRAMES
        assert prompt == s.info["caption"] == motion_caption(motion_of(s), s.info["with_size"])
        query = motion_query_of(s)
        assert query == parse_motion_caption(prompt) and video_right(video, query, VIDEO_FRAMES)
        variants.add(s.info["with_size"])
    assert variants == {True, False}


def test_video_caption_answer_is_the_full_motion_caption():
    for s in samples("video_caption"):
        check_video_sample(s)
        (video, question), (text,) = s.prompt, s.answer
        assert isinstance(video, Video) and video.frames == s.images and question == "Describe the video."
        assert text == motion_caption(motion_of(s)) == video_answer(motion_of(s), question)
        assert video_right(video, parse_motion_caption(text), VIDEO_FRAMES)


def test_next_frames_answer_continues_the_prompt():
    given = set()
    for s in samples("next_frames"):
        check_video_sample(s)
        (head, text), (tail,) = s.prompt, s.answer
        k = s.info["first_index"]
        given.add(k)
        assert text == CONTINUE_VIDEO and len(head) == k and len(head) + len(tail) == VIDEO_FRAMES
        assert isinstance(head, Video) and isinstance(tail, Video) and head + tail == s.images
        assert frames_right(tail, motion_of(s), k) and not frames_right(tail[1:], motion_of(s), k)
    assert given == set(NEXT_FRAMES_GIVEN)


def test_video_qa_answers_are_right_and_both_kinds_occur():
    kinds = set()
    for s in samples("video_qa"):
        check_video_sample(s)
        (video, question), (ans,) = s.prompt, s.answer
        assert isinstance(video, Video) and question != "Describe the video."
        assert ans == video_answer(motion_of(s), question) == s.info["answer"]
        kinds.add(question.rsplit(" ", 1)[-1])
    assert kinds == {"start?", "up?"}


def _fingerprint(s):
    return json.dumps(s.document) + json.dumps(s.info) + hashlib.sha256(
        b"".join(np.asarray(f).tobytes() for f in s.images)).hexdigest()


def test_video_tasks_are_deterministic_and_keep_heldout_apart():
    for task in VIDEO_TASKS:
        train = [_fingerprint(s) for s in samples(task, 20, seed=5)]
        assert train == [_fingerprint(s) for s in samples(task, 20, seed=5)]
        assert train != [_fingerprint(s) for s in samples(task, 20, seed=6)]
        held = heldout_samples(task, 20, seed=5)
        assert [_fingerprint(s) for s in held] == [_fingerprint(s) for s in heldout_samples(task, 20, seed=5)]
        for s in held:
            check_video_sample(s)
        assert len(set(train)) > 15 and not set(train) & {_fingerprint(s) for s in held}


def test_video_sizes_fit_the_rows():
    assert video_sizes(((64, 64), (96, 64), (64, 96))) == VIDEO_SIZES == ((64, 64),)
    assert video_sizes(((48, 48), (64, 48))) == ((48, 48), (64, 48))
    assert video_sizes(((128, 128),)) == VIDEO_SIZES
    assert all(w * h <= MAX_VIDEO_PIXELS for w, h in VIDEO_SIZES)
    s = training_sample("t2v", 0, sizes=((48, 48),))
    assert s.size == (48, 48) and video_right(s.answer[0], motion_query_of(s), VIDEO_FRAMES)
    # an image task keeps the caller's sizes
    assert training_sample("t2i", 0, sizes=((128, 128),)).size == (128, 128)


def test_build_dataset_writes_video_parts_with_their_frame_files(tmp_path):
    counts = {"t2v": 3, "video_caption": 2, "next_frames": 3, "video_qa": 2, "caption": 2}
    summary = build_dataset(tmp_path, counts, seed=2, progress=False)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    meta = read_meta(tmp_path / "train.meta.jsonl")
    assert len(lines) == len(meta) == sum(counts.values())
    assert summary["video_sizes"] == [list(s) for s in VIDEO_SIZES]
    paths = []
    for line, rec in zip(lines, meta):
        doc = json.loads(line)
        sample = training_sample(rec["task"], rec["index"], seed=2)
        frames = []
        for part in (p for m in doc["messages"] for p in m["content"]):
            if part["type"] == "video":
                assert set(part) == {"type", "frames", "width", "height"} and part["frames"]
                for path in part["frames"]:
                    assert path.startswith("images/train-") and path.endswith(".png")
                    with Image.open(tmp_path / path) as im:
                        assert im.size == (part["width"], part["height"]) and im.mode == "RGB"
                        frames.append(im.convert("RGB"))
                paths += part["frames"]
            elif part["type"] == "image":
                paths.append(part["path"])
        if rec["task"] in VIDEO_TASKS:
            assert [parse(f) for f in frames] == rec["scenes"] == sample.scenes
            assert rec["info"] == sample.info
            assert video_right(frames, Motion(**rec["info"]["motion"]))
            # the video parts are the sample's, indices turned into paths in order
            assert [len(p["frames"]) for p in video_parts(sample)] == \
                   [len(p["frames"]) for m in doc["messages"] for p in m["content"] if p["type"] == "video"]
    assert len(paths) == len(set(paths)) == summary["images"] == len(list((tmp_path / "images").iterdir()))
