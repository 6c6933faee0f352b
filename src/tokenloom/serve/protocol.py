"""The wire format: request bodies (pydantic, strict types), data URIs in and out, input audio in and
audio out, answers as content parts.

Unknown fields are ignored (clients send many that change nothing here); known fields must have their
JSON type: a string where a number belongs is a 400 naming the field, never a silent conversion.
Fields that would change the answer in a way this server cannot honour (tools, logprobs, stop, penalties)
are refused with a 400 rather than ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import audio_io
from ..engine.sampling import check_number
from ..image_processing import decoded
from ..video_io import VIDEO_FORMATS, animation_bytes, animation_frames
from .errors import APIError, bad_request


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    audio: Any = None  # OpenAI's reference to an earlier answer's audio ({"id": ...}): refused, nothing is kept


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    modalities: list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # tokenloom (and vLLM) extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # tokenloom extensions: how images are drawn
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    image_temperature: float | None = None
    image_top_k: int | None = None
    image_top_p: float | None = None
    repetition_penalty: float | None = None
    # tokenloom extensions: how speech is drawn (inside an utterance)
    speech_temperature: float | None = None
    speech_top_k: int | None = None
    speech_top_p: float | None = None
    # audio output: {"voice": ..., "format": "wav" | "pcm16"} (checked by check_audio_param)
    audio: Any = None
    # OpenAI fields this server refuses unless they ask for nothing
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class ImageGenerationRequest(_Body):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    stream: bool = False
    partial_images: int | None = None
    seed: int | None = None  # tokenloom extensions from here on
    guidance_scale: float | None = None
    candidates: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


_FIELDS = {name for model in (StreamOptions, Message, ChatCompletionRequest, ImageGenerationRequest)
           for name in model.model_fields}


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body -> the model, or a 400 saying what is wrong and where."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        kind = error.get("type", "")
        if kind == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}",
                              code="invalid_json") from None
        if kind == "model_type" and not error.get("loc"):
            raise bad_request("the request body must be a JSON object", code="invalid_json") from None
        loc = error.get("loc", ())
        param = _param(loc)
        if kind == "missing":
            raise bad_request(f"{param} is required", param, "missing_required_parameter") from None
        if any(isinstance(item, str) and item not in _FIELDS for item in loc):  # a union: say what it takes
            what = UNIONS.get(param.rsplit(".", 1)[-1], "another type")
            raise bad_request(f"{param} must be {what} (got {_short(error.get('input'))})", param,
                              "invalid_type") from None
        raise bad_request(f"{param}: {error['msg']} (got {_short(error.get('input'))})", param,
                          "invalid_type") from None


UNIONS = {"content": "a string, a list of content parts or null", "stop": "a string or a list of strings"}


def _param(loc) -> str:
    """("messages", 0, "content", "str") -> "messages[0].content": union branch tags left out."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _FIELDS:
            out += f".{item}" if out else item
    return out or "body"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- checks of values (types are pydantic's) ----------------------------------------------------------------
def check_range(value, name: str, low: float | None = None, high: float | None = None,
                open_low: bool = False) -> None:
    """`engine.sampling.check_number` for an optional request field, as a 400 naming it."""
    if value is None:
        return
    try:
        check_number(value, name, low=low, high=high, open_low=open_low)
    except ValueError as e:
        raise bad_request(str(e), name) from None


MODALITIES = ("text", "image", "audio")


def modalities_mode(modalities: list[str] | None) -> str:
    """OpenAI's modalities -> the engine's mode: text only "text", image only "image", text and image
    (or none given) "any"; with audio: "audio" alone or with "text" "speech" (exactly one utterance,
    and no text), with "image" too "any" (interleaved text, images and speech)."""
    if modalities is None:
        return "any"
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise bad_request(f"modalities must be a non-empty list of \"text\", \"image\" and \"audio\", got "
                          f"{modalities!r}", "modalities")
    kinds = set(modalities)
    if "audio" in kinds:
        return "any" if "image" in kinds else "speech"
    return "any" if kinds == {"text", "image"} else kinds.pop()


# -- audio in and out ------------------------------------------------------------------------------------------
AUDIO_INPUT_FORMATS = ("wav", "flac", "ogg")  # input_audio.format: what soundfile reads, mp3 left out
AUDIO_OUTPUT_FORMATS = ("wav", "pcm16")  # the request's audio.format; a stream's audio is pcm16 only
AUDIO_RATE = 24000  # every answer's audio: 24 kHz mono (WAV, or pcm16 little-endian), as OpenAI's
_SIGNATURES = {"wav": (b"RIFF", b"RIFX", b"RF64", b"BW64"), "flac": (b"fLaC",), "ogg": (b"OggS",)}


def _sniff(raw: bytes) -> str | None:
    """The accepted container the bytes begin like, or None."""
    for name, heads in _SIGNATURES.items():
        if raw.startswith(heads):
            return name
    return None


def check_audio_param(audio, stream: bool) -> str:
    """The request's `audio` parameter ({"voice": ..., "format": ...}, as OpenAI's) -> the output format.
    A missing one or a missing format is "wav", or "pcm16" when streaming (what OpenAI streams).
    `voice` is accepted and ignored: this model has one voice, no named ones."""
    if audio is None:
        return "pcm16" if stream else "wav"
    if not isinstance(audio, dict):
        raise bad_request("audio must be an object: {\"voice\": ..., \"format\": \"wav\"}", "audio", "invalid_type")
    voice = audio.get("voice")
    if voice is not None and not isinstance(voice, str) and not (isinstance(voice, dict)
                                                                 and isinstance(voice.get("id"), str)):
        raise bad_request(f"audio.voice must be a string (got {_short(voice)}); this model has one voice, so any "
                          "name is accepted and changes nothing", "audio.voice", "invalid_type")
    fmt = audio.get("format")
    if fmt is None:
        return "pcm16" if stream else "wav"
    if not isinstance(fmt, str):
        raise bad_request(f"audio.format must be a string (got {_short(fmt)})", "audio.format", "invalid_type")
    if fmt not in AUDIO_OUTPUT_FORMATS:
        raise bad_request(f"audio.format {fmt!r} is not supported; this server writes \"wav\" (16-bit PCM WAV) "
                          "or \"pcm16\" (raw 16-bit little-endian PCM, 24 kHz mono)", "audio.format",
                          "unsupported_value")
    if stream and fmt != "pcm16":
        raise bad_request(f"audio.format {fmt!r} cannot be streamed: a streamed answer's audio is \"pcm16\" (raw "
                          "16-bit little-endian PCM, 24 kHz mono), as OpenAI streams it; ask for \"pcm16\" or "
                          "do not stream", "audio.format", "unsupported_value")
    return fmt


def decode_input_audio(data, fmt: str, param: str, max_bytes: int, max_seconds: float,
                       sample_rate: int) -> audio_io.Audio:
    """An input_audio part's base64 data -> audio_io.Audio at `sample_rate` (mono float32), within the byte
    and length bounds. `param` is the part's path (messages[i].content[j]); `fmt` is already one of
    AUDIO_INPUT_FORMATS, and the bytes must be that container."""
    where = f"{param}.input_audio.data"
    if data.startswith("data:"):  # a data URI, as a browser's FileReader writes it: its base64 tail
        header, sep, data = data[5:].partition(",")
        if not sep or "base64" not in [m.strip().lower() for m in header.split(";")[1:]]:
            raise bad_request("input_audio.data must be base64 (or a base64 data URI)", where, "invalid_audio")
    if len(data) > (max_bytes + 2) // 3 * 4 + 1024:  # base64 of max_bytes, and some whitespace
        raise bad_request(f"the audio is larger than {max_bytes} bytes", where, "audio_too_large")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("input_audio.data is not valid base64", where, "invalid_audio") from None
    if not raw:
        raise bad_request("input_audio.data is empty", where, "invalid_audio")
    if len(raw) > max_bytes:
        raise bad_request(f"the audio is {len(raw)} bytes; at most {max_bytes}", where, "audio_too_large")
    found = _sniff(raw)
    if found != fmt:
        what = f"it looks like {found.upper()} (format \"{found}\")" if found else \
            f"it does not begin like a {fmt.upper()} file"
        raise bad_request(f"input_audio.data is not {fmt.upper()} audio as input_audio.format says: {what}", where,
                          "invalid_audio")
    try:
        samples = audio_io.read_audio_bytes(raw, sample_rate, max_seconds=max_seconds, name=where)
    except audio_io.AudioLoadError as e:
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", str(e))  # libsndfile's name for it
        code = "audio_too_long" if "longer than the limit" in message else "invalid_audio"
        raise bad_request(message, where, code) from None
    return audio_io.Audio(samples, sample_rate)


def answer_audio(samples, sample_rate: int, fmt: str) -> str:
    """Float samples at `sample_rate` -> base64 at AUDIO_RATE, mono: of a 16-bit PCM WAV file ("wav") or
    of raw 16-bit little-endian PCM ("pcm16", no header)."""
    samples = np.nan_to_num(np.asarray(samples, dtype=np.float32))
    if len(samples) and sample_rate != AUDIO_RATE:
        samples = audio_io.resample(samples, sample_rate, AUDIO_RATE)
    pcm = audio_io.to_pcm16(np.clip(samples, -1.0, 1.0)) if len(samples) else np.zeros(0, np.int16)
    if fmt == "pcm16":
        raw = pcm.astype("<i2").tobytes()
    else:
        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, pcm, AUDIO_RATE, format="WAV", subtype="PCM_16")
        raw = buffer.getvalue()
    return base64.b64encode(raw).decode("ascii")


def parse_size(size: str | None, param: str = "size") -> tuple[int | None, int | None]:
    """"WxH" -> (width, height); None or "auto" -> (None, None) (the model's size)."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size.lower()) if isinstance(size, str) else None
    if match is None:
        raise bad_request(f"{param} must be \"WIDTHxHEIGHT\" in pixels (e.g. \"64x64\") or \"auto\", got {size!r}",
                          param)
    return int(match[1]), int(match[2])


# -- images in and out ---------------------------------------------------------------------------------------
VIDEO_PIXELS = 4  # an animated image's frames together may hold this many times an image's pixel bound


def decode_data_uri(url: str, param: str, max_bytes: int, max_pixels: int) -> Image.Image | list[Image.Image]:
    """A data:image/...;base64 URI -> a decoded RGB (or RGBA) PIL image, within the byte and pixel bounds; an
    animated GIF or WebP of more than one frame -> its frames, a video (what the server answers videos as)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise bad_request("image_url.url must be a data URI (data:image/png;base64,...); this server does not "
                          "fetch URLs", param, "invalid_image_url")
    header, sep, data = url[5:].partition(",")
    media = header.split(";")
    if not sep or "base64" not in [m.strip().lower() for m in media[1:]]:
        raise bad_request("image_url.url must be a base64 data URI (data:image/png;base64,...)", param,
                          "invalid_image_url")
    if media[0] and not media[0].strip().lower().startswith("image/"):
        raise bad_request(f"the data URI holds {media[0]!r}, not an image", param, "invalid_image_url")
    if len(data) > (max_bytes + 2) // 3 * 4 + 1024:  # base64 of max_bytes, and some whitespace
        raise bad_request(f"the image is larger than {max_bytes} bytes", param, "image_too_large")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URI is not valid base64", param, "invalid_image_url") from None
    if len(raw) > max_bytes:
        raise bad_request(f"the image is larger than {max_bytes} bytes", param, "image_too_large")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > max_pixels:
                raise bad_request(f"the image is {img.width}x{img.height}: more than {max_pixels} pixels", param,
                                  "image_too_large")
            frames = getattr(img, "n_frames", 1) if img.format in VIDEO_FORMATS else 1
            if frames > 1:
                if frames * img.width * img.height > VIDEO_PIXELS * max_pixels:  # before decoding any frame
                    raise bad_request(f"the video is {frames} frames of {img.width}x{img.height}: more than "
                                      f"{VIDEO_PIXELS * max_pixels} pixels in all", param, "image_too_large")
                try:
                    return animation_frames(img, "in the data URI")
                except ValueError as e:
                    raise bad_request(str(e), param, "invalid_video") from None
            return decoded(img)
    except APIError:
        raise
    except Image.UnidentifiedImageError:
        raise bad_request("the data URI holds no image format PIL can read", param, "invalid_image") from None
    except Image.DecompressionBombError as e:
        raise bad_request(f"the image is too large: {e}", param, "image_too_large") from None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error...)
        raise bad_request(f"the data URI is not an image PIL can read ({type(e).__name__}: {e})", param,
                          "invalid_image") from None


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(image: Image.Image, partial: bool = False) -> dict:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(image)}}
    if partial:
        part["partial"] = True
    return part


def video_part(frames: list[Image.Image]) -> dict:
    """A drawn video as an `image_url` part holding an animated GIF: what chat clients and browsers show
    (OpenAI's chat format has no video output part)."""
    return {"type": "image_url", "image_url": {"url": "data:image/gif;base64,"
                                                      + base64.b64encode(animation_bytes(frames)).decode("ascii")}}


def message_parts(content, index: int) -> list[tuple[str, Any]]:
    """A message's content -> [("text", str) | ("image", data URI) | ("audio", (base64, format))],
    checked; param names point into it."""
    param = f"messages[{index}].content"
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    out = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{p} must be a content part: {{\"type\": \"text\", \"text\": ...}}, "
                              f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} or "
                              f"{{\"type\": \"input_audio\", \"input_audio\": {{\"data\": ..., \"format\": ...}}}}", p,
                              "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{p}.text must be a string", f"{p}.text", "invalid_type")
            out.append(("text", text))
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise bad_request(f"{p}.image_url.url must be a string", f"{p}.image_url", "invalid_type")
            if part.get("partial") is True:  # a preview the client kept from a stream: not part of the answer
                continue
            out.append(("image", url))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict):
                raise bad_request(f"{p}.input_audio must be an object: {{\"data\": BASE64, \"format\": \"wav\"}}",
                                  f"{p}.input_audio", "invalid_type")
            data, fmt = audio.get("data"), audio.get("format")
            if not isinstance(data, str):
                raise bad_request(f"{p}.input_audio.data must be a base64 string", f"{p}.input_audio.data",
                                  "invalid_type")
            if fmt is None:
                raise bad_request(f"{p}.input_audio.format is required: one of "
                                  f"{', '.join(repr(f) for f in AUDIO_INPUT_FORMATS)}", f"{p}.input_audio.format",
                                  "missing_required_parameter")
            if fmt not in AUDIO_INPUT_FORMATS:
                raise bad_request(f"{p}.input_audio.format must be one of "
                                  f"{', '.join(repr(f) for f in AUDIO_INPUT_FORMATS)}, got {_short(fmt)}"
                                  + (" (MP3 is not read here: convert it to WAV, FLAC or OGG)" if fmt == "mp3" else ""),
                                  f"{p}.input_audio.format", "unsupported_value")
            out.append(("audio", (data, fmt)))
        else:
            raise bad_request(f"{p}.type must be \"text\", \"image_url\" or \"input_audio\", got {kind!r}",
                              f"{p}.type", "invalid_type")
    return out
