"""The FastAPI application: OpenAI's chat completions (text, images and speech, in and out) and image
generations, models, health, metrics, and the web page. Handlers check everything they can before a
request takes a place in the queue; the engine thread (worker.py) does the rest and streams back
through each job's asyncio queue."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..audio_io import StreamResampler
from ..document import MAX_SPEECH_FRAMES, ImagePart, TextPart, VideoPart, check_text
from ..engine import check_guidance_scale
from ..engine.sampling import MAX_TOP_K
from .errors import APIError, bad_request, error_body
from .jobs import ChatJob, ChatOptions, ImageOptions, ImagesJob, Job
from .metrics import Metrics
from .protocol import (AUDIO_RATE, ChatCompletionRequest, ImageGenerationRequest, answer_audio, check_audio_param,
                       check_range, decode_data_uri, decode_input_audio, image_part, message_parts, modalities_mode,
                       parse_body, parse_size, png_base64, video_part)
from .settings import ServeSettings
from .worker import EngineWorker

STATIC = Path(__file__).parent / "static"
MAX_SEED = 2**63 - 1
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/images/generations"}
PUBLIC = {"/health", "/", "/index.html", "/favicon.ico"}  # and /static/*: a page load cannot send a header

PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>tokenloom</title>
<h1>tokenloom</h1><p>The web page is not installed (no <code>tokenloom/serve/static/index.html</code>).
The API is up: <code>POST /v1/chat/completions</code>, <code>POST /v1/images/generations</code>,
<code>GET /v1/models</code>, <code>GET /health</code>, <code>GET /metrics</code>.</p>
"""


def create_app(settings: ServeSettings | None = None, pipe=None) -> FastAPI:
    """The application. The model loads on the engine thread when the app starts (GET /health is 503
    until then); `pipe` gives an already loaded Pipeline instead (the app then owns it), or a function
    that returns one (called on the engine thread)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    worker = EngineWorker(settings, metrics, pipe)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="tokenloom", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.metrics, app.state.worker = settings, metrics, worker
    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                            str(exc.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, None),
                            status_code=500)

    # -- plain endpoints --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if worker.ready:
            return {"status": "ok"}
        body = {"status": worker.state}
        if worker.load_error is not None:
            body["message"] = f"cannot load the model: {worker.load_error}"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(worker, metrics)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != worker.model_id:
            raise _no_model(model_id)
        return _model_card(worker, metrics)

    @app.get("/")
    @app.get("/index.html")
    async def index():
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse(PLACEHOLDER)

    @app.get("/static/{name:path}")
    async def static(name: str):
        root = STATIC.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise APIError(404, f"no such file: /static/{name}")
        return FileResponse(path)

    # -- generation -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await _read_body(request, settings.max_body_bytes), ChatCompletionRequest)
        pipe = _ready(worker)
        _check_model(worker, body.model)
        options, raw_messages = _chat_options(body, pipe, settings)
        job = ChatJob(asyncio.get_running_loop(), options)
        _admit(worker, metrics, settings)
        try:
            options.messages = await run_in_threadpool(_decode_messages, raw_messages, settings, pipe)
        except BaseException:
            worker.release(job)
            raise
        watcher = await _start(request, worker, job)
        if watcher is None:
            return Response(status_code=499)
        meta = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": worker.model_id}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _event_stream(_chat_stream(worker, job, watcher, meta, usage))
        ok = await _wait(worker, job, watcher)
        if not ok:
            return Response(status_code=499)
        return JSONResponse(await run_in_threadpool(_chat_response, job, meta, pipe))

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = parse_body(await _read_body(request, settings.max_body_bytes), ImageGenerationRequest)
        pipe = _ready(worker)
        _check_model(worker, body.model)
        options = _image_options(body, pipe, settings)
        job = ImagesJob(asyncio.get_running_loop(), options)
        _admit(worker, metrics, settings)
        watcher = await _start(request, worker, job)
        if watcher is None:
            return Response(status_code=499)
        h, w = options.grid
        meta = {"created": int(time.time()), "size": f"{w * pipe.factor}x{h * pipe.factor}"}
        if body.stream:
            return _event_stream(_images_stream(worker, job, watcher, meta))
        images: list = [None] * options.n
        ok = await _wait(worker, job, watcher, images)
        if not ok:
            return Response(status_code=499)
        return JSONResponse(await run_in_threadpool(_images_response, job, images, meta))

    return app


# -- the gate: API key and status counts -------------------------------------------------------------
class _Gate:
    """Pure ASGI middleware (so streamed responses pass untouched): checks the API key and counts
    every response by path and status for /metrics."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = None if settings.api_key is None else settings.api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in PATHS else "/static" if path.startswith("/static/") else "other"
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and path not in PUBLIC and not path.startswith("/static/") \
                    and not self._authorized(scope):
                response = JSONResponse(error_body("missing or incorrect API key: send the header "
                                                   "'Authorization: Bearer KEY'", "invalid_request_error", None,
                                                   "invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, counted)
                return
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count_http(label, status)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False


# -- request checks ------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: a larger Content-Length is refused before reading, and a body
    without one (chunked) is counted as it streams in."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise bad_request(f"bad Content-Length header {length!r}")
        if int(length) > limit:
            raise APIError(413, f"the request body is {int(length)} bytes; at most {limit}",
                           code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    except ClientDisconnect:
        raise APIError(499, "the client went away while sending the request") from None
    return bytes(body)


def _ready(worker: EngineWorker):
    if worker.ready:
        return worker.pipe
    if worker.state == "loading":
        raise APIError(503, "the model is loading; try again shortly", code="model_loading",
                       headers={"Retry-After": "5"})
    raise APIError(503, f"the model is not available ({worker.state})", code="model_unavailable")


def _no_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")


def _check_model(worker: EngineWorker, name: str | None) -> None:
    if name not in (None, "", worker.model_id):
        raise _no_model(name)


def _admit(worker: EngineWorker, metrics: Metrics, settings: ServeSettings) -> None:
    if not worker.try_admit():
        metrics.incr("rejected")
        raise APIError(429, f"the server is busy: {settings.capacity} requests are in flight "
                            f"({settings.max_batch} running, {settings.max_queue} waiting); retry shortly",
                       code="rate_limit_exceeded", headers={"Retry-After": str(settings.retry_after_s)})


def _seed(value) -> int | None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise bad_request(f"seed must be in [0, {MAX_SEED}], got {value}", "seed")
    return value


def _guidance(value) -> float | None:
    if value is not None:
        try:
            check_guidance_scale(value)
        except ValueError as e:
            raise bad_request(str(e), "guidance_scale") from None
    return value


def _refuse(body: ChatCompletionRequest) -> None:
    """Fields whose request this server cannot honour: a 400, never a silent difference."""
    unsupported = {
        "tools": bool(body.tools), "functions": bool(body.functions), "logprobs": bool(body.logprobs),
        "top_logprobs": bool(body.top_logprobs), "stop": bool(body.stop), "logit_bias": bool(body.logit_bias),
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
        "response_format": body.response_format not in (None, {"type": "text"}),
    }
    for name, asked in unsupported.items():
        if asked:
            raise bad_request(f"{name} is not supported by this server", name, "unsupported_parameter")


def has_speech(pipe) -> bool:
    """Whether the model hears and speaks: a speech codec and speech codes in its vocabulary."""
    return pipe.speech_tokenizer is not None and pipe.vocab.has_speech


def _hearing(pipe, settings: ServeSettings) -> tuple[int, float] | None:
    """(the codec's sample rate, the longest input audio in seconds), or None for a model without speech."""
    if not has_speech(pipe):
        return None
    codec = pipe.speech_tokenizer.config
    return codec.sample_rate, min(settings.max_audio_seconds, MAX_SPEECH_FRAMES / codec.frame_rate)


NO_SPEECH = "it has no speech codec or no speech codes (tokenloom add-modality --modality speech adds them)"


def _chat_options(body: ChatCompletionRequest, pipe, settings: ServeSettings):
    _refuse(body)
    if len(body.messages) > settings.max_messages:
        raise bad_request(f"at most {settings.max_messages} messages, got {len(body.messages)}", "messages")
    mode = modalities_mode(body.modalities)
    speech = has_speech(pipe)
    if "audio" in (body.modalities or ()) and not speech:
        raise bad_request(f"this model cannot speak: {NO_SPEECH}; modalities may be \"text\" and \"image\"",
                          "modalities", "unsupported_value")
    if mode in ("image", "any") and pipe.image_tokenizer is None:
        raise bad_request("this model has no image tokenizer: it answers with text only (modalities "
                          "[\"text\"])", "modalities")
    audio_format = check_audio_param(body.audio, body.stream)
    if body.audio is not None:
        if not speech:
            raise bad_request(f"audio sets the answer's audio, but this model cannot speak: {NO_SPEECH}", "audio",
                              "unsupported_parameter")
        if mode not in ("speech", "any"):
            raise bad_request(f"audio sets the answer's audio, but modalities {body.modalities!r} ask for none: add "
                              "\"audio\" to modalities", "audio")
    if body.n < 1 or body.n > settings.max_n:
        raise bad_request(f"n must be from 1 to {settings.max_n}, got {body.n}", "n")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; give one", "max_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    context = pipe.model.config.max_position_embeddings
    limit = min(settings.max_tokens or context, context)
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise bad_request(f"{name} must be from 1 to {limit}, got {max_tokens}", name)
    check_range(body.temperature, "temperature", low=0.0)
    check_range(body.image_temperature, "image_temperature", low=0.0)
    check_range(body.top_p, "top_p", low=0.0, high=1.0, open_low=True)
    check_range(body.image_top_p, "image_top_p", low=0.0, high=1.0, open_low=True)
    check_range(body.top_k, "top_k", low=1, high=MAX_TOP_K)
    check_range(body.image_top_k, "image_top_k", low=1, high=MAX_TOP_K)
    check_range(body.repetition_penalty, "repetition_penalty", low=0.0, open_low=True)
    check_range(body.speech_temperature, "speech_temperature", low=0.0)
    check_range(body.speech_top_p, "speech_top_p", low=0.0, high=1.0, open_low=True)
    check_range(body.speech_top_k, "speech_top_k", low=1, high=MAX_TOP_K)
    _guidance(body.guidance_scale)
    draws = mode in ("image", "any")  # width and height apply to drawn images only
    if (body.width is not None or body.height is not None) and draws:
        for name_, value in (("width", body.width), ("height", body.height)):
            if value is not None and value < 1:
                raise bad_request(f"{name_} must be >= 1, got {value}", name_)
        try:
            pipe.grid_size(body.width, body.height)
        except ValueError as e:
            raise bad_request(str(e), "width" if body.width is not None else "height") from None
    raw, chars, images, audios = [], 0, 0, 0
    for i, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise bad_request(f"messages[{i}].role must be system, user or assistant, got {message.role!r} "
                              "(this server has no tools)", f"messages[{i}].role")
        if message.audio is not None:
            raise bad_request(f"messages[{i}].audio refers to an earlier answer's audio, but this server keeps none "
                              "(its expires_at is when it was made): send that audio back as an input_audio "
                              "content part", f"messages[{i}].audio", "unsupported_parameter")
        parts = message_parts(message.content, i)
        for j, (kind, value) in enumerate(parts):
            if kind == "text":
                try:
                    check_text(value, f"messages[{i}].content")
                except ValueError as e:
                    raise bad_request(str(e), f"messages[{i}].content") from None
                chars += len(value)
            elif kind == "audio":
                if not speech:
                    raise bad_request(f"this model cannot hear speech: {NO_SPEECH}", f"messages[{i}].content[{j}]",
                                      "unsupported_value")
                audios += 1
            else:
                images += 1
        raw.append((role, parts, i))
    if chars > settings.max_text_chars:
        raise bad_request(f"the messages hold {chars} characters of text; at most {settings.max_text_chars}",
                          "messages", "context_length_exceeded")
    if images > settings.max_input_images:
        raise bad_request(f"the messages hold {images} images; at most {settings.max_input_images}", "messages")
    if images and pipe.image_tokenizer is None:
        raise bad_request("this model has no image tokenizer: it cannot read images", "messages")
    if audios > settings.max_input_audio:
        raise bad_request(f"the messages hold {audios} input_audio parts; at most {settings.max_input_audio}",
                          "messages")
    sampling = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
                "repetition_penalty": body.repetition_penalty, "image_temperature": body.image_temperature,
                "image_top_k": body.image_top_k, "image_top_p": body.image_top_p,
                "guidance_scale": body.guidance_scale}
    if draws:
        sampling.update(width=body.width, height=body.height)
    speech_sampling = {k: v for k, v in (("temperature", body.speech_temperature), ("top_k", body.speech_top_k),
                                         ("top_p", body.speech_top_p)) if v is not None}
    if speech and speech_sampling:
        sampling["speech_sampling"] = speech_sampling
    options = ChatOptions(messages=[], mode=mode, n=body.n, max_tokens=max_tokens, max_tokens_limit=limit,
                          seed=_seed(body.seed), preview_every=settings.preview_rows if body.stream else 0,
                          sampling={k: v for k, v in sampling.items() if v is not None}, stream=body.stream,
                          audio_format=audio_format, speak="audio" in (body.modalities or ()))
    return options, raw


def _decode_messages(raw, settings: ServeSettings, pipe):
    """Data URIs -> PIL images (animated ones: ("video", frames)) and input_audio -> audio_io.Audio (in a
    worker thread: decoding is CPU work); the model encodes them later."""
    hearing = _hearing(pipe, settings)
    out = []
    for role, parts, i in raw:
        decoded = []
        for j, (kind, value) in enumerate(parts):
            if kind == "image":
                where = f"messages[{i}].content[{j}].image_url"
                value = decode_data_uri(value, where, settings.max_image_bytes, settings.max_image_pixels)
                if isinstance(value, list):  # an animated GIF or WebP: a video
                    kind = "video"
                    _check_video_input(pipe, len(value), where)
            elif kind == "audio":
                rate, seconds = hearing
                value = decode_input_audio(*value, f"messages[{i}].content[{j}]", settings.max_audio_bytes, seconds,
                                           rate)
            decoded.append((kind, value))
        out.append((role, decoded))
    return out


def _check_video_input(pipe, frames: int, where: str) -> None:
    """The format's own check (video tokens, frame count), as a 400 naming the part before anything is queued."""
    try:
        pipe.format.check_video(frames)
    except ValueError as e:
        code = "invalid_video" if pipe.vocab.has_video else "unsupported_video"
        raise bad_request(f"the image is animated, a video of {frames} frames, but {e}; send one frame as a PNG "
                          "for an image", where, code) from None


def _image_options(body: ImageGenerationRequest, pipe, settings: ServeSettings) -> ImageOptions:
    try:
        prompt = check_text(body.prompt, "prompt")
    except ValueError as e:
        raise bad_request(str(e), "prompt") from None
    if not prompt.strip():
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompt) > settings.max_text_chars:
        raise bad_request(f"prompt is {len(prompt)} characters; at most {settings.max_text_chars}", "prompt",
                          "context_length_exceeded")
    if not 1 <= body.n <= settings.max_images:
        raise bad_request(f"n must be from 1 to {settings.max_images}, got {body.n}", "n")
    if body.response_format not in (None, "b64_json"):
        raise bad_request(f"response_format {body.response_format!r} is not supported: this server returns "
                          "images inline only (\"b64_json\"), it keeps no files to link to", "response_format",
                          "unsupported_value")
    if body.output_format not in (None, "png"):
        raise bad_request(f"output_format {body.output_format!r} is not supported; only \"png\"", "output_format",
                          "unsupported_value")
    partial = 0 if body.partial_images is None else body.partial_images
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise bad_request(f"partial_images must be from 0 to {MAX_PARTIAL_IMAGES}, got {partial}", "partial_images")
    if pipe.image_tokenizer is None or not pipe.image_tokenizer.can_decode:
        raise bad_request("this model cannot draw (no VQGAN decoder)", "model")
    width, height = parse_size(body.size)
    try:
        grid = pipe.grid_size(width, height)
    except ValueError as e:
        raise bad_request(f"size {body.size!r}: {e}", "size") from None
    default = min(pipe.config.image_candidates, settings.max_candidates)
    candidates = default if body.candidates is None else body.candidates
    if not 1 <= candidates <= settings.max_candidates:
        raise bad_request(f"candidates must be from 1 to {settings.max_candidates}, got {candidates}", "candidates")
    check_range(body.temperature, "temperature", low=0.0)
    check_range(body.top_p, "top_p", low=0.0, high=1.0, open_low=True)
    check_range(body.top_k, "top_k", low=1, high=MAX_TOP_K)
    sampling = {k: v for k, v in (("temperature", body.temperature), ("top_k", body.top_k),
                                  ("top_p", body.top_p)) if v is not None}
    return ImageOptions(prompt=prompt, grid=grid, n=body.n, candidates=candidates,
                        partial_images=partial if body.stream else 0, seed=_seed(body.seed),
                        guidance_scale=_guidance(body.guidance_scale), sampling=sampling)


# -- running a job ---------------------------------------------------------------------------------------
async def _watch(request: Request, worker: EngineWorker, job: Job) -> None:
    """Cancel the job when the client goes away (uvicorn reports http.disconnect once the body is read)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                worker.cancel(job)
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - nothing more to watch
        return


async def _start(request: Request, worker: EngineWorker, job: Job):
    """Queue the job and wait until it joined the batch (or was refused: its APIError is raised).
    Returns the disconnect watcher, or None when the client left first."""
    worker.submit(job)
    watcher = asyncio.create_task(_watch(request, worker, job))
    try:
        first = await job.queue.get()
    except BaseException:
        watcher.cancel()
        worker.cancel(job)
        raise
    if first[0] == "accepted":
        return watcher
    watcher.cancel()
    if first[0] == "error":
        raise first[1]
    return None  # cancelled


async def _wait(worker: EngineWorker, job: Job, watcher, images: list | None = None) -> bool:
    """Wait for a job's end (non-streamed answers); False when it was cancelled."""
    try:
        while True:
            message = await job.queue.get()
            kind = message[0]
            if kind == "done":
                return True
            if kind == "cancelled":
                return False
            if kind == "error":
                raise message[1]
            if kind == "image" and images is not None:
                images[message[1]] = (message[2], message[3])
    finally:
        watcher.cancel()
        if not job.finished:
            worker.cancel(job)


def _event_stream(generator) -> StreamingResponse:
    return StreamingResponse(generator, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data, event: str | None = None) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def _audio_id() -> str:
    return "audio_" + uuid.uuid4().hex


async def _chat_stream(worker: EngineWorker, job: ChatJob, watcher, meta: dict, include_usage: bool):
    """OpenAI's chunks. A choice's speech (every utterance of it, in order) is one audio: a first
    delta.audio with its id and an empty transcript, then one with base64 pcm16 data per SpeechChunk
    (resampled to AUDIO_RATE as one stream: the pieces join as the utterance resampled whole), and before
    the choice's finish_reason one with only its expires_at."""
    def chunk(index: int, delta: dict, finish_reason=None, **extra) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extra}
        return _sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [choice]})

    audio_ids: dict[int, str] = {}
    resamplers: dict[int, StreamResampler] = {}  # per choice: its utterance being streamed

    def flush(index: int):  # the end of an utterance: what its resampler held back
        rest = resamplers.pop(index).push(np.zeros(0, np.float32), final=True) if index in resamplers else []
        return [chunk(index, {"audio": {"id": audio_ids[index], "data": answer_audio(rest, AUDIO_RATE, "pcm16")}})
                ] if len(rest) else []

    try:
        for i in range(job.options.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while True:
            message = await job.queue.get()
            kind = message[0]
            if kind == "text":
                yield chunk(message[1], {"content": message[2]})
            elif kind in ("preview", "image"):
                if message[2] is not None:
                    part = await run_in_threadpool(image_part, message[2], kind == "preview")
                    yield chunk(message[1], {"content": [part]})
            elif kind == "video":
                part = await run_in_threadpool(video_part, message[2])
                yield chunk(message[1], {"content": [part]})
            elif kind == "speech_start":
                for piece in flush(message[1]):
                    yield piece
                if message[1] not in audio_ids:
                    audio_ids[message[1]] = _audio_id()
                    yield chunk(message[1], {"audio": {"id": audio_ids[message[1]], "transcript": ""}})
            elif kind == "speech":
                _, index, samples, rate = message
                aid = audio_ids.setdefault(index, _audio_id())
                samples = resamplers.setdefault(index, StreamResampler(rate, AUDIO_RATE)).push(samples)
                if len(samples):
                    yield chunk(index, {"audio": {"id": aid, "data": answer_audio(samples, AUDIO_RATE, "pcm16")}})
            elif kind == "finished":
                result = message[2]
                for piece in flush(message[1]):
                    yield piece
                if message[1] in audio_ids:
                    yield chunk(message[1], {"audio": {"id": audio_ids[message[1]], "expires_at": meta["created"]}})
                yield chunk(message[1], {}, result.finish_reason, seed=result.seed)
            elif kind == "done":
                break
            elif kind == "error":
                yield _sse(message[1].body())
                return
            elif kind == "cancelled":
                return
        if include_usage:
            yield _sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [],
                        "usage": _usage(job)})
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        if not job.finished:
            worker.cancel(job)


def answer_content(document):
    """An answer's content: a string when it is text only, else text and image_url parts in order (a
    video as an animated GIF). Speech is not content: it is the message's `audio` (answer_message)."""
    parts: list[dict] = []
    for part in document.parts:
        if isinstance(part, TextPart):
            if not part.text:
                continue
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += part.text
            else:
                parts.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart) and part.pixels is not None:
            parts.append(image_part(part.pixels))
        elif isinstance(part, VideoPart) and part.pixels is not None:
            parts.append(video_part(list(part.pixels)))
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def answer_message(result, pipe, audio_format: str, created: int) -> dict:
    """A choice's message: its content (answer_content), and where it spoke, `audio` as OpenAI shapes it:
    {"id", "data" (base64 of every utterance in order, in audio_format), "expires_at" (when it was made:
    this server keeps nothing to refer back to), "transcript" ("": the model writes none)}; content is
    then null when there is no text or image beside it."""
    message = {"role": "assistant", "content": answer_content(result.document)}
    waves = [p.audio for p in result.speech_parts if p.audio is not None]
    if waves:
        rate = pipe.speech_tokenizer.config.sample_rate
        message["audio"] = {"id": _audio_id(), "data": answer_audio(np.concatenate(waves), rate, audio_format),
                            "expires_at": created, "transcript": ""}
        if message["content"] == "":
            message["content"] = None
    return message


def _chat_response(job: ChatJob, meta: dict, pipe) -> dict:
    choices = [{"index": i, "message": answer_message(r, pipe, job.options.audio_format, meta["created"]),
                "logprobs": None, "finish_reason": r.finish_reason, "seed": r.seed}
               for i, r in enumerate(job.results)]
    return {**meta, "object": "chat.completion", "system_fingerprint": None, "choices": choices,
            "usage": _usage(job)}


def _image_usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0},
            "output_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens}


def _images_response(job: ImagesJob, images: list, meta: dict) -> dict:
    data = []
    for image, _ in images:
        data.append({"b64_json": None if image is None else png_base64(image)})
    return {"created": meta["created"], "data": data, "background": "opaque", "output_format": "png",
            "quality": "auto", "size": meta["size"], "usage": _image_usage(job.prompt_tokens, job.completion_tokens)}


async def _images_stream(worker: EngineWorker, job: ImagesJob, watcher, meta: dict):
    common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": meta["size"]}
    try:
        while True:
            message = await job.queue.get()
            kind = message[0]
            if kind in ("preview", "image"):
                _, index, image, extra = message
                b64 = None if image is None else await run_in_threadpool(png_base64, image)
                if kind == "preview":
                    event = {"type": "image_generation.partial_image", "b64_json": b64, "created_at": int(time.time()),
                             **common, "partial_image_index": extra, "image_index": index}
                else:
                    event = {"type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()),
                             **common, "image_index": index, "usage": _image_usage(job.prompt_tokens, extra)}
                yield _sse(event, event["type"])
            elif kind == "done":
                return
            elif kind == "error":
                yield _sse(message[1].body(), "error")
                return
            elif kind == "cancelled":
                return
    finally:
        watcher.cancel()
        if not job.finished:
            worker.cancel(job)


def _model_card(worker: EngineWorker, metrics: Metrics) -> dict:
    """OpenAI's model object; once the model is loaded, with what it reads and writes (tokenloom's fields):
    input_modalities and output_modalities, of "text", "image", "video" (animated GIFs both ways) and
    "audio" (it hears / it speaks)."""
    card = {"id": worker.model_id, "object": "model", "created": int(metrics.started), "owned_by": "tokenloom"}
    if worker.ready:
        pipe = worker.pipe
        images = pipe.image_tokenizer is not None
        draws = images and pipe.image_tokenizer.can_decode
        video = ["video"] if images and pipe.vocab.has_video else []
        audio = ["audio"] if has_speech(pipe) else []
        card["input_modalities"] = ["text"] + ["image"] * images + video + audio
        card["output_modalities"] = ["text"] + ["image"] * draws + video * draws + audio
    return card


__all__ = ["create_app", "answer_content"]
