"""edit_copy_accuracy puts every teacher-forced prediction on its own grid cell."""

import numpy as np
import pytest

from tokenloom.pipeline import random_pipeline
from tokenloom.world.tasks import heldout_samples


def test_edit_copy_accuracy_lines_predictions_up_with_grid_cells():
    """A stand-in model that predicts each token to repeat the one before is right exactly at the
    target cells whose code equals their left neighbour's: the bookkeeping puts every prediction on
    its own cell and splits cells by whether the edit changed their pixels."""
    import copy

    import torch

    from edit_codes import changed_cells
    from edit_metrics import edit_copy_accuracy

    class RepeatLast(torch.nn.Module):
        def __init__(self, vocab_size):
            super().__init__()
            self.vocab_size = vocab_size
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # the pipeline reads its device from here

        def forward(self, ids):
            return torch.nn.functional.one_hot(ids, self.vocab_size).float()

    pipe = copy.copy(random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=64))
    pipe.model = RepeatLast(pipe.vocab.size)
    samples = heldout_samples("edit", 4, seed=2)
    hits = {"untouched": [0, 0], "changed": [0, 0]}
    for s in samples:
        codes = pipe.encode_image(s.images[1], *s.images[1].size).codes
        right = np.zeros(codes.shape, dtype=bool)
        right[:, 1:] = codes[:, 1:] == codes[:, :-1]  # a row's first code follows a non-code token
        changed = changed_cells(*s.images, codes.shape)
        for key, cells in (("untouched", ~changed), ("changed", changed)):
            hits[key][0] += int(right[cells].sum())
            hits[key][1] += int(cells.sum())
    expected = {key: right / total for key, (right, total) in hits.items()}
    assert 0 < expected["untouched"] < 1  # flat background repeats codes; edges do not
    assert edit_copy_accuracy(pipe, samples) == pytest.approx(expected)
