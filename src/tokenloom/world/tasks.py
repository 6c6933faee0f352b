"""Shapes-world task builders: training documents in tokenloom's raw JSONL format, and held-out
evaluation samples (spec: shapes-world.md).

One document per line, images as PNG files beside the JSONL:

    {"messages": [{"role": "user", "content": [parts]}, {"role": "assistant", "content": [parts]}]}
    part: {"type": "text", "text": ...} | {"type": "image", "path": "images/train-000123.png",
                                           "width": W, "height": H}
        | {"type": "video", "frames": ["images/train-000124.png", ...], "width": W, "height": H}
        | {"type": "speech", "path": "audio/train-000007.wav"}

Tasks: t2i (caption -> image), caption (image -> caption), qa (image + question -> answer), story
(prompt -> caption, image, change sentence, image, ...), edit (image + instruction -> image); and on
videos (spec "Videos", world/video.py): t2v (motion caption -> video), video_caption (video -> motion
caption), next_frames (the first 2 or 3 frames -> the rest), video_qa (video + start/end question -> answer);
and with speech (`speech_tasks`, registered here by `register_tasks`): asr, tts, spoken_qa, speech_t2i.
`build_dataset` also writes `<split>.meta.jsonl`: per line the task, the scene of every image and
the facts the document states, so a dataset can be checked without re-deriving anything.

Seeds. Document j of a task is drawn from its own generator, seeded by (stream, seed, task, j):
the training stream for `build_dataset`, the held-out stream for `heldout_samples`. The streams
are disjoint, so no held-out sample is a training sample's draw; but the scene space is finite
(324 one-object scenes), so equal scenes and prompts can still occur in both. `count_seen`
measures that overlap for a given training set instead of hiding it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import audio_io
from .parse import SceneQuery, parse
from .phrase import caption, change_sentence, edit_instruction, parse_caption, questions
from .render import draw, place
from .scene import JITTER, Change, Obj, Scene, apply_change, random_change, random_scene
from .video import (DESCRIBE_VIDEO, Motion, MotionQuery, Video, motion_caption, parse_motion_caption, random_motion,
                    render_video, video_questions)

Size = tuple[int, int]  # (width, height)
DEFAULT_SIZES: tuple[Size, ...] = ((64, 64), (96, 64), (64, 96))  # multiples of 8: whole VQ grids

# SeedSequence entropy tags; see the module docstring
TRAIN_STREAM, HELDOUT_STREAM, ORDER_STREAM = 0x5EED1, 0x5EED2, 0x5EED3

# t2i prompt variants (with size words, with locations) and their weights: mostly the full caption,
# the leaner variants often enough that the model learns what a left-out word leaves open
T2I_VARIANTS: tuple[tuple[bool, bool], ...] = ((True, True), (False, True), (True, False), (False, False))
T2I_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
DESCRIBE = "Describe the image."
# the spec's questions by kind (its first words); "Describe the image." belongs to the caption task
QUESTION_KINDS = {"count": "How many", "color": "What color", "shape": "What shape", "where": "Where is"}
TELL_A_STORY = "Tell a story."
# A story that opens from a given caption says so: a bare caption is a t2i prompt, whose answer ends
# after one image, and t2i documents outnumber stories, so a bare caption taught stories to stop early.
STORY_FROM = "Tell a story that starts with: "
STORY_CHANGES = (1, 2)  # changes per story

# Video tasks draw one frame size per sample from VIDEO_SIZES, or from the caller's sizes when every one
# of them is at most MAX_VIDEO_PIXELS: a 6-frame 64x64 video takes 6 x 76 + 3 = 459 tokens in the
# unirep layout, and the engine's rows are 512 tokens, so the image sizes (96x64...) would not fit.
VIDEO_SIZES: tuple[Size, ...] = ((64, 64),)
MAX_VIDEO_PIXELS = 64 * 64
VIDEO_FRAMES = 6
T2V_WITH_SIZE = 0.6  # share of t2v prompts that name the size: t2i's share (0.4 + 0.2)
NEXT_FRAMES_GIVEN = (2, 3)  # frames shown in a next_frames prompt
CONTINUE_VIDEO = "Continue the video."


# ----------------------------------------------------------------------------- samples


@dataclass
class TaskSample:
    """One document with its images, before writing. Image parts hold `"image": k`, an index into
    `images`, and video parts `"frames": [k0, k1, ...]`, until `build_dataset` replaces them with the
    files' paths. A video's frames are images too, one scene each."""

    task: str
    document: dict[str, Any]
    images: list[Image.Image]
    scenes: list[Scene]  # the scene of each image, in order
    info: dict[str, Any] = field(default_factory=dict)  # what the text states, JSON-able
    audio: list[np.ndarray] = field(default_factory=list)  # utterances (float32, 16 kHz); speech parts index them

    def _parts(self, role: str) -> list[str | Image.Image | Video | audio_io.Audio]:
        msg = next(m for m in self.document["messages"] if m["role"] == role)
        return [self._part(p) for p in msg["content"]]

    def _part(self, part: dict[str, Any]) -> str | Image.Image | Video | audio_io.Audio:
        if part["type"] == "text":
            return part["text"]
        if part["type"] == "video":
            return Video(self.images[k] for k in part["frames"])
        if part["type"] == "speech":
            return audio_io.Audio(self.audio[part["audio"]])
        return self.images[part["image"]]

    @property
    def prompt(self) -> list[str | Image.Image | Video | audio_io.Audio]:
        """The user turn as strings, PIL images, Videos (lists of PIL frames) and Audio: what an
        evaluation feeds the model."""
        return self._parts("user")

    @property
    def answer(self) -> list[str | Image.Image | Video | audio_io.Audio]:
        """The assistant turn, likewise: the reference answer."""
        return self._parts("assistant")

    @property
    def size(self) -> Size:
        """(width, height) of the sample's images."""
        return self.images[0].size


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(k: int, size: Size) -> dict[str, Any]:
    return {"type": "image", "image": k, "width": size[0], "height": size[1]}


def video_part(frames: Sequence[int], size: Size) -> dict[str, Any]:
    return {"type": "video", "frames": list(frames), "width": size[0], "height": size[1]}


def chat_document(user: list[dict], assistant: list[dict]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def scene_to_json(scene: Scene) -> list[dict[str, str]]:
    return [{"color": o.color, "shape": o.shape, "size": o.size, "cell": o.cell} for o in scene.objects]


def scene_from_json(data: Iterable[Mapping[str, str]]) -> Scene:
    return Scene(tuple(Obj(**o) for o in data))


def change_to_json(change: Change) -> dict[str, str]:
    return {k: v for k, v in vars(change).items() if v is not None}


# ----------------------------------------------------------------------------- steady rendering

Offsets = dict[tuple[str, str], tuple[float, float]]  # (color, shape) -> jitter (dx, dy), fractions of W, H


def _draw_offsets(rng: np.random.Generator, scene: Scene, offsets: Offsets | None = None) -> Offsets:
    """A jitter for every object of `scene` that has none yet (reading order, two draws each)."""
    offsets = dict(offsets or {})
    for obj in scene.objects:
        if obj.key not in offsets:
            dx, dy = rng.uniform(-JITTER, JITTER, size=2)
            offsets[obj.key] = (float(dx), float(dy))
    return offsets


def _carry_offsets(offsets: Offsets, change: Change) -> Offsets:
    """Offsets after a change: a moved or recolored object keeps its own, a removed one drops it."""
    out = dict(offsets)
    key = (change.color, change.shape)
    if change.kind == "remove":
        out.pop(key, None)
    elif change.kind == "recolor":
        out[(change.new_color, change.shape)] = out.pop(key)
    return out


def render_steady(scene: Scene, offsets: Offsets, width: int, height: int) -> Image.Image:
    """Like `render(scene, rng=...)`, but with each object's jitter given by its name, so that the
    objects a change leaves alone do not wiggle between a story's (or an edit's) images."""
    return draw([place(obj, *offsets[obj.key], width, height) for obj in scene.objects], width, height)


def _pick_size(rng: np.random.Generator, sizes: Sequence[Size]) -> Size:
    w, h = sizes[int(rng.integers(len(sizes)))]
    return int(w), int(h)


def scene_image(rng: np.random.Generator, sizes: Sequence[Size]) -> tuple[Scene, Image.Image, Size]:
    scene = random_scene(rng)
    size = _pick_size(rng, sizes)
    return scene, render_steady(scene, _draw_offsets(rng, scene), *size), size


# ----------------------------------------------------------------------------- tasks


def t2i_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: a caption (size words and locations each possibly left out) -> assistant: the image.
    The prompt is the caption only; the pipeline adds the resolution wording from the image part."""
    scene, image, size = scene_image(rng, sizes)
    with_size, with_location = T2I_VARIANTS[int(rng.choice(len(T2I_VARIANTS), p=T2I_WEIGHTS))]
    text = caption(scene, with_size=with_size, with_location=with_location)
    return TaskSample("t2i", chat_document([text_part(text)], [image_part(0, size)]), [image], [scene],
                      {"caption": text, "with_size": with_size, "with_location": with_location})


def caption_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: image + "Describe the image." -> assistant: the canonical caption."""
    scene, image, size = scene_image(rng, sizes)
    text = caption(scene)
    return TaskSample("caption", chat_document([image_part(0, size), text_part(DESCRIBE)], [text_part(text)]), [image], [scene],
                      {"question": DESCRIBE, "answer": text})


def pick_question(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """One of the spec's questions about the scene with its answer: the kind (count, color, shape, where)
    drawn first, so scenes with many color questions do not drown the rest."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for q, a in questions(scene):
        kind = next((k for k, prefix in QUESTION_KINDS.items() if q.startswith(prefix)), None)
        if kind is not None:
            by_kind.setdefault(kind, []).append((q, a))
    kinds = [k for k in QUESTION_KINDS if k in by_kind]
    options = by_kind[kinds[int(rng.integers(len(kinds)))]]
    return options[int(rng.integers(len(options)))]


def qa_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: image + a question of the spec -> assistant: its answer. The question kind (count,
    color, shape, where) is drawn first, so scenes with many color questions do not drown the rest;
    "Describe the image." is left to the caption task."""
    scene, image, size = scene_image(rng, sizes)
    question, answer = pick_question(rng, scene)
    return TaskSample("qa", chat_document([image_part(0, size), text_part(question)], [text_part(answer)]), [image], [scene],
                      {"question": question, "answer": answer})


def story_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: "Tell a story." or STORY_FROM + the first caption -> assistant: [first caption,] image, then per
    change (1 or 2) its sentence and the image after it. Unchanged objects keep their positions."""
    scene = random_scene(rng)
    size = _pick_size(rng, sizes)
    offsets = _draw_offsets(rng, scene)
    scenes, images = [scene], [render_steady(scene, offsets, *size)]
    sentences, changes = [], []
    for _ in range(STORY_CHANGES[int(rng.integers(len(STORY_CHANGES)))]):
        change = random_change(rng, scene)
        scene = apply_change(scene, change)
        offsets = _draw_offsets(rng, scene, _carry_offsets(offsets, change))
        scenes.append(scene)
        images.append(render_steady(scene, offsets, *size))
        sentences.append(change_sentence(change))
        changes.append(change_to_json(change))
    first = caption(scenes[0])
    told = bool(rng.integers(2))  # True: the user only asks, and the answer opens with the caption
    user = [text_part(TELL_A_STORY if told else STORY_FROM + first)]
    answer = ([text_part(first)] if told else []) + [image_part(0, size)]
    for k, sentence in enumerate(sentences, start=1):
        answer += [text_part(sentence), image_part(k, size)]
    return TaskSample("story", chat_document(user, answer), images, scenes,
                      {"caption": first, "sentences": sentences, "changes": changes, "prompt": user[0]["text"]})


def edit_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: image + an editing instruction -> assistant: the image after the change, in which the
    objects the change leaves alone sit exactly where they were."""
    before = random_scene(rng)
    size = _pick_size(rng, sizes)
    offsets = _draw_offsets(rng, before)
    change = random_change(rng, before)
    after = apply_change(before, change)
    after_offsets = _draw_offsets(rng, after, _carry_offsets(offsets, change))
    images = [render_steady(before, offsets, *size), render_steady(after, after_offsets, *size)]
    instruction = edit_instruction(change)
    return TaskSample("edit", chat_document([image_part(0, size), text_part(instruction)], [image_part(1, size)]), images,
                      [before, after], {"instruction": instruction, "change": change_to_json(change)})


# ----------------------------------------------------------------------------- video tasks


def video_sizes(sizes: Sequence[Size]) -> tuple[Size, ...]:
    """The frame sizes video tasks draw from: the caller's when all fit (see VIDEO_SIZES), else VIDEO_SIZES."""
    sizes = tuple((int(w), int(h)) for w, h in sizes)
    return sizes if sizes and all(w * h <= MAX_VIDEO_PIXELS for w, h in sizes) else VIDEO_SIZES


def _motion_video(rng: np.random.Generator, sizes: Sequence[Size]) -> tuple[Motion, list[Image.Image], list, Size]:
    """A random VIDEO_FRAMES-frame motion, its frames at a drawn size and each frame's scene. The scenes
    are the frames' parses: between cell centres, the cell an object is "in" is the one its parsed
    centre falls in, which only the parse decides when the centre is on a cell border."""
    motion = random_motion(rng, VIDEO_FRAMES)
    size = _pick_size(rng, video_sizes(sizes))
    frames = render_video(motion, *size)
    return motion, frames, [parse(f) for f in frames], size


def t2v_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: a motion caption (the size word sometimes left out) -> assistant: the video."""
    motion, frames, scenes, size = _motion_video(rng, sizes)
    with_size = bool(rng.random() < T2V_WITH_SIZE)
    text = motion_caption(motion, with_size)
    return TaskSample("t2v", chat_document([text_part(text)], [video_part(range(len(frames)), size)]), frames, scenes,
                      {"motion": motion.to_json(), "caption": text, "with_size": with_size})


def video_caption_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: video + "Describe the video." -> assistant: the motion caption, size included."""
    motion, frames, scenes, size = _motion_video(rng, sizes)
    text = motion_caption(motion)
    return TaskSample("video_caption", chat_document([video_part(range(len(frames)), size), text_part(DESCRIBE_VIDEO)],
                                             [text_part(text)]), frames, scenes,
                      {"motion": motion.to_json(), "question": DESCRIBE_VIDEO, "answer": text})


def next_frames_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: the first k frames (k = 2 or 3) + "Continue the video." -> assistant: the other frames."""
    motion, frames, scenes, size = _motion_video(rng, sizes)
    k = NEXT_FRAMES_GIVEN[int(rng.integers(len(NEXT_FRAMES_GIVEN)))]
    user = [video_part(range(k), size), text_part(CONTINUE_VIDEO)]
    return TaskSample("next_frames", chat_document(user, [video_part(range(k, len(frames)), size)]), frames, scenes,
                      {"motion": motion.to_json(), "first_index": k})


def video_qa_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """user: video + where the object starts or ends up -> assistant: `the {cell}`. "Describe the
    video." is left to video_caption, as qa leaves "Describe the image." to caption."""
    motion, frames, scenes, size = _motion_video(rng, sizes)
    options = [(q, a) for q, a in video_questions(motion) if q != DESCRIBE_VIDEO]
    question, answer = options[int(rng.integers(len(options)))]
    return TaskSample("video_qa", chat_document([video_part(range(len(frames)), size), text_part(question)], [text_part(answer)]),
                      frames, scenes, {"motion": motion.to_json(), "question": question, "answer": answer})


def motion_query_of(sample: TaskSample) -> MotionQuery:
    """What a t2v sample's prompt asks for: score generated frames with
    `video_right(frames, motion_query_of(sample), motion_of(sample).frames)`."""
    return parse_motion_caption(sample.info["caption"])


TASKS: dict[str, Callable[..., TaskSample]] = {
    "t2i": t2i_sample, "caption": caption_sample, "qa": qa_sample, "story": story_sample, "edit": edit_sample,
    # appended: a task's place here is part of its documents' seeds
    "t2v": t2v_sample, "video_caption": video_caption_sample, "next_frames": next_frames_sample,
    "video_qa": video_qa_sample,
}
IMAGE_TASKS: tuple[str, ...] = ("t2i", "caption", "qa", "story", "edit")
VIDEO_TASKS: tuple[str, ...] = ("t2v", "video_caption", "next_frames", "video_qa")
_TASK_IDS = {name: i for i, name in enumerate(TASKS)}  # part of every document's seed: keep the order
SPEECH_TASK_NAMES: set[str] = set()  # tasks whose builders take held_out= (their voices)


def register_tasks(tasks: Mapping[str, Callable[..., TaskSample]], *, speech: bool = False) -> None:
    """Append tasks to the table (a module of tasks above this one: `speech_tasks`, which needs the
    speech renderer that itself reads this module's prompts). Appending keeps every earlier task's
    seeds; `speech` tasks are given `held_out=` so their voices follow the seed stream."""
    for name, build in tasks.items():
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = build
        _TASK_IDS[name] = len(_TASK_IDS)
        if speech:
            SPEECH_TASK_NAMES.add(name)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def _sample(stream: int, task: str, seed: int, j: int, sizes: Sequence[Size]) -> TaskSample:
    _check_task(task)
    rng = np.random.default_rng([stream, seed, _TASK_IDS[task], j])
    if task in SPEECH_TASK_NAMES:
        return TASKS[task](rng, sizes, held_out=stream == HELDOUT_STREAM)
    return TASKS[task](rng, sizes)


def training_sample(task: str, j: int, seed: int = 0, sizes: Sequence[Size] = DEFAULT_SIZES) -> TaskSample:
    """Document j of `task` in the training stream: what `build_dataset(seed=seed)` writes for it."""
    return _sample(TRAIN_STREAM, task, seed, j, sizes)


def heldout_samples(task: str, n: int, seed: int = 0, sizes: Sequence[Size] = DEFAULT_SIZES) -> list[TaskSample]:
    """n evaluation samples of `task` from the held-out seed stream (see the module docstring).

    Each sample carries the scene(s) (`scenes`), the prompt (`prompt`: strings, PIL images and Videos)
    and the expected answer (`answer`, and in `info` the facts to score with: for t2i the caption, to
    check with `parse_caption` + `matches`; for edit the change, `scenes[1]` being the target; for the
    video tasks the motion (`motion_of`), to check with `video_right` or, for next_frames from
    `info["first_index"]`, `frames_right`). Video tasks take their frame size from `video_sizes(sizes)`."""
    return [_sample(HELDOUT_STREAM, task, seed, j, sizes) for j in range(n)]


# ----------------------------------------------------------------------------- writing


def _document_order(counts: Mapping[str, int], seed: int) -> list[tuple[str, int]]:
    """(task, j) for every document, tasks interleaved in a seeded random order."""
    order = [(task, j) for task, n in counts.items() for j in range(n)]
    perm = np.random.default_rng([ORDER_STREAM, seed]).permutation(len(order))
    return [order[i] for i in perm]


def build_dataset(out_dir: str | os.PathLike, counts: Mapping[str, int], seed: int = 0,
                  sizes: Sequence[Size] = DEFAULT_SIZES, *, split: str = "train",
                  progress: bool = True) -> dict[str, Any]:
    """Write `out_dir/<split>.jsonl`, `out_dir/<split>.meta.jsonl` and the PNGs under
    `out_dir/images/` (named `<split>-NNNNNN.png`, so splits can share a folder).

    counts: documents per task, e.g. {"t2i": 1000, "caption": 500}. Deterministic in (counts, seed,
    sizes); document j of a task does not depend on the other tasks' counts. Video tasks draw their
    frame size from `video_sizes(sizes)` and write each frame as a PNG. The JSONL files appear under
    their final names only once complete. Returns a summary."""
    for task, n in counts.items():
        _check_task(task)
        if int(n) < 0:
            raise ValueError(f"count for {task!r} must be >= 0, got {n}")
    if not sizes:
        raise ValueError("sizes must name at least one (width, height)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if any(t in SPEECH_TASK_NAMES and int(n) for t, n in counts.items()):
        (out / "audio").mkdir(exist_ok=True)
    from tqdm.auto import tqdm

    paths = {name: out / f"{split}{suffix}" for name, suffix in (("docs", ".jsonl"), ("meta", ".meta.jsonl"))}
    tmp = {name: p.with_name(p.name + ".tmp") for name, p in paths.items()}
    n_images = n_audio = 0
    order = _document_order({t: int(n) for t, n in counts.items()}, seed)
    with open(tmp["docs"], "w", encoding="utf-8") as docs, open(tmp["meta"], "w", encoding="utf-8") as meta:
        for task, j in tqdm(order, desc=f"{split} documents", unit="doc", disable=not progress):
            sample = training_sample(task, j, seed, sizes)
            names = []
            for image in sample.images:
                name = f"images/{split}-{n_images:06d}.png"
                image.save(out / name, format="PNG")
                names.append(name)
                n_images += 1
            audio_names = []
            for samples in sample.audio:
                name = f"audio/{split}-{n_audio:06d}.wav"
                audio_io.write_audio(out / name, samples)
                audio_names.append(name)
                n_audio += 1
            docs.write(json.dumps(_with_paths(sample.document, names, audio_names)) + "\n")
            meta.write(json.dumps({"task": task, "index": j, "scenes": [scene_to_json(s) for s in sample.scenes],
                                   "info": sample.info}) + "\n")
    for name in ("meta", "docs"):  # the documents last: their presence means the set is complete
        os.replace(tmp[name], paths[name])
    return {"path": str(paths["docs"]), "documents": len(order), "images": n_images, "utterances": n_audio,
            "counts": {t: int(n) for t, n in counts.items()}, "seed": seed, "sizes": [list(s) for s in sizes],
            "video_sizes": [list(s) for s in video_sizes(sizes)]}


def _with_paths(document: dict[str, Any], names: list[str], audio_names: Sequence[str] = ()) -> dict[str, Any]:
    """The document with each image part's index, each video part's frame indices and each speech part's
    utterance index replaced by file paths."""
    messages = []
    for msg in document["messages"]:
        content = []
        for part in msg["content"]:
            if part["type"] == "image":
                part = {"type": "image", "path": names[part["image"]], "width": part["width"],
                        "height": part["height"]}
            elif part["type"] == "video":
                part = {"type": "video", "frames": [names[k] for k in part["frames"]], "width": part["width"],
                        "height": part["height"]}
            elif part["type"] == "speech":
                part = {"type": "speech", "path": audio_names[part["audio"]]}
            content.append(part)
        messages.append({"role": msg["role"], "content": content})
    return {"messages": messages}


def read_meta(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `<split>.meta.jsonl`, scenes as Scene objects."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            rec["scenes"] = [scene_from_json(s) for s in rec["scenes"]]
            records.append(rec)
    return records


def count_seen(samples: Sequence[TaskSample], meta_path: str | os.PathLike) -> dict[str, int]:
    """How many held-out samples share their first scene (`scene_seen`), or all the facts their text
    states (`info_seen`: caption, question and answer, change...), with some document of a training
    set (its `<split>.meta.jsonl`). Distinct seed streams do not prevent either."""
    seen_scenes: set[Scene] = set()
    seen_info: set[tuple[str, str]] = set()
    for rec in read_meta(meta_path):
        seen_scenes.update(rec["scenes"][:1])
        seen_info.add((rec["task"], json.dumps(rec["info"], sort_keys=True)))
    return {
        "samples": len(samples),
        "scene_seen": sum(s.scenes[0] in seen_scenes for s in samples),
        "info_seen": sum((s.task, json.dumps(s.info, sort_keys=True)) in seen_info for s in samples),
    }


def query_of(sample: TaskSample) -> SceneQuery:
    """What a t2i sample's prompt asks for: score a generated image with `matches(parse(img), query)`."""
    return parse_caption(sample.info["caption"])
