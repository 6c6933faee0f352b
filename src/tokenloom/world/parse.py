"""Parse a shapes-world image back into its scene, and decide whether an image is right for a caption.

Follows shapes-world.md, "Parsing an image back into a scene", step by step. Connected regions
are found on runs of equal pixels (one run = a horizontal stretch of one palette color in one
row) joined with a small union-find: a few hundred runs even at 512x512, so numpy does the
per-pixel work and Python only touches runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from .scene import CELLS, COLORS, SIZES, Obj, Scene

PALETTE = np.array(list(COLORS.values()), np.int32)  # (6, 3), in COLORS order
COLOR_NAMES = list(COLORS)
MAX_DISTANCE = 80  # farther than this from every palette color: background
MIN_AREA_OF_CELL = 0.02  # regions must be larger than this fraction of a cell's area
TRIANGLE_RATIO = 0.6  # triangle when pixels above the midline < 0.6 x pixels below it
SQUARE_FILL = 0.89  # square when area >= 0.89 x bounding-box area


# Every palette color is more than 240 from white (yellow, the nearest, is 242), so a pixel within 80
# of one is more than 160 from white, and its L1 distance to white (765 - sum of its channels) is at
# least that. Only pixels whose channels sum to at most 765 - 160 need comparing with the palette.
_MAX_CHANNEL_SUM = 3 * 255 - 160


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int8: index of the nearest palette color, or -1 for background."""
    px = rgb.reshape(-1, 3)
    labels = np.full(len(px), -1, np.int8)
    candidates = np.flatnonzero(px.sum(axis=1, dtype=np.int32) <= _MAX_CHANNEL_SUM)
    c = px[candidates].astype(np.int32)
    d2 = sum((c[:, ch, None] - PALETTE[None, :, ch]) ** 2 for ch in range(3))  # (n, 6), exact integers
    nearest = d2.argmin(axis=1)
    near = d2[np.arange(len(c)), nearest] <= MAX_DISTANCE ** 2
    labels[candidates[near]] = nearest[near]
    return labels.reshape(rgb.shape[:2])


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in a 2-D mask: (row, start, end) arrays, end exclusive, row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major order pairs each start with its end
    return rows, starts, ends


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """4-connected components of a mask, each as a list of its runs (row, start, end)."""
    rows, starts, ends = (a.tolist() for a in _runs(mask))
    parent = list(range(len(rows)))
    # runs of row r touch runs of row r + 1 when their column ranges overlap; walk both rows in step
    span: dict[int, list[int]] = {}  # row -> [first run, last run + 1]
    for i, r in enumerate(rows):
        span.setdefault(r, [i, i])[1] = i + 1
    for r, (i, i_end) in span.items():
        j, j_end = span.get(r + 1, (0, 0))
        while i < i_end and j < j_end:
            if max(starts[i], starts[j]) < min(ends[i], ends[j]):
                parent[_find(parent, i)] = _find(parent, j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    groups: dict[int, list] = {}
    for i in range(len(rows)):
        groups.setdefault(_find(parent, i), []).append((rows[i], starts[i], ends[i]))
    return list(groups.values())


@dataclass(frozen=True)
class Region:
    """A connected region of one palette color: what the spec's rules look at."""

    color: str
    top: int  # bounding box in pixels; bottom and right exclusive
    bottom: int
    left: int
    right: int
    area: int  # pixel count
    above: int  # pixels whose centres lie above the bounding box's horizontal midline
    below: int  # ... and below it; a middle row exactly on the midline counts for neither

    @classmethod
    def from_runs(cls, color: str, runs: list[tuple[int, int, int]]) -> Region:
        r = np.array(runs)
        rows, lengths = r[:, 0], r[:, 2] - r[:, 1]
        top, bottom = int(rows.min()), int(rows.max()) + 1
        mid = (top + bottom) / 2
        return cls(color, top, bottom, int(r[:, 1].min()), int(r[:, 2].max()), int(lengths.sum()),
                   int(lengths[rows + 0.5 < mid].sum()), int(lengths[rows + 0.5 > mid].sum()))

    @property
    def shape(self) -> str:
        if self.above < TRIANGLE_RATIO * self.below:
            return "triangle"
        if self.area >= SQUARE_FILL * (self.bottom - self.top) * (self.right - self.left):
            return "square"
        return "circle"

    def size(self, width: int, height: int) -> str:
        """The size whose extent is nearer to the bounding box's larger side."""
        side = max(self.bottom - self.top, self.right - self.left)
        return min(SIZES, key=lambda s: abs(SIZES[s] * min(width, height) - side))

    def cell(self, width: int, height: int) -> str:
        """The cell of the bounding box's centre."""
        col = min(2, int((self.left + self.right) / 2 / (width / 3)))
        row = min(2, int((self.top + self.bottom) / 2 / (height / 3)))
        return CELLS[3 * row + col]

    def to_obj(self, width: int, height: int) -> Obj:
        return Obj(self.color, self.shape, self.size(width, height), self.cell(width, height))


def find_regions(image: Image.Image) -> list[Region]:
    """The regions of an image that count as objects: larger than 2% of a cell's area."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    min_area = MIN_AREA_OF_CELL * (width / 3) * (height / 3)
    labels = classify_pixels(rgb)
    counts = np.bincount(labels.ravel() + 1, minlength=len(PALETTE) + 1)[1:]
    regions = []
    for k, name in enumerate(COLOR_NAMES):
        if counts[k] <= min_area:  # too few pixels of this color for any region to count
            continue
        for runs in _components(labels == k):
            if sum(e - s for _, s, e in runs) > min_area:
                regions.append(Region.from_runs(name, runs))
    return regions


def parse(image: Image.Image) -> Scene:
    """The scene in an image. The result may break the scene rules (no objects, four, two in a
    cell) when the image is not a clean render; `matches` then simply fails."""
    width, height = image.size
    return Scene(tuple(r.to_obj(width, height) for r in find_regions(image)))


# ---------------------------------------------------------------------------
# is an image right for a caption?

@dataclass(frozen=True)
class ObjQuery:
    """What a caption says about one object: size or cell None when the caption leaves it out."""

    color: str
    shape: str
    size: str | None = None
    cell: str | None = None

    def accepts(self, obj: Obj, check_size: bool = True, check_cell: bool = True) -> bool:
        return (
            obj.color == self.color
            and obj.shape == self.shape
            and (not check_size or self.size is None or obj.size == self.size)
            and (not check_cell or self.cell is None or obj.cell == self.cell)
        )


@dataclass(frozen=True)
class SceneQuery:
    """What a caption says about a scene, objects in the caption's order."""

    objects: tuple[ObjQuery, ...]

    @classmethod
    def from_scene(cls, scene: Scene, with_size: bool = True, with_location: bool = True) -> SceneQuery:
        return cls(tuple(
            ObjQuery(o.color, o.shape, o.size if with_size else None, o.cell if with_location else None)
            for o in scene.objects
        ))

    def __len__(self) -> int:
        return len(self.objects)


def matches(parsed: Scene, target: Scene | SceneQuery, *, check_size: bool = True, check_cell: bool = True) -> bool:
    """True when `parsed` has exactly the target's objects: the same number and a one-to-one match in
    color, shape, and (where the target names them and the check is on) size and cell."""
    query = target if isinstance(target, SceneQuery) else SceneQuery.from_scene(target)
    if len(parsed.objects) != len(query.objects):
        return False
    # at most 3 objects in a valid target: trying every pairing is cheap and exact
    return any(
        all(q.accepts(o, check_size, check_cell) for q, o in zip(query.objects, perm))
        for perm in permutations(parsed.objects)
    )
