"""edit_codes: code stability and the copy ceiling of image tokenizers under shapes-world edits."""

import numpy as np
from PIL import Image

from edit_codes import changed_cells, code_stability, copied_target, copy_ceiling, grow_cells
from tokenloom.image_processing import ImageTokenizer
from tokenloom.vqgan import VQGANConfig

# factor 2, 48x48 renders (the smallest canvas)
TINY = VQGANConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, resolution=48,
                   z_channels=8, embed_dim=8, codebook_size=32)
SIZES = ((48, 48),)


class _Identity:
    """A stand-in tokenizer whose 'codes' are the pixels themselves: a perfect round trip."""

    class config:
        codebook_size = 256

    def encode(self, images, width, height):
        return [np.asarray(im) for im in images]

    def decode(self, codes):
        return [Image.fromarray(np.asarray(c, np.uint8), "RGB") for c in codes]


class _Blank(_Identity):
    def decode(self, codes):
        return [Image.new("RGB", (c.shape[1], c.shape[0]), (255, 255, 255)) for c in codes]


def test_code_stability_is_one_for_local_codes_and_lower_for_image_wide_ones():
    # pixels as codes: an untouched cell keeps its code by construction
    assert code_stability(_Identity(), n=6, seed=0, sizes=SIZES) == 1.0
    # GroupNorm over the whole image makes far cells' codes follow an edit
    image_wide = ImageTokenizer.random(TINY)
    assert code_stability(image_wide, n=6, seed=0, sizes=SIZES) < 0.9


def test_grow_cells_and_copied_target():
    changed = np.zeros((4, 5), dtype=bool)
    changed[0, 0] = True
    assert grow_cells(changed, 0).sum() == 1
    assert grow_cells(changed, 1).sum() == 4 and grow_cells(changed, 1)[1, 1]  # diagonals count
    assert grow_cells(changed, 2)[:3, :3].all() and grow_cells(changed, 2).sum() == 9
    source, target = np.zeros((4, 5), int), np.ones((4, 5), int)
    drawn = copied_target(source, target, changed, 1)
    assert drawn.sum() == 4 and drawn[1, 1] == 1 and drawn[3, 4] == 0
    pixels = copied_target(np.zeros((4, 5, 3)), np.ones((4, 5, 3)), changed, 0)  # trailing code dims
    assert pixels[0, 0].tolist() == [1, 1, 1] and pixels.sum() == 3


def test_copy_ceiling_is_one_for_a_perfect_round_trip_and_zero_for_garbage():
    # pixels as codes: copying every pixel the edit left alone redraws the edit exactly
    assert copy_ceiling(_Identity(), n=5, seed=0, sizes=SIZES, margins=(0, 2)) == {0: 1.0, 2: 1.0}
    assert copy_ceiling(_Blank(), n=5, seed=0, sizes=SIZES, margins=(1,)) == {1: 0.0}


def test_changed_cells_marks_the_cells_where_any_pixel_differs():
    before = Image.new("RGB", (8, 4), (255, 255, 255))
    after = before.copy()
    after.putpixel((5, 3), (0, 0, 0))  # x 5, y 3: cell (1, 2) of a 2x4 grid of 2x2 cells
    changed = changed_cells(before, after, (2, 4))
    assert changed.shape == (2, 4) and changed.sum() == 1 and changed[1, 2]
