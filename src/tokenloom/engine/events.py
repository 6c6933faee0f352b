"""Streaming events, one per thing a caller may want to show as it happens.

An image outside a video: ImageStarted, ImageRow per code row, ImageDone. A video: VideoStarted (once
its frame count and frame size are known, at its first frame), then per frame FrameStarted,
FrameRow per code row and FrameDone, then VideoDone. A video's frames are not images: they never
emit the Image* events.

An utterance: SpeechStarted, SpeechChunk per `speech_chunk_frames` complete frames (and one with the
rest at its end), SpeechDone. A frame is complete once all its levels are there: in the blocks
layout only while the last block is written (every level's block has reached it), in the
interleaved layout at each frame's last code. The chunks cover the utterance's frames once each, in
order (a last chunk without frames may carry only held-back audio). A chunk's audio is the next
stretch of the utterance's waveform, decoded with the frames before it and crossfaded into the chunk
before (`tokenloom.speech_stream`): it holds back its last frames' audio for the next chunk's crossfade,
and the chunks' audio, concatenated, is the utterance's length. Near the seams it still differs a little
from SpeechDone's whole-utterance audio, which is decoded at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np


@dataclass
class Event:
    row: int  # index of the request in the batch


@dataclass
class TextDelta(Event):
    text: str


@dataclass
class ImageStarted(Event):
    height: int  # grid units
    width: int


@dataclass
class ImageRow(Event):
    index: int
    codes: np.ndarray


@dataclass
class ImageDone(Event):
    codes: np.ndarray
    image: Any  # PIL.Image.Image, or None without an image tokenizer


@dataclass
class VideoStarted(Event):
    frames: int
    height: int  # grid units, of every frame
    width: int


@dataclass
class FrameStarted(Event):
    index: int  # the frame's index in its video


@dataclass
class FrameRow(Event):
    frame: int  # the frame's index in its video
    index: int  # the code row's index in the frame
    codes: np.ndarray


@dataclass
class FrameDone(Event):
    index: int  # the frame's index in its video
    codes: np.ndarray
    image: Any  # PIL.Image.Image, or None without an image tokenizer (or with decode_images off)


@dataclass
class VideoDone(Event):
    video: Any  # VideoPart, its pixels the frames' images (None where they were not decoded)


@dataclass
class SpeechStarted(Event):
    levels: int  # codebook levels the utterance has (1: content only)


@dataclass
class SpeechChunk(Event):
    start_frame: int  # index of the chunk's first frame in the utterance
    codes: np.ndarray  # int64 [levels, n]: the n complete frames from start_frame (n may be 0 in a last chunk)
    # -> this chunk's audio (the utterance's stream decoder). Decoded when first read, not when the chunk
    # is made: `Engine.generate` drops every chunk, and Griffin-Lim would run twice an utterance.
    decode: Callable[[], Any] = field(repr=False, compare=False)

    @cached_property
    def audio(self) -> Any:
        """float32 np.ndarray, the utterance's next stretch of waveform; None without a speech tokenizer."""
        return self.decode()


@dataclass
class SpeechDone(Event):
    speech: Any  # SpeechPart, its audio the whole utterance decoded (None without a speech tokenizer)


@dataclass
class TurnEnd(Event):
    pass


@dataclass
class Finished(Event):
    result: Any  # GenerationResult
