"""A model directory grown by a modality's tokens (`tokenloom add-modality`): the step before
training a model on videos (see `tokenloom.modalities`)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..checkpoint import atomic_directory, atomic_write_json
from ..modalities import add_modality
from ..pipeline import CONFIG_NAME, Pipeline
from .common import prepare_destination


def add_modality_dir(base: str | Path, dst: str | Path, modality: str, *, overwrite: bool = False) -> Path:
    """Write the model directory `base` with `modality`'s tokens added (new embedding and head rows,
    the mean of the old ones) to `dst`, under a temporary name renamed into place. The config records
    which ids are new, so a reader can tell the untrained rows."""
    base, dst = Path(base), Path(dst)
    prepare_destination([base], dst, overwrite)
    pipe = Pipeline.from_pretrained(base)
    grown = add_modality(pipe, modality)
    record = json.loads((base / CONFIG_NAME).read_text())
    with atomic_directory(dst) as tmp:
        grown.save_pretrained(tmp)
        config = json.loads((tmp / CONFIG_NAME).read_text())
        if "conversion" in record:
            config["conversion"] = record["conversion"]
        config["added_modality"] = {"tokenloom_version": __version__, "modality": modality,
                                    "base": str(base.resolve()), "new_ids": [pipe.vocab.size, grown.vocab.size],
                                    "new_row_init": "mean of the base rows"}
        atomic_write_json(tmp / CONFIG_NAME, config)
    return dst
