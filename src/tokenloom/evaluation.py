"""Exact, reproducible quality numbers on the shapes world.

Every sample comes from the held-out seed stream of `tokenloom.world.tasks`; every generated image
is parsed back into a scene (the spec's parse), so scores are exact matches, not model judgements.

    tokenloom eval [--model DIR] --out DIR [--n 200] [--tasks t2i,caption,qa,story,edit,t2v,...]

writes report.json, summary.md, samples.png (t2i prompts' images, green border = right), edits.png
(per edit: source, drawn, target) and, for a model with video tokens, videos-<task>.png (one row of
frames per video: `tokenloom.video_evaluation`) and, for a model with speech, speech/ (its tts
utterances: `tokenloom.speech_evaluation`). The default tasks are every task the model can express:
the video tasks only where it has video tokens, the speech tasks only where it has speech codes and a
speech codec.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image

from .document import TextPart
from .evaluation_parts import border, framed, sample_document, shares, tally
from .report import image_grid
from .speech_evaluation import SPEECH_TASKS, eval_tts
from .video_evaluation import VIDEO_TASKS, eval_next_frames, eval_t2v, video_question_kind, videos_grid
from .world import apply_change, matches, parse, parse_caption, parse_change_sentence
from .world.tasks import QUESTION_KINDS, TASKS, TELL_A_STORY, heldout_samples, query_of

MAX_SAMPLES = 5000
STORY_TEXT_SAMPLING = {"temperature": 1.0}
STORY_MODALITIES = ("text", "image")  # a story is told in these, also by a model that has grown video or speech
# Edits draw unguided whatever --guidance-scale says: the source image is their context, and neither
# two-way nor three-way (image-only) guidance drew more right edits from shapes-tiny (stage 8).
EDIT_GUIDANCE_SCALE = 1.0
EDITS_SHOWN = 16  # edits drawn in edits.png
FRAME = (190, 190, 190)  # border of the source and target images there
BREAKDOWN_TITLES = {
    "t2i": ("Text-to-image breakdown:", "exact"),
    "caption": ("Captions by number of objects:", "exact"),
    "qa": ("Questions by kind:", "right"),
    "story": ("Story images by place in the story (a story that drew too few counts the rest wrong):", "right"),
    "edit": ("Edit breakdown (kind_*: right; kept_rest: the objects the change leaves alone drawn as they were; "
             "unchanged: the source redrawn as it was):", "share"),
    "t2v": ("Text-to-video breakdown:", "share"),
    "next_frames": ("Next frames by frames given:", "right"),
    "video_caption": ("Video captions:", "exact"),
    "video_qa": ("Video questions by kind:", "right"),
    "asr": ("Transcriptions by number of objects:", "exact"),
    "spoken_qa": ("Spoken questions by kind:", "right"),
    "speech_t2i": ("Speech-to-image breakdown:", "exact"),
    "tts": ("Text to speech: the recogniser's rate on espeak-ng's renders of the same texts (its ceiling), on "
            "those renders through the model's codec, and the model's share of the first:", "rate"),
}


def can_speak(pipe) -> bool:
    return pipe.vocab.has_speech and pipe.speech_tokenizer is not None


def default_tasks(pipe) -> tuple[str, ...]:
    """Every task the model can express: the video ones only with video tokens, the speech ones only
    with speech codes and a codec."""
    return tuple(t for t in TASKS if (t not in VIDEO_TASKS or pipe.vocab.has_video)
                 and (t not in SPEECH_TASKS or can_speak(pipe)))


def _grid_size(pipe, sample):
    w, h = sample.size
    return pipe.grid_size(w, h)


def eval_t2i(pipe, samples, batch_size, progress, seed):
    by_size = defaultdict(list)
    for i, s in enumerate(samples):
        by_size[s.size].append(i)
    images = [None] * len(samples)
    for (w, h), idx in by_size.items():
        prompts = [samples[i].info["caption"] for i in idx]
        outs = pipe.generate_images(prompts, width=w, height=h, seed=seed, batch_size=batch_size, progress=progress)
        for i, im in zip(idx, outs):
            images[i] = im
    return score_t2i(samples, images)


def eval_speech_t2i(pipe, samples, batch_size, progress, seed):
    """Draw what you hear: a spoken caption -> an image, scored as text-to-image is."""
    requests = [pipe.chat_request(sample_document(pipe, s), mode="image", seed=seed * MAX_SAMPLES + i,
                                  image_size=_grid_size(pipe, s)) for i, s in enumerate(samples)]
    results = pipe.run_batched(requests, batch_size, progress=progress, desc="speech_t2i")
    blank = [r.images[0] if r.images else Image.new("RGB", s.size, "white") for r, s in zip(results, samples)]
    return score_t2i(samples, blank)


def _breakdown_table(title: str, column: str, breakdown: dict[str, float]) -> list[str]:
    return ["", title, "", f"| slice | {column} |", "| --- | --- |",
            *(f"| {k} | {100 * v:.1f}% |" for k, v in breakdown.items())]


def score_t2i(samples, images):
    """Exact-scene accuracy of images for t2i samples, with breakdowns, records and bordered thumbnails."""
    right, records, shown = [], [], []
    stats = defaultdict(lambda: [0, 0])
    for s, im in zip(samples, images):
        query = query_of(s)
        scene = parse(im)
        ok = matches(scene, query)
        right.append(ok)
        n = len(query.objects)
        tally(stats, f"objects_{n}", ok)
        # Attribute breakdown: does the parsed scene have the asked multiset of each attribute?
        for attr in ("color", "shape", "size", "cell"):
            asked = sorted(getattr(q, attr) for q in query.objects if getattr(q, attr) is not None)
            if not asked:
                continue
            got = sorted(getattr(o, attr) for o in scene.objects)
            if attr in ("size", "cell") and len(asked) < n:
                continue  # only some objects named it: no clean multiset comparison
            tally(stats, f"attribute_{attr}", asked == got)
        records.append({"prompt": s.info["caption"], "size": list(s.size), "right": ok,
                        "parsed": [vars(o) for o in scene.objects]})
        shown.append(framed(im, border(ok)))
    breakdown = shares(stats)
    return sum(right) / len(right), breakdown, records, shown


def eval_text(pipe, samples, batch_size, progress, task):
    requests = [pipe.chat_request(sample_document(pipe, s), mode="text", seed=0,
                                  text_sampling={"temperature": 0.0}) for s in samples]
    results = pipe.run_batched(requests, batch_size, progress=progress, desc=task)
    return score_text(samples, [r.text for r in results])


def _question_kind(question: str) -> str:
    return next((kind for kind, opening in QUESTION_KINDS.items() if question.startswith(opening)), "other")


def _text_slice(sample) -> str:
    """The breakdown slice of a text answer: captions by number of objects, questions by kind."""
    if sample.task in ("caption", "asr"):
        return f"objects_{len(sample.scenes[0])}"
    if sample.task in VIDEO_TASKS:
        return f"kind_{video_question_kind(sample.info['question'])}"
    return f"kind_{_question_kind(sample.info['question'])}"


def score_text(samples, texts):
    """Exact answers, with a breakdown: questions by kind, captions by number of objects (video
    captions and questions by what they ask)."""
    records, right = [], []
    stats = defaultdict(lambda: [0, 0])
    for s, text in zip(samples, texts):
        ok = text.strip() == s.info["answer"]
        right.append(ok)
        tally(stats, _text_slice(s), ok)
        records.append({"question": s.info["question"], "expected": s.info["answer"], "got": text, "right": ok})
    return sum(right) / len(right), shares(stats), records


def eval_edit(pipe, samples, batch_size, progress):
    requests = []
    for s in samples:
        req = pipe.chat_request(sample_document(pipe, s), mode="image", seed=0, image_size=_grid_size(pipe, s),
                                guidance_scale=EDIT_GUIDANCE_SCALE)
        req.max_new_tokens = pipe.format.image_length(*req.image_size) + 1
        requests.append(req)
    results = pipe.run_batched(requests, batch_size, progress=progress, desc="edit")
    drawn = [r.images[0] if r.images else None for r in results]
    score, breakdown, records = score_edit(samples, drawn)
    # Per edit: source, drawn (green border = right; blank = no image drawn), target (grey borders).
    shown = []
    for s, im, rec in zip(samples[:EDITS_SHOWN], drawn, records):
        im = im if im is not None else Image.new("RGB", s.images[1].size, "white")
        shown += [framed(s.images[0], FRAME), framed(im, border(rec["right"])), framed(s.images[1], FRAME)]
    return score, breakdown, records, shown


def score_edit(samples, images):
    """Edits right, with a breakdown by kind of change and two diagnostics of the failures: `kept_rest`
    (every object the change leaves alone is drawn unchanged; true of any drawn image when the change
    leaves nothing alone) and `unchanged` (the source redrawn as it was)."""
    records, right = [], []
    stats = defaultdict(lambda: [0, 0])
    for s, image in zip(samples, images):
        before, after = s.scenes
        change = s.info["change"]
        scene = parse(image) if image is not None else None
        ok = scene is not None and matches(scene, after)
        edited = (change.get("new_color", change["color"]), change["shape"])
        rest = [o for o in after.objects if (o.color, o.shape) != edited]
        kept_rest = scene is not None and all(o in scene.objects for o in rest)
        unchanged = scene is not None and matches(scene, before)
        right.append(ok)
        for key, value in ((f"kind_{change['kind']}", ok), ("kept_rest", kept_rest), ("unchanged", unchanged)):
            tally(stats, key, value)
        records.append({"instruction": s.info["instruction"], "kind": change["kind"], "right": ok,
                        "kept_rest": kept_rest, "unchanged": unchanged})
    breakdown = shares(stats)
    return sum(right) / len(right), breakdown, records


def eval_story(pipe, samples, batch_size, progress, seed):
    """An image is right when it shows what the story's text says: the first the caption, each later one
    the previous (expected) scene after the sentence before it, as the model wrote the sentence.

    A story's text is sampled from the model's own distribution (temperature 1, a seed per sample):
    greedy text would open every "Tell a story." with the same caption, scoring one story n times."""
    requests = []
    for i, s in enumerate(samples):
        req = pipe.chat_request(sample_document(pipe, s), mode="any", modalities=STORY_MODALITIES,
                                seed=seed * MAX_SAMPLES + i,
                                image_size=_grid_size(pipe, s), text_sampling=STORY_TEXT_SAMPLING)
        req.max_new_tokens = 4 * pipe.format.image_length(*req.image_size) + 120
        requests.append(req)
    results = pipe.run_batched(requests, batch_size, progress=progress, desc="story")
    return score_story(samples, [r.document for r in results])


def score_story(samples, documents):
    """Story images right, with a breakdown by the image's place in the story (image_N)."""
    records = []
    stats = defaultdict(lambda: [0, 0])
    for s, doc in zip(samples, documents):
        parts = doc.parts
        text_before = s.info["caption"] if s.info["prompt"] != TELL_A_STORY else None
        expected = None
        sample_right = []
        for p in parts:
            if isinstance(p, TextPart):
                text_before = p.text.strip()
                continue
            ok = False
            try:
                if expected is None:
                    query = parse_caption(text_before or "")
                    scene = parse(p.pixels)
                    ok = matches(scene, query)
                    expected = scene if ok else None
                else:
                    target = apply_change(expected, parse_change_sentence(text_before or ""))
                    scene = parse(p.pixels)
                    ok = matches(scene, target)
                    expected = scene if ok else target
            except ValueError:
                ok = False
            sample_right.append(ok)
            tally(stats, f"image_{len(sample_right)}", ok)
            text_before = None
        # A story that drew too few images counts each expected image it did not draw as wrong.
        for k in range(len(sample_right), len(s.scenes)):
            tally(stats, f"image_{k + 1}", False)
        records.append({"prompt": s.info["prompt"], "text": doc.text, "images": len(sample_right),
                        "right": sample_right})
    hits = sum(h for h, _ in stats.values())
    total = sum(t for _, t in stats.values())
    return hits / max(1, total), shares(stats), records


def evaluate(pipe, out_dir, n: int = 200, tasks=None, seed: int = 0, batch_size: int = 32,
             progress: bool = True) -> dict:
    tasks = default_tasks(pipe) if tasks is None else tuple(tasks)
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be in 1..{MAX_SAMPLES}, got {n}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
    if not pipe.vocab.has_video and any(t in VIDEO_TASKS for t in tasks):
        raise ValueError(f"tasks {[t for t in tasks if t in VIDEO_TASKS]} need a model with video tokens; this "
                         "model has none (tokenloom add-modality, then train it on videos: recipes/video/)")
    if not can_speak(pipe) and any(t in SPEECH_TASKS for t in tasks):
        raise ValueError(f"tasks {[t for t in tasks if t in SPEECH_TASKS]} need a model with speech codes and a "
                         "speech codec; this model has none (tokenloom add-modality --modality speech, then train "
                         "it on speech: recipes/speech/)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"n": n, "seed": seed, "settings": {"guidance_scale": pipe.config.guidance_scale,
                                                  "image_sampling": pipe.sampling("image").to_dict(),
                                                  "image_candidates": pipe.config.image_candidates,
                                                  "candidate_sampling": pipe.sampling("candidate").to_dict(),
                                                  "story_text_sampling": STORY_TEXT_SAMPLING,
                                                  "edit_guidance_scale": EDIT_GUIDANCE_SCALE},
              "scores": {}, "details": {}, "seconds": {}}
    shown, edits_shown, videos_shown = [], [], {}
    for task in tasks:
        t0 = time.time()
        samples = heldout_samples(task, n, seed)
        if task == "t2i":
            score, breakdown, records, shown = eval_t2i(pipe, samples, batch_size, progress, seed)
        elif task in ("caption", "qa", "video_caption", "video_qa", "asr", "spoken_qa"):
            score, breakdown, records = eval_text(pipe, samples, batch_size, progress, task)
        elif task == "speech_t2i":
            score, breakdown, records, _ = eval_speech_t2i(pipe, samples, batch_size, progress, seed)
        elif task == "tts":
            score, breakdown, records = eval_tts(pipe, samples, batch_size, progress, seed, out)
        elif task == "edit":
            score, breakdown, records, edits_shown = eval_edit(pipe, samples, batch_size, progress)
        elif task == "t2v":
            score, breakdown, records, videos_shown[task] = eval_t2v(pipe, samples, batch_size, progress, seed)
        elif task == "next_frames":
            score, breakdown, records, videos_shown[task] = eval_next_frames(pipe, samples, batch_size, progress)
        else:
            score, breakdown, records = eval_story(pipe, samples, batch_size, progress, seed)
        report["scores"][task] = score
        report[f"{task}_breakdown"] = breakdown
        report["details"][task] = records
        report["seconds"][task] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    settings = report["settings"]
    image = settings["image_sampling"]
    lines = ["# tokenloom eval", "", f"{n} held-out samples per task, seed {seed}; guidance "
             f"{settings['guidance_scale']} (edits {settings['edit_guidance_scale']}), "
             f"image temperature {image['temperature']}, top-k {image['top_k']}; "
             f"story text temperature {STORY_TEXT_SAMPLING['temperature']}; other text greedy.", "",
             *_candidates_line(settings),
             "| task | score |", "| --- | --- |"]
    lines += [f"| {t} | {100 * s:.1f}% |" for t, s in report["scores"].items()]
    for task in tasks:
        title, column = BREAKDOWN_TITLES[task]
        lines += _breakdown_table(title, column, report[f"{task}_breakdown"])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if shown:
        image_grid(shown[:64], columns=8).save(out / "samples.png")
    if edits_shown:
        image_grid(edits_shown, columns=6).save(out / "edits.png")
    for task, rows in videos_shown.items():
        if rows:
            videos_grid(rows).save(out / f"videos-{task}.png")
    return report


def _candidates_line(settings) -> list[str]:
    if settings["image_candidates"] == 1:
        return []
    drawn = settings["candidate_sampling"]
    return [f"Text-to-image keeps the best of {settings['image_candidates']} candidates (drawn at temperature "
            f"{drawn['temperature']}, top-k {drawn['top_k']}) by the model's own two-way likelihood "
            "(tokenloom.scoring).", ""]
