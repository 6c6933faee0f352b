"""Documents: interleaved text, images, videos and speech, optionally split into chat turns.

A `Document` is what formats encode to token ids and decode back to. Images
are grids of codebook indices (what the VQ tokenizer produces), a video is
a stack of such grids of one size (its frames), and speech is a stack of
residual-VQ code rows (one per codebook level, the first the content), so a
document round-trips through ids without any pixels or samples; decoded
pixels or audio may ride along (`.pixels`, `.audio`) but never take part in
equality.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

ROLES: tuple[str | None, ...] = (None, "system", "user", "assistant")


def check_text(text, what: str = "text") -> str:
    """`text` if it is a str that UTF-8 can encode, else ValueError naming `what`. (Undecodable bytes in
    a command line or a file read with errors="surrogateescape" arrive as lone surrogates.)"""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8: byte {bad!r} at character {e.start}") from None
    return text


@dataclass
class TextPart:
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"TextPart.text must be str, got {type(self.text).__name__}")
        check_text(self.text)


@dataclass(eq=False)
class ImagePart:
    """One image as an int64 [height, width] grid of codebook indices."""

    codes: np.ndarray
    pixels: Any = field(default=None, compare=False, repr=False)  # PIL.Image.Image | None

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"image codes must be a non-empty 2-D grid, got shape {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise TypeError(f"image codes must be integers, got dtype {codes.dtype}")
        self.codes = codes.astype(np.int64, copy=False)

    @property
    def height(self) -> int:
        return int(self.codes.shape[0])

    @property
    def width(self) -> int:
        return int(self.codes.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImagePart):
            return NotImplemented
        return self.codes.shape == other.codes.shape and bool(np.array_equal(self.codes, other.codes))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        # The full grid would drown logs; shape and a few codes identify it.
        head = self.codes.ravel()[:4].tolist()
        return f"ImagePart({self.height}x{self.width}, codes={head}{'...' if self.codes.size > 4 else ''})"


MAX_FRAMES = 64  # the most frames one video may have: a bound on what a user or client can ask for


@dataclass(eq=False)
class VideoPart:
    """One video as an int64 [frames, height, width] stack of code grids: every frame the same size,
    at least one frame. `pixels`, when decoded, is the list of PIL frames."""

    codes: np.ndarray
    pixels: Any = field(default=None, compare=False, repr=False)  # list[PIL.Image.Image] | None

    def __post_init__(self) -> None:
        codes = self.codes
        if isinstance(codes, (list, tuple)) and codes and all(isinstance(f, ImagePart) for f in codes):
            shapes = {f.codes.shape for f in codes}
            if len(shapes) > 1:
                raise ValueError(f"video frames must all be one size, got grids of shapes {sorted(shapes)}")
            codes = np.stack([f.codes for f in codes])
        codes = np.asarray(codes)
        if codes.ndim != 3 or min(codes.shape) < 1:
            raise ValueError(f"video codes must be a non-empty [frames, height, width] stack, got shape {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise TypeError(f"video codes must be integers, got dtype {codes.dtype}")
        if codes.shape[0] > MAX_FRAMES:
            raise ValueError(f"a video has at most {MAX_FRAMES} frames, got {codes.shape[0]}")
        self.codes = codes.astype(np.int64, copy=False)

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[0])

    @property
    def height(self) -> int:
        return int(self.codes.shape[1])

    @property
    def width(self) -> int:
        return int(self.codes.shape[2])

    @property
    def frames(self) -> list[ImagePart]:
        """Each frame as an ImagePart (with its pixels when the video has them)."""
        pixels = self.pixels if self.pixels is not None else [None] * self.num_frames
        return [ImagePart(c, pixels=p) for c, p in zip(self.codes, pixels)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VideoPart):
            return NotImplemented
        return self.codes.shape == other.codes.shape and bool(np.array_equal(self.codes, other.codes))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"VideoPart({self.num_frames} frames of {self.height}x{self.width})"


MAX_SPEECH_FRAMES = 1500  # the most code frames one utterance may have (a minute at 25 frames a second)


@dataclass(eq=False)
class SpeechPart:
    """One utterance as an int64 [levels, frames] array of residual-VQ codes: row 0 the content
    codebook, rows 1.. the timbre codebooks in order. A content-only utterance (how inputs are fed by
    default, as MIO does) has one row. `audio`, when decoded, is the float32 waveform at the codec's
    sample rate."""

    codes: np.ndarray
    audio: Any = field(default=None, compare=False, repr=False)  # np.ndarray | None

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or min(codes.shape) < 1:
            raise ValueError(f"speech codes must be a non-empty [levels, frames] array, got shape {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise TypeError(f"speech codes must be integers, got dtype {codes.dtype}")
        if codes.shape[1] > MAX_SPEECH_FRAMES:
            raise ValueError(f"an utterance has at most {MAX_SPEECH_FRAMES} code frames, got {codes.shape[1]}")
        self.codes = codes.astype(np.int64, copy=False)

    @property
    def levels(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def content(self) -> SpeechPart:
        """This utterance with its content codebook only."""
        return SpeechPart(self.codes[:1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpeechPart):
            return NotImplemented
        return self.codes.shape == other.codes.shape and bool(np.array_equal(self.codes, other.codes))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"SpeechPart({self.levels} levels x {self.num_frames} frames)"


Part = Union[TextPart, ImagePart, VideoPart, SpeechPart]
PART_TYPES = (TextPart, ImagePart, VideoPart, SpeechPart)


def _as_part(part: Part | str | np.ndarray) -> Part:
    if isinstance(part, str):
        return TextPart(part)
    if isinstance(part, np.ndarray):
        return VideoPart(part) if part.ndim == 3 else ImagePart(part)
    if isinstance(part, PART_TYPES):
        return part
    raise TypeError(f"a part must be TextPart, ImagePart, VideoPart, SpeechPart or str, got {type(part).__name__}")


_JSON_TYPES = {ImagePart: "image", VideoPart: "video", SpeechPart: "speech"}
_JSON_PARTS = {name: cls for cls, name in _JSON_TYPES.items()}


@dataclass
class Turn:
    role: str | None
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
        self.parts = [_as_part(p) for p in self.parts]


@dataclass
class Document:
    turns: list[Turn] = field(default_factory=list)

    @classmethod
    def from_parts(cls, parts: Iterable[Part | str | np.ndarray], role: str | None = None) -> Document:
        """One turn; str parts become text, 2-D arrays images, 3-D arrays videos."""
        return cls([Turn(role, list(parts))])

    @classmethod
    def chat(cls, messages: Iterable[tuple[str | None, Sequence[Part | str] | Part | str]]) -> Document:
        """Turns from (role, parts) pairs; a single part may stand for its list."""
        turns = []
        for role, parts in messages:
            if isinstance(parts, (str, np.ndarray, *PART_TYPES)):
                parts = [parts]
            turns.append(Turn(role, list(parts)))
        return cls(turns)

    @property
    def parts(self) -> list[Part]:
        return [p for t in self.turns for p in t.parts]

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def videos(self) -> list[VideoPart]:
        return [p for p in self.parts if isinstance(p, VideoPart)]

    @property
    def speech(self) -> list[SpeechPart]:
        return [p for p in self.parts if isinstance(p, SpeechPart)]

    @property
    def text(self) -> str:
        """The text parts in order; text on either side of an image or a turn boundary is joined with a
        newline, so words of different parts never run together."""
        pieces, run = [], ""
        for turn in self.turns:
            for part in turn.parts:
                if isinstance(part, TextPart):
                    run += part.text
                elif run:
                    pieces.append(run)
                    run = ""
            if run:
                pieces.append(run)
                run = ""
        return "\n".join(piece.strip("\n") for piece in pieces)

    def normalized(self) -> Document:
        """Merge adjacent text parts and drop empty ones; turns are kept as they are."""
        turns = []
        for turn in self.turns:
            parts: list[Part] = []
            for part in turn.parts:
                if isinstance(part, TextPart):
                    if not part.text:
                        continue
                    if parts and isinstance(parts[-1], TextPart):
                        parts[-1] = TextPart(parts[-1].text + part.text)
                        continue
                    part = TextPart(part.text)
                parts.append(part)
            turns.append(Turn(turn.role, parts))
        return Document(turns)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; images, videos and speech become nested lists of codes (pixels and audio are
        not kept)."""

        def part(p: Part) -> dict[str, Any]:
            if isinstance(p, TextPart):
                return {"type": "text", "text": p.text}
            return {"type": _JSON_TYPES[type(p)], "codes": p.codes.tolist()}

        return {"turns": [{"role": t.role, "parts": [part(p) for p in t.parts]} for t in self.turns]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Document:
        """Inverse of `to_json`; also accepts the JSON text itself."""
        if isinstance(data, str):
            data = json.loads(data)
        turns = []
        for t in data["turns"]:
            parts: list[Part] = []
            for p in t["parts"]:
                if p["type"] == "text":
                    parts.append(TextPart(p["text"]))
                elif p["type"] in _JSON_PARTS:
                    parts.append(_JSON_PARTS[p["type"]](np.asarray(p["codes"], dtype=np.int64)))
                else:
                    raise ValueError(f"unknown part type {p['type']!r}")
            turns.append(Turn(t.get("role"), parts))
        return cls(turns)
