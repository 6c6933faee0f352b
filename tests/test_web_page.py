"""The web page of `tokenloom serve`, driven as a person would: headless Debian chromium through
Playwright against a real server on the embedded default model.

scripts/setup.sh installs both (apt-get chromium, pip playwright); without them the module skips.
Set TOKENLOOM_WEB_TEST_URL to run it against a server that is already running instead."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from tokenloom.serve.runner import ServeProcess

CHROMIUM = shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None,
                       reason="Debian's chromium is not on PATH (scripts/setup.sh installs it: apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None,
                       reason="the playwright package is missing (pip install -e '.[test]' installs it)"),
]

STARTUP_TIMEOUT_S = 180
ANSWER_TIMEOUT_MS = 90_000
# Launch flags: root needs --no-sandbox; the rest keep chromium quiet and off any network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def server():
    """The base URL of a running `tokenloom serve` (embedded default model), stopped at the end."""
    given = os.environ.get("TOKENLOOM_WEB_TEST_URL")
    if given:
        yield given.rstrip("/")
        return
    try:
        # a preview after every row of codes; fewer reranked draws and one torch thread (as the suite's)
        # keep it quick on two busy cores
        server = ServeProcess(["--preview-rows", "1", "--max-candidates", "2", "--threads", "1"],
                              timeout=STARTUP_TIMEOUT_S)
    except RuntimeError as e:
        pytest.fail(str(e))
    with server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(ANSWER_TIMEOUT_MS)
    problems: list[str] = []
    pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    # The page must work offline: anything not on the server itself is a bug.
    pg.on("request", lambda req: problems.append(f"outside request: {req.url}")
          if not req.url.startswith((server, "data:", "blob:")) else None)
    pg.goto(server + "/")
    pg.wait_for_function("document.getElementById('server-status').dataset.state === 'ok'")
    yield pg
    context.close()
    assert not problems, problems


def _finished_images(pg) -> list[list[int]]:
    """[naturalWidth, naturalHeight] of the finished (not preview) images in the assistant's answers."""
    return pg.evaluate("""() => [...document.querySelectorAll(
        'li.message.assistant figure.generated:not(.drawing):not(.unfinished) img')]
        .filter((img) => img.src.startsWith('data:image/') && img.naturalWidth > 0)
        .map((img) => [img.naturalWidth, img.naturalHeight])""")


def _wait_answers(pg, count: int) -> None:
    """Waits until `count` assistant answers have finished streaming."""
    pg.wait_for_function(
        "(n) => document.querySelectorAll('li.message.assistant:not(.streaming)').length >= n", arg=count,
        timeout=ANSWER_TIMEOUT_MS)


def _answer_text(pg, index: int) -> str:
    """The text of the index-th assistant answer."""
    return " ".join(pg.locator("li.message.assistant").nth(index).locator("p.text").all_inner_texts()).strip()


def _chat_requests(pg) -> list[dict]:
    bodies: list[dict] = []
    pg.on("request", lambda req: bodies.append(json.loads(req.post_data))
          if req.url.endswith("/v1/chat/completions") and req.method == "POST" else None)
    return bodies


def _hand_over(pg, path: Path, how: str) -> None:
    """Gives the page an image file as a person would by pasting it into the message box or dropping it
    onto the chat (synthetic clipboard / drag events carrying the file)."""
    pg.evaluate("""([b64, how]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'scene.png', {type: 'image/png'}));
        if (how === 'paste') {
            document.getElementById('prompt').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
            return;
        }
        const target = document.getElementById('chat-scroll');
        for (const type of ['dragenter', 'dragover', 'drop']) {
            target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        }
    }""", [base64.b64encode(path.read_bytes()).decode(), how])


def _scene_png(path: Path) -> Path:
    from tokenloom.world import Obj, Scene, render

    render(Scene(objects=(Obj("blue", "square", "large", "center"),))).save(path)
    return path


def test_chat_draws_then_describes_an_upload(page, tmp_path):
    requests = _chat_requests(page)
    page.get_by_label("Image", exact=True).check()
    box = page.get_by_label("Message", exact=True)
    box.fill("a large red circle in the center")
    box.press("Enter")
    _wait_answers(page, 1)
    page.screenshot(path=str(tmp_path / "chat-image.png"))
    assert page.locator("li.message.error").count() == 0, page.locator("li.message.error").all_inner_texts()
    images = _finished_images(page)
    assert images, f"no finished image in the answer: {page.inner_text('#messages')}"
    assert all(w > 0 and h > 0 for w, h in images)
    first = requests[0]
    assert first["stream"] is True and first["modalities"] == ["image"]
    assert first["messages"] == [{"role": "user", "content": "a large red circle in the center"}]
    # The server was started with --preview-rows 1: the image filled in row by row before it finished.
    previews = page.locator("figure.generated").first.get_attribute("data-previews")
    assert previews and int(previews) >= 1, "no preview of the rows drawn so far was shown"

    # Upload an image (the file input; a thumbnail shows) and ask about it, in the same conversation.
    page.get_by_label("Text", exact=True).check()
    page.set_input_files("#file-input", str(_scene_png(tmp_path / "scene.png")))
    thumb = page.locator("#attachments img")
    thumb.wait_for()
    assert thumb.evaluate("(img) => img.naturalWidth") == 64
    box.fill("Describe the image.")
    page.get_by_role("button", name="Send").click()
    _wait_answers(page, 2)
    page.screenshot(path=str(tmp_path / "chat-caption.png"))
    assert page.locator("li.message.error").count() == 0, page.locator("li.message.error").all_inner_texts()
    caption = _answer_text(page, 1)
    assert caption, "no caption text"
    second = requests[1]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    kept = second["messages"][1]["content"]  # the earlier answer, its image kept as an image part
    assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,")
               for p in kept)
    parts = second["messages"][2]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "Describe the image."}
    assert page.locator("#attachments img").count() == 0

    # A new chat forgets the conversation; the same question alone gets the model's caption.
    page.get_by_role("button", name="New chat").click()
    assert page.locator("li.message").count() == 0
    # Paste an image (a thumbnail shows, its button removes it), then drop one onto the chat.
    _hand_over(page, tmp_path / "scene.png", "paste")
    page.locator("#attachments img").wait_for()
    page.get_by_role("button", name="Remove attached image 1").click()
    assert page.locator("#attachments img").count() == 0
    _hand_over(page, tmp_path / "scene.png", "drop")
    page.locator("#attachments img").wait_for()
    box.fill("Describe the image.")
    box.press("Enter")
    _wait_answers(page, 1)
    assert len(requests[2]["messages"]) == 1
    fresh = _answer_text(page, 0).lower()
    assert "square" in fresh, f"caption of a large blue square: {fresh!r}"


def test_gallery_shows_n_candidates(page, tmp_path):
    page.get_by_role("tab", name="Gallery").click()
    page.get_by_label("Prompt").fill("a small green triangle at the top left")
    page.get_by_label("Candidates").fill("6")  # more than one request's worth (4 by default): two requests
    page.get_by_label("Size").select_option("64x64")
    page.locator("#g-seed").fill("7")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector(".run:not([aria-busy]) .run-status")
    assert page.locator(".run-status.error").count() == 0, page.inner_text(".run-status")
    tiles = page.locator(".run .grid img")
    assert tiles.count() == 6
    sizes = tiles.evaluate_all("(imgs) => imgs.map((i) => [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)])")
    assert sizes == [[64, 64, "data:image/png;base64,"]] * 6
    page.screenshot(path=str(tmp_path / "gallery.png"))
    # Click to enlarge: a dialog with the image and a download link.
    tiles.first.click()
    viewer = page.locator("#viewer")
    assert viewer.evaluate("(d) => d.open")
    assert page.locator("#viewer-download").get_attribute("href").startswith("data:image/png;base64,")
    page.get_by_role("button", name="Close").click()
    assert not viewer.evaluate("(d) => d.open")


def test_server_errors_show_in_the_chat(page, tmp_path):
    # A full queue: the page shows the server's error.message and gives the text back to retry.
    def busy(route):
        route.fulfill(status=429, content_type="application/json", body=json.dumps(
            {"error": {"message": "the queue is full", "type": "rate_limit_error", "param": None, "code": None}}))

    page.route("**/v1/chat/completions", busy)
    box = page.get_by_label("Message", exact=True)
    box.fill("hello")
    box.press("Enter")
    error = page.locator("li.message.error")
    error.wait_for()
    assert "the queue is full" in error.inner_text()
    assert box.input_value() == "hello"
    page.unroute("**/v1/chat/completions")

    # The real server refusing a setting: its message shows too.
    page.get_by_label("Max tokens").fill("999999")
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('li.message.error').length >= 2")
    assert "max_tokens" in page.locator("li.message.error").nth(1).inner_text()
    page.screenshot(path=str(tmp_path / "chat-error.png"))


def test_an_api_key_typed_in_settings_goes_with_every_api_call(page):
    """A server started with --api-key needs `Authorization: Bearer KEY` on /v1 (the page itself
    loads without it): the key typed in Settings is sent with chat and gallery calls."""
    seen = []
    page.on("request", lambda req: seen.append((req.url, req.headers.get("authorization")))
            if "/v1/" in req.url else None)
    key = page.get_by_label("API key")
    key.fill("sekret")
    key.dispatch_event("change")
    page.get_by_label("Text", exact=True).check()
    box = page.get_by_label("Message", exact=True)
    box.fill("hello")
    box.press("Enter")
    _wait_answers(page, 1)
    calls = [auth for url, auth in seen if url.endswith("/v1/chat/completions")]
    assert calls == ["Bearer sekret"]
    assert page.evaluate("() => sessionStorage.getItem('tokenloom.api-key')") == "sekret"


def _sent_image_url(pg, gif: Path) -> str:
    """Uploads `gif`, sends a message, and returns the image_url the page put in the request (the request
    itself is answered with an error at once: only what the page sends matters here)."""
    sent: list[dict] = []

    def capture(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=429, content_type="application/json", body=json.dumps(
            {"error": {"message": "captured", "type": "rate_limit_error", "param": None, "code": None}}))

    pg.route("**/v1/chat/completions", capture)
    pg.set_input_files("#file-input", str(gif))
    pg.locator("#attachments img").wait_for()
    box = pg.get_by_label("Message", exact=True)
    box.fill("Describe the video.")
    box.press("Enter")
    pg.locator("li.message.error").wait_for()
    pg.unroute("**/v1/chat/completions")
    (part,) = [p for p in sent[0]["messages"][-1]["content"] if p["type"] == "image_url"]
    return part["image_url"]["url"]


def test_an_animated_gif_goes_as_it_is_to_a_model_that_reads_videos(browser, page, tmp_path):
    from tokenloom.pipeline import random_pipeline
    from tokenloom.video_io import animation_bytes
    from tokenloom.world.video import Motion, render_video

    gif = tmp_path / "moves.gif"
    gif.write_bytes(animation_bytes(render_video(Motion("red", "circle", "large", "left", "right", 3))))
    as_is = "data:image/gif;base64," + base64.b64encode(gif.read_bytes()).decode()
    assert _sent_image_url(page, gif) == as_is  # the embedded model reads videos: the server gets the GIF
    # a model made before video tokens reads no video: the page sends the first frame as a PNG
    model = tmp_path / "no-video-model"
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32,
                    markers=False).save_pretrained(model)
    with ServeProcess(["--model", str(model), "--threads", "1"], timeout=STARTUP_TIMEOUT_S) as plain_server:
        context = browser.new_context()
        pg = context.new_page()
        pg.set_default_timeout(ANSWER_TIMEOUT_MS)
        pg.goto(plain_server.url + "/")
        pg.wait_for_function("document.getElementById('server-status').dataset.state === 'ok'")
        assert _sent_image_url(pg, gif).startswith("data:image/png;base64,")
        context.close()
