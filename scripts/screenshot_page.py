"""Takes the docs' screenshot of the web page: a chat whose answer is a drawn image, with an uploaded
image waiting in the composer. Starts `tokenloom serve` on the embedded default model (or uses --url), drives
Debian's chromium through Playwright, and writes docs/images/web-page.png.

    python scripts/screenshot_page.py [--out docs/images/web-page.png] [--url http://127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shoot(url: str, out: Path, workdir: Path) -> None:
    from playwright.sync_api import sync_playwright

    from tokenloom.world import Obj, Scene, render

    scene = workdir / "scene.png"
    render(Scene(objects=(Obj("yellow", "triangle", "large", "center"), Obj("blue", "circle", "small", "top left")))).save(scene)
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 800}, device_scale_factor=1)
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('server-status').dataset.state === 'ok'")
        box = page.get_by_label("Message", exact=True)
        page.get_by_label("Both", exact=True).check()
        # One turn whose answer is drawn (the tiny model reads a fresh question best), then an upload
        # waiting in the composer with its thumbnail.
        box.fill("a large red circle in the center")
        box.press("Enter")
        page.wait_for_function("document.querySelectorAll('li.message.assistant:not(.streaming)').length >= 1")
        page.set_input_files("#file-input", str(scene))
        page.locator("#attachments img").wait_for()
        box.fill("Describe the image.")
        page.evaluate("document.getElementById('chat-scroll').scrollTop = 0")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "web-page.png")
    parser.add_argument("--url", help="a running server (default: start `tokenloom serve` on a free port)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.url:
            shoot(args.url.rstrip("/"), args.out, workdir)
        else:
            from tokenloom.serve.runner import ServeProcess

            with ServeProcess() as server:
                shoot(server.url, args.out, workdir)
    print(args.out)


if __name__ == "__main__":
    main()
