"""Suite-wide settings. The tests run tiny models: one intra-op thread avoids the pool's
synchronisation cost, which on two cores outweighs the parallelism and explodes under contention."""

import pytest
import torch

from tokenloom.pipeline import random_pipeline

torch.set_num_threads(1)


# One module each: the small random pipelines most tests run (built once per test module).
@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(seed=0, hidden_size=64, num_layers=2, codebook_size=64, image_size=32)


@pytest.fixture(scope="module")
def flat_pipe():
    return random_pipeline(seed=1, hidden_size=64, num_layers=2, codebook_size=64, image_size=32, layout="flat")


@pytest.fixture(scope="module")
def speech_pipe():
    """Speech codes of 4 levels of 32 (blocks layout) and a random speech codec beside the image codes."""
    return random_pipeline(seed=2, hidden_size=64, num_layers=2, codebook_size=64, image_size=32, speech=(4, 32))


@pytest.fixture(scope="module")
def old_pipe():
    """A vocabulary made before video and speech had markers (as shapes-tiny's first one was), for
    `add_modality` to grow and for the errors of a model without those modalities."""
    return random_pipeline(seed=3, hidden_size=64, num_layers=2, codebook_size=64, image_size=32, markers=False)
