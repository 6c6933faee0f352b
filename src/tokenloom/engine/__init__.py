"""Generation: one decode loop, a per-row grammar, per-modality sampling, batched guidance, streaming."""

from .engine import MAX_GUIDANCE_SCALE, Engine, GenerationRequest, GenerationResult, check_guidance_scale
from .events import Event, Finished, ImageDone, ImageRow, ImageStarted, TextDelta, TurnEnd
from .grammar import Grammar, GrammarTables
from .sampling import SamplingParams, default_image_sampling, default_text_sampling

__all__ = ["MAX_GUIDANCE_SCALE", "check_guidance_scale", "Engine", "GenerationRequest", "GenerationResult",
           "Event", "Finished", "ImageDone", "ImageRow", "ImageStarted", "TextDelta", "TurnEnd", "Grammar",
           "GrammarTables", "SamplingParams", "default_image_sampling", "default_text_sampling"]
