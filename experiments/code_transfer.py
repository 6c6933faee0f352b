"""Give a trained model a new image tokenizer, warm-starting its code rows from the old tokenizer's.

A new VQGAN's codes mean nothing to a transformer trained on another's. Encode the same images with
both and every grid cell pairs a new code with an old one (the two share the grid: same downsampling
factor). Each new code's input embedding and output row then start as the co-occurrence-weighted
mean of the old codes' rows ("mean"), or as the row of its most frequent old partner ("argmax"), so
the transformer first sees roughly the images it knew, and further training only has to refine them.

    pipe = Pipeline.from_pretrained(old_dir)
    counts = code_cooccurrence(pipe.image_tokenizer, new_tokenizer, images)
    swap_image_tokenizer(pipe, new_tokenizer, counts).save_pretrained(out_dir)

Research code, not part of the installed package; what it measured is in docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

MODES = ("mean", "argmax")


def code_cooccurrence(old, new, images: Iterable[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """[new codebook, old codebook] float64 counts of (new code, old code) at the same grid cell,
    over `images` encoded at their own sizes by both ImageTokenizers."""
    if old.factor != new.factor:
        raise ValueError(f"the tokenizers' grids differ: downsampling factor {old.factor} (old) against "
                         f"{new.factor} (new); codes pair up only cell for cell")
    n_old, n_new = old.vqgan.config.codebook_size, new.vqgan.config.codebook_size
    counts = np.zeros(n_new * n_old, dtype=np.float64)
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for im in images:
        by_size.setdefault(im.size, []).append(im)
    for (w, h), group in by_size.items():
        for i in range(0, len(group), batch_size):
            batch = group[i:i + batch_size]
            pairs = zip(new.encode(batch, w, h), old.encode(batch, w, h))
            for new_codes, old_codes in pairs:
                np.add.at(counts, new_codes.reshape(-1) * n_old + old_codes.reshape(-1), 1.0)
    return torch.from_numpy(counts.reshape(n_new, n_old))


def code_row_map(counts: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """[new, old] weights, each row summing to 1: how each new code's rows mix the old codes' rows.
    A new code the images never used gets the old codes' overall frequencies."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    counts = counts.double()
    if counts.sum() == 0:
        raise ValueError("no co-occurrences: encode at least one image")
    unused = counts.sum(1) == 0
    counts = torch.where(unused[:, None], counts.sum(0, keepdim=True), counts)
    if mode == "argmax":
        counts = torch.zeros_like(counts).scatter_(1, counts.argmax(1, keepdim=True), 1.0)
    return counts / counts.sum(1, keepdim=True)


@torch.no_grad()
def transfer_code_rows(model, code_ids, weights: torch.Tensor) -> None:
    """In place: the code rows of the input embedding and of the output layer (one matrix when tied)
    become `weights` [new, old] times the old code rows."""
    ids = torch.as_tensor(np.asarray(code_ids), dtype=torch.long)
    if weights.shape != (len(ids), len(ids)):
        raise ValueError(f"row map is {tuple(weights.shape)}; the model has {len(ids)} code ids, and both "
                         "codebooks must have that many entries")
    matrices = [model.tok_embeddings.weight]
    if model.output is not None:
        matrices.append(model.output.weight)
    for matrix in matrices:
        rows = matrix[ids.to(matrix.device)].double()
        matrix[ids.to(matrix.device)] = (weights.to(rows.device) @ rows).to(matrix.dtype)


def swap_image_tokenizer(pipe, new_tokenizer, counts: torch.Tensor, mode: str = "mean"):
    """The pipeline with `new_tokenizer` in place of its own and its code rows carried over (in place;
    returns `pipe`). counts: code_cooccurrence(pipe.image_tokenizer, new_tokenizer, images)."""
    if new_tokenizer.vqgan.config.codebook_size != pipe.vocab.codebook_size:
        raise ValueError(f"the new tokenizer has {new_tokenizer.vqgan.config.codebook_size} codes and the "
                         f"vocabulary {pipe.vocab.codebook_size}")
    transfer_code_rows(pipe.model, pipe.vocab.code_ids, code_row_map(counts, mode))
    pipe.image_tokenizer = new_tokenizer
    pipe._engine = None  # the engine holds the tokenizer it was built with
    return pipe
