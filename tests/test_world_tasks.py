"""Shapes-world task builders: every document must be right per shapes-world.md, checked by parsing
its text and its images back, and the builder must be deterministic and keep held-out apart."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tokenloom.world import (
    answer,
    apply_change,
    caption,
    find_regions,
    matches,
    parse,
    parse_caption,
    parse_change_sentence,
    parse_edit_instruction,
    random_scene,
    render,
)
from tokenloom.world.tasks import (
    DEFAULT_SIZES,
    DESCRIBE,
    QUESTION_KINDS,
    STORY_FROM,
    TASKS,
    TELL_A_STORY,
    _draw_offsets,
    build_dataset,
    count_seen,
    heldout_samples,
    query_of,
    read_meta,
    render_steady,
    training_sample,
)

N = 40  # samples per task in the per-sample checks
COUNTS = {"t2i": 12, "caption": 6, "qa": 6, "story": 6, "edit": 6}


def samples(task, n=N, seed=0):
    return [training_sample(task, j, seed) for j in range(n)]


def texts(parts):
    return [p for p in parts if isinstance(p, str)]


def check_images(sample):
    """Images exist per image part, match its declared size, and parse back to their scenes."""
    parts = [p for m in sample.document["messages"] for p in m["content"] if p["type"] == "image"]
    assert [p["image"] for p in parts] == list(range(len(sample.images)))
    assert len(sample.scenes) == len(sample.images)
    for part, image, scene in zip(parts, sample.images, sample.scenes):
        assert image.size == (part["width"], part["height"]) and image.size in DEFAULT_SIZES
        assert parse(image) == scene


def test_t2i_prompt_is_a_caption_the_image_satisfies():
    variants = set()
    for s in samples("t2i"):
        check_images(s)
        (prompt,), (image,) = s.prompt, s.answer
        assert isinstance(image, Image.Image)
        query = parse_caption(prompt)
        assert query == query_of(s)
        assert matches(parse(image), query)
        assert prompt == caption(s.scenes[0], s.info["with_size"], s.info["with_location"])
        variants.add((s.info["with_size"], s.info["with_location"]))
    assert variants == {(True, True), (True, False), (False, True), (False, False)}


def test_caption_answer_is_the_canonical_caption():
    for s in samples("caption"):
        check_images(s)
        assert texts(s.prompt) == [DESCRIBE] and isinstance(s.prompt[0], Image.Image)
        (text,) = s.answer
        assert text == caption(s.scenes[0])
        assert matches(s.scenes[0], parse_caption(text))  # names size and cell of every object


def test_qa_answers_are_right_and_all_kinds_occur():
    kinds = set()
    for s in samples("qa", 80):
        check_images(s)
        (question,), (ans,) = texts(s.prompt), s.answer
        assert question != DESCRIBE
        assert ans == answer(s.scenes[0], question)
        kinds |= {k for k, prefix in QUESTION_KINDS.items() if question.startswith(prefix)}
    assert kinds == set(QUESTION_KINDS)


def test_story_sentences_follow_the_scene_sequence():
    prompts, lengths = set(), set()
    for s in samples("story"):
        check_images(s)
        scenes, (user,) = s.scenes, s.prompt
        parts = s.answer
        if user == TELL_A_STORY:
            assert parts[0] == caption(scenes[0])
            parts = parts[1:]
        else:
            # never a bare caption: that is a t2i prompt, whose answer is a single image
            assert user == STORY_FROM + caption(scenes[0])
        prompts.add(user == TELL_A_STORY)
        # image, then (sentence, image) per change: text and images alternate
        assert isinstance(parts[0], Image.Image)
        sentences = parts[1::2]
        assert all(isinstance(p, str) for p in sentences)
        assert all(isinstance(p, Image.Image) for p in parts[2::2])
        assert len(parts) == 2 * len(sentences) + 1 == 2 * len(scenes) - 1
        lengths.add(len(sentences))
        for before, sentence, after in zip(scenes, sentences, scenes[1:]):
            assert apply_change(before, parse_change_sentence(sentence)) == after
    assert prompts == {True, False} and lengths == {1, 2}


def _boxes(image):
    return {(r.top, r.left, r.bottom, r.right) for r in find_regions(image)}


def test_edit_target_is_apply_change_and_untouched_objects_stay_put():
    kinds = set()
    for s in samples("edit"):
        check_images(s)
        (instruction,) = texts(s.prompt)
        change = parse_edit_instruction(instruction)
        kinds.add(change.kind)
        before, after = s.scenes
        assert apply_change(before, change) == after
        assert s.prompt[0] is s.images[0] and s.answer == [s.images[1]]
        # objects the change does not touch keep their exact pixels' bounding boxes
        untouched = len(before) - (change.kind != "add")
        if change.kind == "recolor":
            untouched += 1  # recoloring keeps the shape's box too
        assert len(_boxes(s.images[0]) & _boxes(s.images[1])) == untouched
    assert kinds == {"move", "recolor", "add", "remove"}


def test_steady_rendering_is_the_worlds_render():
    # render_steady re-implements render's placement with named jitters; they must agree
    for i in range(50):
        scene = random_scene(np.random.default_rng([7, i]))
        size = DEFAULT_SIZES[i % len(DEFAULT_SIZES)]
        a = render(scene, *size, rng=np.random.default_rng(i))
        b = render_steady(scene, _draw_offsets(np.random.default_rng(i), scene), *size)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    summary = build_dataset(out, COUNTS, seed=3, progress=False)
    return out, summary


def test_build_dataset_writes_valid_documents(dataset):
    out, summary = dataset
    lines = (out / "train.jsonl").read_text().splitlines()
    meta = read_meta(out / "train.meta.jsonl")
    assert len(lines) == len(meta) == sum(COUNTS.values()) == summary["documents"]
    assert {t: sum(m["task"] == t for m in meta) for t in COUNTS} == COUNTS
    assert not list(out.glob("*.tmp"))
    n_images = 0
    for line, rec in zip(lines, meta):
        doc = json.loads(line)
        assert list(doc) == ["messages"] and [m["role"] for m in doc["messages"]] == ["user", "assistant"]
        images = []
        for part in (p for m in doc["messages"] for p in m["content"]):
            if part["type"] == "text":
                assert set(part) == {"type", "text"} and part["text"]
            else:
                assert set(part) == {"type", "path", "width", "height"}
                assert part["path"].startswith("images/") and part["path"].endswith(".png")
                with Image.open(out / part["path"]) as im:
                    assert im.size == (part["width"], part["height"]) and im.mode == "RGB"
                    images.append(im.convert("RGB"))
        assert [parse(im) for im in images] == rec["scenes"]
        # the written document is exactly the sample's, with indices turned into paths
        sample = training_sample(rec["task"], rec["index"], seed=3)
        assert [p.get("text") for m in doc["messages"] for p in m["content"]] == \
               [p.get("text") for m in sample.document["messages"] for p in m["content"]]
        n_images += len(images)
    assert n_images == summary["images"] == len(list((out / "images").iterdir()))


def test_build_dataset_is_deterministic_per_seed(dataset, tmp_path):
    out, _ = dataset
    build_dataset(tmp_path / "same", COUNTS, seed=3, progress=False)
    build_dataset(tmp_path / "other", COUNTS, seed=4, progress=False)
    assert _digest(tmp_path / "same") == _digest(out)
    assert _digest(tmp_path / "other") != _digest(out)
    # a task's documents do not depend on how many of the other tasks there are
    build_dataset(tmp_path / "fewer", {"t2i": 12}, seed=3, progress=False)
    mine = [r["info"] for r in read_meta(out / "train.meta.jsonl") if r["task"] == "t2i"]
    theirs = [r["info"] for r in read_meta(tmp_path / "fewer" / "train.meta.jsonl")]
    assert sorted(map(json.dumps, mine)) == sorted(map(json.dumps, theirs))


def test_heldout_samples_differ_from_training(dataset):
    out, _ = dataset
    for task, n in COUNTS.items():
        held = heldout_samples(task, n, seed=3)
        train = samples(task, n, seed=3)
        assert all(s.task == task for s in held)
        for s in held:
            check_images(s)
        held_docs = [json.dumps(s.document) + json.dumps([np.asarray(i).tobytes().hex() for i in s.images])
                     for s in held]
        train_docs = {json.dumps(s.document) + json.dumps([np.asarray(i).tobytes().hex() for i in s.images])
                      for s in train}
        assert not any(d in train_docs for d in held_docs)
        # same call, same samples
        again = heldout_samples(task, n, seed=3)
        assert [s.info for s in again] == [s.info for s in held]
    seen = count_seen(heldout_samples("t2i", 50, seed=3), out / "train.meta.jsonl")
    assert seen["samples"] == 50 and 0 <= seen["info_seen"] <= seen["samples"]
    assert 0 <= seen["scene_seen"] <= seen["samples"]


def test_count_seen_finds_training_scenes(dataset):
    out, _ = dataset
    own = [training_sample("caption", j, seed=3) for j in range(COUNTS["caption"])]
    assert count_seen(own, out / "train.meta.jsonl") == {"samples": 6, "scene_seen": 6, "info_seen": 6}


def test_unknown_task_and_bad_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        build_dataset(tmp_path, {"video": 1}, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        build_dataset(tmp_path, {"t2i": -1}, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        heldout_samples("nope", 1)
    assert list(TASKS) == ["t2i", "caption", "qa", "story", "edit", "t2v", "video_caption", "next_frames", "video_qa",
                           "asr", "tts", "spoken_qa", "speech_t2i"]  # the order is part of every document's seed
