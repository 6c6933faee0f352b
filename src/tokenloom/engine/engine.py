"""One decode loop over one static KV cache for a whole batch.

Rows of a batch may be in different states at once (one writing text while another draws an
image, a video or an utterance); the cache is kept across every switch between text, images and a video's
frames (each frame attends to the frames before it, nothing is prefilled again). Classifier-free
guidance runs in the same forward: each guided request adds rows of its own (unconditional, and
for three-way guidance image-only) that follow the request's tokens but see only the current image
(or video, its earlier frames included, or utterance) after their own short context, and guide its
codes. The
visibility is a key mask over cache slots, so nothing is prefilled again when an image starts.
The loop itself is `ContinuousBatcher.step`: a fixed batch is a continuous one whose requests all
join at the first step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..document import MAX_SPEECH_FRAMES
from .continuous import ContinuousBatcher, request_rows
from .events import Event, Finished
from .grammar import MODES, OUTPUT_MODALITIES, GrammarTables
from .request import GenerationRequest, GenerationResult, check_guidance_scale
from .sampling import check_integer
from .speculative import check_speculative


class Engine:
    def __init__(self, model, vocab, text_tokenizer, layout: str, flat_grid=None, image_tokenizer=None,
                 compile: bool = False, *, speech_tokenizer=None, speech_layout: str = "blocks"):
        self.model, self.vocab, self.text_tokenizer = model, vocab, text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.speech_tokenizer = speech_tokenizer  # tokenloom.speech_codec.SpeechTokenizer, or None: codes only
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tables = GrammarTables.build(vocab, layout, flat_grid, self.device, speech_layout)
        self.forward = torch.compile(model, dynamic=True) if compile else model

    def decode_image(self, grid: np.ndarray):
        if self.image_tokenizer is None or not self.image_tokenizer.can_decode:
            return None  # the codes are still returned
        return self.image_tokenizer.decode(grid)[0]

    def stream_decoder(self):
        """A StreamDecoder for one streamed utterance, or None without a speech tokenizer."""
        if self.speech_tokenizer is None:
            return None
        from ..speech_stream import StreamDecoder

        return StreamDecoder(self.speech_tokenizer)

    def decode_speech(self, codes: np.ndarray):
        """int64 [levels, frames] speech codes -> float32 waveform, or None without a speech tokenizer."""
        if self.speech_tokenizer is None:
            return None  # the codes are still returned
        return self.speech_tokenizer.decode(codes)

    # -- public API ---------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], progress: bool = False) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for event in self.stream(requests, progress=progress):
            if isinstance(event, Finished):
                results[event.row] = event.result
        return results  # type: ignore[return-value]

    def stream(self, requests: list[GenerationRequest], progress: bool = False) -> Iterator[Event]:
        """Events of a fixed batch, each request's `row` its index in `requests`: the continuous
        batcher with every request joining at the first step."""
        if not requests:
            return
        self.validate(requests)
        batcher = ContinuousBatcher(self, max_batch=len(requests),
                                    max_rows=sum(len(request_rows(r)) for r in requests))
        for r in requests:
            batcher.add(r, validated=True)
        steps = max(r.max_new_tokens for r in requests)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="generating", unit="tok")
        try:
            while batcher.has_work():
                yield from batcher.step()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def validate(self, requests: list[GenerationRequest]) -> None:
        """ValueError naming the request and the field for anything the engine cannot run."""
        limit = self.model.config.max_position_embeddings
        for i, r in enumerate(requests):
            if not r.prompt_ids:
                raise ValueError(f"request {i}: empty prompt")
            if r.mode not in MODES:
                raise ValueError(f"request {i}: unknown generation mode {r.mode!r}; expected one of {MODES}")
            check_integer(r.max_new_tokens, f"request {i}: max_new_tokens", low=1)
            if r.seed is not None:
                check_integer(r.seed, f"request {i}: seed", low=0, high=2**64 - 1)
            total = len(r.prompt_ids) + r.max_new_tokens
            if total > limit:
                raise ValueError(f"request {i}: prompt of {len(r.prompt_ids)} tokens plus max_new_tokens "
                                 f"{r.max_new_tokens} exceeds the model's context of {limit} tokens")
            bad = [t for t in r.prompt_ids if not 0 <= t < self.vocab.size]
            if bad:
                raise ValueError(f"request {i}: prompt ids outside the vocabulary (size {self.vocab.size}): {bad[:5]}")
            if r.image_size is not None:
                h, w = r.image_size
                if not (1 <= h <= self.tables.max_grid and 1 <= w <= self.tables.max_grid):
                    raise ValueError(f"request {i}: image size {h}x{w} grid units is outside 1..{self.tables.max_grid}")
                if r.mode == "image" and self.tables.image_length(h, w) > r.max_new_tokens:
                    raise ValueError(f"request {i}: a {h}x{w} image needs {self.tables.image_length(h, w)} tokens, "
                                     f"more than max_new_tokens={r.max_new_tokens}")
            self._validate_modalities(i, r)
            self._validate_video(i, r)
            self._validate_speech(i, r)
            check_guidance_scale(r.guidance_scale, f"request {i}: guidance_scale")
            check_speculative(r.speculative, r.speculative_window, r.speculative_init, f"request {i}")
            if r.image_guidance_scale is not None:
                check_guidance_scale(r.image_guidance_scale, f"request {i}: image_guidance_scale")
            if r.image_guidance_scale is not None and r.image_cond_prompt_ids is None:
                raise ValueError(f"request {i}: image_guidance_scale needs image_cond_prompt_ids")

    @staticmethod
    def _validate_modalities(i: int, r: GenerationRequest) -> None:
        """`modalities` names modalities (text is always allowed) and leaves in what the request asks for."""
        if r.modalities is None:
            return
        if isinstance(r.modalities, str) or not all(isinstance(m, str) for m in r.modalities):
            raise ValueError(f"request {i}: modalities must be a list of names, got {r.modalities!r}")
        bad = [m for m in r.modalities if m not in OUTPUT_MODALITIES]
        if bad:
            raise ValueError(f"request {i}: unknown modalities {bad}; expected some of {OUTPUT_MODALITIES}")
        asked = [(r.mode in ("image", "video", "speech"), r.mode, f"mode {r.mode!r}"),
                 (r.speech_frames is not None, "speech", "speech_frames"),
                 (r.video_frames is not None, "video", "video_frames")]
        for wanted, modality, what in asked:
            if wanted and modality not in r.modalities:
                raise ValueError(f"request {i}: {what} asks for {modality}, which modalities="
                                 f"{list(r.modalities)} leaves out")

    def _validate_video(self, i: int, r: GenerationRequest) -> None:
        """Mode "video" and `video_frames` need video tokens, a frame count the vocabulary can say, and
        room for the video in max_new_tokens (its smallest when the model chooses the count or size)."""
        t = self.tables
        if r.mode != "video" and r.video_frames is None:
            return
        if not t.has_video:
            what = "mode 'video'" if r.mode == "video" else "video_frames"
            raise ValueError(f"request {i}: {what} needs a model whose vocabulary has video tokens "
                             "(video_begin, video_end) and size tokens to count frames; "
                             "tokenloom.modalities.add_modality(pipe, 'video') adds them")
        if r.video_frames is not None:
            check_integer(r.video_frames, f"request {i}: video_frames", low=1, high=t.max_frames)
            if r.mode not in ("video", "any"):
                raise ValueError(f"request {i}: video_frames is for modes 'video' and 'any', not {r.mode!r}")
        frames = r.video_frames or 1
        if t.layout == "flat":
            h, w = t.flat_grid
        else:
            h, w = r.image_size or (t.size_unit, t.size_unit)
        need = t.video_length(frames, h, w)
        if need > r.max_new_tokens:
            what = f"{frames} frame{'s' * (frames > 1)} of {h}x{w}" if r.video_frames else f"one frame of {h}x{w}"
            raise ValueError(f"request {i}: a video of {what} needs {need} tokens, "
                             f"more than max_new_tokens={r.max_new_tokens}")

    def _validate_speech(self, i: int, r: GenerationRequest) -> None:
        """Mode "speech", `speech_levels` and `speech_frames` need speech tokens and levels the vocabulary
        has; mode "speech" and `speech_frames` room for the utterance in max_new_tokens (its shortest
        when the model ends it)."""
        t = self.tables
        check_integer(r.max_speech_frames, f"request {i}: max_speech_frames", low=1, high=MAX_SPEECH_FRAMES)
        check_integer(r.speech_chunk_frames, f"request {i}: speech_chunk_frames", low=1)
        if r.mode != "speech" and r.speech_levels is None and r.speech_frames is None:
            return
        if not t.has_speech:
            what = "mode 'speech'" if r.mode == "speech" else (
                "speech_levels" if r.speech_levels is not None else "speech_frames")
            raise ValueError(f"request {i}: {what} needs a model whose vocabulary has speech tokens "
                             "(speech_begin, speech_end, speech codes); `tokenloom add-modality --modality "
                             "speech` adds them")
        for name in ("speech_levels", "speech_frames"):
            if getattr(r, name) is not None and r.mode not in ("speech", "any"):
                raise ValueError(f"request {i}: {name} is for modes 'speech' and 'any', not {r.mode!r}")
        if r.speech_levels is not None:
            check_integer(r.speech_levels, f"request {i}: speech_levels", low=1, high=t.speech_levels)
        if r.speech_frames is not None:
            check_integer(r.speech_frames, f"request {i}: speech_frames", low=1, high=MAX_SPEECH_FRAMES)
        levels, frames = r.speech_levels or t.speech_levels, r.speech_frames or 1
        need = t.speech_length(levels, frames)
        # Mode "any" with levels alone only shapes the utterances it may speak: nothing has to fit.
        if (r.mode == "speech" or r.speech_frames is not None) and need > r.max_new_tokens:
            what = f"{frames} frame{'s' * (frames > 1)}" if r.speech_frames else "one frame"
            raise ValueError(f"request {i}: an utterance of {what} at {levels} level{'s' * (levels > 1)} needs "
                             f"{need} tokens, more than max_new_tokens={r.max_new_tokens}")
