"""Exact scores of the shapes world's video tasks (spec: shapes-world.md, "Videos"), for `evaluate`.

    t2v            a motion caption -> a video, right by the spec's rule (every frame parsed, the
                   trajectory checked: `world.video.score_video`)
    next_frames    the first frames given -> the rest drawn, each where the motion puts it
    video_caption  a video -> its motion caption, exact
    video_qa       a video and a question (where does it start / end up) -> the answer, exact

The last two are text answers, scored as captions and questions are (`evaluation.eval_text`). Each drawn video is shown as one row of frames in videos.png (green border = right).
"""

from __future__ import annotations

from collections import defaultdict

from PIL import Image

from .evaluation_parts import border, framed, sample_document, shares, tally
from .report import image_grid
from .world.video import motion_of, parse_motion_caption, score_frames, score_video

VIDEO_TASKS = ("t2v", "next_frames", "video_caption", "video_qa")
VIDEOS_SHOWN = 12  # videos drawn in videos.png, per task
# Continuing a video draws unguided, as edits do: the given frames are the context that matters.
NEXT_FRAMES_GUIDANCE_SCALE = 1.0


def _frames_of(result) -> list:
    videos = result.document.videos
    return list(videos[0].pixels) if videos and videos[0].pixels is not None else []


def _shown(frames: list, right: bool, size: tuple[int, int]) -> list:
    frames = frames or [Image.new("RGB", size, "white")]
    return [framed(f, border(right)) for f in frames]


def eval_t2v(pipe, samples, batch_size, progress, seed):
    """Text to video: each sample's caption drawn with its frame count and size, scored exactly."""
    groups = defaultdict(list)  # one generate_videos call per (frames, size)
    for i, s in enumerate(samples):
        groups[(motion_of(s).frames, s.size)].append(i)
    drawn = [None] * len(samples)
    for (frames, (w, h)), idx in groups.items():
        videos = pipe.generate_videos([samples[i].info["caption"] for i in idx], frames=frames, width=w, height=h,
                                      seed=seed, batch_size=batch_size, progress=progress)
        for i, video in zip(idx, videos):
            drawn[i] = video
    return score_t2v(samples, drawn)


def score_t2v(samples, videos):
    stats = defaultdict(lambda: [0, 0])
    records, right, shown = [], [], []
    for s, frames in zip(samples, videos):
        query = parse_motion_caption(s.info["caption"])
        verdict = score_video(frames, query, motion_of(s).frames)
        right.append(verdict["right"])
        tally(stats, "size_named" if query.size else "size_left_out", verdict["right"])
        tally(stats, "frame_count_right", len(frames) == motion_of(s).frames)
        records.append({"prompt": s.info["caption"], "frames": len(frames), **verdict})
        if len(shown) < VIDEOS_SHOWN:
            shown.append(_shown(frames, verdict["right"], s.size))
    return sum(right) / len(right), shares(stats), records, shown


def eval_next_frames(pipe, samples, batch_size, progress):
    """The rest of a video after its first frames: drawn as one video span, scored frame by frame."""
    requests = []
    for s in samples:
        motion, first = motion_of(s), s.info["first_index"]
        grid = pipe.grid_size(*s.size)
        req = pipe.chat_request(sample_document(pipe, s), mode="video", seed=0, image_size=grid,
                                guidance_scale=NEXT_FRAMES_GUIDANCE_SCALE)
        req.video_frames = motion.frames - first
        req.max_new_tokens = pipe.format.video_length(req.video_frames, *grid) + 1
        requests.append(req)
    results = pipe.run_batched(requests, batch_size, progress=progress, desc="next_frames")
    return score_next_frames(samples, [_frames_of(r) for r in results])


def score_next_frames(samples, videos):
    stats = defaultdict(lambda: [0, 0])
    records, right, shown = [], [], []
    for s, frames in zip(samples, videos):
        first = s.info["first_index"]
        verdict = score_frames(frames, motion_of(s), first)
        right.append(verdict["right"])
        tally(stats, f"given_{first}", verdict["right"])
        records.append({"given": first, "frames": len(frames), **verdict})
        if len(shown) < VIDEOS_SHOWN:
            shown.append(_shown(frames, verdict["right"], s.size))
    return sum(right) / len(right), shares(stats), records, shown


def video_question_kind(question: str) -> str:
    """What a question about a video asks: where the object starts, where it ends up, or the caption."""
    return "start" if "start" in question else "end" if "end up" in question else "describe"


def videos_grid(rows: list[list]):
    """One row of frames per video, on white (a shorter video's row padded with blank frames)."""
    columns = max(len(r) for r in rows)
    blank = Image.new("RGB", rows[0][0].size, "white")
    return image_grid([f for r in rows for f in r + [blank] * (columns - len(r))], columns=columns)
