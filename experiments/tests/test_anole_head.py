"""anole_head_experiment: the re-initialisation touches the image-code rows of the head only."""

import math

import torch

from anole_head_experiment import reinit_image_head
from tokenloom.pipeline import random_pipeline


def test_reinit_replaces_code_rows_only_with_he_normal_draws():
    pipe = random_pipeline(seed=0, hidden_size=64, num_layers=2, codebook_size=256, image_size=32)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    head = pipe.model.output_weight
    codes = torch.as_tensor(pipe.vocab.code_ids)
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[codes] = False
    old_head = head.detach().clone()

    reinit_image_head(pipe, seed=3)

    after = pipe.model.state_dict()
    head_key = next(k for k in after if after[k].data_ptr() == head.data_ptr())
    assert all(torch.equal(before[k], after[k]) for k in before if k != head_key)
    assert torch.equal(head[others], old_head[others])
    assert (head[codes] != old_head[codes]).any(1).all()
    std = head[codes].std().item()
    assert abs(std - math.sqrt(2 / head.shape[1])) < 0.1 * math.sqrt(2 / head.shape[1])
    again = reinit_image_head(random_pipeline(seed=0, hidden_size=64, num_layers=2, codebook_size=256,
                                              image_size=32), seed=3)
    assert torch.equal(again.model.output_weight, head)  # a pure function of the seed
