"""Merge a LoRA adapter into its base: a plain model directory that loads without peft."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..checkpoint import atomic_directory, atomic_write_json
from ..pipeline import CONFIG_NAME, Pipeline
from .common import prepare_destination, resolve_dtype


def merge_adapter(base: str | Path, adapter: str | Path, dst: str | Path, *, overwrite: bool = False,
                  dtype: str | None = None) -> Path:
    """Write the model directory `base` with the LoRA adapter at `adapter` merged into its weights to
    `dst`: a plain model directory (`tokenloom.load` reads it without peft). The adapter is checked
    against the base first (ValueError naming the file when it was made for another one). `dst` is
    written under a temporary name and renamed into place; a non-empty `dst` is replaced only with
    `overwrite`. dtype: of the merged weights (default: the base's, as saved)."""
    base, adapter, dst = Path(base), Path(adapter), Path(dst)
    prepare_destination([base, adapter], dst, overwrite)
    pipe = Pipeline.from_pretrained(base, adapter=adapter)
    if dtype is not None:
        pipe.model.to(resolve_dtype(dtype))
    record = json.loads((base / CONFIG_NAME).read_text())
    with atomic_directory(dst) as tmp:
        pipe.save_pretrained(tmp)
        config = json.loads((tmp / CONFIG_NAME).read_text())
        if "conversion" in record:  # what the base's conversion recorded (whether its VQGAN can draw)
            config["conversion"] = record["conversion"]
        config["merged_adapter"] = {"tokenloom_version": __version__, "base": str(base.resolve()),
                                    "adapter": str(adapter.resolve())}
        atomic_write_json(tmp / CONFIG_NAME, config)
    return dst
