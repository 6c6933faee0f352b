"""Per-family `PipelineConfig` defaults: sequence layout, image size and sampling.

Sources of the numbers:

* Chameleon -- facebookresearch/chameleon, ``chameleon/inference/chameleon.py``, ``Options``:
  text: repetition_penalty 1.2, temp 0.7, top_p 0.9; image: temp 0.7, top_p 0.9, classifier-free
  guidance with guidance_scale_text 3.0 (and guidance_scale_image 1.2 for its three-way
  guidance), unconditional context ``[bos, begin_image]``; images are 1024 codes (32x32 grid of
  the f16 VQGAN, 512 px).
* Anole -- GAIR-NLP/anole, its copy of ``chameleon/inference/chameleon.py``: the same ``Options``
  except text temp 1.0 (image: temp 0.7, top_p 0.9, guidance 3.0 / 1.2).
* Lumina-mGPT -- Alpha-VLLM/Lumina-mGPT, ``lumina_mgpt/inference_solver.py``
  ``create_logits_processor(cfg=3.0, image_top_k=2000, text_top_k=10)``, temperature 1.0 in the
  README examples (which pass cfg=4.0 for the 768 model); images of ``target_size`` (512, 768
  or 1024 px) with aspect ratios up to 4:1 at the same patch count
  (``generate_crop_size_list``), so the longest side reaches 2 x target_size; prompts
  "Generate an image of WxH according to the following prompt:\\n...".
"""

from __future__ import annotations

from ..pipeline import PipelineConfig

__all__ = ["chameleon_profile", "anole_profile", "lumina_mgpt_profile", "liquid_profile", "profile_config",
           "PROFILES", "CHAMELEON_GRID"]

CHAMELEON_GRID = 32  # Chameleon / Anole images are always 32x32 codes (1024 tokens)
VQGAN_FACTOR = 16  # Chameleon's VQGAN downsampling


def _chameleon_like(profile: str, text_temperature: float, factor: int, grid: int) -> PipelineConfig:
    size = grid * factor
    return PipelineConfig(
        profile=profile, layout="flat", flat_grid=(grid, grid), image_width=size, image_height=size,
        max_image_side=size, resolution_prompt=False, guidance_scale=3.0,
        text_sampling={"temperature": text_temperature, "top_k": None, "top_p": 0.9, "repetition_penalty": 1.2},
        image_sampling={"temperature": 0.7, "top_k": None, "top_p": 0.9, "repetition_penalty": 1.0},
        unconditional_context=["bos"],
    )


def chameleon_profile(factor: int = VQGAN_FACTOR, grid: int = CHAMELEON_GRID) -> PipelineConfig:
    """Meta's Chameleon: flat 32x32 grid (512 px with the f16 VQGAN), Meta's sampling options."""
    return _chameleon_like("chameleon", 0.7, factor, grid)


def anole_profile(factor: int = VQGAN_FACTOR, grid: int = CHAMELEON_GRID) -> PipelineConfig:
    """GAIR's Anole (Chameleon fine-tuned to draw): as Chameleon, text temperature 1.0."""
    return _chameleon_like("anole", 1.0, factor, grid)


def lumina_mgpt_profile(resolution: int = 768, factor: int = VQGAN_FACTOR,
                        max_image_side: int | None = None) -> PipelineConfig:
    """Lumina-mGPT: unirep layout, resolution-aware prompts, cfg 3.0, image top_k 2000, temperature 1.0.

    `resolution` is the checkpoint's target size (512, 768 or 1024 for the released models).
    """
    if resolution <= 0 or resolution % (2 * factor):
        raise ValueError(f"Lumina-mGPT resolution must be a positive multiple of {2 * factor} px, got {resolution}")
    return PipelineConfig(
        profile="lumina-mgpt", layout="unirep", flat_grid=None, image_width=resolution, image_height=resolution,
        max_image_side=max_image_side or 2 * resolution, resolution_prompt=True, guidance_scale=3.0,
        text_sampling={"temperature": 1.0, "top_k": 10, "top_p": None, "repetition_penalty": 1.0},
        image_sampling={"temperature": 1.0, "top_k": 2000, "top_p": None, "repetition_penalty": 1.0},
        unconditional_context=[],
    )


def liquid_profile(image_size: int = 512, max_image_side: int = 1024) -> PipelineConfig:
    """An LLM expanded with image codes (Liquid style): tokenloom's own unirep layout and defaults.

    The expanded model has not seen an image yet, so these are the defaults it will be trained
    for, not values measured on a released checkpoint.
    """
    return PipelineConfig(profile="liquid", layout="unirep", flat_grid=None, image_width=image_size,
                          image_height=image_size, max_image_side=max_image_side, resolution_prompt=True)


PROFILES = {
    "chameleon": chameleon_profile,
    "anole": anole_profile,
    "lumina-mgpt": lumina_mgpt_profile,
    "liquid": liquid_profile,
}


def profile_config(name: str, **kwargs) -> PipelineConfig:
    """`PipelineConfig` of a named profile (keyword arguments go to its factory)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {sorted(PROFILES)}")
    return PROFILES[name](**kwargs)
