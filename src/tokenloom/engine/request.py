"""What a caller asks of the engine and what it gets back: requests, results, and the bookkeeping that
turns one request's sampled tokens into streaming events and document parts."""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np

from ..document import MAX_SPEECH_FRAMES, Document, ImagePart, SpeechPart, TextPart, VideoPart
from .events import (Event, Finished, FrameDone, FrameRow, FrameStarted, ImageDone, ImageRow, ImageStarted,
                     SpeechChunk, SpeechDone, SpeechStarted, TextDelta, TurnEnd, VideoDone, VideoStarted)
from .grammar import CODES, COUNT, END, SPEECH, TEXT, WIDTH
from .sampling import SamplingParams

MAX_GUIDANCE_SCALE = 20.0  # far past any useful scale; larger ones only amplify noise into garbage


def check_guidance_scale(value: float, what: str = "guidance_scale") -> None:
    """Guidance scales are finite and in [1, MAX_GUIDANCE_SCALE] (1 = unguided)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and 1.0 <= value <= MAX_GUIDANCE_SCALE):
        raise ValueError(f"{what} must be in [1, {MAX_GUIDANCE_SCALE:g}], got {value!r}")

def fresh_seed() -> int:
    """A seed from the operating system's randomness, for a request that names none (63 bits: any
    torch generator takes it, and JSON keeps it exact)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class GenerationRequest:
    """One prompt to continue. `prompt_ids` already formatted (bos, turns, generation role)."""

    prompt_ids: list[int]
    mode: str = "any"  # "text", "image" (one image only), "video" (one video only), "speech" (one utterance) or "any"
    image_size: tuple[int, int] | None = None  # (height, width) in grid units, forced when given (video frames too)
    video_frames: int | None = None  # frames of a video, forced when given (modes "video" and "any")
    max_new_tokens: int = 256
    text: SamplingParams = field(default_factory=SamplingParams)
    image: SamplingParams = field(default_factory=SamplingParams)
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # share of an image's codes that is guided
    uncond_prompt_ids: list[int] = field(default_factory=list)
    image_guidance_scale: float | None = None  # three-way guidance (editing) when set
    image_cond_prompt_ids: list[int] | None = None
    seed: int | None = None  # None: fresh randomness (the seed drawn is kept in the result)
    decode_images: bool = True  # False: drawn images keep their codes only (reranked candidates)
    speculative: str | None = None  # "jacobi": speculative Jacobi decoding of image codes (engine.speculative)
    speculative_window: int = 16  # draft codes per step
    speculative_init: str = "above"  # how positions new to the window are drafted
    # Speech (modes "speech" and "any", where the vocabulary has speech codes). Guidance (guidance_scale)
    # acts on every code of an utterance: guidance_interval is an image's and does not apply there.
    speech: SamplingParams | None = None  # None: sampling.default_speech_sampling of the codebook size
    speech_levels: int | None = None  # codebook levels to generate, 1..L (1: content only); None: all L
    speech_frames: int | None = None  # frames of an utterance, forced when given; None: the model ends it
    max_speech_frames: int = MAX_SPEECH_FRAMES  # the most frames of an utterance whose length the model chooses
    speech_chunk_frames: int = 10  # frames per SpeechChunk event (the last chunk of an utterance may be shorter)
    # Mode "any": the modalities the answer may contain ("text", "image", "video", "speech"; text always
    # may). None: every one the vocabulary has. A client that did not ask for audio leaves "speech" out;
    # an old task on a grown model leaves out what the model grew.
    modalities: tuple[str, ...] | None = None


@dataclass
class GenerationResult:
    ids: list[int]
    document: Document
    finish_reason: str  # "stop" or "length"
    seed: int | None = None  # the seed the request sampled with: given, or drawn fresh

    @property
    def image_parts(self) -> list[ImagePart]:
        return [p for p in self.document.parts if isinstance(p, ImagePart)]

    @property
    def images(self):
        return [p.pixels for p in self.image_parts]

    @property
    def video_parts(self) -> list[VideoPart]:
        return [p for p in self.document.parts if isinstance(p, VideoPart)]

    @property
    def videos(self):
        """Each video's frames as PIL images (None for a video whose frames were not decoded)."""
        return [p.pixels for p in self.video_parts]

    @property
    def speech_parts(self) -> list[SpeechPart]:
        return [p for p in self.document.parts if isinstance(p, SpeechPart)]

    @property
    def speech_audio(self):
        """Each utterance's waveform (float32 at the codec's sample rate; None without a speech tokenizer)."""
        return [p.audio for p in self.speech_parts]

    @property
    def text(self) -> str:
        return self.document.text


class SpeechStream:
    """One utterance's chunks, decoded in order (a StreamDecoder carries state from one to the next)
    when any chunk's audio is first read: the engine itself reads none, so a plain `generate` decodes none."""

    def __init__(self, decoder):
        self.decoder = decoder  # None without a speech tokenizer
        self.pending: list[tuple[np.ndarray, bool]] = []  # (codes, final) per chunk
        self.decoded: list[np.ndarray] = []

    @property
    def holds_back(self) -> bool:
        """Whether the last chunk was not final: its decode kept audio back for a chunk still to come."""
        return bool(self.pending) and not self.pending[-1][1]

    def add(self, codes: np.ndarray, final: bool) -> int:
        self.pending.append((codes, final))
        return len(self.pending) - 1

    def audio(self, k: int):
        if self.decoder is None:
            return None
        while len(self.decoded) <= k:
            self.decoded.append(self.decoder.push(*self.pending[len(self.decoded)]))
        return self.decoded[k]


class RequestOutput:
    """Turns one request's tokens into events and document parts as they come."""

    def __init__(self, index: int, engine: object, seed: int, decode_images: bool = True, speech_levels: int = 0,
                 speech_chunk_frames: int = 10):
        self.index, self.engine, self.seed, self.decode_images = index, engine, seed, decode_images
        self.speech_levels, self.speech_chunk_frames = speech_levels, speech_chunk_frames
        self.speech: list[list[int]] | None = None  # the utterance being drawn: its codes so far, per level
        self.speech_sent = 0  # its frames already streamed in chunks
        self.speech_stream: SpeechStream | None = None  # its chunks' decoder
        self.ids: list[int] = []
        self.parts: list = []
        self.text_ids: list[int] = []
        self.text_sent = ""
        self.codes: list[int] = []  # the current image's (or frame's) codes, row-major
        self.rows: list[list[int]] = []
        self.size: tuple[int, int] | None = None
        self.frames: list[ImagePart] | None = None  # the closed frames of the video being drawn; None outside one
        self.frame_count = 0

    def _flush_text(self, final: bool) -> list[Event]:
        if not self.text_ids:
            return []
        text = self.engine.text_tokenizer.decode(self.text_ids)
        # Hold back a partial UTF-8 character until its last byte arrives.
        visible = text if final else text.rstrip("\ufffd")
        events = []
        if len(visible) > len(self.text_sent) and visible.startswith(self.text_sent):
            events.append(TextDelta(self.index, visible[len(self.text_sent):]))
            self.text_sent = visible
        if final:
            self.parts.append(TextPart(text))
            self.text_ids, self.text_sent = [], ""
        return events

    def _image_started(self) -> list[Event]:
        """The current image's (or frame's) size is known: its start events."""
        if self.frames is None:
            return [ImageStarted(self.index, *self.size)]
        k = len(self.frames)
        head = [VideoStarted(self.index, self.frame_count, *self.size)] if k == 0 else []
        return head + [FrameStarted(self.index, k)]

    def _image_done(self) -> list[Event]:
        h, w = self.size
        grid = np.array(self.codes, dtype=np.int64).reshape(h, w)
        pixels = self.engine.decode_image(grid) if self.decode_images else None
        if self.frames is None:
            self.parts.append(ImagePart(grid, pixels=pixels))
            return [ImageDone(self.index, grid, pixels)]
        self.frames.append(ImagePart(grid, pixels=pixels))
        return [FrameDone(self.index, len(self.frames) - 1, grid, pixels)]

    def _video_done(self) -> list[Event]:
        pixels = [f.pixels for f in self.frames]
        video = VideoPart(self.frames, pixels=None if any(p is None for p in pixels) else pixels)
        self.parts.append(video)
        self.frames = None
        return [VideoDone(self.index, video)]

    def _speech_chunks(self, final: bool) -> list[Event]:
        """Chunks of the frames complete since the last one (every level there), speech_chunk_frames
        each; at the utterance's end one last chunk of the rest (no frames, if only held-back audio is left)."""
        complete = min(len(level) for level in self.speech)
        events = []
        while complete - self.speech_sent >= self.speech_chunk_frames or (final and complete > self.speech_sent):
            n = min(self.speech_chunk_frames, complete - self.speech_sent)
            events.append(self._speech_chunk(n, final and self.speech_sent + n == complete))
        if final and self.speech_stream.holds_back:
            events.append(self._speech_chunk(0, True))  # the audio the last chunk held back
        return events

    def _speech_chunk(self, n: int, final: bool) -> SpeechChunk:
        start = self.speech_sent
        codes = np.array([level[start:start + n] for level in self.speech], dtype=np.int64)
        codes = codes.reshape(len(self.speech), n)  # [levels, 0] for a frameless last chunk
        self.speech_sent += n
        chunk = self.speech_stream.add(codes, final)
        return SpeechChunk(self.index, start, codes, functools.partial(self.speech_stream.audio, chunk))

    def _speech_done(self) -> list[Event]:
        codes = np.array(self.speech, dtype=np.int64)
        part = SpeechPart(codes, audio=self.engine.decode_speech(codes))
        self.parts.append(part)
        self.speech = None
        return [SpeechDone(self.index, part)]

    def feed(self, token: int, state_before: int, flags: dict[str, bool], grammar_hw: tuple[int, int]) -> list[Event]:
        e = self.engine
        self.ids.append(token)
        events: list[Event] = []
        if flags["video_started"]:
            events += self._flush_text(final=True)
            self.frames = []
        elif state_before == COUNT:
            self.frame_count = e.vocab.size_of_token(token)
        elif flags["started"]:
            events += self._flush_text(final=True)
            self.codes, self.rows = [], []
            if e.tables.layout == "flat":
                self.size = e.tables.flat_grid
                events += self._image_started()
        elif state_before == WIDTH:
            self.size = grammar_hw
            events += self._image_started()
        elif state_before == CODES and token != e.tables.end_of_line:
            self.codes.append(int(e.vocab.ids_to_codes(np.array([token]))[0]))
        elif state_before == END and flags["ended"]:
            events += self._image_done()
        elif flags["video_ended"]:
            events += self._video_done()
        elif flags["speech_started"]:
            events += self._flush_text(final=True)
            self.speech, self.speech_sent = [[] for _ in range(self.speech_levels)], 0
            self.speech_stream = SpeechStream(e.stream_decoder())
            events.append(SpeechStarted(self.index, self.speech_levels))
        elif flags["speech_ended"]:
            events += self._speech_chunks(final=True)
            events += self._speech_done()
        elif state_before == SPEECH:
            level, code = e.vocab.ids_to_speech(np.array([token]))
            self.speech[int(level[0])].append(int(code[0]))
            events += self._speech_chunks(final=False)
        elif state_before == TEXT and not flags["stopped"]:
            self.text_ids.append(token)
            events += self._flush_text(final=False)
        if flags["row_done"]:
            h, w = self.size
            r = len(self.rows)
            row = np.array(self.codes[r * w:(r + 1) * w], dtype=np.int64)
            self.rows.append(row.tolist())
            events.append(ImageRow(self.index, r, row) if self.frames is None else
                          FrameRow(self.index, len(self.frames), r, row))
        if flags["stopped"] or flags["truncated"]:
            events += self._flush_text(final=True)
            if flags["stopped"] and token == e.vocab.turn_end:
                events.append(TurnEnd(self.index))
            reason = "stop" if flags["stopped"] else "length"
            doc = Document.from_parts(self.parts, role="assistant")
            events.append(Finished(self.index, GenerationResult(list(self.ids), doc, reason, self.seed)))
        return events
