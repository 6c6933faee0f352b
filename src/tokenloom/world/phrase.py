"""Text of the shapes world (spec: shapes-world.md, "Canonical phrasing" onwards): captions, questions
and answers, change sentences, editing instructions and stories; with strict parsers back. Videos and
their motion captions are in video.py."""

from __future__ import annotations

import re

import numpy as np

from .parse import ObjQuery, SceneQuery
from .scene import (CELLS, COLORS, LOCATIONS, SHAPES, SIZES, Change, Obj, Scene, apply_change, random_change,
                    random_scene)

NUMBERS = {1: "one", 2: "two", 3: "three"}


def location_phrase(cell: str) -> str:
    return LOCATIONS[cell]


def object_phrase(obj: Obj | ObjQuery, with_size: bool = True) -> str:
    """`a {size} {color} {shape}`; the size is left out when asked to or when unknown (ObjQuery)."""
    words = ["a", obj.size if with_size and obj.size else None, obj.color, obj.shape]
    return " ".join(w for w in words if w)


def join(phrases: list[str]) -> str:
    """`x`, `x and y`, `x, y and z`."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene | SceneQuery, with_size: bool = True, with_location: bool = True) -> str:
    """The canonical caption: objects in reading order (a SceneQuery keeps its own order)."""
    phrases = []
    for obj in scene.objects:
        phrase = object_phrase(obj, with_size)
        if with_location and obj.cell:
            phrase += " " + location_phrase(obj.cell)
        phrases.append(phrase)
    return join(phrases)


# ---------------------------------------------------------------------------
# parsing text back: regular expressions over the closed vocabulary

def _alt(words) -> str:
    return "(" + "|".join(re.escape(w) for w in words) + ")"


_CELL_OF_LOCATION = {phrase: cell for cell, phrase in LOCATIONS.items()}
_OBJECT = rf"a (?:{_alt(SIZES)} )?{_alt(COLORS)} {_alt(SHAPES)}"
_OBJECT_RE = re.compile(rf"{_OBJECT}(?: {_alt(_CELL_OF_LOCATION)})?")


def parse_caption(text: str) -> SceneQuery:
    """The SceneQuery a caption states; ValueError for text that is not a caption.

    Each object may leave out its size and its location. Named locations must be distinct
    and in reading order, as in every caption `caption` writes."""
    parts = text.split(", ")
    last = parts.pop().split(" and ")
    if len(last) > 2 or (len(last) == 1 and parts):  # only the last two are joined by " and "
        raise ValueError(f"not a caption: {text!r}")
    parts += last
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"a caption names 1 to 3 objects: {text!r}")
    objects = []
    for part in parts:
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"not an object phrase: {part!r}")
        size, color, shape, location = m.groups()
        objects.append(ObjQuery(color, shape, size, _CELL_OF_LOCATION[location] if location else None))
    order = [CELLS.index(o.cell) for o in objects if o.cell]
    if order != sorted(set(order)):
        raise ValueError(f"locations repeat or are not in reading order: {text!r}")
    return SceneQuery(tuple(objects))


# ---------------------------------------------------------------------------
# questions and answers

def where(cell: str) -> str:
    """The location phrase without its preposition: `the top left`, `the center`."""
    return location_phrase(cell).split(" ", 1)[1]


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every question of the spec that has one answer in this scene, with that answer."""
    scene.validate()
    qa = [("Describe the image.", caption(scene)), ("How many shapes are there?", NUMBERS[len(scene)])]
    for shape in SHAPES:
        found = [o for o in scene.objects if o.shape == shape]
        if len(found) == 1:
            qa.append((f"What color is the {shape}?", found[0].color))
    for color in COLORS:
        found = [o for o in scene.objects if o.color == color]
        if len(found) == 1:
            qa.append((f"What shape is the {color} object?", found[0].shape))
    for obj in scene.objects:
        if sum(o.key == obj.key for o in scene.objects) == 1:
            qa.append((f"Where is the {obj.color} {obj.shape}?", where(obj.cell)))
    return qa


def answer(scene: Scene, question: str) -> str | None:
    """The answer to a question about a scene, or None when it has no single answer there."""
    return dict(questions(scene)).get(question)


# ---------------------------------------------------------------------------
# changes: sentences (stories) and imperatives (editing)

def change_sentence(change: Change, scene: Scene | None = None) -> str:
    """`the red circle moves to the top`, ...; with `scene`, first checks that the change applies to it."""
    if scene is not None:
        apply_change(scene, change)
    name = f"the {change.color} {change.shape}"
    if change.kind == "move":
        return f"{name} moves to the {change.cell}"
    if change.kind == "recolor":
        return f"{name} turns {change.new_color}"
    if change.kind == "add":
        return f"a {change.size} {change.color} {change.shape} appears {location_phrase(change.cell)}"
    return f"{name} disappears"


def edit_instruction(change: Change, scene: Scene | None = None) -> str:
    """`move the red circle to the top`, ...; with `scene`, first checks that the change applies to it."""
    if scene is not None:
        apply_change(scene, change)
    name = f"the {change.color} {change.shape}"
    if change.kind == "move":
        return f"move {name} to the {change.cell}"
    if change.kind == "recolor":
        return f"make {name} {change.new_color}"
    if change.kind == "add":
        return f"add a {change.size} {change.color} {change.shape} {location_phrase(change.cell)}"
    return f"remove {name}"


_NAME = rf"the {_alt(COLORS)} {_alt(SHAPES)}"
_ADDED = rf"a {_alt(SIZES)} {_alt(COLORS)} {_alt(SHAPES)}"
_LOCATION = _alt(_CELL_OF_LOCATION)
_SENTENCES = [
    ("move", re.compile(rf"{_NAME} moves to the {_alt(CELLS)}")),
    ("recolor", re.compile(rf"{_NAME} turns {_alt(COLORS)}")),
    ("add", re.compile(rf"{_ADDED} appears {_LOCATION}")),
    ("remove", re.compile(rf"{_NAME} disappears")),
]
_INSTRUCTIONS = [
    ("move", re.compile(rf"move {_NAME} to the {_alt(CELLS)}")),
    ("recolor", re.compile(rf"make {_NAME} {_alt(COLORS)}")),
    ("add", re.compile(rf"add {_ADDED} {_LOCATION}")),
    ("remove", re.compile(rf"remove {_NAME}")),
]


def _parse_change(text: str, patterns) -> Change:
    for kind, pattern in patterns:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if kind == "move":
            return Change("move", g[0], g[1], cell=g[2])
        if kind == "recolor":
            return Change("recolor", g[0], g[1], new_color=g[2])
        if kind == "add":
            return Change("add", g[1], g[2], size=g[0], cell=_CELL_OF_LOCATION[g[3]])
        return Change("remove", g[0], g[1])
    raise ValueError(f"not a change: {text!r}")


def parse_change_sentence(text: str) -> Change:
    return _parse_change(text, _SENTENCES)


def parse_edit_instruction(text: str) -> Change:
    return _parse_change(text, _INSTRUCTIONS)


# ---------------------------------------------------------------------------
# stories

def random_story(rng: np.random.Generator, n_steps: int, n_objects: int | None = None) -> list[tuple[str, Scene]]:
    """[(first caption, first scene), (change sentence, scene after it), ...] with n_steps changes."""
    scene = random_scene(rng, n_objects)
    story = [(caption(scene), scene)]
    for _ in range(n_steps):
        change = random_change(rng, scene)
        scene = apply_change(scene, change)
        story.append((change_sentence(change), scene))
    return story

