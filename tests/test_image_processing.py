import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom.image_processing import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ImageLoadError,
    ImageTokenizer,
    check_image_size,
    load_image,
    postprocess,
    preprocess,
)
from tokenloom.vqgan import VQGANConfig

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# factor 4, codebook 64
TINY = VQGANConfig(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
                   resolution=16, z_channels=4, embed_dim=4, codebook_size=64)


def stripes(colors, stripe, size, vertical=True):
    """Image of equal stripes: vertical stripes run left->right, horizontal ones top->bottom."""
    arr = np.zeros((size, stripe * len(colors), 3) if vertical else (stripe * len(colors), size, 3), np.uint8)
    for i, c in enumerate(colors):
        if vertical:
            arr[:, i * stripe:(i + 1) * stripe] = c
        else:
            arr[i * stripe:(i + 1) * stripe] = c
    return Image.fromarray(arr, "RGB")


def as_uint8(t):
    return np.rint((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)


def noise_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


# ----------------------------------------------------------------------------- preprocess


def test_transparent_region_becomes_white():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[:, 4:, 3] = 255  # right half opaque, left half fully transparent
    arr[0, 4, 3] = 128  # one half-transparent pixel
    x = preprocess(Image.fromarray(arr, "RGBA"), 8, 8)
    assert torch.equal(x[:, :, :4], torch.ones(3, 8, 4))
    assert torch.equal(x[:, 1:, 4:], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 7, 4))
    # 50% red over white: (255, ~127, ~127)
    assert as_uint8(x)[0, 4].tolist() == [255, 127, 127]


def test_palette_with_transparency_is_whitened():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    assert torch.equal(preprocess(img, 4, 4), torch.ones(3, 4, 4))


def test_wide_image_is_centre_cropped_without_resize():
    x = preprocess(stripes([RED, GREEN, BLUE], 8, 8), 8, 8)
    assert (as_uint8(x) == np.array(GREEN)).all()


def test_wide_image_is_resized_short_side_then_cropped():
    # 48x16 -> 24x8 -> middle 8x8 is the green stripe (edges may ring under LANCZOS)
    x = as_uint8(preprocess(stripes([RED, GREEN, BLUE], 16, 16), 8, 8))
    assert x.shape == (8, 8, 3)
    assert (np.abs(x[:, 2:6] - np.array(GREEN)) <= 2).all()


def test_tall_image_to_non_square_box():
    # 16 wide, 48 tall, target 8x16 (WxH): scale 0.5 covers it -> 8x24, crop rows 4..20
    img = stripes([RED, GREEN, BLUE], 16, 16, vertical=False)
    x = as_uint8(preprocess(img, 8, 16))
    assert x.shape == (16, 8, 3)
    assert (np.abs(x[0, :] - np.array(RED)) <= 2).all()  # bottom of the red stripe
    assert (np.abs(x[6:10] - np.array(GREEN)) <= 2).all()
    assert (np.abs(x[-1, :] - np.array(BLUE)) <= 2).all()


def test_preprocess_range_dtype_and_shape():
    img = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]] * 2, np.uint8), "RGB")
    x = preprocess(img, 2, 2)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2)
    assert x.min() == -1.0 and x.max() == 1.0
    y = preprocess(noise_image(37, 23), 16, 8)
    assert y.shape == (3, 8, 16) and -1.0 <= y.min() and y.max() <= 1.0
    with pytest.raises(ValueError, match="width"):
        preprocess(img, 0, 2)
    with pytest.raises(TypeError):
        preprocess(np.zeros((2, 2, 3)), 2, 2)


def test_postprocess_inverts_preprocess():
    img = noise_image(16, 12, seed=1)
    back = postprocess(preprocess(img, 16, 12))
    assert back.mode == "RGB" and back.size == (16, 12)
    diff = np.abs(np.asarray(back, int) - np.asarray(img, int))
    assert diff.max() <= 1


def test_postprocess_clamps_and_batches():
    t = torch.tensor([-3.0, 0.0, 3.0]).reshape(3, 1, 1).repeat(1, 2, 5)
    imgs = postprocess(torch.stack([t, -t]))
    assert isinstance(imgs, list) and len(imgs) == 2
    assert imgs[0].size == (5, 2)
    assert np.asarray(imgs[0])[0, 0].tolist() == [0, 128, 255]  # 127.5 rounds to even -> 128
    assert np.asarray(imgs[1])[0, 0].tolist() == [255, 128, 0]
    with pytest.raises(ValueError):
        postprocess(torch.zeros(4, 2, 2))


# ----------------------------------------------------------------------------- load_image


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="missing.png.*not found"):
        load_image(missing)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(text)
    good = tmp_path / "good.png"
    noise_image(64, 64).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png") as e:
        load_image(truncated)
    assert isinstance(e.value, ValueError)
    with pytest.raises(ImageLoadError, match="exceeds"):
        load_image(good, max_pixels=64 * 63)


def test_load_image_modes(tmp_path):
    noise_image(8, 6, mode="RGBA").save(tmp_path / "a.png")
    noise_image(8, 6, mode="L").save(tmp_path / "l.png")
    noise_image(8, 6).save(tmp_path / "c.jpg")
    a = load_image(tmp_path / "a.png")
    assert a.mode == "RGBA" and a.size == (8, 6)
    assert np.array_equal(np.asarray(a), np.asarray(noise_image(8, 6, mode="RGBA")))
    assert load_image(tmp_path / "l.png").mode == "RGB"
    assert load_image(str(tmp_path / "c.jpg")).mode == "RGB"


def test_check_image_size():
    check_image_size(512, 256, 16)
    check_image_size(1024, 1024, 16)
    for args, msg in [
        ((500, 512, 16), "multiple of 16"),
        ((512, 520, 16), "multiple of 16"),
        ((2048, 512, 16), "maximum side 1024"),
        ((0, 512, 16), "width"),
        ((512, -16, 16), "height"),
        ((512.0, 512, 16), "width"),
        ((True, 512, 1), "width"),
        ((512, 512, 0), "factor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_image_size(*args)
    check_image_size(2048, 512, 16, max_side=2048)


# ----------------------------------------------------------------------------- ImageTokenizer


@pytest.fixture(scope="module")
def tok():
    return ImageTokenizer.random(TINY, seed=0)


def test_tokenizer_encode_shapes_and_batching(tok):
    assert tok.factor == 4
    imgs = [noise_image(40, 30, seed=i) for i in range(3)]
    codes = tok.encode(imgs, width=32, height=16)
    assert len(codes) == 3
    for c in codes:
        assert isinstance(c, np.ndarray) and c.dtype == np.int64 and c.shape == (4, 8)
        assert 0 <= c.min() and c.max() < 64
    assert len(np.unique(np.concatenate(codes))) > 1  # a collapsed tokenizer would hide bugs
    assert not np.array_equal(codes[0], codes[1])
    single = tok.encode(imgs[1], width=32, height=16)
    assert len(single) == 1 and np.array_equal(single[0], codes[1])  # batching does not change codes
    small_batches = ImageTokenizer(tok.vqgan, batch_size=2).encode(imgs, width=32, height=16)
    assert all(np.array_equal(a, b) for a, b in zip(codes, small_batches))
    with pytest.raises(ValueError, match="multiple of 4"):
        tok.encode(imgs, width=30, height=16)
    with pytest.raises(ValueError, match="maximum side"):
        tok.encode(imgs, width=2048, height=16)


def test_tokenizer_decode_mixed_shapes_keeps_order(tok):
    g = np.random.default_rng(0)
    a, b, c = g.integers(0, 64, (2, 3)), g.integers(0, 64, (4, 4)), g.integers(0, 64, (2, 3))
    imgs = tok.decode([a, torch.from_numpy(b), c])
    assert [im.size for im in imgs] == [(12, 8), (16, 16), (12, 8)]
    assert all(im.mode == "RGB" for im in imgs)
    alone = tok.decode(c)
    assert len(alone) == 1 and np.array_equal(np.asarray(alone[0]), np.asarray(imgs[2]))
    with pytest.raises(ValueError, match="codes must be in"):
        tok.decode(np.full((2, 2), 64))
    with pytest.raises(ValueError, match="2-D"):
        tok.decode([np.zeros((1, 2, 2), np.int64)])


def test_save_and_load_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / WEIGHTS_NAME).is_file() and (tmp_path / "vq" / CONFIG_NAME).is_file()
    loaded = ImageTokenizer.from_pretrained(tmp_path / "vq")
    assert loaded.config == tok.config
    for k, v in tok.vqgan.state_dict().items():
        assert torch.equal(loaded.vqgan.state_dict()[k], v), k
    imgs = [noise_image(20, 20, seed=7), noise_image(16, 32, seed=8)]
    for a, b in zip(tok.encode(imgs, 16, 16), loaded.encode(imgs, 16, 16)):
        assert np.array_equal(a, b)
    (tmp_path / "vq" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        ImageTokenizer.from_pretrained(tmp_path / "vq")


def test_from_pretrained_dtype_and_random_is_seeded(tmp_path):
    state = torch.random.get_rng_state()
    a, b = ImageTokenizer.random(TINY, seed=3), ImageTokenizer.random(TINY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.vqgan.decoder.conv_out.weight, b.vqgan.decoder.conv_out.weight)
    c = ImageTokenizer.random(TINY, seed=4)
    assert not torch.equal(a.vqgan.decoder.conv_out.weight, c.vqgan.decoder.conv_out.weight)
    a.save_pretrained(tmp_path)
    half = ImageTokenizer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.vqgan.quant_conv.weight.dtype == torch.bfloat16
    codes = half.encode(noise_image(16, 16), 16, 16)[0]
    assert codes.dtype == np.int64 and codes.shape == (4, 4)
    assert half.decode(codes)[0].size == (16, 16)
