"""Meta's Chameleon release layout -> tokenloom pipeline.

Layout (facebookresearch/chameleon, ``data/``)::

    models/7b/params.json            {"model": {dim, n_layers, n_heads, n_kv_heads, norm_eps, rope_theta,
                                                swin_norm, qk_normalization, vocab_size, multiple_of,
                                                ffn_dim_multiplier, ...}, ...}
    models/7b/consolidate_params.json (optional, merged over params.json)
    models/7b/consolidated.pth       one file; or consolidated.00.pth ... one per model-parallel rank
    tokenizer/text_tokenizer.json, tokenizer/vqgan.yaml, tokenizer/vqgan.ckpt

`src` is the directory holding params.json; the tokenizer directory is looked for in
``src/tokenizer``, ``src/../tokenizer`` and ``src/../../tokenizer`` (or given as ``tokenizer_dir``).

Meta's attention applies RoPE to *adjacent* pairs (dims 2i, 2i+1: xformers ``rope_padded`` with
``adjacents=True``); tokenloom pairs dim i with i + head_dim/2 (rotate_half). Within each head, row
2i + j of wq / wk (j in {0, 1}) therefore moves to row j * head_dim/2 + i; q/k LayerNorm runs
before RoPE over the same dims, so its weight and bias get the same permutation. Meta keeps one
q/k LayerNorm affine per model-parallel rank (shared by the rank's heads); tokenloom keeps one per
head, so each rank's vector is repeated over its heads. Model-parallel shards are merged:
column-parallel weights (wq, wk, wv, w1, w3, output) along rows, row-parallel ones (wo, w2) and
the embedding (split along its feature dim) along columns; replicated norms must agree.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DEFAULT_MAX_SHARD_BYTES
from ..image_processing import ImageTokenizer
from ..model import ModelConfig
from ..pipeline import Pipeline
from .common import (
    ConversionError,
    Notes,
    TensorStore,
    WeightSpec,
    assemble_model,
    dtype_name,
    load_taming_vqgan,
    plain_state_dict,
    prepare_destination,
    read_json,
    require_dir,
    resolve_dtype,
    safe_torch_load,
    save_pipeline,
)
from .chameleon_hf import (
    CHAMELEON_QK_NORM_EPS,
    load_chameleon_tokenizer,
    build_chameleon_pipeline,
    chameleon_vocabulary,
    check_profile,
)

__all__ = ["load_chameleon_meta", "convert_chameleon_meta", "meta_model_config", "interleaved_to_half",
           "half_to_interleaved"]


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from adjacent RoPE pairs (2i, 2i+1) to halves (i, i + head_dim/2).

    `w` is a projection [n_heads * head_dim, in] or a flat vector [n_heads * head_dim].
    """
    x = w.reshape(n_heads, -1, 2, *w.shape[1:])  # [head, i, j, ...]: row 2i + j of the head
    return x.transpose(1, 2).reshape(w.shape).contiguous()


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    x = w.reshape(n_heads, 2, -1, *w.shape[1:])  # [head, j, i, ...]: row j * head_dim/2 + i
    return x.transpose(1, 2).reshape(w.shape).contiguous()


def read_meta_params(src: Path) -> dict[str, Any]:
    params = read_json(src / "params.json", "Chameleon params")
    merged = {**params, **(params.get("model") or {})}
    if (src / "consolidate_params.json").is_file():
        merged.update(read_json(src / "consolidate_params.json", "Chameleon consolidate params"))
    return merged


def _ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    # Meta's FeedForward: hidden = int(2 * 4 * dim / 3), times the multiplier, rounded up.
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_model_config(params: dict[str, Any], where: str, notes: Notes, w1_rows: int | None) -> ModelConfig:
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
        vocab_size = int(params["vocab_size"])
    except KeyError as e:
        raise ConversionError(f"{where}: params.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: bad value in params.json: {e}") from None
    if vocab_size <= 0:
        raise ConversionError(f"{where}: params.json vocab_size must be positive, got {vocab_size}")
    theta = float(params.get("rope_theta") or 10000.0)
    intermediate = _ffn_size(dim, int(params.get("multiple_of") or 256), params.get("ffn_dim_multiplier"))
    if w1_rows is not None and w1_rows != intermediate:
        raise ConversionError(f"{where}: weight 'layers.0.feed_forward.w1.weight' has {w1_rows} rows but params.json "
                              f"(dim={dim}, multiple_of, ffn_dim_multiplier) gives intermediate size {intermediate}")
    qk_norm = bool(params.get("qk_normalization", False))
    eps = float(params.get("norm_eps") or 1e-5)
    if qk_norm and not math.isclose(eps, CHAMELEON_QK_NORM_EPS, rel_tol=1e-6):
        notes.warn(f"{where}: norm_eps is {eps}; tokenloom's q/k LayerNorm uses it too while Meta's uses "
                   f"{CHAMELEON_QK_NORM_EPS}, so attention differs very slightly")
    try:
        return ModelConfig(vocab_size=vocab_size, hidden_size=dim, num_layers=n_layers, num_heads=n_heads,
                           num_kv_heads=int(params.get("n_kv_heads") or n_heads), intermediate_size=intermediate,
                           norm_type="rmsnorm", norm_eps=eps, qk_norm=qk_norm,
                           swin_norm=bool(params.get("swin_norm", False)), rope_theta=theta,
                           # what transformers' converter sets for Chameleon v1
                           max_position_embeddings=16384 if theta > 10000.0 else 4096)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def _checkpoint_files(src: Path, mp: int | None) -> list[Path]:
    single = src / "consolidated.pth"
    if single.is_file():
        return [single]
    numbered = {int(m.group(1)): p for p in src.glob("consolidated.*.pth")
                if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))}
    if not numbered:
        raise FileNotFoundError(f"Chameleon checkpoint not found: neither {single} nor {src}/consolidated.NN.pth exist")
    if sorted(numbered) != list(range(len(numbered))):
        raise ConversionError(f"{src}: model-parallel shards are not numbered 00..{len(numbered) - 1:02d}: "
                              f"{sorted(p.name for p in numbered.values())}")
    if mp is not None and mp != len(numbered):
        raise ConversionError(f"{src}: params.json says model_parallel_size={mp} but there are {len(numbered)} "
                              "consolidated.NN.pth shards")
    return [numbered[i] for i in range(len(numbered))]


class _MetaShards:
    """Merges model-parallel shards lazily, one weight at a time, into full tensors."""

    ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
    COLS = ("attention.wo", "feed_forward.w2", "tok_embeddings")
    PER_RANK = ("q_normalization", "k_normalization")

    def __init__(self, shards: list[dict[str, torch.Tensor]], files: list[Path], notes: Notes):
        self.shards, self.files, self.notes = shards, files, notes
        self.origin = str(files[0]) if len(files) == 1 else f"{files[0].parent}/consolidated.NN.pth"

    @property
    def mp(self) -> int:
        return len(self.shards)

    def has(self, key: str) -> bool:
        missing = [f.name for f, s in zip(self.files, self.shards) if key not in s]
        if missing and len(missing) < len(self.shards):
            raise ConversionError(f"weight {key!r} is in some model-parallel shards but missing from {missing}")
        return not missing

    def shape(self, key: str) -> tuple[int, ...]:
        shapes = [tuple(s[key].shape) for s in self.shards]
        if self.mp == 1:
            return shapes[0]
        if any(sh != shapes[0] for sh in shapes):
            raise ConversionError(f"weight {key!r} has different shapes across shards: {shapes}")
        sh = list(shapes[0])
        name = self._name(key)
        if name in self.ROWS:
            sh[0] *= self.mp
        elif name in self.COLS and len(sh) == 2:
            sh[1] *= self.mp
        elif name.endswith(self.PER_RANK):
            sh = [self.mp, *sh]
        return tuple(sh)

    @staticmethod
    def _name(key: str) -> str:
        """"layers.3.attention.wq.weight" -> "attention.wq"; "output.weight" -> "output"."""
        module = key.rsplit(".", 1)[0]
        return module.split(".", 2)[-1] if module.startswith("layers.") else module

    def get(self, key: str) -> torch.Tensor:
        parts = [s[key] for s in self.shards]
        if self.mp == 1:
            return parts[0]
        name = self._name(key)
        if name in self.ROWS:
            return torch.cat(parts, dim=0)
        if name in self.COLS:
            return torch.cat(parts, dim=1)
        if name.endswith(self.PER_RANK):
            return torch.stack(parts)  # one vector per rank
        # replicated (RMSNorm weights): identical on every rank
        first = parts[0]
        if any(not torch.equal(first, p) for p in parts[1:]):
            self.notes.warn(f"replicated weight {key!r} differs across model-parallel shards; using their mean")
            return torch.stack([p.float() for p in parts]).mean(0).to(first.dtype)
        return first

    def keys(self) -> set[str]:
        return set().union(*(s.keys() for s in self.shards))


def _split_fused(shards: list[dict[str, torch.Tensor]], n_layers: int, local_heads: int, local_kv: int) -> None:
    """Split Meta's fused wqkv / w13 (as the inference module stores them) into wq, wk, wv / w1, w3."""
    for s in shards:
        for i in range(n_layers):
            p = f"layers.{i}."
            if f"{p}attention.wqkv.weight" in s:
                w = s.pop(f"{p}attention.wqkv.weight")
                hd = w.shape[0] // (local_heads + 2 * local_kv)
                q, k, v = torch.split(w, [local_heads * hd, local_kv * hd, local_kv * hd])
                s[f"{p}attention.wq.weight"], s[f"{p}attention.wk.weight"], s[f"{p}attention.wv.weight"] = q, k, v
            if f"{p}feed_forward.w13.weight" in s:
                w1, w3 = s.pop(f"{p}feed_forward.w13.weight").chunk(2, dim=0)
                s[f"{p}feed_forward.w1.weight"], s[f"{p}feed_forward.w3.weight"] = w1, w3


def _find_tokenizer_dir(src: Path, given: Path | None) -> Path:
    if given is not None:
        return require_dir(Path(given), "Chameleon tokenizer directory")
    candidates = [src / "tokenizer", src.parent / "tokenizer", src.parent.parent / "tokenizer"]
    for c in candidates:
        if (c / "text_tokenizer.json").is_file():
            return c
    tried = ", ".join(str(c / "text_tokenizer.json") for c in candidates)
    raise FileNotFoundError(f"Chameleon text tokenizer not found: tried {tried} (pass tokenizer_dir=...)")


def load_chameleon_meta(src: str | Path, *, dtype: str | torch.dtype | None = None, profile: str = "chameleon",
                        tokenizer_dir: str | Path | None = None, vqgan: str | Path | None = None,
                        grid: int | None = None) -> tuple[Pipeline, dict[str, Any]]:
    """Load Meta's Chameleon layout as a Pipeline; returns it and a conversion record."""
    src = require_dir(Path(src), "Chameleon model directory")
    check_profile(profile)
    notes = Notes()
    params = read_meta_params(src)
    config = meta_model_config(params, str(src / "params.json"), notes, None)
    mp = params.get("model_parallel_size")
    files = _checkpoint_files(src, int(mp) if mp else None)
    tok_dir = _find_tokenizer_dir(src, Path(tokenizer_dir) if tokenizer_dir else None)
    tokenizer = load_chameleon_tokenizer(tok_dir / "text_tokenizer.json")
    # Fail fast, before reading gigabytes: the tokenizer must make a vocabulary for this model.
    chameleon_vocabulary(tokenizer, config.vocab_size, lumina=profile == "lumina-mgpt", max_grid_size=None,
                         where=str(tok_dir))
    vq_source = Path(vqgan) if vqgan else tok_dir
    image_tokenizer = ImageTokenizer(load_taming_vqgan(vq_source))

    shards = [plain_state_dict(safe_torch_load(f), f) for f in files]
    m = len(shards)
    if config.num_heads % m or config.num_kv_heads % m:
        raise ConversionError(f"{src}: {m} model-parallel shards cannot split {config.num_heads} heads / "
                              f"{config.num_kv_heads} kv heads")
    _split_fused(shards, config.num_layers, config.num_heads // m, config.num_kv_heads // m)
    merged = _MetaShards(shards, files, notes)
    w1 = "layers.0.feed_forward.w1.weight"
    if merged.has(w1):  # params.json's FFN size must be the checkpoint's
        meta_model_config(params, str(src / "params.json"), Notes(), merged.shape(w1)[0])
    specs = _meta_specs(config, m)
    store = _MergedStore(merged)
    model = assemble_model(config, specs, store, resolve_dtype(dtype), ignore=lambda k: k == "rope.freqs")
    pipe = build_chameleon_pipeline(model, tokenizer, image_tokenizer, profile=profile, where=str(src), notes=notes,
                                    grid=grid)
    record = {"source_kind": "chameleon-meta", "source": str(src), "model_parallel_shards": m,
              "tokenizer_dir": str(tok_dir), "vqgan": str(vq_source), "vq_decoder": True,
              "dtype": dtype_name(model.tok_embeddings.weight.dtype), "warnings": notes.items}
    return pipe, record


class _MergedStore(TensorStore):
    """TensorStore view of merged shards (shapes and tensors of the full, merged weights)."""

    def __init__(self, merged: _MetaShards):
        self.m = merged
        self.origin = merged.origin

    def keys(self) -> list[str]:
        return sorted(self.m.keys())

    def __contains__(self, key: str) -> bool:
        return self.m.has(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.m.shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self.m.get(key)


def _meta_specs(c: ModelConfig, mp: int) -> dict[str, WeightSpec]:
    V, D, F, H, KV, hd = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                          c.head_dim)
    note = f"params.json: vocab_size={V}, dim={D}, n_heads={H}, n_kv_heads={KV}, ffn={F}"

    def one(key, shape, build=None):
        return WeightSpec((key,), (shape,), build, note)

    def per_rank_norm(heads: int):
        # [mp, hd] per-rank vectors -> [heads, hd] per-head affines, in rotate_half order
        def build(v: torch.Tensor) -> torch.Tensor:
            v = interleaved_to_half(v.reshape(-1), mp).reshape(mp, hd)
            return v.repeat_interleave(heads // mp, dim=0)
        return build

    specs = {"tok_embeddings.weight": one("tok_embeddings.weight", (V, D)), "norm.weight": one("norm.weight", (D,)),
             "output.weight": one("output.weight", (V, D))}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        specs[f"{p}attention.wq.weight"] = one(f"{p}attention.wq.weight", (H * hd, D),
                                               lambda w: interleaved_to_half(w, H))
        specs[f"{p}attention.wk.weight"] = one(f"{p}attention.wk.weight", (KV * hd, D),
                                               lambda w: interleaved_to_half(w, KV))
        specs[f"{p}attention.wv.weight"] = one(f"{p}attention.wv.weight", (KV * hd, D))
        specs[f"{p}attention.wo.weight"] = one(f"{p}attention.wo.weight", (D, H * hd))
        if c.qk_norm:
            shape = (hd,) if mp == 1 else (mp, hd)
            for ours, theirs, heads in (("q_norm", "q_normalization", H), ("k_norm", "k_normalization", KV)):
                for w in ("weight", "bias"):
                    build = per_rank_norm(heads)
                    specs[f"{p}attention.{ours}.{w}"] = one(
                        f"{p}attention.{theirs}.{w}", shape,
                        (lambda v, b=build: b(v.reshape(1, hd))) if mp == 1 else build)
        specs[f"{p}feed_forward.w1.weight"] = one(f"{p}feed_forward.w1.weight", (F, D))
        specs[f"{p}feed_forward.w3.weight"] = one(f"{p}feed_forward.w3.weight", (F, D))
        specs[f"{p}feed_forward.w2.weight"] = one(f"{p}feed_forward.w2.weight", (D, F))
        specs[f"{p}attention_norm.weight"] = one(f"{p}attention_norm.weight", (D,))
        specs[f"{p}ffn_norm.weight"] = one(f"{p}ffn_norm.weight", (D,))
    return specs


def convert_chameleon_meta(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> Path:
    """Convert Meta's Chameleon layout (params.json + consolidated*.pth + tokenizer/) to a tokenloom pipeline.

    Options: dtype ("bfloat16", "float16", "float32"; default: the checkpoint's), profile
    ("chameleon" or "anole"), tokenizer_dir, vqgan (defaults to the tokenizer directory's pair), grid.
    """
    dst = prepare_destination([src], dst, overwrite)
    pipe, record = load_chameleon_meta(src, **options)
    return save_pipeline(pipe, dst, record, max_shard_bytes)
