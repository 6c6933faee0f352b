"""tokenloom serve: the OpenAI-compatible server, driven over HTTP on 127.0.0.1 (uvicorn on a background
thread, a free port): the official openai client for chat (text, images, image input) and image
generation, streamed answers that reassemble into the plain ones, overload (429), bad input (4xx with
OpenAI's error body), the API key, and cancellation of requests whose client went away."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tokenloom.cli import main
from tokenloom.pipeline import load, random_pipeline
from tokenloom.serve import ServerThread, ServeSettings, create_app
from tokenloom.serve.worker import PREVIEW_FILL
from tokenloom.world import random_scene, render

STORY = [{"role": "user", "content": "Tell a story."}]
PROMPT = "a large red circle in the center"
TIMEOUT = httpx.Timeout(30.0)


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedded():
    """The embedded shapes-tiny model: answers that make sense (stories with pictures, captions)."""
    with ServerThread(create_app(ServeSettings())) as server:
        yield server


@pytest.fixture(scope="module")
def embedded_pipe():
    return load()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """A small random model with small limits, for bad input and cancellation."""
    settings = ServeSettings(model=str(tiny_dir), max_body_bytes=256 << 10, max_image_bytes=64 << 10,
                             max_image_pixels=200 * 200, max_n=2, max_images=2)
    with ServerThread(create_app(settings)) as server:
        yield server


def client(server, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30.0)


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str) -> Image.Image:
    raw = base64.b64decode(data.removeprefix("data:image/png;base64,"))
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


def reassemble(contents) -> str | list:
    """Streamed delta contents -> the answer's content, skipping parts marked partial (previews)."""
    parts: list[dict] = []
    for content in contents:
        if isinstance(content, str):
            if content:
                if parts and parts[-1]["type"] == "text":
                    parts[-1]["text"] += content
                else:
                    parts.append({"type": "text", "text": content})
        elif content:
            parts += [p for p in content if not p.get("partial")]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def stream_contents(stream) -> tuple[list, list, object]:
    """(delta contents, finish reasons, usage) of an openai chat stream."""
    contents, reasons, usage = [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content is not None:
                contents.append(choice.delta.content)
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    return contents, reasons, usage


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- the plain endpoints ---------------------------------------------------------------------------------------
def test_models_health_metrics_and_the_page(embedded):
    models = client(embedded).models.list()
    assert [m.id for m in models.data] == ["shapes-tiny"]
    assert httpx.get(embedded.url + "/health").json() == {"status": "ok"}
    text = httpx.get(embedded.url + "/metrics").text
    for name in ("tokenloom_queue_depth", "tokenloom_running_requests", "tokenloom_running_rows",
                 "tokenloom_generated_tokens_total",
                 "tokenloom_tokens_per_second", "tokenloom_time_to_first_token_seconds_bucket",
                 "tokenloom_http_requests_total"):
        assert name in text
    page = httpx.get(embedded.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(embedded.url + "/static/../app.py").status_code == 404
    assert httpx.get(embedded.url + "/v1/models/nope").status_code == 404


def test_health_is_503_while_the_model_loads(tiny_dir):
    release = threading.Event()

    def loader():
        release.wait(10)
        return load(tiny_dir)

    with ServerThread(create_app(ServeSettings(), pipe=loader)).start(ready=False) as server:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": STORY})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
        release.set()
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 200)


# -- chat ------------------------------------------------------------------------------------------------------
def test_chat_answers_with_text_and_images(embedded):
    r = client(embedded).chat.completions.create(model="shapes-tiny", messages=STORY, seed=0,
                                                 extra_body={"modalities": ["text", "image"]})
    content = r.choices[0].message.content
    assert isinstance(content, list)
    kinds = [p["type"] for p in content]
    assert "text" in kinds and "image_url" in kinds
    for part in content:
        if part["type"] == "image_url":
            assert decode_png(part["image_url"]["url"]).size == (64, 64)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("modalities", [["text", "image"], ["text"]])
def test_streamed_chat_reassembles_into_the_plain_answer(embedded, modalities):
    c = client(embedded)
    kwargs = dict(model="shapes-tiny", messages=STORY, seed=3, extra_body={"modalities": modalities})
    plain = c.chat.completions.create(**kwargs)
    contents, reasons, usage = stream_contents(c.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert reassemble(contents) == plain.choices[0].message.content
    assert reasons == [plain.choices[0].finish_reason]
    assert usage.completion_tokens == plain.usage.completion_tokens
    partial = [p for c_ in contents if isinstance(c_, list) for p in c_ if p.get("partial")]
    if modalities == ["text"]:
        assert isinstance(plain.choices[0].message.content, str) and not partial
    else:  # the embedded model's 8-row images get a preview after row 4 (preview_rows)
        assert partial and all(decode_png(p["image_url"]["url"]).size == (64, 64) for p in partial)
        # A preview shows the rows drawn so far; below them the image is not drawn yet (plain fill).
        assert all(decode_png(p["image_url"]["url"]).convert("RGB").getpixel((0, 63)) == PREVIEW_FILL
                   for p in partial)


def test_raw_stream_is_openai_sse_ending_with_done(embedded):
    body = {"model": "shapes-tiny", "messages": STORY, "seed": 1, "stream": True, "max_tokens": 20}
    with httpx.stream("POST", embedded.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "shapes-tiny" and "created" in c
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_image_input_is_described_as_the_pipeline_describes_it(embedded, embedded_pipe):
    image = render(random_scene(np.random.default_rng(7)), 64, 64)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri(image)}},
                                             {"type": "text", "text": "Describe the image."}]}]
    r = client(embedded).chat.completions.create(model="shapes-tiny", messages=messages, seed=0,
                                                 extra_body={"modalities": ["text"]})
    answer = r.choices[0].message.content
    assert isinstance(answer, str) and answer.strip()
    assert answer.strip() == embedded_pipe.ask(image, "Describe the image.", seed=0)


def test_an_earlier_assistant_turn_may_hold_an_image(embedded):
    image = render(random_scene(np.random.default_rng(1)), 64, 64)
    messages = [{"role": "system", "content": "You draw shapes."},
                {"role": "user", "content": "Draw something."},
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": png_uri(image)}}]},
                {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}]
    r = client(embedded).chat.completions.create(model="shapes-tiny", messages=messages, seed=0, max_tokens=30,
                                                 extra_body={"modalities": ["text"]})
    assert isinstance(r.choices[0].message.content, str)


def test_n_choices_use_consecutive_seeds(tiny):
    c = client(tiny)
    body = dict(model=tiny.app.state.worker.model_id, messages=STORY, max_tokens=12,
                extra_body={"modalities": ["text"]})
    both = c.chat.completions.create(n=2, seed=5, **body)
    second = c.chat.completions.create(seed=6, **body)
    assert [ch.index for ch in both.choices] == [0, 1]
    assert both.choices[1].message.content == second.choices[0].message.content
    _, reasons, _ = stream_contents(c.chat.completions.create(n=2, seed=5, stream=True, **body))
    assert len(reasons) == 2


# -- images ----------------------------------------------------------------------------------------------------
def test_images_endpoint_draws_what_the_pipeline_draws(embedded, embedded_pipe):
    c = client(embedded)
    r = c.images.generate(model="shapes-tiny", prompt=PROMPT, size="64x64", response_format="b64_json",
                          extra_body={"seed": 0})
    (item,) = r.data
    served = decode_png(item.b64_json)
    assert served.size == (64, 64)
    expected = embedded_pipe.generate_images(PROMPT, seed=0)[0]  # reranked: the best of the model's 8 draws
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected.convert("RGB")))
    assert r.usage.output_tokens > 0

    events = list(c.images.generate(model="shapes-tiny", prompt=PROMPT, stream=True, partial_images=2,
                                    extra_body={"seed": 0}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    assert [e.partial_image_index for e in partial] == [0, 1]
    assert all(decode_png(e.b64_json).size == (64, 64) for e in partial)
    assert events[-1].b64_json == item.b64_json and events[-1].usage.output_tokens == r.usage.output_tokens


def test_images_n_and_candidates(tiny):
    r = client(tiny).images.generate(prompt="a red circle", n=2, extra_body={"seed": 1, "candidates": 2})
    assert len(r.data) == 2 and all(decode_png(d.b64_json).size == (32, 32) for d in r.data)


# -- overload ------------------------------------------------------------------------------------------------
def test_overload_gives_429_and_the_server_recovers(tiny_dir):
    settings = ServeSettings(model=str(tiny_dir), max_batch=1, max_queue=1)
    long = {"messages": STORY, "modalities": ["image"], "width": 192, "height": 192, "seed": 0}
    with ServerThread(create_app(settings)) as server:
        def post(_):
            return httpx.post(server.url + "/v1/chat/completions", json=long, timeout=TIMEOUT)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert httpx.get(server.url + "/health").status_code == 200
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": STORY, "max_tokens": 5},
                       timeout=TIMEOUT)
        assert r.status_code == 200
        assert metric(server, "tokenloom_requests_rejected_total") == codes.count(429)


# -- bad input -------------------------------------------------------------------------------------------------
def _png(size, noise=False) -> str:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        return png_uri(Image.fromarray(pixels))
    return png_uri(Image.new("RGB", size, (200, 30, 30)))


def _chat(content=None, **fields):
    return {"messages": [{"role": "user", "content": "hi" if content is None else content}], **fields}


def _with_image(url):
    return _chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])


CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"
BAD = [  # (name, path, body (dict, or raw bytes), status, param)
    ("malformed JSON", CHAT, b"{not json", 400, None),
    ("not an object", CHAT, b"[1, 2]", 400, None),
    ("no messages", CHAT, {}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("messages a string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("content a number", CHAT, _chat(5), 400, "messages[0].content"),
    ("temperature a string", CHAT, _chat(temperature="hot"), 400, "temperature"),
    ("n a float", CHAT, _chat(n=1.5), 400, "n"),
    ("stream a string", CHAT, _chat(stream="yes"), 400, "stream"),
    ("seed a string", CHAT, _chat(seed="1"), 400, "seed"),
    ("negative seed", CHAT, _chat(seed=-1), 400, "seed"),
    ("negative temperature", CHAT, _chat(temperature=-1.0), 400, "temperature"),
    ("top_p zero", CHAT, _chat(top_p=0.0), 400, "top_p"),
    ("guidance too large", CHAT, _chat(guidance_scale=100.0), 400, "guidance_scale"),
    ("n past the limit", CHAT, _chat(n=3), 400, "n"),
    ("n past the limit, streamed", CHAT, _chat(n=3, stream=True), 400, "n"),
    ("max_tokens past the context", CHAT, _chat(max_tokens=5000), 400, "max_tokens"),
    ("max_tokens zero", CHAT, _chat(max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens past", CHAT, _chat(max_completion_tokens=10**9), 400, "max_completion_tokens"),
    ("prompt longer than the context", CHAT, _chat("red circle " * 1000), 400, "messages"),
    ("prompt plus max_tokens past the context", CHAT, _chat("red circle " * 300, max_tokens=4000), 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("unknown part", CHAT, _chat([{"type": "video", "video": "x"}]), 400, "messages[0].content[0].type"),
    ("audio modality", CHAT, _chat(modalities=["audio"]), 400, "modalities"),
    ("width not drawable", CHAT, _chat(width=12, modalities=["image"]), 400, "width"),
    ("width huge", CHAT, _chat(width=10**6, modalities=["image"]), 400, "width"),
    ("tools", CHAT, _chat(tools=[{"type": "function"}]), 400, "tools"),
    ("stop", CHAT, _chat(stop=["\n"]), 400, "stop"),
    ("unknown model", CHAT, _chat(model="gpt-9"), 404, "model"),
    ("image URL, not data", CHAT, _with_image("https://example.com/a.png"), 400, "messages[0].content[0].image_url"),
    ("data URI of text", CHAT, _with_image("data:text/plain;base64,aGVsbG8="), 400,
     "messages[0].content[0].image_url"),
    ("data URI not base64", CHAT, _with_image("data:image/png;base64,@@@@"), 400, "messages[0].content[0].image_url"),
    ("data URI not an image", CHAT, _with_image("data:image/png;base64,aGVsbG8gd29ybGQ="), 400,
     "messages[0].content[0].image_url"),
    ("image past the pixel bound", CHAT, _with_image(_png((300, 300))), 400, "messages[0].content[0].image_url"),
    ("image past the byte bound", CHAT, _with_image(_png((180, 180), noise=True)), 400,
     "messages[0].content[0].image_url"),
    ("images: no prompt", IMAGES, {}, 400, "prompt"),
    ("images: empty prompt", IMAGES, {"prompt": " "}, 400, "prompt"),
    ("images: n past the limit", IMAGES, {"prompt": "x", "n": 3}, 400, "n"),
    ("images: n zero", IMAGES, {"prompt": "x", "n": 0}, 400, "n"),
    ("images: size not drawable", IMAGES, {"prompt": "x", "size": "13x13"}, 400, "size"),
    ("images: size too large", IMAGES, {"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ("images: size not a size", IMAGES, {"prompt": "x", "size": "big"}, 400, "size"),
    ("images: url format", IMAGES, {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ("images: webp", IMAGES, {"prompt": "x", "output_format": "webp"}, 400, "output_format"),
    ("images: partial_images 4", IMAGES, {"prompt": "x", "stream": True, "partial_images": 4}, 400,
     "partial_images"),
    ("images: candidates past the limit", IMAGES, {"prompt": "x", "candidates": 99}, 400, "candidates"),
    ("images: unknown model", IMAGES, {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ("images: prompt longer than the context", IMAGES, {"prompt": "red circle " * 1000}, 400, "prompt"),
    # Values that once got past the checks and failed inside an engine step (failing every request in it):
    ("top_k past int64", CHAT, _chat(top_k=10**30), 400, "top_k"),
    ("image_top_k past int64", CHAT, _chat(image_top_k=2**63), 400, "image_top_k"),
    ("images: top_k past int64", IMAGES, {"prompt": "x", "top_k": 2**63}, 400, "top_k"),
    ("images: size in superscript digits", IMAGES, {"prompt": "x", "size": "\u00b2x\u00b2"}, 400, "size"),
    ("images: size in full-width digits", IMAGES, {"prompt": "x", "size": "\uff16\uff14x\uff16\uff14"}, 400, "size"),
]


def test_bad_requests_get_4xx_with_openai_error_bodies(tiny):
    failures = []
    with httpx.Client(base_url=tiny.url, timeout=TIMEOUT) as http:
        for name, path, body, status, param in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") \
                else {}
            if r.status_code != status or set(error) != {"message", "type", "param", "code"} or \
                    error["param"] != param or not error["message"]:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        for method, path, status in (("GET", CHAT, 405), ("GET", "/v1/nothing", 404)):
            r = http.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/health").status_code == 200
        assert http.post(CHAT, json=_chat(max_tokens=3)).status_code == 200
        assert metric(tiny, "tokenloom_engine_errors_total") == 0  # no bad request reached an engine step
        counts = http.get("/metrics").text
        assert 'tokenloom_http_requests_total{path="/v1/chat/completions",code="400"}' in counts
        assert 'tokenloom_http_requests_total{path="/v1/images/generations",code="404"}' in counts


def _raw_http(server, request: bytes) -> tuple[int, dict]:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server may answer and close before reading all of it
            pass
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])


def test_request_bodies_are_bounded(tiny):
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    status, body = _raw_http(tiny, (head + "Content-Length: 1000000000\r\n\r\n").encode() + b"{")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, body = _raw_http(tiny, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert httpx.get(tiny.url + "/health").status_code == 200


# -- the API key -------------------------------------------------------------------------------------------------
def test_api_key_is_enforced(tiny_dir):
    with ServerThread(create_app(ServeSettings(model=str(tiny_dir), api_key="s3cret"))) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path in ("/v1/models", "/metrics"):
                r = httpx.get(server.url + path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(server.url + CHAT, json=_chat(), headers=headers)
            assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        good = client(server, "s3cret")
        assert good.models.list().data[0].id == tiny_dir.name
        assert good.chat.completions.create(model=tiny_dir.name, messages=STORY, max_tokens=3).choices
        assert httpx.get(server.url + "/").status_code == 200  # the page itself: a browser sends no header


# -- clients that go away -----------------------------------------------------------------------------------------
def test_a_client_that_disconnects_gets_its_request_cancelled(tiny):
    worker = tiny.app.state.worker
    before = metric(tiny, "tokenloom_requests_cancelled_total")
    long = _chat(modalities=["image"], width=192, height=192, stream=True)
    with httpx.stream("POST", tiny.url + CHAT, json=long, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the role chunk: the request runs; now hang up
    wait_until(lambda: metric(tiny, "tokenloom_requests_cancelled_total") == before + 1)
    wait_until(lambda: worker.in_flight == 0)

    long.pop("stream")
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
        httpx.post(tiny.url + CHAT, json=long, timeout=httpx.Timeout(30.0, read=0.3))
    wait_until(lambda: metric(tiny, "tokenloom_requests_cancelled_total") == before + 2)
    wait_until(lambda: worker.in_flight == 0 and not worker.batcher.has_work())
    assert httpx.post(tiny.url + CHAT, json=_chat(max_tokens=3), timeout=TIMEOUT).status_code == 200


def test_a_failing_engine_step_fails_its_requests_and_the_server_goes_on(tiny):
    worker = tiny.app.state.worker

    def broken():
        raise RuntimeError("simulated engine failure")

    worker.batcher.step = broken  # the engine thread replaces a batcher whose step raised
    r = httpx.post(tiny.url + CHAT, json=_chat(max_tokens=5), timeout=TIMEOUT)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    worker.batcher.step = broken
    with pytest.raises(openai.APIError, match="engine step failed"):
        stream_contents(client(tiny).chat.completions.create(model="", messages=STORY, max_tokens=5, stream=True))
    assert metric(tiny, "tokenloom_engine_errors_total") == 2
    assert httpx.post(tiny.url + CHAT, json=_chat(max_tokens=3), timeout=TIMEOUT).status_code == 200


# -- the verb ------------------------------------------------------------------------------------------------------
def test_the_serve_verb_reports_bad_arguments_in_one_line(tmp_path, capsys):
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("tokenloom serve: error:") for line in lines)
    assert "cannot listen on 127.0.0.1" in lines[2]
