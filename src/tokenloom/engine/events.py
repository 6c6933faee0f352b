"""Streaming events, one per thing a caller may want to show as it happens."""

from __future__ import annotations

from dataclasses import dataclass
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
class TurnEnd(Event):
    pass


@dataclass
class Finished(Event):
    result: Any  # GenerationResult
