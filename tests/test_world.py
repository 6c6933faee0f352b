"""Tests of the shapes world against its spec (/work/shared/specs/shapes-world.md)."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from tokenloom.world import (
    CELLS,
    COLORS,
    LOCATIONS,
    SHAPES,
    SIZES,
    Change,
    Obj,
    ObjQuery,
    Scene,
    SceneQuery,
    answer,
    apply_change,
    caption,
    cell_centre,
    change_sentence,
    check_canvas,
    edit_instruction,
    find_regions,
    matches,
    parse,
    parse_caption,
    parse_change_sentence,
    parse_edit_instruction,
    pixel_extent,
    questions,
    random_change,
    random_scene,
    random_story,
    render,
    video_frames,
)
from tokenloom.world.parse import _components, classify_pixels
from tokenloom.world.render import patch

SPEC_CAPTION = ("a small red circle at the top left, a large blue square in the center "
                "and a small yellow triangle at the bottom right")
SPEC_SCENE = Scene((
    Obj("yellow", "triangle", "small", "bottom right"),  # given out of order on purpose
    Obj("red", "circle", "small", "top left"),
    Obj("blue", "square", "large", "center"),
))


def gaussian_blur(image: Image.Image, sigma: float = 0.6) -> Image.Image:
    """A true Gaussian blur (separable, 5 sigma wide), the spec's "mild blur"."""
    a = np.asarray(image).astype(np.float64)
    r = 3
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, ((r, r), (r, r), (0, 0)), mode="edge")
    h = sum(k[i] * p[:, i:i + a.shape[1]] for i in range(2 * r + 1))
    v = sum(k[i] * h[i:i + a.shape[0]] for i in range(2 * r + 1))
    return Image.fromarray(np.rint(v).astype(np.uint8))


def pil_blur(image: Image.Image) -> Image.Image:
    # PIL's GaussianBlur takes sigma as its radius but approximates the Gaussian with box blurs:
    # close enough to sigma 0.6, and what a data pipeline would most likely use
    return image.filter(ImageFilter.GaussianBlur(0.6))


# ---------------------------------------------------------------------------
# constants and canvas


def test_palette_extents_and_cells_are_the_spec_numbers():
    assert COLORS == {
        "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
        "yellow": (235, 200, 20), "purple": (140, 50, 170), "cyan": (20, 190, 210),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == {"small": 0.14, "large": 0.24}
    assert CELLS == ("top left", "top", "top right", "left", "center", "right",
                     "bottom left", "bottom", "bottom right")
    assert [LOCATIONS[c] for c in CELLS] == [
        "at the top left", "at the top", "at the top right", "on the left", "in the center", "on the right",
        "at the bottom left", "at the bottom", "at the bottom right"]
    # drawn extents are the spec's, rounded to whole pixels
    for m in (48, 64, 100, 512):
        for size, f in SIZES.items():
            assert abs(pixel_extent(size, m, 2 * m if m <= 256 else m) - f * m) <= 0.5


@pytest.mark.parametrize("w,h", [(47, 64), (64, 47), (513, 400), (400, 513), (48, 97), (97, 48), (300, 149), (0, 0)])
def test_invalid_canvas_raises(w, h):
    with pytest.raises(ValueError):
        check_canvas(w, h)
    with pytest.raises(ValueError):
        render(SPEC_SCENE, w, h)


@pytest.mark.parametrize("w,h", [(48, 48), (48, 96), (96, 48), (512, 512), (512, 256), (256, 512), (64, 64)])
def test_valid_canvas_renders_white_rgb(w, h):
    image = render(SPEC_SCENE, w, h)
    assert image.mode == "RGB" and image.size == (w, h)
    a = np.asarray(image)
    assert (a[0] == 255).all() and (a[:, 0] == 255).all()  # background is pure white
    assert set(map(tuple, a.reshape(-1, 3))) >= {COLORS["red"], COLORS["blue"], COLORS["yellow"]}  # filled solid


# ---------------------------------------------------------------------------
# render -> parse is exact


def test_every_drawable_object_parses_exactly():
    """Objects are pixel-aligned, so an object's pixels depend only on its shape, color, extent in
    whole pixels and antialiasing. Check every such pattern that any allowed canvas can produce,
    clean and blurred, and its size against every canvas that draws that extent."""
    canvases_of = {}  # extent in pixels -> [(size, min side)]
    for m in range(48, 513):
        for size in SIZES:
            canvases_of.setdefault(pixel_extent(size, m, m), []).append((size, m))
    for n, uses in canvases_of.items():
        side = n + 16  # white margin wider than the blur
        for shape in SHAPES:
            for color in COLORS:
                for antialias in (False, True):
                    canvas = np.full((side, side, 3), 255, np.uint8)
                    canvas[8:8 + n, 8:8 + n] = patch(shape, n, color, antialias)
                    image = Image.fromarray(canvas)
                    for im in (image, gaussian_blur(image), pil_blur(image)):
                        (region,) = find_regions(im)
                        assert (region.color, region.shape) == (color, shape), (n, antialias)
                        for size, m in uses:
                            assert region.size(m, m) == size, (n, shape, color, antialias, m)


SIZES_TO_TEST = [(48, 48), (64, 64), (96, 48), (48, 96), (100, 70), (70, 100), (53, 101), (256, 256),
                 (512, 256), (256, 512), (512, 512)]


@pytest.mark.parametrize("w,h", SIZES_TO_TEST)
def test_render_parse_round_trip(w, h):
    rng = np.random.default_rng(w * 1000 + h)
    n = 80 if max(w, h) <= 128 else 20
    for i in range(n):
        scene = random_scene(rng)
        antialias = i % 4 != 3
        image = render(scene, w, h, antialias=antialias, rng=rng if i % 2 else None)
        assert parse(image) == scene
        blurred = gaussian_blur(image) if i % 3 == 0 else pil_blur(image)
        assert parse(blurred) == scene


def test_objects_stay_within_the_jitter_allowance_and_jitter_varies():
    rng = np.random.default_rng(0)
    for w, h in [(48, 48), (64, 64), (96, 48), (48, 96), (100, 70), (512, 256)]:
        centres = set()
        for _ in range(30):
            obj = Obj("red", "square", str(rng.choice(list(SIZES))), "top left")
            (region,) = find_regions(render(Scene((obj,)), w, h, antialias=False, rng=rng))
            cx, cy = cell_centre(obj.cell, w, h)
            x, y = (region.left + region.right) / 2, (region.top + region.bottom) / 2
            assert abs(x - cx) <= 0.02 * w + 1e-9 and abs(y - cy) <= 0.02 * h + 1e-9
            centres.add((x, y))
        assert len(centres) > 1
    # no rng: deterministic, at (a pixel-aligned neighbour of) the cell centre
    assert np.array_equal(np.asarray(render(SPEC_SCENE)), np.asarray(render(SPEC_SCENE)))


def test_classify_pixels_is_nearest_palette_color_within_80():
    rng = np.random.default_rng(6)
    pixels = [rng.integers(0, 256, (4000, 3))]
    for c in COLORS.values():  # blends with white: the edges of anti-aliased and blurred objects
        t = np.linspace(0, 1, 256)[:, None]
        pixels.append(np.rint(255 + t * (np.array(c) - 255)))
    px = np.concatenate(pixels).astype(np.uint8)[:, None, :]
    d2 = ((px.astype(int)[:, :, None] - np.array(list(COLORS.values()))) ** 2).sum(-1)  # (n, 1, 6)
    expected = np.where(d2.min(-1) <= 80 ** 2, d2.argmin(-1), -1)
    assert np.array_equal(classify_pixels(px), expected)
    # a blend of a color with white is that color or background, never another color
    for k, c in enumerate(COLORS.values()):
        t = np.linspace(0, 1, 256)[:, None, None]
        labels = classify_pixels(np.rint(255 + t * (np.array(c) - 255)).astype(np.uint8))
        assert set(labels.ravel().tolist()) == {-1, k}


def flood_fill_components(mask: np.ndarray) -> list[set]:
    """Reference 4-connected components, the slow obvious way."""
    seen, comps = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, comp = [start], set()
        seen[start] = True
        while stack:
            y, x = stack.pop()
            comp.add((y, x))
            for q in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        comps.append(comp)
    return comps


def test_components_match_flood_fill():
    rng = np.random.default_rng(7)
    for density in (0.3, 0.5, 0.6):
        for _ in range(20):
            mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < density
            got = [{(r, x) for r, s, e in comp for x in range(s, e)} for comp in _components(mask)]
            want = flood_fill_components(mask)
            assert sorted(map(sorted, got)) == sorted(map(sorted, want))


def test_parse_ignores_noise_and_tiny_regions():
    image = np.asarray(render(SPEC_SCENE, 96, 96)).copy()
    image[2:5, 2:5] = COLORS["green"]  # 9 px < 2% of a 32x32 cell (20.5 px)
    assert parse(Image.fromarray(image)) == SPEC_SCENE
    image[40:48, 2:10] = COLORS["green"]  # 64 px: a region, and so an extra object
    assert len(parse(Image.fromarray(image))) == 4
    assert parse(Image.new("RGB", (64, 64), "white")) == Scene(())


# ---------------------------------------------------------------------------
# scenes


def test_scene_keeps_reading_order_and_validates():
    assert [o.cell for o in SPEC_SCENE.objects] == ["top left", "center", "bottom right"]
    assert SPEC_SCENE.validate() is SPEC_SCENE
    with pytest.raises(ValueError):
        Scene(()).validate()
    with pytest.raises(ValueError):
        Scene((Obj("red", "circle", "small", "top"), Obj("blue", "circle", "small", "top"))).validate()
    with pytest.raises(ValueError):
        Scene(tuple(Obj("red", "circle", "small", c) for c in CELLS[:4])).validate()
    with pytest.raises(ValueError):
        Obj("pink", "circle", "small", "top")


def test_random_scenes_are_valid_and_varied():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(500)]
    assert all(s.is_valid and s.has_unique_names for s in scenes)
    assert {len(s) for s in scenes} == {1, 2, 3}
    assert {o.cell for s in scenes for o in s.objects} == set(CELLS)
    assert {(o.color, o.shape, o.size) for s in scenes for o in s.objects} == {
        (c, s, z) for c in COLORS for s in SHAPES for z in SIZES}
    assert len(random_scene(rng, n_objects=3)) == 3


# ---------------------------------------------------------------------------
# captions


def test_spec_example_caption():
    assert caption(SPEC_SCENE) == SPEC_CAPTION
    assert caption(SPEC_SCENE, with_size=False) == (
        "a red circle at the top left, a blue square in the center and a yellow triangle at the bottom right")
    assert caption(SPEC_SCENE, with_location=False) == (
        "a small red circle, a large blue square and a small yellow triangle")
    assert caption(Scene((Obj("green", "square", "large", "left"),))) == "a large green square on the left"
    two = Scene((Obj("cyan", "circle", "small", "right"), Obj("purple", "triangle", "large", "top")))
    assert caption(two) == "a large purple triangle at the top and a small cyan circle on the right"


def test_parse_caption_round_trips():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = random_scene(rng)
        for with_size in (True, False):
            for with_location in (True, False):
                text = caption(scene, with_size, with_location)
                query = parse_caption(text)
                assert query == SceneQuery.from_scene(scene, with_size, with_location)
                assert caption(query) == text
                assert matches(scene, query)


@pytest.mark.parametrize("text", [
    "", "a red circle.", "A red circle", "a red circle, a blue square",
    "a red circle and a blue square and a green square",
    "a red circle, a blue square, a green square and a red square", "a huge red circle", "a red hexagon",
    "a red circle at the middle", "the red circle", "a blue square in the center and a red circle at the top left",
    "a red circle on the left and a blue square on the left", "a red circle  at the top",
])
def test_parse_caption_rejects_non_captions(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_matches_rule():
    scene = SPEC_SCENE
    assert matches(scene, parse_caption(SPEC_CAPTION))
    assert matches(scene, parse_caption("a red circle, a blue square and a yellow triangle"))  # any size, any cell
    assert matches(scene, parse_caption("a yellow triangle, a red circle and a blue square"))  # any order
    assert matches(scene, parse_caption("a large blue square, a small red circle and a yellow triangle"))
    assert not matches(scene, parse_caption("a red circle, a blue square and a green triangle"))  # color
    assert not matches(scene, parse_caption("a red circle, a blue circle and a yellow triangle"))  # shape
    assert not matches(scene, parse_caption("a red circle and a blue square"))  # count
    assert not matches(scene, parse_caption("a large red circle, a blue square and a yellow triangle"))  # size
    wrong_cell = "a red circle at the top, a blue square and a yellow triangle"
    assert not matches(scene, parse_caption(wrong_cell))
    assert matches(scene, parse_caption(wrong_cell), check_cell=False)
    assert matches(scene, scene) and not matches(scene, Scene(scene.objects[:2]))
    # one-to-one: two parsed red circles cannot both match one named red circle
    reds = Scene((Obj("red", "circle", "small", "top"), Obj("red", "circle", "large", "left")))
    assert not matches(reds, SceneQuery((ObjQuery("red", "circle"), ObjQuery("blue", "circle"))))
    assert matches(reds, SceneQuery((ObjQuery("red", "circle", "large"), ObjQuery("red", "circle"))))


# ---------------------------------------------------------------------------
# questions and answers


def test_questions_for_constructed_scene():
    scene = Scene((Obj("red", "circle", "small", "top left"), Obj("red", "square", "large", "center"),
                   Obj("blue", "square", "small", "bottom")))
    qa = dict(questions(scene))
    assert qa == {
        "Describe the image.": "a small red circle at the top left, a large red square in the center "
                               "and a small blue square at the bottom",
        "How many shapes are there?": "three",
        "What color is the circle?": "red",
        "What shape is the blue object?": "square",
        "Where is the red circle?": "the top left",
        "Where is the red square?": "the center",
        "Where is the blue square?": "the bottom",
    }
    # ambiguous (two squares, two red objects) or unanswerable (no triangle, no green) questions are not asked
    assert answer(scene, "What color is the square?") is None
    assert answer(scene, "What shape is the red object?") is None
    assert answer(scene, "What color is the triangle?") is None


def test_questions_for_single_object_and_all_locations():
    for cell in CELLS:
        scene = Scene((Obj("cyan", "triangle", "large", cell),))
        assert answer(scene, "How many shapes are there?") == "one"
        assert answer(scene, "What color is the triangle?") == "cyan"
        assert answer(scene, "What shape is the cyan object?") == "triangle"
        assert "the " + answer(scene, "Where is the cyan triangle?") == "the " + LOCATIONS[cell].split(" ", 1)[1]
    assert answer(Scene((Obj("cyan", "triangle", "large", "center"),)), "Where is the cyan triangle?") == "the center"
    assert answer(Scene((Obj("cyan", "triangle", "large", "left"),)), "Where is the cyan triangle?") == "the left"


def test_questions_are_unambiguous_for_random_scenes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = random_scene(rng)
        for q, a in questions(scene):
            if q.startswith("What color is the "):
                shape = q[len("What color is the "):-1]
                assert [o.color for o in scene.objects if o.shape == shape] == [a]
            elif q.startswith("What shape is the "):
                color = q[len("What shape is the "):-len(" object?")]
                assert [o.shape for o in scene.objects if o.color == color] == [a]
        assert answer(scene, "How many shapes are there?") == ["one", "two", "three"][len(scene) - 1]


# ---------------------------------------------------------------------------
# changes, edits, stories, video


def test_change_sentences_and_instructions():
    scene = SPEC_SCENE
    cases = [
        (Change("move", "red", "circle", cell="top"),
         "the red circle moves to the top", "move the red circle to the top"),
        (Change("recolor", "blue", "square", new_color="green"),
         "the blue square turns green", "make the blue square green"),
        (Change("remove", "yellow", "triangle"), "the yellow triangle disappears", "remove the yellow triangle"),
    ]
    two = Scene(scene.objects[:2])
    add = Change("add", "purple", "triangle", size="large", cell="right")
    for change, sentence, instruction in cases:
        assert change_sentence(change, scene) == sentence
        assert edit_instruction(change, scene) == instruction
        assert parse_change_sentence(sentence) == change and parse_edit_instruction(instruction) == change
    assert change_sentence(add, two) == "a large purple triangle appears on the right"
    assert edit_instruction(add, two) == "add a large purple triangle on the right"
    after = apply_change(two, add)
    assert after.objects[2] == Obj("purple", "triangle", "large", "right")
    assert apply_change(scene, cases[0][0]).objects[0] == Obj("red", "circle", "small", "top")
    with pytest.raises(ValueError):
        parse_change_sentence("the red circle jumps")
    with pytest.raises(ValueError):
        parse_edit_instruction("the red circle moves to the top")


@pytest.mark.parametrize("change", [
    Change("move", "red", "circle", cell="center"),  # occupied
    Change("move", "green", "circle", cell="top"),  # no such object
    Change("recolor", "red", "circle", new_color="red"),  # no change
    Change("add", "green", "circle", size="small", cell="top"),  # a fourth object
    Change("add", "red", "circle", size="small", cell="top"),  # a second red circle
])
def test_inapplicable_changes_raise(change):
    with pytest.raises(ValueError):
        apply_change(SPEC_SCENE, change)
    with pytest.raises(ValueError):
        change_sentence(change, SPEC_SCENE)
    with pytest.raises(ValueError):
        apply_change(Scene((Obj("red", "circle", "small", "top"),)), Change("remove", "red", "circle"))


def test_change_validates_its_fields():
    with pytest.raises(ValueError):
        Change("move", "red", "circle")
    with pytest.raises(ValueError):
        Change("remove", "red", "circle", cell="top")
    with pytest.raises(ValueError):
        Change("recolor", "red", "circle", new_color="pink")


def test_random_changes_keep_scenes_valid_and_match_their_sentences():
    rng = np.random.default_rng(4)
    kinds = set()
    for _ in range(300):
        scene = random_scene(rng)
        change = random_change(rng, scene)
        kinds.add(change.kind)
        after = apply_change(scene, change)
        assert after.is_valid and after.has_unique_names
        assert parse_change_sentence(change_sentence(change, scene)) == change
        assert parse_edit_instruction(edit_instruction(change, scene)) == change
        before_keys = {o.key for o in scene.objects}
        after_keys = {o.key for o in after.objects}
        if change.kind == "move":
            assert after.find(change.color, change.shape).cell == change.cell and len(after) == len(scene)
        elif change.kind == "recolor":
            moved = after.find(change.new_color, change.shape)
            assert moved.cell == scene.find(change.color, change.shape).cell
            assert after_keys == before_keys - {(change.color, change.shape)} | {(change.new_color, change.shape)}
        elif change.kind == "add":
            assert after_keys == before_keys | {(change.color, change.shape)}
        else:
            assert after_keys == before_keys - {(change.color, change.shape)}
    assert kinds == {"move", "recolor", "add", "remove"}
    assert random_change(rng, SPEC_SCENE, kinds=("remove",)).kind == "remove"


def test_random_story_follows_its_sentences():
    rng = np.random.default_rng(5)
    for _ in range(20):
        story = random_story(rng, 4)
        assert len(story) == 5
        text, scene = story[0]
        assert parse_caption(text) == SceneQuery.from_scene(scene)
        for sentence, after in story[1:]:
            assert apply_change(scene, parse_change_sentence(sentence)) == after
            assert parse(render(after, rng=rng)) == after
            scene = after


def test_video_moves_one_object_in_a_straight_line():
    obj = Obj("green", "triangle", "large", "top left")
    frames = video_frames(obj, "top left", "bottom right", 7, 96, 64)
    assert len(frames) == 7 and all(f.size == (96, 64) for f in frames)
    assert parse(frames[0]) == Scene((obj,))
    assert parse(frames[-1]) == Scene((Obj("green", "triangle", "large", "bottom right"),))
    centres = []
    for f in frames:
        (region,) = find_regions(f)
        centres.append(((region.left + region.right) / 2, (region.top + region.bottom) / 2))
    xs, ys = np.array(centres).T
    assert (np.diff(xs) > 0).all() and (np.diff(ys) > 0).all()
    # on the line between the two cell centres, to within the pixel grid
    (x0, y0), (x1, y1) = cell_centre("top left", 96, 64), cell_centre("bottom right", 96, 64)
    t = (xs - xs[0]) / (xs[-1] - xs[0])
    assert np.abs(ys - (ys[0] + t * (ys[-1] - ys[0]))).max() <= 1.0
    assert abs(xs[-1] - xs[0] - (x1 - x0)) <= 1.0 and abs(ys[-1] - ys[0] - (y1 - y0)) <= 1.0
    with pytest.raises(ValueError):
        video_frames(obj, "top", "left", 1)
