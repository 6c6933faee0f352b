"""Real-checkpoint converters: Chameleon (Meta and Hugging Face layouts), Anole, Lumina-mGPT, Liquid-style
expansion of a Hugging Face LLM, and export back to the Hugging Face Chameleon layout.

    convert(kind, src, dst, **options)      kind: "chameleon-meta", "chameleon-hf", "lumina-mgpt"
    expand(base, dst, codebook_size=None, vq=None, **options)
    export(src, dst, **options)             tokenloom pipeline -> HF ChameleonForConditionalGeneration
    merge_adapter(base, adapter, dst)       a LoRA adapter merged into its base: a plain model directory
    add_modality_dir(base, dst, modality)   a model grown by a modality's tokens (video), to train on it
    remove_modality_dir(base, dst, [modality, ...])   the inverse: a grown model's base back

Conversions stream: weights are read one tensor at a time from memory-mapped files into a model
built on the meta device, so the peak host memory stays near one copy of the weights. Each
converted directory's config.json gains a "conversion" record (source, options, warnings, and
"vq_decoder": whether the pipeline can draw).
"""

from __future__ import annotations

from pathlib import Path

from .common import ConversionError, ConversionWarning
from .chameleon_hf import convert_chameleon_hf, load_chameleon_hf
from .chameleon_meta import convert_chameleon_meta, load_chameleon_meta
from .export import export_hf_chameleon
from .liquid import expand as _expand
from .liquid import expand_pipeline
from .lumina import convert_lumina_mgpt, load_lumina_mgpt
from .merge import merge_adapter
from .modality import add_modality_dir, remove_modality_dir
from .profiles import PROFILES, anole_profile, chameleon_profile, liquid_profile, lumina_mgpt_profile, profile_config

__all__ = ["add_modality_dir", "remove_modality_dir", "convert", "expand", "export", "merge_adapter", "KINDS", "ConversionError", "ConversionWarning", "load_chameleon_hf",
           "load_chameleon_meta", "load_lumina_mgpt", "expand_pipeline", "export_hf_chameleon", "PROFILES",
           "profile_config", "chameleon_profile", "anole_profile", "lumina_mgpt_profile", "liquid_profile"]

KINDS = {
    "chameleon-meta": convert_chameleon_meta,
    "chameleon-hf": convert_chameleon_hf,
    "lumina-mgpt": convert_lumina_mgpt,
}


def convert(kind: str, src: str | Path, dst: str | Path, **options) -> Path:
    """Convert the checkpoint at `src` (of `kind`) into a tokenloom pipeline directory at `dst`.

    Common options: dtype ("bfloat16" | "float16" | "float32"; default: the checkpoint's),
    overwrite (write into a non-empty `dst`), max_shard_bytes. Per kind:
    chameleon-meta: profile ("chameleon" | "anole"), tokenizer_dir, vqgan, grid;
    chameleon-hf: vqgan (Meta's vqgan.ckpt + vqgan.yaml, needed to draw), profile, tokenizer, grid;
    lumina-mgpt: vqgan, resolution (512 | 768 | 1024), tokenizer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind](src, dst, **options)


def expand(base: str | Path, dst: str | Path, codebook_size: int | None = None, vq: str | Path | None = None,
           **options) -> Path:
    """Liquid-style: add image codes (and tokenloom's special tokens) to the HF causal LM at `base`."""
    return _expand(base, dst, codebook_size, vq, **options)


def export(src, dst: str | Path, **options) -> Path:
    """Export a tokenloom pipeline (directory or object) to the HF Chameleon layout at `dst`."""
    return export_hf_chameleon(src, dst, **options)
