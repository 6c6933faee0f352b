"""Liquid-style expansion: a Hugging Face causal LM + image codes -> a tokenloom pipeline.

The base model (``config.json``, safetensors, ``tokenizer.json``, ``tokenizer_config.json``) keeps
every weight; its tokenizer gains tokenloom's special and size tokens (`Vocabulary.expand_llm`)
and the vocabulary gains one id per VQ code after them. The embedding and output matrices get a
row per new id, initialised at the mean of the base model's rows for the tokenizer's ids, so
text-only inputs give exactly the base model's logits (new columns aside) until training starts.

Supported families: Llama, Mistral, Qwen2 (Qwen2.5): RMSNorm, SwiGLU, rotate_half RoPE, all of
which tokenloom's `Transformer` implements with the same parameter layout; Qwen2's q/k/v biases
map to ``attention_bias=True`` with a zero output-projection bias. Models with something the
Transformer cannot express are refused with the reason (Gemma's GELU feed-forward and
``(1 + weight)`` norms, Qwen3's q/k RMSNorm, RoPE scaling such as Llama 3.1's, a head_dim that is
not hidden_size / heads).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES
from ..model import ModelConfig
from ..pipeline import Pipeline
from ..text_tokenizer import TextTokenizer
from ..vocab import NATIVE_SPECIAL_TOKENS, Vocabulary, VocabularyError
from .common import (
    ConversionError,
    Notes,
    WeightSpec,
    assemble_model,
    dtype_name,
    image_tokenizer_from_path,
    prepare_destination,
    read_json,
    require_dir,
    require_file,
    resolve_dtype,
    save_pipeline,
)
from .chameleon_hf import chameleon_hf_specs, open_hf_weights, rope_theta_of
from .profiles import liquid_profile

__all__ = ["expand", "expand_pipeline", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_REJECTED = {
    "gemma": "Gemma's feed-forward uses GELU (tokenloom's is SwiGLU with SiLU), its RMSNorm scales by "
             "(1 + weight), its embeddings are multiplied by sqrt(hidden_size) and its head_dim is not "
             "hidden_size / heads",
    "qwen3": "Qwen3 normalises q and k with a per-head RMSNorm (tokenloom's q/k norm is Chameleon's LayerNorm)",
}
_REJECTED["gemma2"] = _REJECTED["gemma"] + "; Gemma 2 also soft-caps logits and adds post-norms"
_REJECTED["gemma3"] = _REJECTED["gemma3_text"] = _REJECTED["gemma2"]
_REJECTED["qwen3_moe"] = _REJECTED["qwen3"] + " and is a mixture of experts"


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_names(base: Path, tok: TextTokenizer, cfg, overrides: dict[str, str | None],
                   notes: Notes) -> dict[str, str | None]:
    tc_path = base / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer config") if tc_path.is_file() else {}
    if not tc:
        notes.warn(f"{tc_path} is missing: bos/eos names come from config.json's token ids")
    names: dict[str, str | None] = {}
    for role in ("bos", "eos", "pad"):
        name = overrides.get(role) or _token_name(tc.get(f"{role}_token"))
        if name is None:
            i = getattr(cfg, f"{role}_token_id", None)
            if isinstance(i, (list, tuple)):
                i = i[0] if i else None
            if isinstance(i, int) and 0 <= i < tok.vocab_size:
                name = tok.id_to_token(i)
        names[role] = name
    if names["eos"] is None:
        raise ConversionError(f"{base}: no eos token in tokenizer_config.json or config.json; pass eos_token=NAME")
    if overrides.get("bos") and overrides["bos"] == names["eos"]:
        raise ConversionError(f"bos_token and eos_token are both {names['eos']!r}; tokenloom needs distinct ids")
    if names["bos"] is None or names["bos"] == names["eos"]:
        # Qwen-style models prepend nothing (their config's bos id is the eos token): tokenloom's
        # sequences start with a bos of their own, so one is added like the other new tokens.
        names["bos"] = NATIVE_SPECIAL_TOKENS["bos"]
        tok.add_special_tokens([names["bos"]])
        notes.warn(f"{base}: the base model has no bos token distinct from eos; added {names['bos']} "
                   "(initialised like the other new tokens)")
    if names["pad"] in (names["bos"], names["eos"]):
        names["pad"] = None  # a pad that doubles as bos/eos would be a special id used twice
    return names


def _model_config(cfg, where: str, notes: Notes) -> tuple[ModelConfig, bool]:
    """(ModelConfig with the base vocabulary size, whether o_proj lacks the q/k/v bias)."""
    d = cfg.to_dict()
    model_type = d.get("model_type")
    act = d.get("hidden_act") or d.get("hidden_activation")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} cannot be expressed (tokenloom's feed-forward is SwiGLU "
                              "with SiLU)")
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    if head_dim not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads ({hidden} / {heads}) "
                              "cannot be expressed")
    max_pos = int(d.get("max_position_embeddings") or 4096)
    window = None
    if model_type == "mistral":
        window = d.get("sliding_window")
    elif model_type == "qwen2" and (d.get("use_sliding_window")
                                    or "sliding_attention" in (d.get("layer_types") or [])):
        window = d.get("sliding_window")
    if window is not None and int(window) < max_pos:
        notes.warn(f"{where}: sliding-window attention ({window} tokens) cannot be expressed; sequences are "
                   f"limited to {window} tokens, where full attention is identical")
        max_pos = int(window)
    if model_type == "qwen2":
        attention_bias, no_o_bias = True, True  # q/k/v projections have biases, o_proj does not
    else:
        attention_bias, no_o_bias = bool(d.get("attention_bias", False)), False
    try:
        config = ModelConfig(
            vocab_size=int(d["vocab_size"]), hidden_size=hidden, num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
            intermediate_size=int(d["intermediate_size"]), norm_type="rmsnorm", norm_eps=float(d["rms_norm_eps"]),
            qk_norm=False, swin_norm=False, rope_theta=rope_theta_of(d, where), max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {type(e).__name__}: {e}") from None
    return config, no_o_bias


def expand_pipeline(base: str | Path, codebook_size: int | None = None, vq: str | Path | None = None, *,
                    max_grid_size: int | None = None, max_image_side: int = 1024, image_size: int | None = None,
                    dtype: str | torch.dtype | None = None, bos_token: str | None = None,
                    eos_token: str | None = None, pad_token: str | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """Expand a HF causal LM in memory; returns the pipeline and a conversion record."""
    base = require_dir(Path(base), "base model directory")
    notes = Notes()
    where = str(base / "config.json")
    raw = read_json(base / "config.json", "base model config")
    model_type = raw.get("model_type")
    if model_type in _REJECTED:
        raise ConversionError(f"{where}: model_type {model_type!r} cannot be expanded: {_REJECTED[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConversionError("expanding a Hugging Face model needs the transformers package (to read its "
                              "config with the family's defaults): pip install transformers") from None
    try:
        cfg = AutoConfig.from_pretrained(str(base), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise ConversionError(f"{where}: transformers cannot read it: {type(e).__name__}: {e}") from None
    base_config, no_o_bias = _model_config(cfg, where, notes)
    rows = base_config.vocab_size

    tok = TextTokenizer.from_file(require_file(base / "tokenizer.json", "base model tokenizer"))
    n_text = tok.vocab_size
    if n_text > rows:
        raise ConversionError(f"{base}: the tokenizer has ids up to {n_text - 1} but the model has only {rows} "
                              "embedding rows")

    image_tokenizer = image_tokenizer_from_path(Path(vq)) if vq is not None else None
    if image_tokenizer is not None:
        vq_codes = image_tokenizer.config.codebook_size
        if codebook_size is not None and codebook_size != vq_codes:
            raise ConversionError(f"codebook_size={codebook_size} but the VQ at {vq} has {vq_codes} codes")
        codebook_size = vq_codes
        factor = image_tokenizer.factor
    else:
        if codebook_size is None:
            raise ConversionError("codebook_size is required when no VQ image tokenizer is given")
        factor = 16
        notes.warn("no VQ image tokenizer given: the expanded pipeline has image code ids but can neither read "
                   "nor draw images until one is added")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ConversionError(f"codebook_size must be a positive integer, got {codebook_size!r}")
    if max_image_side < factor:
        raise ConversionError(f"max_image_side={max_image_side} is smaller than one code ({factor} px)")
    max_grid_size = max_grid_size or max_image_side // factor
    if image_size is None:
        image_size = min(image_tokenizer.config.resolution if image_tokenizer else 512, max_image_side)
        image_size -= image_size % factor

    names = _special_names(base, tok, cfg, {"bos": bos_token, "eos": eos_token, "pad": pad_token}, notes)
    try:
        vocab = Vocabulary.expand_llm(tok, codebook_size, max_grid_size, bos_token=names["bos"],
                                      eos_token=names["eos"], pad_token=names["pad"])
    except VocabularyError as e:
        raise ConversionError(f"{base}: {e}") from None
    new_rows = max(rows, vocab.size)
    if new_rows > vocab.size:  # the base model's padding rows stay addressable
        vocab = Vocabulary(new_rows, vocab.specials, vocab.code_ids, vocab.size_token_ids, size_unit=vocab.size_unit)
    # Every id from the tokenizer's old end to the last code is new (added tokens, then codes).
    new_ids = torch.arange(n_text, int(vocab.code_ids.max()) + 1)
    mean_rows = min(n_text, rows)

    def grow(w: torch.Tensor) -> torch.Tensor:
        out = torch.empty(new_rows, w.shape[1], dtype=w.dtype)
        out[:rows] = w
        out[new_ids] = w[:mean_rows].float().mean(0).to(w.dtype)
        return out

    config = dataclasses.replace(base_config, vocab_size=new_rows)
    specs = chameleon_hf_specs(base_config)
    specs["tok_embeddings.weight"] = dataclasses.replace(specs["tok_embeddings.weight"], build=grow)
    if "output.weight" in specs:
        specs["output.weight"] = dataclasses.replace(specs["output.weight"], build=grow)
    if no_o_bias:
        zeros = WeightSpec((), (), build=lambda d=config.hidden_size: torch.zeros(d))
        for i in range(config.num_layers):
            specs[f"layers.{i}.attention.wo.bias"] = zeros

    def ignore(k: str) -> bool:
        return k.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and k == "lm_head.weight")

    with open_hf_weights(base) as store:
        model = assemble_model(config, specs, store, resolve_dtype(dtype), ignore=ignore)
    pipe = Pipeline(model, vocab, tok, image_tokenizer, liquid_profile(image_size, max_image_side))
    record = {"source_kind": "liquid-expand", "source": str(base), "base_model_type": model_type,
              "base_vocab_rows": rows, "base_tokenizer_ids": n_text, "codebook_size": codebook_size,
              "new_rows": [int(new_ids[0]), int(new_ids[-1]) + 1] if len(new_ids) else [],
              "new_row_init": "mean of the base rows of the tokenizer's ids", "vq": str(vq) if vq else None,
              "vq_decoder": image_tokenizer is not None, "dtype": dtype_name(model.tok_embeddings.weight.dtype),
              "warnings": notes.items}
    return pipe, record


def expand(base: str | Path, dst: str | Path, codebook_size: int | None = None, vq: str | Path | None = None, *,
           overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Expand the causal LM at `base` with `codebook_size` image codes (or the VQ's) and save a pipeline.

    `vq` is a tokenloom image tokenizer directory (vq_config.json + vq.safetensors) or a taming
    vqgan.ckpt + vqgan.yaml pair. Options: max_grid_size, max_image_side (1024), image_size, dtype,
    bos_token / eos_token / pad_token (override tokenizer_config.json).
    """
    dst = prepare_destination([base], dst, overwrite)
    pipe, record = expand_pipeline(base, codebook_size, vq, **options)
    return save_pipeline(pipe, dst, record, max_shard_bytes)
