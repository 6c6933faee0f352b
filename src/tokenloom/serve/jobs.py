"""One HTTP request's work for the engine thread: the engine requests it adds, and what it sends back.

A job is made on the event loop (its fields already checked there), built into engine requests on the
engine thread (which owns the model: input images are encoded there), and fed that thread's events. It
answers its handler through an asyncio queue of tuples, in order:

    ("accepted",) | ("error", APIError)          first: it joined the batch, or why not
    ("text", choice, str)                          chat: a piece of text
    ("preview", choice, PIL image, k)              a drawn image's rows so far (padded), k-th preview
    ("image", choice, PIL image, tokens)           a finished image (images: the chosen candidate)
    ("speech_start", choice)                       chat, streamed: an utterance begins
    ("speech", choice, float32 samples, rate)      chat, streamed: the utterance's next stretch of audio
    ("finished", choice, GenerationResult)         chat: one choice is done
    ("done",) | ("cancelled",) | ("error", APIError)   last
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from ..document import MAX_SPEECH_FRAMES, Document, TextPart
from ..engine import GenerationRequest
from ..engine.grammar import OUTPUT_MODALITIES
from .errors import APIError

WITHOUT_SPEECH = tuple(m for m in OUTPUT_MODALITIES if m != "speech")  # an answer to a client that asked for no audio


class Job:
    kind = "job"

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.first_output: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rids: list[int] = []
        self.cancelled = False  # asked by the handler (client gone)
        self.finished = False  # set by the engine thread once its last message is posted
        self.released = False  # its admission slot was given back

    def post(self, *message) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, message)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    # -- engine thread --------------------------------------------------------------------------
    def build(self, pipe) -> list[GenerationRequest]:
        raise NotImplementedError

    def preview_rows(self, index: int, height: int) -> set[int]:
        """Counts of finished code rows of an image of `height` rows after which to send a preview."""
        return set()

    def on_text(self, index: int, text: str) -> None:
        pass

    def on_preview(self, index: int, image, k: int) -> None:
        self.post("preview", index, image, k)

    def on_image(self, index: int, image) -> None:
        pass

    def on_video(self, index: int, frames) -> None:
        pass

    def on_speech_started(self, index: int) -> None:
        pass

    def on_speech_chunk(self, index: int, audio, sample_rate: int) -> None:
        pass

    def on_finished(self, index: int, result, pipe) -> bool:
        """A request of this job finished; True when the whole job is done."""
        raise NotImplementedError


@dataclasses.dataclass
class ChatOptions:
    # (role, [("text", str) | ("image", PIL image) | ("audio", audio_io.Audio)])
    messages: list[tuple[str, list[tuple[str, object]]]]
    mode: str = "any"
    n: int = 1
    max_tokens: int | None = None
    max_tokens_limit: int | None = None  # the server's bound (default max_tokens is clamped to it)
    seed: int | None = None
    preview_every: int = 0  # rows between previews (0: none; a plain answer has none)
    sampling: dict = dataclasses.field(default_factory=dict)  # Pipeline.chat_request keywords
    stream: bool = False  # streamed: speech chunks are posted as they come
    audio_format: str = "wav"  # of the answer's audio: "wav" or "pcm16" (protocol.AUDIO_OUTPUT_FORMATS)
    speak: bool = True  # may the answer speak (a client that did not ask for "audio" gets none)


class ChatJob(Job):
    kind = "chat"

    def __init__(self, loop, options: ChatOptions):
        super().__init__(loop)
        self.options = options
        self.results: list = [None] * options.n

    def build(self, pipe) -> list[GenerationRequest]:
        o = self.options
        turns = []
        for role, parts in o.messages:
            doc_parts = []
            for kind, value in parts:
                if kind == "text":
                    if value:
                        doc_parts.append(TextPart(value))
                elif kind == "audio":  # heard as the pipeline hears: the content codebook only
                    doc_parts.append(pipe.encode_speech(value, levels="content"))
                elif kind == "video":
                    doc_parts.append(pipe.encode_video(value))
                else:
                    doc_parts.append(pipe.encode_image(value))
            turns.append((role, doc_parts))
        request = pipe.chat_request(Document.chat(turns), mode=o.mode, max_new_tokens=o.max_tokens, seed=o.seed,
                                    modalities=None if o.speak else WITHOUT_SPEECH, **o.sampling)
        context = pipe.model.config.max_position_embeddings
        prompt = len(request.prompt_ids)
        room = context - prompt
        if room < 1 or (o.max_tokens is not None and o.max_tokens > room):
            asked = "" if o.max_tokens is None else f" plus max_tokens {o.max_tokens}"
            raise APIError(400, f"the prompt is {prompt} tokens{asked}: more than the model's context of "
                                f"{context} tokens", "messages", "context_length_exceeded")
        if o.max_tokens is None:  # the default answer length: room for the image asked for, within the context
            if o.mode == "image" and request.image_size is not None:
                need = pipe.format.image_length(*request.image_size) + 1
                request.max_new_tokens = max(request.max_new_tokens, need)
            elif o.mode == "speech":  # room for the longest utterance `speak` draws (config.max_speech_seconds)
                codec = pipe.speech_tokenizer.config
                frames = min(MAX_SPEECH_FRAMES, max(1, int(pipe.config.max_speech_seconds * codec.frame_rate)))
                need = pipe.format.speech_length(pipe.vocab.speech_codebooks, frames) + 1
                request.max_new_tokens = max(request.max_new_tokens, need)
            request.max_new_tokens = min(request.max_new_tokens, room, o.max_tokens_limit or room)
        self.prompt_tokens = prompt
        return [request] + [dataclasses.replace(request, seed=None if o.seed is None else o.seed + i)
                            for i in range(1, o.n)]

    def preview_rows(self, index: int, height: int) -> set[int]:
        k = self.options.preview_every
        if k <= 0:
            return set()
        return set(range(k, height, k))

    def on_text(self, index: int, text: str) -> None:
        self.post("text", index, text)

    def on_image(self, index: int, image) -> None:
        self.post("image", index, image, None)

    def on_video(self, index: int, frames) -> None:
        self.post("video", index, frames)

    def on_speech_started(self, index: int) -> None:
        if self.options.stream:
            self.post("speech_start", index)

    def on_speech_chunk(self, index: int, audio, sample_rate: int) -> None:
        if self.options.stream and audio is not None:
            self.post("speech", index, audio, sample_rate)

    def on_finished(self, index: int, result, pipe) -> bool:
        self.results[index] = result
        self.completion_tokens += len(result.ids)
        self.post("finished", index, result)
        return all(r is not None for r in self.results)


@dataclasses.dataclass
class ImageOptions:
    prompt: str
    grid: tuple[int, int]  # (height, width) codes
    n: int = 1
    candidates: int = 1
    partial_images: int = 0
    seed: int | None = None
    guidance_scale: float | None = None
    sampling: dict = dataclasses.field(default_factory=dict)  # temperature, top_k, top_p


def partial_rows(height: int, partial_images: int) -> set[int]:
    """Rows after which to preview, spread evenly; never the last row (the finished image follows it)."""
    rows = {(height * (i + 1)) // (partial_images + 1) for i in range(partial_images)}
    return {r for r in rows if 0 < r < height}


class ImagesJob(Job):
    """Text to image as Pipeline.iter_images does it: n images, each the best of `candidates` draws
    (reranked on the engine thread when its last draw finishes); draw j uses seed + j."""

    kind = "images"

    def __init__(self, loop, options: ImageOptions):
        super().__init__(loop)
        self.options = options
        self.draws: list = [None] * (options.n * options.candidates)
        self.sent = 0
        self.prompt_text = options.prompt

    def build(self, pipe) -> list[GenerationRequest]:
        o = self.options
        doc, requests = pipe.image_draws(o.prompt, o.grid, len(self.draws), seed=o.seed,
                                         guidance_scale=o.guidance_scale, candidates=o.candidates, **o.sampling)
        self.prompt_text = doc.text
        self.prompt_tokens = prompt = len(requests[0].prompt_ids)
        max_new, context = requests[0].max_new_tokens, pipe.model.config.max_position_embeddings
        if prompt + max_new > context:
            h, w = (side * pipe.factor for side in o.grid)
            raise APIError(400, f"the prompt is {prompt} tokens: with the {max_new} of a {w}x{h} image that is "
                                f"more than the model's context of {context} tokens", "prompt",
                           "context_length_exceeded")
        return requests

    def preview_rows(self, index: int, height: int) -> set[int]:
        if index % self.options.candidates:  # previews follow the first draw of each image
            return set()
        return partial_rows(height, self.options.partial_images)

    def on_preview(self, index: int, image, k: int) -> None:
        self.post("preview", index // self.options.candidates, image, k)

    def on_finished(self, index: int, result, pipe) -> bool:
        c = self.options.candidates
        self.draws[index] = result
        k = index // c
        group = self.draws[k * c:(k + 1) * c]
        if all(r is not None for r in group):
            parts = [(r.image_parts or [None])[0] for r in group]
            tokens = sum(len(r.ids) for r in group)
            self.completion_tokens += tokens
            self.post("image", k, pipe.best_drawn(self.options.prompt, self.prompt_text, parts), tokens)
            self.sent += 1
        return self.sent == self.options.n
