"""Merge a LoRA adapter into its base: a plain model directory that loads without peft."""

from __future__ import annotations

from pathlib import Path

from ..pipeline import Pipeline
from .common import prepare_destination, resolve_dtype, save_derived


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
    return save_derived(pipe, base, dst, "merged_adapter", {"adapter": str(adapter.resolve())})
