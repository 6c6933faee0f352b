"""code_transfer: co-occurrence counts, row maps and the tokenizer swap."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from code_transfer import code_cooccurrence, code_row_map, swap_image_tokenizer
from tokenloom.document import Document, TextPart
from tokenloom.image_processing import ImageTokenizer
from tokenloom.pipeline import random_pipeline
from tokenloom.vqgan import VQGANConfig


def noise_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def permuted(tokenizer, perm):
    """The same VQGAN with codebook entry k moved to perm^-1[k]: new code k draws old code perm[k]."""
    other = copy.deepcopy(tokenizer)
    with torch.no_grad():
        other.vqgan.quantize.embedding.weight.copy_(tokenizer.vqgan.quantize.embedding.weight[perm])
    return other


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(seed=0, hidden_size=64, num_layers=2, codebook_size=64, image_size=32)


def test_row_map_normalizes_fills_unused_and_argmaxes():
    counts = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    mean = code_row_map(counts, "mean")
    assert torch.allclose(mean[0], torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    assert torch.allclose(mean[1], torch.tensor([3.0, 3.0, 2.0], dtype=torch.float64) / 8)  # overall frequencies
    top = code_row_map(counts, "argmax")
    assert top[0].tolist() == [1.0, 0.0, 0.0] and top[2].sum() == 1.0
    with pytest.raises(ValueError, match="mode"):
        code_row_map(counts, "median")
    with pytest.raises(ValueError, match="no co-occurrences"):
        code_row_map(torch.zeros(2, 2))


def test_cooccurrence_of_a_tokenizer_with_itself_is_diagonal(pipe):
    images = noise_images(3) + noise_images(2, size=48, seed=1)
    counts = code_cooccurrence(pipe.image_tokenizer, pipe.image_tokenizer, images)
    assert counts.shape == (64, 64)
    assert counts.sum() == 3 * 16 + 2 * 36  # one pair per grid cell, each image at its own size
    assert counts.sum() == counts.diagonal().sum()


def test_swap_to_a_permuted_codebook_keeps_the_models_view(pipe):
    """New code k is old code perm[k]: after the swap the model reads the same images into the same
    hidden states and gives every code it saw the logit its old partner had."""
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    images = noise_images(4)
    new = permuted(pipe.image_tokenizer, perm)
    counts = code_cooccurrence(pipe.image_tokenizer, new, images)
    used = torch.nonzero(counts.sum(1) > 0)[:, 0]
    assert torch.equal(counts.argmax(1)[used], perm[used])
    swapped = swap_image_tokenizer(copy.deepcopy(pipe), new, counts, mode="argmax")
    assert swapped.image_tokenizer is new

    def logits(p):
        doc = Document.chat([("user", [TextPart("a small red circle")]), ("assistant", [p.encode_image(images[0])])])
        encoded = p.format.encode(doc)
        with torch.no_grad():
            return torch.tensor(encoded.ids), p.model(torch.tensor([encoded.ids]))[0]

    old_ids, old_logits = logits(pipe)
    new_ids, new_logits = logits(swapped)
    assert not torch.equal(old_ids, new_ids)  # the image's codes are other ids now
    code_ids = torch.as_tensor(np.asarray(pipe.vocab.code_ids))
    text = torch.ones(old_logits.shape[-1], dtype=torch.bool)
    text[code_ids] = False
    torch.testing.assert_close(new_logits[:, text], old_logits[:, text])
    torch.testing.assert_close(new_logits[:, code_ids[used]], old_logits[:, code_ids[perm[used]]])


def test_swap_refuses_mismatched_tokenizers(pipe):
    other = random_pipeline(seed=1, hidden_size=64, num_layers=2, codebook_size=32, image_size=32)
    with pytest.raises(ValueError, match="codes"):
        swap_image_tokenizer(copy.deepcopy(pipe), other.image_tokenizer, torch.ones(32, 32))
    fine = ImageTokenizer.random(VQGANConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
                                             embed_dim=16, codebook_size=64, resolution=32))  # factor 2 against 8
    with pytest.raises(ValueError, match="factor"):
        code_cooccurrence(pipe.image_tokenizer, fine, noise_images(1))
