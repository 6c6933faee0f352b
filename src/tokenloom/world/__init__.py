"""The shapes world (spec: /work/shared/specs/shapes-world.md): scenes of colored shapes on a 3x3 grid,
rendered to images, parsed back exactly, and phrased as captions, questions, changes and edits."""

from .parse import ObjQuery, Region, SceneQuery, classify_pixels, find_regions, matches, parse
from .phrase import (
    answer,
    caption,
    change_sentence,
    edit_instruction,
    location_phrase,
    object_phrase,
    parse_caption,
    parse_change_sentence,
    parse_edit_instruction,
    questions,
    random_story,
    video_frames,
    where,
)
from .render import cell_centre, check_canvas, coverage, draw, extent, pixel_extent, render
from .scene import (
    BACKGROUND,
    CELLS,
    COLORS,
    LOCATIONS,
    SHAPES,
    SIZES,
    Change,
    Obj,
    Scene,
    apply_change,
    random_change,
    random_scene,
)

__all__ = [
    "BACKGROUND", "CELLS", "COLORS", "LOCATIONS", "SHAPES", "SIZES",
    "Obj", "Scene", "Change", "random_scene", "random_change", "apply_change",
    "render", "draw", "cell_centre", "extent", "pixel_extent", "coverage", "check_canvas",
    "parse", "find_regions", "Region", "matches", "classify_pixels", "ObjQuery", "SceneQuery",
    "object_phrase", "location_phrase", "caption", "parse_caption", "where", "questions", "answer",
    "change_sentence", "edit_instruction", "parse_change_sentence", "parse_edit_instruction",
    "random_story", "video_frames",
]
