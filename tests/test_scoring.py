"""Reply scoring and text-to-image reranking on a tiny random pipeline."""

import numpy as np
import pytest
import torch

import tokenloom.scoring as scoring
from tokenloom.document import Document, ImagePart, TextPart
from tokenloom.pipeline import PipelineConfig


def _codes(seed, pipe, size=(4, 4)):
    return ImagePart(np.random.default_rng(seed).integers(0, pipe.vocab.codebook_size, size))


def _manual_mean(pipe, doc):
    enc = pipe.format.encode(doc, add_eos=False)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        lp = pipe.model(ids).float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    positions = [j for j, m in enumerate(enc.loss_mask) if m][:-1]  # the reply without its closing token
    return sum(lp[j - 1].item() for j in positions) / len(positions)


def test_reply_scores_are_per_token_means_and_ignore_padding(pipe):
    short = Document.chat([("user", [_codes(0, pipe), TextPart("Describe the image.")]),
                           ("assistant", [TextPart("a red circle")])])
    long = Document.chat([("user", [TextPart("a small blue square at the top left and more")]),
                          ("assistant", [_codes(1, pipe, (4, 6))])])
    alone = scoring.reply_log_likelihoods(pipe, [short])
    together = scoring.reply_log_likelihoods(pipe, [short, long])
    assert alone[0] == pytest.approx(_manual_mean(pipe, short), abs=1e-5)
    assert together[0] == pytest.approx(alone[0], abs=1e-5)  # batched with a longer, right-padded row
    assert together[1] == pytest.approx(_manual_mean(pipe, long), abs=1e-5)
    with pytest.raises(ValueError, match="no assistant reply"):
        scoring.reply_log_likelihoods(pipe, [Document.chat([("user", [TextPart("hi")])])])


def test_best_candidate_is_the_argmax_of_both_directions(pipe):
    candidates = [_codes(k, pipe) for k in range(5)]
    scores = scoring.rerank_scores(pipe, "a red circle", "a red circle", candidates)
    caption_part = scoring.reply_log_likelihoods(pipe, [
        Document.chat([("user", [c, TextPart(pipe.config.caption_prompt)]), ("assistant", [TextPart("a red circle")])])
        for c in candidates])
    drawing_part = scoring.reply_log_likelihoods(pipe, [
        Document.chat([("user", [TextPart("a red circle")]), ("assistant", [c])]) for c in candidates])
    assert scores == pytest.approx([a + b for a, b in zip(caption_part, drawing_part)])
    assert len(set(np.round(scores, 6))) == 5  # distinct, so the argmax below is a real choice
    best = int(np.argmax(scores))
    assert scoring.best_candidate(pipe, "a red circle", "a red circle", candidates) == best
    # a failed draw is never chosen over a drawn one
    with_gap = [None] + candidates
    assert scoring.best_candidate(pipe, "a red circle", "a red circle", with_gap) == best + 1


def test_generate_images_keeps_the_chosen_candidate_of_each_group(pipe, monkeypatch):
    prompts = ["a red circle", "a blue square"]
    every = pipe.generate_images(prompts, seed=3, num_images=3, candidates=1)
    groups = []

    def pick_last(p, prompt, prompt_text, group):
        groups.append((prompt, len(group)))
        return len(group) - 1

    monkeypatch.setattr(scoring, "best_candidate", pick_last)
    chosen = pipe.generate_images(prompts, seed=3, candidates=3)
    assert groups == [("a red circle", 3), ("a blue square", 3)]
    # candidate k of prompt i draws with seed + i * 3 + k: the same draws as num_images=3
    assert [np.asarray(im).tolist() for im in chosen] == [np.asarray(every[2]).tolist(), np.asarray(every[5]).tolist()]


def test_candidates_are_bounded(pipe):
    for bad in (0, 65, True, 2.0):
        with pytest.raises(ValueError, match="candidates"):
            pipe.generate_images("a red circle", candidates=bad)
    with pytest.raises(ValueError, match="image_candidates"):
        PipelineConfig.from_dict({"image_candidates": 0})
