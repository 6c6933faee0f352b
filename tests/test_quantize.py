"""dtype="int8": the decoder's linears in dynamic int8 for CPU inference."""

import numpy as np
import pytest
import torch

import tokenloom
from tokenloom.cli import main
from tokenloom.document import Document, TextPart
from tokenloom.world.tasks import heldout_samples
from tokenloom.world import random_scene, render


@pytest.fixture(scope="module")
def models():
    return tokenloom.load(), tokenloom.load(dtype="int8")


def test_int8_linears_stay_close_to_float32(models) -> None:
    full, int8 = models
    quantized = "torch.ao.nn.quantized"
    block = int8.model.layers[0]
    assert type(block.feed_forward.w1).__module__.startswith(quantized)
    assert type(block.attention.wq).__module__.startswith(quantized)
    assert type(block.feed_forward.w2) is torch.nn.Linear and type(int8.model.output) is torch.nn.Linear
    # next-token choices on held-out documents (a caption answer, an image) agree at almost every position
    samples = heldout_samples("caption", 4, seed=3) + heldout_samples("t2i", 4, seed=3)
    agree = total = 0
    for s in samples:
        parts = [TextPart(p) if isinstance(p, str) else full.encode_image(p) for p in [*s.prompt, *s.answer]]
        doc = Document.chat([("user", parts[:len(s.prompt)]), ("assistant", parts[len(s.prompt):])])
        ids = torch.tensor([full.format.encode(doc).ids])
        with torch.no_grad():
            a, b = full.model(ids), int8.model(ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += ids.shape[1]
    assert agree / total > 0.93


def test_int8_answers_like_float32(models) -> None:
    full, int8 = models
    images = [render(random_scene(np.random.default_rng(s)), 64, 64) for s in range(4)]
    same = sum(a == b for a, b in zip(int8.caption(images), full.caption(images)))
    assert same >= 3  # int8 is not exact: 4 of 4 when measured


def test_int8_on_the_command_line(capsys) -> None:
    assert main(["info", "--dtype", "int8"]) == 0
    assert main(["info", "--dtype", "int4"]) == 2
    assert "unknown dtype 'int4'" in capsys.readouterr().err
