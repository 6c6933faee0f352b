"""The shapes world (spec: /work/shared/specs/shapes-world.md): scenes of colored shapes on a 3x3 grid,
rendered to images, parsed back exactly, and phrased as captions, questions, changes and edits; and videos
of one object moving between cells, scored exactly frame by frame; and its texts spoken (espeak-ng) and
recognised (pocketsphinx), with the speech tasks registered among the rest."""

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
from .speech import (
    HELD_OUT_VARIANTS,
    LANGUAGES,
    TEXT_KINDS,
    TRAIN_VARIANTS,
    Recognizer,
    SpeechError,
    Voice,
    normalize,
    phonemes,
    random_voice,
    random_world_text,
    read_manifest,
    render_corpus,
    sentence_grammar,
    speak,
)
from .video import (
    Motion,
    MotionQuery,
    Video,
    frames_right,
    motion_caption,
    motion_of,
    parse_motion_caption,
    random_motion,
    render_video,
    score_frames,
    score_video,
    video_answer,
    video_frames,
    video_questions,
    video_right,
)
from .speech_tasks import SPEECH_TASKS  # registers the speech tasks in tasks.TASKS

__all__ = [
    "BACKGROUND", "CELLS", "COLORS", "LOCATIONS", "SHAPES", "SIZES",
    "Obj", "Scene", "Change", "random_scene", "random_change", "apply_change",
    "render", "draw", "cell_centre", "extent", "pixel_extent", "coverage", "check_canvas",
    "parse", "find_regions", "Region", "matches", "classify_pixels", "ObjQuery", "SceneQuery",
    "object_phrase", "location_phrase", "caption", "parse_caption", "where", "questions", "answer",
    "change_sentence", "edit_instruction", "parse_change_sentence", "parse_edit_instruction",
    "random_story",
    "Motion", "MotionQuery", "Video", "random_motion", "motion_of", "render_video", "video_frames",
    "motion_caption", "parse_motion_caption", "video_questions", "video_answer",
    "score_video", "video_right", "score_frames", "frames_right",
    "LANGUAGES", "TRAIN_VARIANTS", "HELD_OUT_VARIANTS", "TEXT_KINDS", "Voice", "random_voice", "speak", "phonemes",
    "normalize", "sentence_grammar", "Recognizer", "SpeechError", "random_world_text", "render_corpus",
    "read_manifest",
    "SPEECH_TASKS",
]
