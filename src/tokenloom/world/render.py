"""Render shapes-world scenes to RGB images (spec: shapes-world.md, "Canvas" and "Objects").

Objects are drawn pixel-aligned: the extent is rounded to whole pixels and the bounding box
starts on a pixel boundary, with its centre kept within the spec's 0.02 x W, 0.02 x H of the
cell centre. Exact fractional geometry cannot keep the spec's promise of an exact parse at
48 px: a 6.72 px circle sampled at some sub-pixel offsets fills more than 0.89 of its
bounding box and parses as a square. Aligned, every object's pixels depend only on (shape,
extent in pixels, color, antialias), so tests can check every pattern that can ever be drawn.

Anti-aliasing is a box filter: the exact geometry sampled at 4 x 4 points per pixel.
Objects never overlap, so each one is a cached patch pasted onto the white canvas.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from .scene import BACKGROUND, CELLS, COLORS, JITTER, SIZES, Obj, Scene

MIN_SIDE, MAX_SIDE = 48, 512
SUPERSAMPLE = 4  # 16 coverage levels: smooth edges, cheap


def check_canvas(width: int, height: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"width and height must be {MIN_SIDE} to {MAX_SIDE}, got {width}x{height}")
    if not (width <= 2 * height and height <= 2 * width):
        raise ValueError(f"aspect ratio W/H must be between 1/2 and 2, got {width}x{height}")


def cell_centre(cell: str, width: int, height: int) -> tuple[float, float]:
    """(x, y) of a cell's centre, in pixel units with (0, 0) the top-left corner of the image."""
    row, col = divmod(CELLS.index(cell), 3)
    return (col + 0.5) * width / 3, (row + 0.5) * height / 3


def extent(size: str, width: int, height: int) -> float:
    """The spec's extent: SIZES[size] x min(W, H)."""
    return SIZES[size] * min(width, height)


def pixel_extent(size: str, width: int, height: int) -> int:
    """The extent as drawn: rounded to whole pixels (half up, so no float ties to worry about)."""
    return math.floor(extent(size, width, height) + 0.5)


def _inside(shape: str, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Which points (x, y) lie in the shape filling the box [0, n] x [0, n] (y down)."""
    h = n / 2
    if shape == "circle":
        return (x - h) ** 2 + (y - h) ** 2 <= h * h
    if shape == "square":
        return (x >= 0) & (x <= n) & (y >= 0) & (y <= n)
    # isosceles triangle, apex up at (h, 0): its width grows from 0 at the apex to n at the base
    return (y <= n) & (np.abs(x - h) <= y / 2)


@lru_cache(maxsize=256)
def coverage(shape: str, n: int, antialias: bool = True) -> np.ndarray:
    """(n, n) float32: fraction of each pixel of an n-pixel object's bounding box that the shape covers."""
    ss = SUPERSAMPLE if antialias else 1  # one sample at the pixel centre: hard edges
    t = ((np.arange(n)[:, None] + (np.arange(ss) + 0.5) / ss)).reshape(-1)  # sample positions
    alpha = _inside(shape, t[None, :], t[:, None], n).reshape(n, ss, n, ss).mean(axis=(1, 3), dtype=np.float32)
    alpha.setflags(write=False)
    return alpha


@lru_cache(maxsize=1024)  # a few MB; one canvas size needs 36 patches
def patch(shape: str, n: int, color: str, antialias: bool = True) -> np.ndarray:
    """(n, n, 3) uint8: the object's bounding box as drawn over the white background."""
    bg = np.array(BACKGROUND, np.float32)
    rgb = bg + coverage(shape, n, antialias)[..., None] * (np.array(COLORS[color], np.float32) - bg)
    out = np.rint(rgb).astype(np.uint8)
    out.setflags(write=False)
    return out


def _paste(canvas: np.ndarray, tile: np.ndarray, x0: int, y0: int) -> None:
    """canvas[y0:, x0:] = tile, clipped to the canvas."""
    h, w = tile.shape[:2]
    H, W = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if cx0 < cx1 and cy0 < cy1:
        canvas[cy0:cy1, cx0:cx1] = tile[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def draw(placed: list[tuple[Obj, float, float]], width: int, height: int, *, antialias: bool = True) -> Image.Image:
    """Draw objects with their bounding-box centres at (about: pixel-aligned) the given (x, y); `obj.cell`
    is not used. The building block of `render` and of video frames, where objects sit between cells."""
    check_canvas(width, height)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    for obj, cx, cy in placed:
        n = pixel_extent(obj.size, width, height)
        _paste(canvas, patch(obj.shape, n, obj.color, antialias), math.floor(cx - n / 2 + 0.5),
               math.floor(cy - n / 2 + 0.5))
    return Image.fromarray(canvas, "RGB")


def place(obj: Obj, dx: float, dy: float, width: int, height: int) -> tuple[Obj, float, float]:
    """(obj, cx, cy): the object's cell centre moved by (dx x W, dy x H), aligned to the pixel grid
    without leaving the jitter allowance; what `draw` takes."""
    cx, cy = cell_centre(obj.cell, width, height)
    n = pixel_extent(obj.size, width, height)
    return obj, _aligned_centre(cx + dx * width, JITTER * width, n, cx), _aligned_centre(cy + dy * height,
                                                                                          JITTER * height, n, cy)


def _aligned_centre(target: float, allowance: float, n: int, cell_mid: float) -> float:
    """The pixel-aligned centre (box start on a whole pixel) nearest `target` that stays within
    `allowance` of the cell centre. One always exists: allowance >= 0.02 x 48 px, so the allowed
    interval is at least 1.92 px long."""
    start = math.floor(target - n / 2 + 0.5)
    lo, hi = math.ceil(cell_mid - allowance - n / 2), math.floor(cell_mid + allowance - n / 2)
    return min(max(start, lo), hi) + n / 2


def render(scene: Scene, width: int = 64, height: int = 64, *, antialias: bool = True,
           rng: np.random.Generator | None = None) -> Image.Image:
    """The image of a scene. With `rng`, each object's centre is moved by a uniform jitter of up to
    0.02 x W and 0.02 x H (two draws per object, in reading order); without it, it sits at its cell
    centre. Either way it is then aligned to the pixel grid, without leaving that allowance."""
    check_canvas(width, height)
    placed = []
    for obj in scene.objects:
        dx, dy = rng.uniform(-JITTER, JITTER, size=2) if rng is not None else (0.0, 0.0)
        placed.append(place(obj, dx, dy, width, height))
    return draw(placed, width, height, antialias=antialias)
