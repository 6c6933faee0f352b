"""Teaching a model a new modality: grow its vocabulary by the modality's tokens.

A modality beyond text and images (video now, speech next) is a set of special tokens (and, for a
new codec, a block of codes) that the layouts and the grammar use where the vocabulary has them.
A model that lacks them gains them as Liquid gains image codes: the vocabulary grows by new ids
appended after its last one, and the model's input embedding and output head grow by one row per
new id, initialised to the mean of the existing rows (a new token starts as an average token, not
as noise that dominates the logits). Training on the modality's data then teaches the rows.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .vocab import MODALITY_ROLES, Vocabulary, VocabularyError


def missing_roles(vocab: Vocabulary, modality: str) -> list[str]:
    if modality not in MODALITY_ROLES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(MODALITY_ROLES)}")
    return [r for r in MODALITY_ROLES[modality] if vocab.role_id(r) is None]


def _grown(weight: torch.Tensor, rows: int, where: slice) -> torch.Tensor:
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[: weight.shape[0]] = weight
    out[where] = weight.float().mean(0).to(weight.dtype)
    return out


@torch.no_grad()
def add_modality(pipeline, modality: str):
    """A new Pipeline whose vocabulary and model have `modality`'s tokens (the given one is left as it
    was). A pipeline that already has them is an error, so a run never silently re-adds rows."""
    from .pipeline import Pipeline

    roles = missing_roles(pipeline.vocab, modality)
    if not roles:
        raise VocabularyError(f"the model already has the {modality} tokens")
    if pipeline.model.config.vocab_size != pipeline.vocab.size:
        # Padding rows past the vocabulary would be where the new ids go; keep the ids and rows one.
        raise VocabularyError(f"model has {pipeline.model.config.vocab_size} embedding rows for a vocabulary of "
                              f"{pipeline.vocab.size} ids; add_modality needs them equal")
    vocab = pipeline.vocab.with_new_specials(roles)
    old = pipeline.vocab.size
    new_rows = slice(old, vocab.size)
    model = copy.deepcopy(pipeline.model)
    model.config = dataclasses.replace(model.config, vocab_size=vocab.size)
    embed = model.tok_embeddings
    model.tok_embeddings = nn.Embedding(vocab.size, embed.embedding_dim, device=embed.weight.device,
                                        dtype=embed.weight.dtype)
    model.tok_embeddings.weight.copy_(_grown(embed.weight, vocab.size, new_rows))
    if model.output is not None:
        head = model.output
        model.output = nn.Linear(head.in_features, vocab.size, bias=False, device=head.weight.device,
                                 dtype=head.weight.dtype)
        model.output.weight.copy_(_grown(head.weight, vocab.size, new_rows))
    return Pipeline(model, vocab, pipeline.text_tokenizer, pipeline.image_tokenizer,
                    dataclasses.replace(pipeline.config))
