"""What a server is allowed to do: every limit in one place, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..engine.sampling import check_integer

# The longest input audio: an utterance holds at most document.MAX_SPEECH_FRAMES code frames, a minute
# at the codecs' 25 frames a second.
MAX_AUDIO_SECONDS = 60.0


@dataclass
class ServeSettings:
    """Limits and switches of `tokenloom serve` (the CLI's flags; defaults in brackets there)."""

    model: str | None = None  # model directory; None: the embedded default
    adapter: str | None = None  # a LoRA adapter directory merged into the model's weights at load
    model_id: str | None = None  # name in /v1/models (default: the directory's name)
    device: str | None = None
    dtype: str | None = None
    speculative: str | None = None  # "jacobi" or "off": override the model's speculative decoding
    speculative_window: int | None = None
    max_batch: int = 16  # engine requests decoded together
    max_queue: int = 64  # HTTP requests admitted beyond max_batch; past it: 429
    api_key: str | None = None  # every endpoint but /health, / and /static/* needs "Authorization: Bearer KEY"
    max_body_bytes: int = 16 << 20  # request body (413 past it)
    max_image_bytes: int = 8 << 20  # one decoded data URI
    max_image_pixels: int = 2048 * 2048  # one input image, width x height, checked before decoding
    max_input_images: int = 8  # images in one chat request (all messages)
    max_audio_bytes: int = 8 << 20  # one input_audio part, decoded from base64
    max_audio_seconds: float = 60.0  # one input_audio part (at most 60 s: what one utterance holds)
    max_input_audio: int = 8  # input_audio parts in one chat request (all messages)
    max_messages: int = 256
    max_text_chars: int = 200_000  # all text of one request, before tokenizing
    max_n: int = 4  # chat choices per request
    max_images: int = 4  # images per /v1/images/generations request
    max_candidates: int = 8  # reranked draws per image (the model's image_candidates, clamped to this)
    max_tokens: int | None = None  # bound on max_tokens (default: the model's context)
    preview_rows: int = 4  # streamed chat: a preview of a drawn image every this many code rows (0: none)
    retry_after_s: int = 1  # Retry-After of a 429

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_messages",
                     "max_text_chars", "max_n", "max_images", "max_candidates", "retry_after_s", "max_audio_bytes"):
            check_integer(getattr(self, name), name, low=1)
        for name in ("max_queue", "max_input_images", "preview_rows", "max_input_audio"):
            check_integer(getattr(self, name), name, low=0)
        seconds = self.max_audio_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_AUDIO_SECONDS:
            raise ValueError(f"max_audio_seconds must be in (0, {MAX_AUDIO_SECONDS:g}], got {seconds!r}")
        if self.max_tokens is not None:
            check_integer(self.max_tokens, "max_tokens", low=1)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()
                                         or any(c.isspace() for c in self.api_key)):
            raise ValueError("api_key must be a non-empty string without spaces")

    @property
    def capacity(self) -> int:
        """HTTP requests in flight at once (running or waiting) before new ones get 429."""
        return self.max_batch + self.max_queue

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["api_key"] = None if self.api_key is None else "***"
        return d
