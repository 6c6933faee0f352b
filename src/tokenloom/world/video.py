"""Videos of the shapes world (spec: shapes-world.md, "Videos"): one object moving in a straight line
from the centre of cell A to the centre of cell B, its motion caption and questions, and the exact
scorer that decides whether frames are right for a motion caption.

Frames are drawn with `render.draw`, which aligns each object to the pixel grid; the scorer measures
the parsed bounding-box centre of every frame against the spec's unrounded position, with the spec's
tolerance of 0.06 x min(W, H) (at least 2.88 px), which the half-pixel rounding and a mild blur stay
well inside.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .parse import find_regions
from .render import cell_centre, check_canvas, draw
from .scene import CELLS, COLORS, SHAPES, SIZES, Obj, check_choice, pick

MIN_FRAMES, MAX_FRAMES = 2, 16
DEFAULT_FRAMES = 6
TOLERANCE = 0.06  # largest distance of a parsed centre from its place, as a fraction of min(W, H)
DESCRIBE_VIDEO = "Describe the video."


class Video(list):
    """A video's frames (PIL images, all one size), typed so that a caller can tell a video part of a
    prompt or answer from an image part; otherwise a plain list."""

    @property
    def frames(self) -> list[Image.Image]:
        return list(self)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        return self[0].size

    def __repr__(self) -> str:
        return f"Video({len(self)} frames of {self.size[0]}x{self.size[1]})" if self else "Video([])"


@dataclass(frozen=True)
class Motion:
    """One video: the object (color, shape, size) moving from cell `start` to cell `end` in `frames` frames."""

    color: str
    shape: str
    size: str
    start: str
    end: str
    frames: int = DEFAULT_FRAMES

    def __post_init__(self):
        for value, allowed in ((self.color, COLORS), (self.shape, SHAPES), (self.size, SIZES),
                               (self.start, CELLS), (self.end, CELLS)):
            check_choice(value, allowed)
        if self.start == self.end:
            raise ValueError(f"a motion must change the cell, got {self.start!r} twice")
        _check_frames(self.frames)

    def to_json(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "start": self.start,
                "end": self.end, "frames": self.frames}


@dataclass(frozen=True)
class MotionQuery:
    """What a motion caption states: the size None when the caption leaves it out. It says nothing
    about the frame count; that is the task's (`video_right`'s n_frames)."""

    color: str
    shape: str
    size: str | None
    start: str
    end: str

    @classmethod
    def from_motion(cls, motion: Motion, with_size: bool = True) -> MotionQuery:
        return cls(motion.color, motion.shape, motion.size if with_size else None, motion.start, motion.end)


def _check_frames(n: int) -> None:
    if not MIN_FRAMES <= n <= MAX_FRAMES:
        raise ValueError(f"a video has {MIN_FRAMES} to {MAX_FRAMES} frames, got {n}")


def random_motion(rng: np.random.Generator, frames: int = DEFAULT_FRAMES) -> Motion:
    """A uniform random motion: color, shape, size and start cell uniform, end uniform among the other 8 cells."""
    color, shape, size, start = (pick(rng, list(v)) for v in (COLORS, SHAPES, SIZES, CELLS))
    end = pick(rng, [c for c in CELLS if c != start])
    return Motion(color, shape, size, start, end, frames)


def motion_of(sample) -> Motion:
    """The motion a video task's sample (`tasks.TaskSample`) shows: every video task records it in `info`."""
    return Motion(**sample.info["motion"])


# ----------------------------------------------------------------------------- rendering


def centres(motion: Motion | MotionQuery, n_frames: int, width: int, height: int) -> list[tuple[float, float]]:
    """The spec's bounding-box centre (x, y) of each frame k: c_A + (c_B - c_A) * k / (F - 1), unrounded."""
    return _line(motion.start, motion.end, n_frames, width, height)


def _line(start: str, end: str, n_frames: int, width: int, height: int) -> list[tuple[float, float]]:
    (x0, y0), (x1, y1) = cell_centre(start, width, height), cell_centre(end, width, height)
    return [(x0 + (x1 - x0) * k / (n_frames - 1), y0 + (y1 - y0) * k / (n_frames - 1)) for k in range(n_frames)]


def _draw_line(obj: Obj, start: str, end: str, n_frames: int, width: int, height: int,
               antialias: bool) -> list[Image.Image]:
    check_canvas(width, height)
    return [draw([(obj, x, y)], width, height, antialias=antialias)
            for x, y in _line(start, end, n_frames, width, height)]


def render_video(motion: Motion, width: int = 64, height: int = 64, *, antialias: bool = True) -> list[Image.Image]:
    """The motion's frames: its object alone on each, at `centres` (aligned to the pixel grid by `draw`)."""
    obj = Obj(motion.color, motion.shape, motion.size, motion.start)  # draw does not use the cell
    return _draw_line(obj, motion.start, motion.end, motion.frames, width, height, antialias)


def video_frames(obj: Obj, start_cell: str, end_cell: str, n_frames: int, width: int = 64, height: int = 64,
                 *, antialias: bool = True) -> list[Image.Image]:
    """Frames of `obj` (its cell is not used) moving from the centre of start_cell to that of end_cell:
    the older interface of `render_video`, kept for its callers with its looser rules (any n_frames >= 2,
    and start_cell may be end_cell: a still object)."""
    if n_frames < 2:
        raise ValueError(f"a video has at least 2 frames, got {n_frames}")
    return _draw_line(obj, start_cell, end_cell, n_frames, width, height, antialias)


# ----------------------------------------------------------------------------- text


def motion_caption(motion: Motion | MotionQuery, with_size: bool = True) -> str:
    """`a {size} {color} {shape} moves from the {cell A} to the {cell B}`; no size word when asked
    or when unknown (a MotionQuery without one)."""
    words = ["a", motion.size if with_size and motion.size else None, motion.color, motion.shape]
    return f"{' '.join(w for w in words if w)} moves from the {motion.start} to the {motion.end}"


def _alt(words) -> str:
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_MOTION_RE = re.compile(rf"a (?:{_alt(SIZES)} )?{_alt(COLORS)} {_alt(SHAPES)} "
                        rf"moves from the {_alt(CELLS)} to the {_alt(CELLS)}")


def parse_motion_caption(text: str) -> MotionQuery:
    """The MotionQuery a motion caption states; ValueError for text that is not one (or names one cell twice)."""
    m = _MOTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a motion caption: {text!r}")
    size, color, shape, start, end = m.groups()
    if start == end:
        raise ValueError(f"a motion caption names two different cells: {text!r}")
    return MotionQuery(color, shape, size, start, end)


def video_questions(motion: Motion | MotionQuery) -> list[tuple[str, str]]:
    """The spec's video questions with their answers; `Describe the video.` needs the size, so a
    MotionQuery without one only gets the start and end questions."""
    name = f"the {motion.color} {motion.shape}"
    qa = [(f"Where does {name} start?", f"the {motion.start}"), (f"Where does {name} end up?", f"the {motion.end}")]
    if motion.size is not None:
        qa.append((DESCRIBE_VIDEO, motion_caption(motion)))
    return qa


def video_answer(motion: Motion | MotionQuery, question: str) -> str | None:
    """The answer to a question about a video, or None when it is not one of the spec's questions for it."""
    return dict(video_questions(motion)).get(question)


# ----------------------------------------------------------------------------- scoring


def _score(frames, motion: Motion | MotionQuery, n_total: int, first_index: int) -> dict:
    """Frames first_index.. of an n_total-frame video of `motion`: each must show exactly one object, of
    its color and shape (and size, unless None), with its centre within tolerance of its place; the
    first frame's in cell A and the last's in cell B (the tolerance alone would imply both)."""
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        return _wrong(f"frames are not all one size: {sorted(sizes)}")
    ((width, height),) = sizes
    tolerance = TOLERANCE * min(width, height)
    places = centres(motion, n_total, width, height)
    for k, frame in enumerate(frames, start=first_index):
        regions = find_regions(frame)
        if len(regions) != 1:
            return _wrong(f"frame {k} shows {len(regions)} objects", k)
        (r,) = regions
        found_size = r.size(width, height)
        if (r.color, r.shape) != (motion.color, motion.shape) or motion.size not in (None, found_size):
            return _wrong(f"frame {k} shows a {found_size} {r.color} {r.shape}", k)
        cell = r.cell(width, height)
        if (k == 0 and cell != motion.start) or (k == n_total - 1 and cell != motion.end):
            return _wrong(f"frame {k}'s object is at the {cell}", k)
        x, y = (r.left + r.right) / 2, (r.top + r.bottom) / 2
        distance = math.hypot(x - places[k][0], y - places[k][1])
        if distance > tolerance:
            return _wrong(f"frame {k}'s object is {distance:.1f} px from its place (at most {tolerance:.2f})", k)
    return {"right": True, "reason": None, "frame": None}


def _wrong(reason: str, frame: int | None = None) -> dict:
    return {"right": False, "reason": reason, "frame": frame}


def score_video(frames: list[Image.Image], query: MotionQuery | Motion, n_frames: int | None = None) -> dict:
    """Whether frames are right for a motion caption (the spec's rule), as {"right", "reason", "frame"}:
    the first failure found and the frame it is in (None when right or not about one frame).

    n_frames: the frame count asked for; None takes a Motion's own and, for a MotionQuery, accepts
    any count from 2 to 16."""
    if n_frames is None and isinstance(query, Motion):
        n_frames = query.frames
    if n_frames is not None and len(frames) != n_frames:
        return _wrong(f"{len(frames)} frames, asked for {n_frames}")
    if not MIN_FRAMES <= len(frames) <= MAX_FRAMES:
        return _wrong(f"{len(frames)} frames: a video has {MIN_FRAMES} to {MAX_FRAMES}")
    return _score(frames, query, len(frames), 0)


def video_right(frames: list[Image.Image], query: MotionQuery | Motion, n_frames: int | None = None) -> bool:
    """True when frames are right for the motion caption `query` states; see `score_video`."""
    return score_video(frames, query, n_frames)["right"]


def score_frames(frames: list[Image.Image], motion: Motion, first_index: int) -> dict:
    """Whether frames are right as frames first_index..F-1 of `motion`'s video (a "continue the video"
    answer): exactly F - first_index of them, each the motion's object (color, shape and size) within
    tolerance of its place. As `score_video`, a dict."""
    if not 0 <= first_index < motion.frames:
        raise ValueError(f"first_index must be 0 to {motion.frames - 1}, got {first_index}")
    if len(frames) != motion.frames - first_index:
        return _wrong(f"{len(frames)} frames, asked for {motion.frames - first_index}")
    return _score(frames, motion, motion.frames, first_index)


def frames_right(frames: list[Image.Image], motion: Motion, first_index: int) -> bool:
    """True when frames are right as the rest of `motion`'s video from frame first_index; see `score_frames`."""
    return score_frames(frames, motion, first_index)["right"]
