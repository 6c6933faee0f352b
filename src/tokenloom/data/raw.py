"""Raw training data: JSONL, one document per line.

A line is either a roleless document (pretraining style)::

    {"parts": [{"type": "text", "text": "a red circle"}, {"type": "image", "path": "img/0001.png"}]}

or a chat::

    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Draw a red circle."}]},
                  {"role": "assistant", "content": [{"type": "image", "path": "img/0001.png",
                                                     "width": 512, "height": 512}]}]}

Roles are "system", "user" and "assistant"; a message's content may also be a plain string
(one text part). Image paths are relative to the JSONL file's folder unless absolute;
"width"/"height" (pixels) default to the pipeline's image size. An optional top-level "meta"
value (anything) is carried along untouched and ignored. Blank lines are ignored.

A video part is its frames as image files, or one file or folder (`tokenloom.video_io`)::

    {"type": "video", "frames": ["clip/f0.png", "clip/f1.png"], "width": 256, "height": 256}
    {"type": "video", "path": "clip.gif"}      (an animated GIF or WebP, or a folder of PNG/JPEG frames)

with paths resolved like image paths, at most `MAX_FRAMES` frames, all of one size, and the same
optional "width"/"height" (every frame is encoded at that size).

A speech part is an audio file (WAV, FLAC or OGG: `tokenloom.audio_io`, resampled to the codec's rate)::

    {"type": "speech", "path": "audio/0001.wav"}

Every malformed line is reported as ``file:line: what``: raised as `DataError`, or with
``on_error="skip"`` warned (`DataWarning`) and counted in a `DataSummary`, never dropped silently.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import video_io
from ..document import MAX_FRAMES, TextPart

ON_ERROR = ("raise", "skip")
MESSAGE_ROLES = ("system", "user", "assistant")
MAX_KEPT_ERRORS = 100  # messages kept in a summary; the count is always exact


class DataError(ValueError):
    """A malformed input; the message starts with ``file:line:`` where there is one."""


class DataWarning(UserWarning):
    """A malformed input skipped under ``on_error="skip"``."""


@dataclass(frozen=True)
class RawImage:
    path: Path | None  # absolute (resolved against the JSONL file's folder); None for an image held in memory
    width: int | None = None
    height: int | None = None
    # An image held in memory instead of a file (a `datasets.Dataset` row's): a PIL image, or a
    # function returning one (read when the image is encoded).
    pixels: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RawVideo:
    """A video whose frames are still files: its frame images in order (the "frames" form, or a
    folder's frames), or, with no `frames`, the GIF/WebP `path` read whole when it is encoded."""

    frames: tuple[RawImage, ...] = ()
    path: Path | None = None  # the "path" form's file or folder (absolute); None for the "frames" form
    width: int | None = None
    height: int | None = None
    # Frames as stored: a GIF/WebP made by `write_video` stores a still run once and reads back longer.
    num_frames: int = 0

    def load(self) -> list:
        """The frames as RGB PIL images of one size; ValueError naming the file otherwise."""
        if self.frames:
            return video_io.read_frames([f.path for f in self.frames])
        return video_io.read_video(self.path)


@dataclass(frozen=True)
class RawSpeech:
    """An utterance still in its audio file (read and codec-encoded by pre-tokenization)."""

    path: Path


RawPart = TextPart | RawImage | RawVideo | RawSpeech
RawVisual = RawImage | RawVideo


@dataclass
class RawTurn:
    role: str | None
    parts: list[RawPart]


@dataclass
class RawDocument:
    """A parsed line whose images are still files (pre-tokenization turns them into codes)."""

    turns: list[RawTurn]

    @property
    def images(self) -> list[RawImage]:
        return [p for t in self.turns for p in t.parts if isinstance(p, RawImage)]

    @property
    def videos(self) -> list[RawVideo]:
        return [p for t in self.turns for p in t.parts if isinstance(p, RawVideo)]

    @property
    def visuals(self) -> list[RawVisual]:
        """Images and videos in document order (what pre-tokenization VQ-encodes)."""
        return [p for t in self.turns for p in t.parts if isinstance(p, (RawImage, RawVideo))]

    @property
    def speech(self) -> list[RawSpeech]:
        return [p for t in self.turns for p in t.parts if isinstance(p, RawSpeech)]


@dataclass
class DataSummary:
    """Counts of what a read (or a pre-tokenization) kept and skipped."""

    lines: int = 0  # non-blank lines read
    documents: int = 0  # documents kept
    skipped: int = 0  # malformed documents skipped (on_error="skip")
    errors: list[str] = field(default_factory=list)  # first MAX_KEPT_ERRORS messages

    def record_error(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "documents": self.documents, "skipped": self.skipped, "errors": list(self.errors)}


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def report_error(message: str, on_error: str, summary: DataSummary | None) -> None:
    """Raise `DataError`, or warn and count: the one policy for every malformed input."""
    if on_error == "raise":
        raise DataError(message)
    warnings.warn(f"skipped: {message}", DataWarning, stacklevel=3)
    if summary is not None:
        summary.record_error(message)


def _fail(what: str) -> None:
    raise _SchemaError(what)


class _SchemaError(Exception):
    pass


def _check_keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        _fail(f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(allowed)})")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(f"{what} must be a positive integer, got {value!r}")
    return value


def _resolve(path: str, base_dir: Path) -> Path:
    return Path(path) if os.path.isabs(path) else base_dir / path


def _size(part: dict, prefix: str) -> tuple[int | None, int | None]:
    width = _positive_int(part["width"], f"{prefix}width") if "width" in part else None
    height = _positive_int(part["height"], f"{prefix}height") if "height" in part else None
    return width, height


def _parse_video(part: dict, base_dir: Path, where: str) -> RawVideo:
    _check_keys(part, ("type", "frames", "path", "width", "height"), f"video {where}")
    if ("frames" in part) == ("path" in part):
        _fail(f"video {where} needs exactly one of 'frames' (a list of image paths) or 'path' (a GIF/WebP file "
              f"or a folder of frames)")
    width, height = _size(part, f"video {where}: ")
    if "path" in part:
        path = part["path"]
        if not isinstance(path, str) or not path:
            _fail(f"video {where} needs a non-empty string 'path'")
        full = _resolve(path, base_dir)
        try:
            if full.is_dir():  # a folder is its frame files, checked now like a "frames" list
                files = video_io.frame_files(full)
                return RawVideo(tuple(RawImage(f) for f in files), full, width, height, len(files))
            # a file's frames are decoded when it is encoded; its headers say now whether it is a video
            return RawVideo((), full, width, height, video_io.stored_frames(full))
        except ValueError as e:
            _fail(f"video {where}: {e}")
    frames = part["frames"]
    if not isinstance(frames, list):
        _fail(f"video {where}: 'frames' must be a list of image paths, got {type(frames).__name__}")
    if not frames:
        _fail(f"video {where} has an empty 'frames' list (a video has at least one frame)")
    if len(frames) > MAX_FRAMES:
        _fail(f"video {where} has {len(frames)} frames, more than the {MAX_FRAMES} a video may have (cut it into "
              f"shorter clips, or keep every n-th frame)")
    images = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, str) or not frame:
            _fail(f"video {where}: frame {i} must be a non-empty string path, got {frame!r}")
        full = _resolve(frame, base_dir)
        if not full.is_file():
            problem = "does not exist" if not full.exists() else "is not a file"
            _fail(f"video {where}: frame {i} file {full} {problem}")
        images.append(RawImage(full))
    return RawVideo(tuple(images), None, width, height, len(images))


def _file_path(part: dict, base_dir: Path, what: str, file_kind: str, hint: str = "") -> Path:
    """The part's 'path', resolved, checked to name an existing file (`file_kind`: "image", "audio")."""
    path = part.get("path")
    if not isinstance(path, str) or not path:
        _fail(f"{what} needs a non-empty string 'path'{hint}")
    full = _resolve(path, base_dir)
    if not full.is_file():
        _fail(f"{file_kind} file {full} does not exist" if not full.exists() else f"{file_kind} path {full} is not a file")
    return full


def _parse_part(part: Any, base_dir: Path, where: str) -> RawPart:
    if not isinstance(part, dict):
        _fail(f"{where} must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        _check_keys(part, ("type", "text"), f"text {where}")
        if not isinstance(part.get("text"), str):
            _fail(f"text {where} needs a string 'text'")
        return TextPart(part["text"])
    if kind == "image":
        _check_keys(part, ("type", "path", "width", "height"), f"image {where}")
        return RawImage(_file_path(part, base_dir, f"image {where}", "image"), *_size(part, "image "))
    if kind == "video":
        return _parse_video(part, base_dir, where)
    if kind == "speech":
        _check_keys(part, ("type", "path"), f"speech {where}")
        return RawSpeech(_file_path(part, base_dir, f"speech {where}", "audio", " (an audio file)"))
    _fail(f"unknown part type {kind!r} in {where} (expected 'text', 'image', 'video' or 'speech')")
    raise AssertionError  # unreachable; keeps type checkers content


def _parse_parts(parts: Any, base_dir: Path, where: str) -> list[RawPart]:
    if isinstance(parts, str):  # chat shorthand: "content": "hello"
        return [TextPart(parts)]
    if not isinstance(parts, list):
        _fail(f"{where} must be a list of parts, got {type(parts).__name__}")
    return [_parse_part(p, base_dir, f"part {i} of {where}") for i, p in enumerate(parts)]


def parse_document(obj: Any, base_dir: Path) -> RawDocument:
    """One decoded JSON line -> RawDocument; raises `DataError` (without file:line) on bad schema."""
    try:
        return _parse_document(obj, base_dir)
    except _SchemaError as e:
        raise DataError(str(e)) from None


def _parse_document(obj: Any, base_dir: Path) -> RawDocument:
    if not isinstance(obj, dict):
        _fail(f"a line must be a JSON object, got {type(obj).__name__}")
    if ("parts" in obj) == ("messages" in obj):
        _fail("a line needs exactly one of 'parts' (roleless) or 'messages' (chat)")
    if "parts" in obj:
        _check_keys(obj, ("parts", "meta"), "the document")
        if isinstance(obj["parts"], str):
            _fail("'parts' must be a list of parts, got str")
        turns = [RawTurn(None, _parse_parts(obj["parts"], base_dir, "parts"))]
    else:
        _check_keys(obj, ("messages", "meta"), "the document")
        messages = obj["messages"]
        if not isinstance(messages, list):
            _fail(f"'messages' must be a list, got {type(messages).__name__}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                _fail(f"message {i} must be an object, got {type(m).__name__}")
            _check_keys(m, ("role", "content"), f"message {i}")
            if m.get("role") not in MESSAGE_ROLES:
                _fail(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(MESSAGE_ROLES)}")
            if "content" not in m:
                _fail(f"message {i} has no 'content'")
            turns.append(RawTurn(m["role"], _parse_parts(m["content"], base_dir, f"message {i}")))
    if not any(t.parts for t in turns):
        _fail("the document has no parts")
    return RawDocument(turns)


def iter_lines(path: Path, start_line: int = 0, start_byte: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, length in bytes, raw line) for each line, starting after line
    `start_line` which ends at byte `start_byte` (both 0: from the top)."""
    with open(path, "rb") as f:
        f.seek(start_byte)
        for number, raw in enumerate(f, start=start_line + 1):
            yield number, len(raw), raw


def parse_line(raw: bytes, path: Path, number: int) -> RawDocument | None:
    """Parse one raw line; None for a blank line; `DataError` with ``file:line:`` otherwise."""
    where = f"{path}:{number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    try:
        return parse_document(obj, path.parent)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def read_jsonl(
    path: str | os.PathLike, on_error: str = "raise", summary: DataSummary | None = None
) -> Iterator[tuple[int, RawDocument]]:
    """Yield ``(line_number, RawDocument)`` for each document line of a JSONL file.

    Malformed lines raise `DataError` (``file:line: what``), or with ``on_error="skip"`` are
    warned about and counted in `summary` (pass one to read the counts afterwards).
    """
    check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for number, _, raw in iter_lines(path):
        try:
            doc = parse_line(raw, path, number)
        except DataError as e:
            if summary is not None:
                summary.lines += 1
            report_error(str(e), on_error, summary)
            continue
        if doc is None:
            continue
        if summary is not None:
            summary.lines += 1
            summary.documents += 1
        yield number, doc
