"""Lumina-mGPT (Alpha-VLLM) checkpoints -> tokenloom pipelines.

Lumina-mGPT ships Chameleon weights in the Hugging Face layout (its ``ChameleonXLLMX`` class only
adds a z-loss weight to the config), so the weights convert exactly as ``chameleon-hf``. What
differs is the sequence format (``lumina_mgpt/data/item_processor.py``, ``FlexARItemProcessor``):

    <racm3:break> <reserved{8800+h}> <reserved{8800+w}> (w codes, <reserved08799>) * h <eoss>

with h, w counted in 32-pixel patches (2 codes of the f16 VQGAN), i.e. tokenloom's ``unirep``
layout with Lumina's reserved tokens (``Vocabulary.from_chameleon(..., lumina=True)``), prompts
"Generate an image of WxH according to the following prompt:\\n..." and Lumina's sampling
defaults (see `profiles.lumina_mgpt_profile`). The unconditional context of its guidance is the
image's own start (image_begin and the size tokens), which is what tokenloom does for a
vocabulary without an uncond token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES
from ..pipeline import Pipeline
from .common import prepare_destination, save_pipeline
from .chameleon_hf import load_chameleon_hf

__all__ = ["load_lumina_mgpt", "convert_lumina_mgpt"]


def load_lumina_mgpt(src: str | Path, *, vqgan: str | Path | None = None, dtype: str | torch.dtype | None = None,
                     resolution: int | None = None, tokenizer: str | Path | None = None) -> tuple[Pipeline, dict]:
    """Load a Lumina-mGPT checkpoint; `resolution` is its target size (512 / 768 / 1024).

    Without `resolution`, a 512/768/1024 in the directory name is used (the released checkpoints are
    named Lumina-mGPT-7B-768 etc.), else 768 with a warning.
    """
    return load_chameleon_hf(src, vqgan=vqgan, dtype=dtype, profile="lumina-mgpt", resolution=resolution,
                             tokenizer=tokenizer)


def convert_lumina_mgpt(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Convert a Lumina-mGPT checkpoint to a tokenloom pipeline directory.

    Options: vqgan (Meta's vqgan.ckpt + vqgan.yaml: needed to draw), dtype, resolution, tokenizer.
    """
    dst = prepare_destination([src] + ([options["vqgan"]] if options.get("vqgan") else []), dst, overwrite)
    pipe, record = load_lumina_mgpt(src, **options)
    return save_pipeline(pipe, dst, record, max_shard_bytes)
