"""The wire format: request bodies (pydantic, strict types), data URIs in and out, answers as content parts.

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

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.sampling import check_number
from ..image_processing import decoded
from .errors import APIError, bad_request


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None


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
    # OpenAI fields this server refuses unless they ask for nothing
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
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


def modalities_mode(modalities: list[str] | None) -> str:
    """OpenAI's modalities -> the engine's mode: text only "text", image only "image", both or none "any"."""
    if modalities is None:
        return "any"
    unknown = [m for m in modalities if m not in ("text", "image")]
    if unknown or not modalities:
        raise bad_request(f"modalities must be a non-empty list of \"text\" and \"image\", got {modalities!r}"
                          + (" (this server has no audio)" if "audio" in unknown else ""), "modalities")
    kinds = set(modalities)
    return "any" if kinds == {"text", "image"} else kinds.pop()


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
def decode_data_uri(url: str, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """A data:image/...;base64 URI -> a decoded RGB (or RGBA) PIL image, within the byte and pixel bounds."""
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
    from ..video_io import animation_bytes

    return {"type": "image_url", "image_url": {"url": "data:image/gif;base64,"
                                                      + base64.b64encode(animation_bytes(frames)).decode("ascii")}}


def message_parts(content, index: int) -> list[tuple[str, Any]]:
    """A message's content -> [("text", str) | ("image", data URI)], checked; param names point into it."""
    param = f"messages[{index}].content"
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)]
    out = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{p} must be a content part: {{\"type\": \"text\", \"text\": ...}} or "
                              f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", p, "invalid_type")
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
        else:
            raise bad_request(f"{p}.type must be \"text\" or \"image_url\", got {kind!r}", f"{p}.type",
                              "invalid_type")
    return out
