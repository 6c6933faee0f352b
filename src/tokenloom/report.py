"""Render Documents for people: Markdown and HTML pages with PNG files (and animated GIFs for videos)
beside them."""

from __future__ import annotations

import html
from pathlib import Path

from .document import Document, ImagePart, SpeechPart, TextPart, VideoPart

VIDEO_FPS = 4  # frames a second of a video's animated GIF


def save_document(doc: Document, out_dir: str | Path, title: str = "tokenloom") -> dict[str, Path]:
    """Write out_dir/index.md, out_dir/index.html, one PNG per image part with pixels, one animated
    GIF (and a PNG strip of its frames) per video part with pixels and one WAV file (an `<audio>` element
    in the page) per speech part with audio (at the codec's 16 kHz)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    body = []
    n = n_videos = n_speech = 0
    for turn in doc.turns:
        role = turn.role or "document"
        md += [f"**{role}**", ""]
        body.append(f'<div class="turn {html.escape(role)}"><div class="role">{html.escape(role)}</div>')
        for part in turn.parts:
            if isinstance(part, TextPart):
                md += [part.text, ""]
                body.append(f"<p>{html.escape(part.text)}</p>")
            elif isinstance(part, ImagePart):
                if part.pixels is None:
                    md += [f"*[image {part.width}x{part.height} codes, not decoded]*", ""]
                    body.append(f"<p><em>image {part.width}x{part.height} codes, not decoded</em></p>")
                    continue
                name = f"image_{n:03d}.png"
                n += 1
                part.pixels.save(out / name)
                md += [f"![image {n}]({name})", ""]
                body.append(f'<img src="{name}" alt="image {n}" width="{max(256, part.pixels.width)}">')
            elif isinstance(part, VideoPart):
                what = f"video of {part.num_frames} frames of {part.width}x{part.height} codes"
                if part.pixels is None:
                    md += [f"*[{what}, not decoded]*", ""]
                    body.append(f"<p><em>{what}, not decoded</em></p>")
                    continue
                from .video_io import write_video

                n_videos += 1
                name, strip = f"video_{n_videos - 1:03d}.gif", f"video_{n_videos - 1:03d}_frames.png"
                write_video(part.pixels, out / name, fps=VIDEO_FPS)
                image_grid(part.pixels, columns=part.num_frames).save(out / strip)
                md += [f"![video {n_videos}]({name})", "", f"![video {n_videos}, frame by frame]({strip})", ""]
                width = max(256, part.pixels[0].width)
                body.append(f'<img src="{name}" alt="video {n_videos} ({what})" width="{width}">'
                            f'<img src="{strip}" alt="video {n_videos}, frame by frame" class="frames">')
            elif isinstance(part, SpeechPart):
                what = f"speech, {part.num_frames} frames x {part.levels} codebooks"
                if part.audio is None:
                    md += [f"*[{what}, not decoded]*", ""]
                    body.append(f"<p><em>{what}, not decoded</em></p>")
                    continue
                from .audio_io import write_audio

                n_speech += 1
                name = f"speech_{n_speech - 1:03d}.wav"
                write_audio(out / name, part.audio)
                md += [f"[speech {n_speech}]({name}) ({what})", ""]
                body.append(f'<audio controls src="{name}" title="speech {n_speech} ({what})"></audio>')
        body.append("</div>")
    (out / "index.md").write_text("\n".join(md))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:48rem;margin:2rem auto}} .turn{{margin:1rem 0;padding:.5rem 1rem;
border-left:4px solid #ccc}} .assistant{{border-color:#4a7}} .role{{font-weight:bold;color:#555}}
img{{image-rendering:pixelated;display:block;margin:.5rem 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
{chr(10).join(body)}
</body></html>
"""
    (out / "index.html").write_text(page)
    return {"markdown": out / "index.md", "html": out / "index.html"}


def image_grid(images, columns: int = 8, pad: int = 2):
    """Tile PIL images (same size or not) into one PIL image on white."""
    from PIL import Image

    images = [im for im in images if im is not None]
    if not images:
        raise ValueError("no images to tile")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
