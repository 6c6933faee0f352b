"""Teaching a model a new modality: grow its vocabulary by the modality's tokens.

A modality beyond text and images is a set of special tokens (video: its begin and end markers) and,
for a modality with its own codec, a block of codes (speech: one id per codebook level and code) that
the layouts and the grammar use where the vocabulary has them.
A model that lacks them gains them as Liquid gains image codes: the vocabulary grows by new ids
appended after its last one, and the model's input embedding and output head grow by one row per
new id, initialised to the mean of the existing rows (a new token starts as an average token, not
as noise that dominates the logits). Training on the modality's data then teaches the rows.

With experts (`add_modality(..., experts=True)`, CogVLM's visual expert), the model also gains a second
set of projections in every block (`ModelConfig.experts`), copies of the first, which the tokens inside
the modality's spans run through; trained with `train.trainable: experts` (only those projections and the
new rows learn), the grown model computes on every old task exactly what the base did, and
`remove_modalities` gives the base back, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .model import Transformer
from .vocab import MODALITY_ROLES, Vocabulary, VocabularyError


def new_token_rows(vocab: Vocabulary, modalities: list[str]) -> torch.Tensor:
    """[vocab.size] bool: the rows of `modalities`' own tokens (their markers, speech's codes): what an
    experts run trains in the embedding and the output head."""
    rows = torch.zeros(vocab.size, dtype=torch.bool)
    begins, ends = vocab.span_markers(modalities)
    rows[begins + ends] = True
    if "speech" in modalities:
        rows[: len(vocab.speech_mask)] |= vocab.speech_mask.cpu()
    return rows


def _with_experts(model: Transformer, modalities: list[str], scope: str | None = None,
                  head: bool | None = None) -> Transformer:
    """`model` with config.experts = modalities (and expert_scope = scope, expert_head = head; None keeps the
    model's own); a model that had no experts gains them as copies of its projections, one that gains the
    expert head gets it as a copy of its final norm and head."""
    weight = model.tok_embeddings.weight
    config = dataclasses.replace(model.config, experts=modalities, expert_scope=scope or model.config.expert_scope,
                                 expert_head=model.config.expert_head if head is None else head)
    grown = Transformer(config).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert all(name.startswith("expert_") for name in unexpected), unexpected  # a head given up
    assert all(".expert." in name or name.startswith("expert_") for name in missing), missing
    if not model.config.experts:
        grown.copy_to_experts()
    elif config.expert_head and not model.config.expert_head:
        grown.copy_to_expert_head()
    return grown.eval()


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
def add_modality(pipeline, modality: str, speech_tokenizer=None, *, experts: bool = False,
                 expert_scope: str | None = None, expert_head: bool = False):
    """A new Pipeline whose vocabulary and model have `modality`'s tokens (the given one is left as it
    was). A pipeline that already has them is an error, so a run never silently re-adds rows.
    Speech needs the codec (`speech_tokenizer`, a `tokenloom.speech_codec.SpeechTokenizer`) whose codes
    the vocabulary gains; the new pipeline carries it. `experts`: the modality's spans run through expert
    projections (copies of the model's, or the experts it has already); a model that has the modality's
    tokens but does not route them gains only that. `expert_scope`: ModelConfig.expert_scope ("span" or
    "rest"; None: the model's own, "span" for a model without experts). `expert_head`: the experts' tokens
    get their own final norm and output head (ModelConfig.expert_head; a copy of the model's), which a
    model that routes the modality already may gain alone."""
    from .pipeline import Pipeline

    roles = missing_roles(pipeline.vocab, modality)
    new_codes = modality == "speech" and not pipeline.vocab.speech_codebooks
    if modality == "speech" and speech_tokenizer is None and (roles or new_codes):
        raise ValueError("adding speech needs its codec: add_modality(pipe, 'speech', speech_tokenizer) "
                         "(CLI: --codec DIR, a `tokenloom train-codec` run's best/)")
    if (expert_scope is not None or expert_head) and not experts:
        raise ValueError("expert_scope and expert_head are for experts=True")
    if modality != "speech" and speech_tokenizer is not None:
        raise ValueError(f"a speech codec is for --modality speech, not {modality!r}")
    if not roles and not new_codes:
        config = pipeline.model.config
        if experts and (modality not in config.experts or expert_head and not config.expert_head):
            # the tokens are there: only route them (or give the experts their head)
            routed = config.experts if modality in config.experts else [*config.experts, modality]
            model = _with_experts(copy.deepcopy(pipeline.model), routed, expert_scope, expert_head or None)
            return Pipeline(model, pipeline.vocab, pipeline.text_tokenizer, pipeline.image_tokenizer,
                            dataclasses.replace(pipeline.config), speech_tokenizer or pipeline.speech_tokenizer)
        raise VocabularyError(f"the model already has the {modality} tokens")
    if pipeline.model.config.vocab_size != pipeline.vocab.size:
        # Padding rows past the vocabulary would be where the new ids go; keep the ids and rows one.
        raise VocabularyError(f"model has {pipeline.model.config.vocab_size} embedding rows for a vocabulary of "
                              f"{pipeline.vocab.size} ids; add_modality needs them equal")
    vocab = pipeline.vocab.with_new_specials(roles) if roles else pipeline.vocab
    if new_codes:
        codec = speech_tokenizer.config
        vocab = vocab.with_speech_codes(codec.codebooks, codec.codebook_size)
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
    if model.expert_output is not None:
        head = model.expert_output
        model.expert_output = nn.Linear(head.in_features, vocab.size, bias=False, device=head.weight.device,
                                        dtype=head.weight.dtype)
        model.expert_output.weight.copy_(_grown(head.weight, vocab.size, new_rows))
    if experts:
        model = _with_experts(model, [*model.config.experts, modality], expert_scope, expert_head or None)
    return Pipeline(model, vocab, pipeline.text_tokenizer, pipeline.image_tokenizer,
                    dataclasses.replace(pipeline.config), speech_tokenizer or pipeline.speech_tokenizer)


@torch.no_grad()
def remove_modalities(pipeline, modalities: list[str]):
    """A new Pipeline without `modalities`' tokens: the inverse of add_modality. Their rows leave the
    embedding and the heads; experts that routed only them leave with them (and the experts' head, when no
    expert is left). Of a model grown through experts this gives back, bit for bit, the model it grew from:
    the experts never moved its weights. The modalities may be named in any order, but their ids must be
    the vocabulary's last (a modality kept whose ids come after them is an error)."""
    from .pipeline import Pipeline

    vocab, model = pipeline.vocab, pipeline.model
    if model.config.vocab_size != vocab.size:
        raise VocabularyError(f"model has {model.config.vocab_size} embedding rows for a vocabulary of "
                              f"{vocab.size} ids; remove_modalities needs them equal")
    for modality in sorted(set(modalities), key=lambda m: -int(vocab.modality_ids(m).max(initial=-1))):
        vocab = vocab.without_modality(modality)  # the last-added first
    if vocab.size < pipeline.text_tokenizer.vocab_size:
        raise VocabularyError(f"the {', '.join(modalities)} ids are the text tokenizer's too; they cannot go")
    routed = [m for m in model.config.experts if m not in modalities]
    config = dataclasses.replace(model.config, vocab_size=vocab.size, experts=routed,
                                 expert_scope=model.config.expert_scope if routed else "span",
                                 expert_head=model.config.expert_head and bool(routed))
    state = {}
    for name, weight in model.state_dict().items():
        if not routed and (".expert." in name or name.startswith("expert_")):
            continue  # no expert is left
        rows = name in ("tok_embeddings.weight", "output.weight", "expert_output.weight")
        state[name] = weight[: vocab.size] if rows else weight
    weight = model.tok_embeddings.weight
    kept = Transformer(config).to(device=weight.device, dtype=weight.dtype)
    kept.load_state_dict(state)
    speech_tokenizer = None if "speech" in modalities else pipeline.speech_tokenizer
    return Pipeline(kept.eval(), vocab, pipeline.text_tokenizer, pipeline.image_tokenizer,
                    dataclasses.replace(pipeline.config), speech_tokenizer)
