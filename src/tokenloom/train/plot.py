"""A loss-curve PNG drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TRAIN_COLOR = (31, 119, 180)
EVAL_COLOR = (214, 39, 40)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def plot_losses(path: str | Path, train: Sequence[tuple[int, float]], eval: Sequence[tuple[int, float]] = (),
                *, title: str = "loss", size: tuple[int, int] = (800, 500)) -> Path:
    """Train loss as a line, eval loss as dots, against the step; written atomically-enough (temp + rename)."""
    path = Path(path)
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = list(train) + list(eval)
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    draw.text((left, 12), title, fill="black", font=font)
    if not finite:
        draw.text((left, height // 2), "no finite losses yet", fill="black", font=font)
    else:
        s_lo, s_hi = min(s for s, _ in finite), max(s for s, _ in finite)
        v_lo, v_hi = min(v for _, v in finite), max(v for _, v in finite)
        if s_hi == s_lo:
            s_hi = s_lo + 1
        pad = (v_hi - v_lo) * 0.05 or max(abs(v_hi) * 0.05, 1e-3)
        v_lo, v_hi = v_lo - pad, v_hi + pad

        def xy(step: float, value: float) -> tuple[float, float]:
            x = left + (step - s_lo) / (s_hi - s_lo) * (width - left - right)
            y = top + (v_hi - value) / (v_hi - v_lo) * (height - top - bottom)
            return x, y

        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        for v in _ticks(v_lo, v_hi):
            _, y = xy(s_lo, v)
            draw.line([left - 4, y, left, y], fill="black")
            draw.line([left + 1, y, width - right - 1, y], fill=(230, 230, 230))
            draw.text((4, y - 6), _fmt(v), fill="black", font=font)
        for s in _ticks(s_lo, s_hi):
            x, _ = xy(s, v_lo)
            draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
            draw.text((x - 10, height - bottom + 8), str(int(s)), fill="black", font=font)
        draw.text((width // 2 - 15, height - 20), "step", fill="black", font=font)
        line = [xy(s, v) for s, v in train if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=TRAIN_COLOR, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=TRAIN_COLOR)
        for s, v in eval:
            if math.isfinite(v):
                x, y = xy(s, v)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=EVAL_COLOR)
        legend_x = width - right - 150
        draw.line([legend_x, 20, legend_x + 20, 20], fill=TRAIN_COLOR, width=2)
        draw.text((legend_x + 26, 14), "train", fill="black", font=font)
        if eval:
            draw.ellipse([legend_x + 76, 16, legend_x + 84, 24], fill=EVAL_COLOR)
            draw.text((legend_x + 90, 14), "eval", fill="black", font=font)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
