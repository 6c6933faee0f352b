"""Chameleon / Anole / Lumina-mGPT checkpoints in the Hugging Face layout -> tokenloom pipelines.

The layout is what ``ChameleonForConditionalGeneration.save_pretrained`` writes: ``config.json``
(``ChameleonConfig``), ``model.safetensors`` (or an index and shards), plus ``tokenizer.json``.
Parameter names map one to one (HF already uses the rotate_half RoPE convention and per-head
q/k LayerNorm affines, which is what tokenloom's ``Transformer`` implements):

    model.embed_tokens                     -> tok_embeddings
    model.layers.N.self_attn.{q,k,v,o}_proj -> layers.N.attention.{wq,wk,wv,wo}
    model.layers.N.self_attn.{q,k}_norm    -> layers.N.attention.{q,k}_norm    [heads, head_dim]
    model.layers.N.mlp.{gate,up,down}_proj -> layers.N.feed_forward.{w1,w3,w2}
    model.layers.N.input_layernorm         -> layers.N.attention_norm
    model.layers.N.post_attention_layernorm -> layers.N.ffn_norm
    model.norm, lm_head                    -> norm, output
    model.vqmodel.*                        -> the VQGAN's encoder, quantizer and quant convs

Hugging Face keeps no VQGAN decoder, so drawing needs Meta's ``vqgan.ckpt`` + ``vqgan.yaml``
(``vqgan=PATH``); without them the pipeline reads images but cannot draw them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, WEIGHTS_NAME
from ..image_processing import ImageTokenizer
from ..model import ModelConfig, Transformer
from ..pipeline import Pipeline
from ..text_tokenizer import TextTokenizer
from ..vocab import CHAMELEON_IMAGE_PREFIX, Vocabulary, VocabularyError
from ..vqgan import VQGAN, VQGANConfig
from .common import (
    ConversionError,
    DictStore,
    Notes,
    SafetensorsStore,
    TensorStore,
    WeightSpec,
    assemble_model,
    dtype_name,
    encoder_only_vqgan,
    load_taming_vqgan,
    plain_state_dict,
    prepare_destination,
    read_json,
    require_file,
    resolve_dtype,
    safe_torch_load,
    save_pipeline,
)
from .profiles import anole_profile, chameleon_profile, lumina_mgpt_profile

__all__ = ["load_chameleon_hf", "convert_chameleon_hf", "chameleon_model_config", "chameleon_hf_specs",
           "build_chameleon_pipeline", "open_hf_weights", "VQ_PREFIX"]

VQ_PREFIX = "model.vqmodel."

# ChameleonConfig's defaults (transformers), for keys an older or hand-written config.json omits.
CHAMELEON_DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "swin_norm": False,
    "tie_word_embeddings": False,
}
CHAMELEON_QK_NORM_EPS = 1e-5  # Meta's torch.nn.LayerNorm default and HF's ChameleonLayerNorm constant

VQ_DEFAULTS: dict[str, Any] = {
    "embed_dim": 256, "num_embeddings": 8192, "double_latent": False, "latent_channels": 256, "resolution": 512,
    "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2,
    "attn_resolutions": None, "dropout": 0.0, "attn_type": "vanilla",
}


# --------------------------------------------------------------------------- config


def rope_theta_of(cfg: dict[str, Any], where: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or ``rope_theta``; only plain RoPE."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConversionError(f"{where}: rope_parameters must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise ConversionError(f"{where}: RoPE scaling {kind!r} cannot be expressed by tokenloom's model "
                              "(it implements plain RoPE only)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(theta if theta is not None else CHAMELEON_DEFAULTS["rope_theta"])


def chameleon_model_config(cfg: dict[str, Any], where: str, notes: Notes) -> ModelConfig:
    """tokenloom ModelConfig of a ChameleonConfig dict (config.json)."""
    def get(key):
        value = cfg.get(key)
        return CHAMELEON_DEFAULTS[key] if value is None else value

    if get("hidden_act") != "silu":
        raise ConversionError(f"{where}: hidden_act {get('hidden_act')!r} cannot be expressed "
                              "(tokenloom's feed-forward is SwiGLU with SiLU)")
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    if cfg.get("head_dim") not in (None, hidden // max(heads, 1)):
        raise ConversionError(f"{where}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                              f"({hidden} / {heads}) cannot be expressed")
    eps = float(get("rms_norm_eps"))
    if not math.isclose(eps, CHAMELEON_QK_NORM_EPS, rel_tol=1e-6):
        notes.warn(f"{where}: rms_norm_eps is {eps}; tokenloom's q/k LayerNorm uses the same eps while "
                   f"Chameleon's uses {CHAMELEON_QK_NORM_EPS}, so attention differs very slightly")
    try:
        return ModelConfig(
            vocab_size=int(get("vocab_size")), hidden_size=hidden, num_layers=int(get("num_hidden_layers")),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(get("intermediate_size")), norm_type="rmsnorm", norm_eps=eps, qk_norm=True,
            swin_norm=bool(get("swin_norm")), rope_theta=rope_theta_of(cfg, where),
            max_position_embeddings=int(get("max_position_embeddings")),
            tie_word_embeddings=bool(get("tie_word_embeddings")), attention_bias=bool(get("attention_bias")),
            mlp_bias=bool(get("mlp_bias")))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: {e}") from None


def chameleon_hf_specs(c: ModelConfig) -> dict[str, WeightSpec]:
    V, D, F, H, KV, hd = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                          c.head_dim)
    note = f"vocab_size={V}, hidden_size={D}, heads={H}, kv_heads={KV}, intermediate_size={F}"

    def one(key, shape):
        return WeightSpec((key,), (shape,), note=note)

    specs = {"tok_embeddings.weight": one("model.embed_tokens.weight", (V, D)),
             "norm.weight": one("model.norm.weight", (D,))}
    if not c.tie_word_embeddings:
        specs["output.weight"] = one("lm_head.weight", (V, D))
    for i in range(c.num_layers):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        proj = {"wq": ("q_proj", H * hd, D), "wk": ("k_proj", KV * hd, D), "wv": ("v_proj", KV * hd, D),
                "wo": ("o_proj", D, H * hd)}
        for ours, (theirs, rows, cols) in proj.items():
            specs[f"{t}attention.{ours}.weight"] = one(f"{p}self_attn.{theirs}.weight", (rows, cols))
            if c.attention_bias:
                specs[f"{t}attention.{ours}.bias"] = one(f"{p}self_attn.{theirs}.bias", (rows,))
        if c.qk_norm:
            for ours, n in (("q_norm", H), ("k_norm", KV)):
                for w in ("weight", "bias"):
                    specs[f"{t}attention.{ours}.{w}"] = one(f"{p}self_attn.{ours}.{w}", (n, hd))
        mlp = {"w1": ("gate_proj", F, D), "w3": ("up_proj", F, D), "w2": ("down_proj", D, F)}
        for ours, (theirs, rows, cols) in mlp.items():
            specs[f"{t}feed_forward.{ours}.weight"] = one(f"{p}mlp.{theirs}.weight", (rows, cols))
            if c.mlp_bias:
                specs[f"{t}feed_forward.{ours}.bias"] = one(f"{p}mlp.{theirs}.bias", (rows,))
        specs[f"{t}attention_norm.weight"] = one(f"{p}input_layernorm.weight", (D,))
        specs[f"{t}ffn_norm.weight"] = one(f"{p}post_attention_layernorm.weight", (D,))
    return specs


def vq_config_from_hf(vq: dict[str, Any] | None, where: str) -> VQGANConfig:
    vq = {**VQ_DEFAULTS, **{k: v for k, v in (vq or {}).items() if v is not None}}
    if vq["double_latent"]:
        raise ConversionError(f"{where}: vq_config.double_latent=true is not a VQGAN")
    if vq["attn_type"] != "vanilla":
        raise ConversionError(f"{where}: vq_config.attn_type {vq['attn_type']!r} cannot be expressed "
                              "(tokenloom's VQGAN has taming's vanilla attention blocks)")
    try:
        return VQGANConfig(in_channels=int(vq["in_channels"]), base_channels=int(vq["base_channels"]),
                           channel_mult=tuple(vq["channel_multiplier"]), num_res_blocks=int(vq["num_res_blocks"]),
                           attn_resolutions=tuple(vq["attn_resolutions"] or ()), resolution=int(vq["resolution"]),
                           z_channels=int(vq["latent_channels"]), embed_dim=int(vq["embed_dim"]),
                           codebook_size=int(vq["num_embeddings"]), dropout=float(vq["dropout"]))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: vq_config: {e}") from None


def open_hf_weights(src: Path) -> TensorStore:
    """Safetensors (single file or index + shards), else ``pytorch_model.bin`` loaded safely."""
    src = Path(src)
    if (src / WEIGHTS_NAME).is_file() or (src / INDEX_NAME).is_file():
        return SafetensorsStore(src)
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(read_json(index, "weights index").get("weight_map", {}).values()))
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(plain_state_dict(safe_torch_load(src / f), src / f))
        return DictStore(tensors, str(src))
    if (src / "pytorch_model.bin").is_file():
        return DictStore(plain_state_dict(safe_torch_load(src / "pytorch_model.bin"), src / "pytorch_model.bin"),
                         str(src))
    raise FileNotFoundError(f"no weights in {src}: expected {src / WEIGHTS_NAME} (or {src / INDEX_NAME} "
                            "with its shards, or pytorch_model.bin)")


# --------------------------------------------------------------------------- vocabulary and pipeline


def check_vocabulary_map(tokenizer: TextTokenizer, vocabulary_map: dict[str, int] | None, where: str) -> None:
    """config.json's vocabulary_map (HF's source for image token ids) must agree with tokenizer.json."""
    if not vocabulary_map:
        return
    vocab = tokenizer.get_vocab()
    for name, i in vocab.items():
        if name.startswith(CHAMELEON_IMAGE_PREFIX) and vocabulary_map.get(name, i) != i:
            raise ConversionError(f"{where}: vocabulary_map gives image token {name!r} id {vocabulary_map[name]} "
                                  f"but the tokenizer gives {i}: config and tokenizer do not belong together")


def chameleon_vocabulary(tokenizer: TextTokenizer, model_rows: int, *, lumina: bool,
                         max_grid_size: int | None, where: str) -> Vocabulary:
    try:
        vocab = Vocabulary.from_chameleon(tokenizer, lumina=lumina, max_grid_size=max_grid_size)
    except VocabularyError as e:
        raise ConversionError(f"{where}: {e} (a Chameleon-family tokenizer names its image tokens "
                              f"{CHAMELEON_IMAGE_PREFIX}...)") from None
    if vocab.size > model_rows:
        raise ConversionError(f"{where}: the tokenizer has ids up to {vocab.size - 1} but the model has only "
                              f"{model_rows} embedding rows")
    if vocab.size < model_rows:
        # Rows past the tokenizer (padding) stay addressable: the vocabulary covers every logit.
        vocab = Vocabulary(model_rows, vocab.specials, vocab.code_ids, vocab.size_token_ids,
                           size_unit=vocab.size_unit)
    return vocab


CHAMELEON_PROFILES = ("chameleon", "anole", "lumina-mgpt")


def check_profile(profile: str) -> None:
    if profile not in CHAMELEON_PROFILES:
        raise ConversionError(f"unknown Chameleon-family profile {profile!r}; expected one of "
                              f"{', '.join(CHAMELEON_PROFILES)}")


_RESOLUTION_IN_NAME = re.compile(r"(?<!\d)(512|768|1024)(?!\d)")


def build_chameleon_pipeline(model: Transformer, tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer | None,
                             *, profile: str, where: str, notes: Notes, resolution: int | None = None,
                             grid: int | None = None, source_name: str = "") -> Pipeline:
    """Vocabulary and PipelineConfig of a Chameleon-family model ("chameleon", "anole" or "lumina-mgpt")."""
    check_profile(profile)
    factor = image_tokenizer.factor if image_tokenizer is not None else 16
    lumina = profile == "lumina-mgpt"
    rows = model.config.vocab_size
    if lumina:
        if resolution is None:
            found = _RESOLUTION_IN_NAME.findall(source_name)
            if found:
                resolution = int(found[-1])
            else:
                resolution = 768
                notes.warn(f"{where}: Lumina-mGPT target resolution not given and not in the name; assuming 768 "
                           "(pass resolution=512/768/1024 to match the checkpoint)")
        vocab = chameleon_vocabulary(tokenizer, rows, lumina=True, max_grid_size=None, where=where)
        unit_px = vocab.size_unit * factor
        wanted_side = 2 * resolution  # Lumina's crop list reaches 4:1 at the target's patch count
        needed = -(-wanted_side // unit_px)
        if vocab.max_grid_size > needed:
            vocab = chameleon_vocabulary(tokenizer, rows, lumina=True, max_grid_size=needed, where=where)
        max_side = min(wanted_side, vocab.max_grid_size * unit_px)
        if max_side < resolution:
            raise ConversionError(f"{where}: the tokenizer's Lumina size tokens reach {max_side} px, "
                                  f"less than the {resolution} px target")
        if max_side < wanted_side:
            notes.warn(f"{where}: Lumina size tokens only reach {max_side} px; images are limited to that side")
        config = lumina_mgpt_profile(resolution, factor=factor, max_image_side=max_side)
    else:
        vocab = chameleon_vocabulary(tokenizer, rows, lumina=False, max_grid_size=None, where=where)
        make = chameleon_profile if profile == "chameleon" else anole_profile
        config = make(factor=factor, **({"grid": grid} if grid else {}))
    if image_tokenizer is not None and image_tokenizer.config.codebook_size != vocab.codebook_size:
        raise ConversionError(f"{where}: the VQGAN has {image_tokenizer.config.codebook_size} codes but the "
                              f"tokenizer has {vocab.codebook_size} {CHAMELEON_IMAGE_PREFIX} image tokens")
    return Pipeline(model, vocab, tokenizer, image_tokenizer, config)


def load_chameleon_tokenizer(path: Path) -> TextTokenizer:
    """A tokenizers JSON file (or a directory holding tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    require_file(path, "text tokenizer")
    try:
        return TextTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception types for bad JSON
        if isinstance(e, FileNotFoundError):
            raise
        raise ConversionError(f"{path} is not a tokenizers JSON file: {e}") from None


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of casting b to a's dtype (HF checkpoints are often bf16)."""
    if a.shape != b.shape:
        return False
    b = b.to(a.dtype).float()
    a = a.float()
    tol = 4 * torch.finfo(torch.bfloat16 if a.dtype == torch.bfloat16 else a.dtype).eps
    return bool(((a - b).abs() <= tol * (1.0 + b.abs())).all())


def hf_image_tokenizer(store: TensorStore, hf_config: dict, vqgan: Path | None, where: str,
                       notes: Notes) -> tuple[ImageTokenizer | None, bool]:
    """(image tokenizer, has_decoder) from --vqgan and/or the model.vqmodel.* weights."""
    vq_keys = [k for k in store.keys() if k.startswith(VQ_PREFIX)]
    if vqgan is not None:
        full: VQGAN = load_taming_vqgan(Path(vqgan))
        own = full.state_dict()
        for k in vq_keys:
            name = k[len(VQ_PREFIX):]
            if name not in own or not _same_weights(store.get(k), own[name]):
                raise ConversionError(f"the VQGAN at {vqgan} does not match the VQ encoder stored in {where} "
                                      f"(first difference: {k}); pass the vqgan.ckpt this model was trained with")
        return ImageTokenizer(full), True
    if vq_keys:
        config = vq_config_from_hf(hf_config.get("vq_config"), where)
        vq = encoder_only_vqgan(config, {k[len(VQ_PREFIX):]: store.get(k) for k in vq_keys}, where)
        notes.warn(f"{where} holds no VQGAN decoder (Hugging Face drops it): the converted pipeline can read "
                   "images but NOT draw them (its decoder is zero-filled and renders flat grey). Pass "
                   "vqgan=PATH (Meta's vqgan.ckpt + vqgan.yaml) to convert with the full VQGAN")
        return ImageTokenizer(vq), False
    notes.warn(f"{where} has no VQ weights (model.vqmodel.*) and no vqgan=PATH was given: the converted "
               "pipeline can neither read nor draw images")
    return None, False


def load_chameleon_hf(src: str | Path, *, vqgan: str | Path | None = None, dtype: str | torch.dtype | None = None,
                      profile: str = "chameleon", resolution: int | None = None, grid: int | None = None,
                      tokenizer: str | Path | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """Load a HF-layout Chameleon-family checkpoint as a Pipeline; returns it and a conversion record."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory not found: {src}")
    check_profile(profile)
    notes = Notes()
    where = str(src)
    hf_config = read_json(src / "config.json", "Hugging Face config")
    model_type = hf_config.get("model_type", "chameleon")
    if model_type not in ("chameleon", "chameleon_xllmx"):
        raise ConversionError(f"{src / 'config.json'}: model_type {model_type!r} is not a Chameleon-family model")
    config = chameleon_model_config(hf_config, str(src / "config.json"), notes)
    tok = load_chameleon_tokenizer(Path(tokenizer) if tokenizer is not None else src / "tokenizer.json")
    check_vocabulary_map(tok, hf_config.get("vocabulary_map"), str(src / "config.json"))
    # Fail fast, before reading gigabytes: the tokenizer must make a vocabulary for this model.
    chameleon_vocabulary(tok, config.vocab_size, lumina=profile == "lumina-mgpt", max_grid_size=None, where=where)
    target = resolve_dtype(dtype)
    with open_hf_weights(src) as store:
        image_tokenizer, has_decoder = hf_image_tokenizer(store, hf_config, Path(vqgan) if vqgan else None, where,
                                                          notes)
        specs = chameleon_hf_specs(config)

        def ignore(k: str) -> bool:
            return (k.startswith(VQ_PREFIX) or k.endswith("rotary_emb.inv_freq")
                    or (config.tie_word_embeddings and k == "lm_head.weight"))

        model = assemble_model(config, specs, store, target, ignore=ignore)
    pipe = build_chameleon_pipeline(model, tok, image_tokenizer, profile=profile, where=where, notes=notes,
                                    resolution=resolution, grid=grid, source_name=src.resolve().name)
    if image_tokenizer is not None:
        image_tokenizer.can_decode = has_decoder
    record = {"source_kind": "lumina-mgpt" if profile == "lumina-mgpt" else "chameleon-hf", "source": str(src),
              "vqgan": str(vqgan) if vqgan else None, "vq_decoder": has_decoder,
              "dtype": dtype_name(model.tok_embeddings.weight.dtype), "warnings": notes.items}
    return pipe, record


def convert_chameleon_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Convert a HF-layout Chameleon / Anole checkpoint into a tokenloom pipeline directory at `dst`.

    Options: vqgan (vqgan.ckpt + vqgan.yaml, a directory or the .ckpt), dtype ("bfloat16", "float16",
    "float32"; default: the checkpoint's), profile ("chameleon" or "anole"), grid, tokenizer.
    """
    dst = prepare_destination([src] + ([options["vqgan"]] if options.get("vqgan") else []), dst, overwrite)
    pipe, record = load_chameleon_hf(src, **options)
    return save_pipeline(pipe, dst, record, max_shard_bytes)
