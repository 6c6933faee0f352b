"""Generation: one decode loop, a per-row grammar, per-modality sampling (text, image, speech), batched
guidance, streaming, continuous batching."""

from .continuous import ContinuousBatcher
from .engine import Engine
from .request import MAX_GUIDANCE_SCALE, GenerationRequest, GenerationResult, check_guidance_scale, fresh_seed
from .events import (Event, Finished, FrameDone, FrameRow, FrameStarted, ImageDone, ImageRow, ImageStarted,
                     SpeechChunk, SpeechDone, SpeechStarted, TextDelta, TurnEnd, VideoDone, VideoStarted)
from .grammar import Grammar, GrammarTables
from .sampling import SamplingParams, default_image_sampling, default_speech_sampling, default_text_sampling

__all__ = ["MAX_GUIDANCE_SCALE", "check_guidance_scale", "fresh_seed", "Engine", "ContinuousBatcher",
           "GenerationRequest", "GenerationResult", "Event", "Finished", "FrameDone", "FrameRow", "FrameStarted",
           "ImageDone", "ImageRow", "ImageStarted", "SpeechChunk", "SpeechDone", "SpeechStarted", "TextDelta",
           "TurnEnd", "VideoDone", "VideoStarted", "Grammar", "GrammarTables", "SamplingParams",
           "default_image_sampling", "default_speech_sampling", "default_text_sampling"]
