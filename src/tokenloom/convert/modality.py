"""A model directory grown by a modality's tokens (`tokenloom add-modality`): the step before
training a model on videos (see `tokenloom.modalities`)."""

from __future__ import annotations

from pathlib import Path

from ..modalities import add_modality, remove_modalities
from ..pipeline import Pipeline
from .common import prepare_destination, save_derived


def add_modality_dir(base: str | Path, dst: str | Path, modality: str, *, codec: str | Path | None = None,
                     experts: bool = False, expert_scope: str | None = None, expert_head: bool = False,
                     overwrite: bool = False) -> Path:
    """Write the model directory `base` with `modality`'s tokens added (new embedding and head rows,
    the mean of the old ones) to `dst`, under a temporary name renamed into place. The config records
    which ids are new, so a reader can tell the untrained rows. Speech needs `codec`: the directory of
    the speech codec (a `tokenloom train-codec` run's best/), which the new model carries. `experts`: the
    modality's spans run through expert projections (train it with `train.trainable: experts`);
    `expert_scope` what they compute (ModelConfig.expert_scope); `expert_head`: their tokens get their own
    final norm and output head (ModelConfig.expert_head), alone where the model routes the modality already."""
    base, dst = Path(base), Path(dst)
    prepare_destination([base, *([Path(codec)] if codec else [])], dst, overwrite)
    speech_tokenizer = None
    if codec is not None:
        from ..speech_codec import SpeechTokenizer

        speech_tokenizer = SpeechTokenizer.from_pretrained(codec)
    pipe = Pipeline.from_pretrained(base)
    grown = add_modality(pipe, modality, speech_tokenizer, experts=experts, expert_scope=expert_scope,
                         expert_head=expert_head)
    record = {"modality": modality, "new_ids": [pipe.vocab.size, grown.vocab.size],
              "new_row_init": "mean of the base rows"}
    if experts:
        record["experts"] = grown.model.config.experts
        record["expert_scope"] = grown.model.config.expert_scope
        record["expert_head"] = grown.model.config.expert_head
    return save_derived(grown, base, dst, "added_modality", record)


def remove_modality_dir(base: str | Path, dst: str | Path, modalities: list[str], *, overwrite: bool = False) -> Path:
    """Write the model directory `base` without `modalities`' tokens (and the experts and codec only they
    used) to `dst`, under a temporary name renamed into place: of a model grown through experts, the model it
    grew from (`tokenloom.modalities.remove_modalities`)."""
    base, dst = Path(base), Path(dst)
    prepare_destination([base], dst, overwrite)
    pipe = Pipeline.from_pretrained(base)
    kept = remove_modalities(pipe, modalities)
    record = {"modalities": list(modalities), "removed_ids": [kept.vocab.size, pipe.vocab.size]}
    return save_derived(kept, base, dst, "removed_modalities", record)
