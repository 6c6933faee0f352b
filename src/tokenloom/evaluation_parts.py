"""What both evaluations (`tokenloom.evaluation`, `tokenloom.video_evaluation`) build on: a held-out
sample as a prompt document, tallies of hits per slice and framed thumbnails."""

from __future__ import annotations

from PIL import Image, ImageOps

from .document import Document, TextPart


def sample_document(pipe, sample) -> Document:
    parts = []
    for p in sample.prompt:
        if isinstance(p, str):
            parts.append(TextPart(p))
        elif pipe.is_speech(p):
            parts.append(pipe.encode_speech(p))
        else:
            encode = pipe.encode_video if pipe.is_video(p) else pipe.encode_image
            parts.append(encode(p, *p.size))
    return Document.chat([("user", parts)])


def tally(stats, key: str, hit: bool) -> None:
    """Count one case of slice `key` in {slice: [hits, total]}."""
    stats[key][0] += hit
    stats[key][1] += 1


def shares(stats) -> dict[str, float]:
    """{slice: [hits, total]} -> {slice: hits / total}, slices sorted."""
    return {k: hits / total for k, (hits, total) in sorted(stats.items())}


def border(right: bool) -> tuple[int, int, int]:
    return (40, 170, 60) if right else (220, 40, 40)


def framed(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image inside a 2-pixel border of `fill`, as the grids show it."""
    return ImageOps.expand(image, border=2, fill=fill)
