"""How an image tokenizer's codes behave under edits: research code (docs/experiments.md), not part
of the installed package. `tokenloom.train.vq.evaluate_vq` scores reconstructions; this scores
what a model that edits by copying codes would face.

    python experiments/edit_codes.py src/tokenloom/assets/shapes-tiny [--n 200] [--seed 0]

prints code_stability and copy_ceiling (margins 0, 1, 2) of a tokenizer directory over n held-out
edits at the training sizes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from tokenloom.train.vq import EVAL_STREAM
from tokenloom.world import matches, parse
from tokenloom.world.tasks import edit_sample

STABILITY_TAG = 0x57AB  # with EVAL_STREAM (tokenloom.train.vq): the edit pairs of code_stability
TRAINING_SIZES = ((64, 64), (96, 64), (64, 96))

Size = tuple[int, int]  # (width, height)


def changed_cells(before, after, grid: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: the code cells of a grid over two same-size images where any pixel differs."""
    h, w = grid
    changed = (np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB"))).any(-1)
    return changed.reshape(h, changed.shape[0] // h, w, changed.shape[1] // w).any(axis=(1, 3))


def grow_cells(cells: np.ndarray, margin: int) -> np.ndarray:
    """[h, w] bool: the cells within `margin` steps (8-neighbourhood) of a True cell."""
    grown = np.asarray(cells, dtype=bool)
    for _ in range(margin):
        p = np.pad(grown, 1)
        grown = np.logical_or.reduce([p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx]
                                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return grown


def copied_target(source_codes, target_codes, changed: np.ndarray, margin: int) -> np.ndarray:
    """What a model that copies draws: the target's codes within `margin` cells of a changed cell,
    the source's everywhere else. Codes are [h, w] or [h, w, ...]; changed is [h, w]."""
    near = grow_cells(changed, margin)
    near = near.reshape(near.shape + (1,) * (np.ndim(target_codes) - 2))
    return np.where(near, target_codes, source_codes)


def edit_code_scores(image_tokenizer, n: int, seed: int, sizes: Sequence[Size],
                     margins: Sequence[int]) -> tuple[float, dict[int, float]]:
    """(code_stability, copy_ceiling at `margins`) from one pass over the same n held-out edits, so
    a caller that wants both encodes each edit once; no margins: nothing is decoded."""
    rng = np.random.default_rng([EVAL_STREAM, seed, STABILITY_TAG])
    same = cells = 0
    right = dict.fromkeys(margins, 0)
    for _ in range(n):
        sample = edit_sample(rng, sizes)
        before, after = sample.images
        source, target = (np.asarray(c) for c in image_tokenizer.encode([before, after], *before.size))
        changed = changed_cells(before, after, target.shape[:2])
        equal = (source == target).reshape(*changed.shape, -1).all(-1)
        same += int((equal & ~changed).sum())
        cells += int((~changed).sum())
        if margins:
            drawn = image_tokenizer.decode([copied_target(source, target, changed, m) for m in margins])
            for m, image in zip(margins, drawn):
                right[m] += matches(parse(image), sample.scenes[1])
    return same / max(cells, 1), {m: hits / max(n, 1) for m, hits in right.items()}


def code_stability(image_tokenizer, n: int = 200, seed: int = 0, sizes: Sequence[Size] = ((64, 64),)) -> float:
    """Of the code cells whose pixels an edit leaves exactly as they were, the fraction whose code
    stays the same too, over n held-out shapes-world edits (one object added, removed, moved or
    recolored; the others keep their exact pixels).

    At 1.0 a model that edits can copy untouched regions token for token. Codes that depend on the
    whole image (image-wide GroupNorm, attention, a receptive field wider than the image) score
    lower, and the model must learn to redraw what did not change with other codes."""
    return edit_code_scores(image_tokenizer, n, seed, sizes, margins=())[0]


def copy_ceiling(image_tokenizer, n: int = 200, seed: int = 0, sizes: Sequence[Size] = ((64, 64),),
                 margins: Sequence[int] = (0, 1, 2)) -> dict[int, float]:
    """Per margin: of code_stability's n held-out edits, the fraction that still parse back to the
    edited scene when every cell farther than `margin` cells from the change keeps the source's code
    (copied_target). How far a model that copies untouched codes can get, whatever the encoder does
    to them: the decoder's reach decides it."""
    return edit_code_scores(image_tokenizer, n, seed, sizes, margins)[1]


def main(argv: Sequence[str] | None = None) -> int:
    from tokenloom.image_processing import ImageTokenizer

    p = argparse.ArgumentParser(description="code_stability and copy_ceiling of an image tokenizer")
    p.add_argument("tokenizer", help="directory with vq.safetensors and vq_config.json")
    p.add_argument("--n", type=int, default=200, help="held-out edits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tok = ImageTokenizer.from_pretrained(args.tokenizer)
    stability, ceiling = edit_code_scores(tok, args.n, args.seed, TRAINING_SIZES, margins=(0, 1, 2))
    print(json.dumps({"code_stability": stability, "copy_ceiling": {str(m): v for m, v in ceiling.items()},
                      "n": args.n, "seed": args.seed}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
