"""Generation: one decode loop, a per-row grammar, per-modality sampling, batched guidance, streaming."""

from .engine import Engine, GenerationRequest, GenerationResult
from .events import Event, Finished, ImageDone, ImageRow, ImageStarted, TextDelta, TurnEnd
from .grammar import Grammar, GrammarTables
from .sampling import SamplingParams, default_image_sampling, default_text_sampling

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "Event", "Finished", "ImageDone", "ImageRow",
           "ImageStarted", "TextDelta", "TurnEnd", "Grammar", "GrammarTables", "SamplingParams",
           "default_image_sampling", "default_text_sampling"]
