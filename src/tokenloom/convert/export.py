"""tokenloom pipeline -> Hugging Face Chameleon layout (``ChameleonForConditionalGeneration``).

Written to `dst`:

* ``config.json`` (``ChameleonConfig``: sizes, RoPE, norms, ``vocabulary_map``, ``vq_config``) and
  ``model.safetensors`` (or shards + index) with HF's parameter names;
* ``model.vqmodel.*``: the VQGAN encoder, quantizer and quant convs (all HF keeps), plus Meta's
  ``vqgan.ckpt`` + ``vqgan.yaml`` with the full VQGAN, decoder included, so the export converts back
  (``convert("chameleon-hf", dst, ..., vqgan=dst)``) without losing the ability to draw;
* ``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``);
* ``tokenloom_export.json``: the pipeline config and vocabulary (the sequence layout HF does not know).

The model must be Chameleon-shaped: RMSNorm and q/k LayerNorm (HF's Chameleon always normalises q
and k). A vocabulary from a Chameleon tokenizer exports completely. A native (or LLM-expanded)
vocabulary exports its weights, with ``IMGIMG...`` names added to the tokenizer for the code ids so
HF's image-token mapping works; what HF cannot use is tokenloom's own sequence layout (its
special, size and role tokens): HF's ``ChameleonProcessor`` builds Chameleon's flat 1024-code
layout with Chameleon's token names, so inputs for such a model must be built with tokenloom.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, atomic_write_json, save_weights
from ..pipeline import Pipeline
from ..vocab import CHAMELEON_IMAGE_PREFIX, VocabularyError, chameleon_code, chameleon_image_token
from .common import ConversionError, Notes, dtype_name, prepare_destination, resolve_dtype
from .chameleon_hf import VQ_PREFIX, chameleon_hf_specs

__all__ = ["export_hf_chameleon"]

HF_IMAGE_PLACEHOLDER = "<image>"
META_IMAGE_PLACEHOLDER = "<reserved08707>"  # the reserved token HF's converter renames to <image>


def _is_chameleon_vocab(pipe: Pipeline) -> bool:
    tok, vocab = pipe.text_tokenizer, pipe.vocab
    for code, i in enumerate(vocab.code_ids.tolist()):
        name = tok.id_to_token(i)
        if name is None or not name.startswith(CHAMELEON_IMAGE_PREFIX):
            return False
        try:
            if chameleon_code(name) != code:
                return False
        except VocabularyError:
            return False
    return True


def _export_tokenizer(pipe: Pipeline, chameleon: bool, notes: Notes) -> Tokenizer:
    data = json.loads(pipe.text_tokenizer.backend.to_str())
    if chameleon:
        vocab_map = data.get("model", {}).get("vocab", {})
        names = {t["content"] for t in data.get("added_tokens", [])} | set(vocab_map)
        if HF_IMAGE_PLACEHOLDER not in names and META_IMAGE_PLACEHOLDER in names:
            # As transformers' converter does: HF's processor expects <image> as the placeholder.
            if META_IMAGE_PLACEHOLDER in vocab_map:
                vocab_map[HF_IMAGE_PLACEHOLDER] = vocab_map.pop(META_IMAGE_PLACEHOLDER)
            for t in data.get("added_tokens", []):
                if t["content"] == META_IMAGE_PLACEHOLDER:
                    t["content"] = HF_IMAGE_PLACEHOLDER
        return Tokenizer.from_str(json.dumps(data))
    tok = Tokenizer.from_str(json.dumps(data))
    code_ids = pipe.vocab.code_ids.tolist()
    first = tok.get_vocab_size(with_added_tokens=True)
    names = [chameleon_image_token(c) for c in range(len(code_ids))]
    if code_ids == list(range(first, first + len(code_ids))) and all(tok.token_to_id(n) is None for n in names):
        tok.add_special_tokens(names)
        got = [tok.token_to_id(n) for n in names]
        if got != code_ids:
            raise AssertionError("IMGIMG names did not land on the code ids")
    else:
        notes.warn("the code ids are not right after the tokenizer's last id: the exported tokenizer has no "
                   "names for them (config.json's vocabulary_map still does)")
    return tok


def _vq_config(vq) -> dict[str, Any]:
    c = vq.config
    return {"embed_dim": c.embed_dim, "num_embeddings": c.codebook_size, "double_latent": False,
            "latent_channels": c.z_channels, "resolution": c.resolution, "in_channels": c.in_channels,
            "base_channels": c.base_channels, "channel_multiplier": list(c.channel_mult),
            "num_res_blocks": c.num_res_blocks, "attn_resolutions": list(c.attn_resolutions),
            "dropout": c.dropout, "attn_type": "vanilla", "model_type": "chameleon_vqgan"}


def _taming_yaml(vq) -> dict[str, Any]:
    c = vq.config
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": c.embed_dim, "n_embed": c.codebook_size,
        "ddconfig": {"double_z": False, "z_channels": c.z_channels, "resolution": c.resolution,
                     "in_channels": c.in_channels, "out_ch": c.out_channels, "ch": c.base_channels,
                     "ch_mult": list(c.channel_mult), "num_res_blocks": c.num_res_blocks,
                     "attn_resolutions": list(c.attn_resolutions), "dropout": c.dropout}}}}


def export_hf_chameleon(src: Pipeline | str | Path, dst: str | Path, *, dtype: str | torch.dtype | None = None,
                        overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a pipeline (object or directory) as a HF ``ChameleonForConditionalGeneration`` directory."""
    notes = Notes()
    sources = [] if isinstance(src, Pipeline) else [Path(src)]
    dst = prepare_destination(sources, dst, overwrite)
    pipe = src if isinstance(src, Pipeline) else Pipeline.from_pretrained(src)
    c = pipe.model.config
    if c.experts:
        raise ConversionError(f"this model routes {' and '.join(c.experts)} spans through expert projections, which "
                              "HF Chameleon has no place for: it cannot be exported to the Chameleon layout")
    if c.norm_type != "rmsnorm":
        raise ConversionError(f"norm_type {c.norm_type!r} cannot be exported: HF Chameleon uses RMSNorm")
    if not c.qk_norm:
        raise ConversionError("this model has no q/k norm (qk_norm=False) and HF Chameleon always applies a q/k "
                              "LayerNorm, which is not the identity: it cannot be exported to the Chameleon layout")
    if abs(c.norm_eps - 1e-5) > 1e-12:
        notes.warn(f"norm_eps is {c.norm_eps}; HF Chameleon's q/k LayerNorm always uses 1e-5")
    target = resolve_dtype(dtype) or pipe.model.tok_embeddings.weight.dtype
    chameleon = _is_chameleon_vocab(pipe)
    if not chameleon:
        notes.warn("the vocabulary is not a Chameleon tokenizer's: exported the weights, the VQ and the tokenizer "
                   "(with IMGIMG names for the code ids); NOT usable from HF: tokenloom's sequence layout "
                   f"({pipe.config.layout}, its special/size/role tokens). HF's ChameleonProcessor builds Chameleon's "
                   "own layout, so build input ids with tokenloom")
    tokenizer = _export_tokenizer(pipe, chameleon, notes)
    vocabulary_map = tokenizer.get_vocab(with_added_tokens=True)
    for code, i in enumerate(pipe.vocab.code_ids.tolist()):
        vocabulary_map.setdefault(chameleon_image_token(code), i)

    # -- weights (renamed views, cast only when asked) ------------------------------------------
    specs = chameleon_hf_specs(c)
    state = pipe.model.state_dict()
    tensors = {specs[name].sources[0]: t.detach().to(target) for name, t in state.items()}
    vq = pipe.image_tokenizer.vqgan if pipe.image_tokenizer is not None else None
    if vq is not None:
        if vq.config.codebook_size != pipe.vocab.codebook_size:
            raise ConversionError(f"the VQGAN has {vq.config.codebook_size} codes but the vocabulary "
                                  f"{pipe.vocab.codebook_size}")
        for k, t in vq.state_dict().items():
            if not k.startswith("decoder."):
                tensors[VQ_PREFIX + k] = t.detach().to(target)
    else:
        notes.warn("the pipeline has no image tokenizer: the HF model's VQ encoder will be randomly initialised")
    dst.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, dst, max_shard_bytes)

    # -- config ---------------------------------------------------------------------------------
    config: dict[str, Any] = {
        "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias, "attention_dropout": 0.0,
        "swin_norm": c.swin_norm, "tie_word_embeddings": c.tie_word_embeddings, "model_parallel_size": 1,
        "bos_token_id": pipe.vocab.bos, "eos_token_id": pipe.vocab.eos, "pad_token_id": pipe.vocab.pad,
        "vocabulary_map": vocabulary_map, "dtype": dtype_name(target), "use_cache": True,
    }
    if HF_IMAGE_PLACEHOLDER in vocabulary_map:
        config["image_token_id"] = vocabulary_map[HF_IMAGE_PLACEHOLDER]
    if vq is not None:
        config["vq_config"] = _vq_config(vq)
    atomic_write_json(dst / "config.json", config)

    # -- tokenizer ------------------------------------------------------------------------------
    tokenizer.save(str(dst / "tokenizer.json"))
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "model_max_length": c.max_position_embeddings}
    for role in ("bos", "eos", "pad"):
        i = pipe.vocab.role_id(role)
        if i is not None and tokenizer.id_to_token(i) is not None:
            tok_config[f"{role}_token"] = tokenizer.id_to_token(i)
    if pipe.vocab.turn_end is not None and tokenizer.id_to_token(pipe.vocab.turn_end) is not None:
        # as transformers' Chameleon converter does (sep = <reserved08706>, the turn end)
        tok_config["sep_token"] = tokenizer.id_to_token(pipe.vocab.turn_end)
    atomic_write_json(dst / "tokenizer_config.json", tok_config)

    # -- full VQGAN, Meta's layout --------------------------------------------------------------
    if vq is not None:
        torch.save({"state_dict": {k: t.detach().float().cpu() for k, t in vq.state_dict().items()}},
                   dst / "vqgan.ckpt")
        (dst / "vqgan.yaml").write_text(yaml.safe_dump(_taming_yaml(vq), sort_keys=False))
    atomic_write_json(dst / "tokenloom_export.json", {
        "pipeline": pipe.config.to_dict(), "vocab": pipe.vocab.to_dict(), "chameleon_vocabulary": chameleon,
        "vq_decoder_in": "vqgan.ckpt" if vq is not None else None, "warnings": notes.items})
    return dst
