"""Scenes of the shapes world (spec: shapes-world.md, version 1) and changes between them.

A scene is 1 to 3 objects, each a (color, shape, size) in its own cell of a 3x3 grid.
Scenes made here also keep every (color, shape) pair unique, so that "the red circle"
always names one object in change sentences, edits and questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "cyan": (20, 190, 210),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# extent as a fraction of min(W, H): circle diameter, square side, triangle base and height
SIZES: dict[str, float] = {"small": 0.14, "large": 0.24}
JITTER = 0.02  # largest shift of an object's centre, as a fraction of W (horizontal) and H (vertical)

# cells in reading order (row by row, left to right)
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
LOCATIONS: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
MAX_OBJECTS = 3


def cell_index(cell: str) -> int:
    return CELLS.index(cell)


def check_choice(value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    cell: str

    def __post_init__(self):
        for value, allowed in ((self.color, COLORS), (self.shape, SHAPES), (self.size, SIZES), (self.cell, CELLS)):
            check_choice(value, allowed)

    @property
    def key(self) -> tuple[str, str]:
        """(color, shape): how sentences name an object ("the red circle")."""
        return (self.color, self.shape)


def _reading_order(obj: Obj) -> tuple:
    # ties (two objects in one cell) only occur in parses of generated images; keep them deterministic
    return (cell_index(obj.cell), obj.color, obj.shape, obj.size)


@dataclass(frozen=True)
class Scene:
    """Objects in reading order of their cells.

    Construction only sorts: a parse of a generated image may hold 0 or 4 objects, or two in
    one cell, and must still be representable to be scored. `validate()` checks the spec's rules;
    everything in this package that makes scenes calls it.
    """

    objects: tuple[Obj, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=_reading_order)))

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def is_valid(self) -> bool:
        cells = [o.cell for o in self.objects]
        return 1 <= len(cells) <= MAX_OBJECTS and len(set(cells)) == len(cells)

    @property
    def has_unique_names(self) -> bool:
        keys = [o.key for o in self.objects]
        return len(set(keys)) == len(keys)

    def validate(self) -> Scene:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if not self.is_valid:
            raise ValueError("two objects share a cell")
        return self

    def find(self, color: str, shape: str) -> Obj:
        """The one object named `the {color} {shape}`."""
        found = [o for o in self.objects if o.key == (color, shape)]
        if len(found) != 1:
            raise ValueError(f"'the {color} {shape}' names {len(found)} objects in this scene")
        return found[0]

    def free_cells(self) -> list[str]:
        used = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in used]


def pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random valid scene: 1 to 3 objects (uniform, unless n_objects is given), distinct cells,
    unique (color, shape) pairs, every choice uniform."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be 1 to {MAX_OBJECTS}, got {n}")
    cells = rng.choice(len(CELLS), size=n, replace=False)
    keys = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = list(COLORS)
    objects = [
        Obj(colors[k // len(SHAPES)], SHAPES[k % len(SHAPES)], pick(rng, list(SIZES)), CELLS[c])
        for c, k in zip(cells, keys)
    ]
    return Scene(tuple(objects)).validate()


# ---------------------------------------------------------------------------
# changes between scenes

ChangeKind = Literal["move", "recolor", "add", "remove"]
CHANGE_KINDS: tuple[str, ...] = ("move", "recolor", "add", "remove")


@dataclass(frozen=True)
class Change:
    """One change. The object is named by (color, shape); which other fields are used depends on kind:
    move: cell (the destination); recolor: new_color; add: size and cell; remove: nothing else."""

    kind: ChangeKind
    color: str
    shape: str
    size: str | None = None
    cell: str | None = None
    new_color: str | None = None

    def __post_init__(self):
        if self.kind not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {self.kind!r}")
        needed = {"move": ("cell",), "recolor": ("new_color",), "add": ("size", "cell"), "remove": ()}[self.kind]
        for name in ("size", "cell", "new_color"):
            if (getattr(self, name) is not None) != (name in needed):
                raise ValueError(f"a {self.kind} change {'needs' if name in needed else 'takes no'} {name}")
        for value, allowed in ((self.color, COLORS), (self.shape, SHAPES), (self.size, SIZES),
                               (self.cell, CELLS), (self.new_color, COLORS)):
            if value is not None:
                check_choice(value, allowed)


def apply_change(scene: Scene, change: Change) -> Scene:
    """The scene after `change`; ValueError when the change does not apply or breaks the scene's rules."""
    objs = list(scene.objects)
    if change.kind == "add":
        if any(o.key == (change.color, change.shape) for o in objs):
            raise ValueError(f"there already is a {change.color} {change.shape}")
        objs.append(Obj(change.color, change.shape, change.size, change.cell))
    else:
        target = scene.find(change.color, change.shape)
        objs.remove(target)
        if change.kind == "move":
            if change.cell == target.cell:
                raise ValueError("a move must change the cell")
            objs.append(Obj(target.color, target.shape, target.size, change.cell))
        elif change.kind == "recolor":
            if change.new_color == target.color or any(o.key == (change.new_color, target.shape) for o in objs):
                raise ValueError(f"cannot make the {target.color} {target.shape} {change.new_color}")
            objs.append(Obj(change.new_color, target.shape, target.size, target.cell))
    after = Scene(tuple(objs)).validate()
    if not after.has_unique_names:
        raise ValueError("the change makes two objects share a name")
    return after


def possible_kinds(scene: Scene) -> list[str]:
    kinds = ["move", "recolor"]  # always possible: at most 3 of 9 cells and 3 of 6 colors are taken
    if len(scene) < MAX_OBJECTS:
        kinds.append("add")
    if len(scene) > 1:
        kinds.append("remove")
    return kinds


def random_change(rng: np.random.Generator, scene: Scene, kinds: tuple[str, ...] | None = None) -> Change:
    """A uniform random change among `kinds` (all by default) that keeps the scene valid and names unique."""
    options = [k for k in possible_kinds(scene) if kinds is None or k in kinds]
    if not options:
        raise ValueError(f"none of {kinds} applies to a scene of {len(scene)} objects")
    kind = pick(rng, options)
    if kind == "add":
        taken = {o.key for o in scene.objects}
        keys = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
        color, shape = pick(rng, keys)
        return Change("add", color, shape, size=pick(rng, list(SIZES)), cell=pick(rng, scene.free_cells()))
    target = pick(rng, scene.objects)
    if kind == "move":
        return Change("move", target.color, target.shape, cell=pick(rng, scene.free_cells()))
    if kind == "remove":
        return Change("remove", target.color, target.shape)
    taken = {o.key for o in scene.objects}
    colors = [c for c in COLORS if (c, target.shape) not in taken]
    return Change("recolor", target.color, target.shape, new_color=pick(rng, colors))
