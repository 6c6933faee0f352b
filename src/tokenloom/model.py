"""Decoder-only transformer of the Llama / Chameleon family.

One forward serves training (plain or packed documents), prefill and cached decoding.
Parameter names follow Meta's Llama/Chameleon checkpoints (wq/wk/wv/wo, w1/w2/w3) so that
checkpoint converters map onto them directly. RoPE uses the Hugging Face "rotate_half"
layout (dimension i pairs with i + head_dim/2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ModelConfig",
    "KVCache",
    "Transformer",
    "TransformerBlock",
    "Attention",
    "FeedForward",
    "RMSNorm",
    "HeadNorm",
    "rope_cos_sin",
    "apply_rope",
    "document_mask",
    "document_positions",
    "span_routes",
]

NORM_TYPES = ("rmsnorm", "layernorm")
EXPERT_SCOPES = ("span", "rest")  # ModelConfig.expert_scope


def _default_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    # SwiGLU has three matrices; 8/3 * hidden keeps the FFN cost of a 4x two-matrix MLP.
    n = int(8 * hidden_size / 3)
    return multiple_of * ((n + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None -> num_heads (no grouping)
    intermediate_size: int | None = None  # None -> ~8/3 * hidden_size, multiple of 64
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False  # Chameleon: per-head LayerNorm on q and k before RoPE
    swin_norm: bool = False  # Chameleon-30B: norm the branch output inside the residual
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    dropout: float = 0.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Modalities ("video", "speech") whose spans run through expert projections (CogVLM's visual expert):
    # every block has a second set of wq/wk/wv/wo/w1/w2/w3 for the tokens inside such a span, the first set
    # for all others, so a model grown this way computes exactly what it did on its old tokens.
    experts: list = dataclasses.field(default_factory=list)
    # What the experts compute: "span", the span's tokens (begin marker through end marker, CogVLM's); "rest",
    # every token from a begin marker to the end of its document, so that the text answering about a video
    # or an utterance is the experts' too (a small model's frozen text weights cannot learn to write it).
    expert_scope: str = "span"
    # The experts' tokens also have their own final norm and output head (copies of the model's at growth):
    # words the base never wrote (their output rows untrained) can then be learned without moving the
    # logits of any token outside the experts.
    expert_head: bool = False

    def __post_init__(self) -> None:
        # Resolve defaults to concrete values so to_dict() records what was built.
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = _default_intermediate_size(self.hidden_size)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.experts = list(self.experts)
        if any(not isinstance(m, str) for m in self.experts) or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts must be distinct modality names, got {self.experts!r}")
        if self.expert_scope not in EXPERT_SCOPES:
            raise ValueError(f"expert_scope must be one of {EXPERT_SCOPES}, got {self.expert_scope!r}")
        if self.expert_head and not self.experts:
            raise ValueError("expert_head needs experts (the modalities whose tokens use it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not d["experts"]:  # configs (and adapter fingerprints) of models without experts stay as they were
            del d["experts"], d["expert_scope"]
        if not d["expert_head"]:  # nor those of models whose experts share the head
            del d["expert_head"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        fields = dataclasses.fields(cls)
        unknown = sorted(set(d) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"missing required ModelConfig keys: {missing}")
        return cls(**d)


# --------------------------------------------------------------------------- rotary


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] (float32) for integer positions.

    Computed on the fly (cheap, once per forward) rather than from a precomputed table, so any
    position works and models built on the meta device need no buffer re-materialisation.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)  # both halves share a frequency (rotate_half)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, D] by per-row angles cos/sin [B, T, D]."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------- packing


def document_mask(document_ids: Tensor) -> Tensor:
    """[B, T, T] bool: query t may read key s iff s <= t and both carry the same document id."""
    T = document_ids.shape[-1]
    idx = torch.arange(T, device=document_ids.device)
    return (document_ids[:, :, None] == document_ids[:, None, :]) & (idx <= idx[:, None])


def document_positions(document_ids: Tensor) -> Tensor:
    """[B, T] positions that restart at 0 for each document (= earlier tokens with the same id).

    RoPE is relative, so restarting barely changes a packed forward; it keeps positions small
    (float32 angles stay precise) and identical to those of a document run on its own.
    """
    return document_mask(document_ids).sum(-1) - 1


def span_routes(input_ids: Tensor, begin_ids: Tensor, end_ids: Tensor,
                open_before: Tensor | None = None, reset_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Which tokens lie inside an expert span, markers included, and whether a span is open after each.

    input_ids [B, T]; begin_ids / end_ids [K]: the spans' begin and end tokens; open_before [B] bool: a span
    was open before the first token (a window after cached tokens), else none was. Returns inside [B, T] and
    open_after [B, T]. A token's state is set by the last marker at or before it: a begin opens a span, an
    end closes it after itself, a reset (reset_ids: a document's first token, bos) closes it before itself;
    with no marker yet, the state before the window holds.
    """
    B, T = input_ids.shape
    is_begin = torch.isin(input_ids, begin_ids)
    is_end = torch.isin(input_ids, end_ids)
    marker = is_begin | is_end
    if reset_ids is not None:
        marker = marker | torch.isin(input_ids, reset_ids)
    idx = torch.arange(T, device=input_ids.device).expand(B, T)
    last = torch.where(marker, idx, -1).cummax(dim=1).values  # last marker at or before t
    opened = torch.gather(is_begin, 1, last.clamp(min=0))
    prior = torch.zeros(B, dtype=torch.bool, device=input_ids.device) if open_before is None else open_before
    open_after = torch.where(last >= 0, opened, prior[:, None])
    return open_after | is_end, open_after


def _split(base: Callable[[Tensor], Tensor], expert: Callable[[Tensor], Tensor] | None, x: Tensor,
           route: Tensor | None) -> Tensor:
    """base(x), with expert(x) at the flat token indices `route` (None: no token is the expert's)."""
    if route is None:
        return base(x)
    flat = x.reshape(-1, x.shape[-1])
    y = base(flat).index_copy(0, route, expert(flat.index_select(0, route)))
    return y.view(*x.shape[:-1], y.shape[-1])


def _routed(base: nn.Linear, experts: nn.ModuleDict | None, name: str, x: Tensor, route: Tensor | None) -> Tensor:
    """base(x), with the expert's projection of that name at the flat token indices `route`."""
    return _split(base, None if route is None else experts[name], x, route)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32: squares in half precision overflow / lose precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadNorm(nn.Module):
    """Chameleon's q/k norm: LayerNorm over head_dim, then a separate affine per head."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, H, D]
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias


def _make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


class KVCache:
    """Static per-layer key/value buffers [B, num_kv_heads, S, head_dim] (gpt-fast style).

    New keys/values are written with ``index_copy_`` at ``cache_positions``; which slots a query
    reads is decided by the model's mask, so unused or stale slots never need clearing (they only
    have to be finite: a masked NaN would still leak through the attention matmul).
    """

    def __init__(self, k: Sequence[Tensor], v: Sequence[Tensor], open_spans: Tensor | None = None):
        if len(k) != len(v) or not k:
            raise ValueError("KVCache needs one k and one v tensor per layer")
        self.k = list(k)
        self.v = list(v)
        # A model with experts: [B, 1, S, 1] bool, whether an expert span is open after each slot's token
        # (shaped like k and v so that code moving slots or rows moves it with them: `tensors`).
        self.open_spans = open_spans

    @property
    def tensors(self) -> list[Tensor]:
        """Every per-row, per-slot tensor (batch dim 0, slot dim 2): what copying rows or slots must move."""
        return self.k + self.v + ([] if self.open_spans is None else [self.open_spans])

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        open_spans = (torch.zeros((batch_size, 1, max_length, 1), dtype=torch.bool, device=device)
                      if config.experts else None)
        return cls(k, v, open_spans)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def update(self, layer: int, cache_positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] into slots cache_positions [T] (the same for every row), or, with
        cache_positions [B, T], each row's tokens into that row's own slots; return the layer cache."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if cache_positions.dim() == 2:
            # Advanced-index assignment; the indexed view is [B, T, Hkv, D]. (It beats scatter_ along the
            # slot axis on CPUs: docs/engine.md#speed.)
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            k_cache[rows, :, cache_positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, cache_positions] = v.transpose(1, 2).to(v_cache.dtype)
            return k_cache, v_cache
        k_cache.index_copy_(2, cache_positions, k.to(k_cache.dtype))
        v_cache.index_copy_(2, cache_positions, v.to(v_cache.dtype))
        return k_cache, v_cache

    def rows(self, n: int) -> KVCache:
        """A view of the first n batch rows (writes go through to this cache)."""
        spans = None if self.open_spans is None else self.open_spans[:n]
        return KVCache([t[:n] for t in self.k], [t[:n] for t in self.v], spans)

    def select(self, rows: Tensor | Sequence[int]) -> KVCache:
        """New cache holding the given batch rows (drop finished rows, duplicate for sampling)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        spans = None if self.open_spans is None else self.open_spans.index_select(0, rows)
        return KVCache([t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v], spans)

    def reorder(self, rows: Tensor | Sequence[int]) -> KVCache:
        """In-place variant of select(), for callers that hold a reference to this cache."""
        selected = self.select(rows)
        self.k, self.v, self.open_spans = selected.k, selected.v, selected.open_spans
        return self

    def routes(self, input_ids: Tensor, cache_positions: Tensor, begin_ids: Tensor, end_ids: Tensor,
               reset_ids: Tensor | None = None) -> Tensor:
        """span_routes of tokens written at cache_positions ([T] or [B, T], consecutive per row), continuing
        from the slot before them; records the new states in their slots. Returns inside [B, T]."""
        B, T = input_ids.shape
        per_row = cache_positions if cache_positions.dim() == 2 else cache_positions[None].expand(B, T)
        rows = torch.arange(B, device=input_ids.device)
        before = per_row[:, 0] - 1
        spans = self.open_spans[:, 0, :, 0]  # [B, S]
        open_before = spans[rows, before.clamp(min=0)] & (before >= 0)
        inside, open_after = span_routes(input_ids, begin_ids, end_ids, open_before, reset_ids)
        spans[rows[:, None], per_row] = open_after
        return inside



class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        hidden, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.wq = nn.Linear(hidden, self.num_heads * hd, bias=bias)
        self.wk = nn.Linear(hidden, self.num_kv_heads * hd, bias=bias)
        self.wv = nn.Linear(hidden, self.num_kv_heads * hd, bias=bias)
        self.wo = nn.Linear(self.num_heads * hd, hidden, bias=bias)
        if config.qk_norm:
            self.q_norm = HeadNorm(self.num_heads, hd, config.norm_eps)
            self.k_norm = HeadNorm(self.num_kv_heads, hd, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.expert = nn.ModuleDict({name: nn.Linear(getattr(self, name).in_features, getattr(self, name).out_features,
                                                     bias=bias) for name in ("wq", "wk", "wv", "wo")}) \
            if config.experts else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                cache_positions: Tensor | None = None, kv_length: int | None = None,
                route: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = _routed(self.wq, self.expert, "wq", x, route).view(B, T, self.num_heads, self.head_dim)
        k = _routed(self.wk, self.expert, "wk", x, route).view(B, T, self.num_kv_heads, self.head_dim)
        v = _routed(self.wv, self.expert, "wv", x, route).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE, as in Chameleon
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, cache_positions, k, v)
            if kv_length is not None:  # slots past kv_length hold nothing yet: skip them
                k, v = k[:, :, :kv_length], v[:, :, :kv_length]
        per_row = cache_positions is not None and cache_positions.dim() == 2  # decode steps, not prefills
        if (T == 1 or per_row and T <= DECODE_QUERIES) and mask is not None and not self.training:
            y = decode_attention(q, k, v, mask)
            return _routed(self.wo, self.expert, "wo", y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim),
                           route)
        if self.num_kv_heads != self.num_heads:
            # q head h reads kv head h // rep (the Llama / Hugging Face grouping).
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return _routed(self.wo, self.expert, "wo", y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim), route)


DECODE_QUERIES = 64  # decode steps of up to this many new tokens per row use decode_attention


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few new queries per row over the cache: q [B, H, T, D], k/v [B, KV, S, D], mask
    [B|1, 1, T, S] (True = attend). Two batched matmuls, with the q heads of a kv head stacked as
    rows, so grouped-query caches are never copied; on CPUs this is several times faster than SDPA's
    kernels for one query (a decode step) or a few (a window of speculative drafts). Same math as
    `F.scaled_dot_product_attention`."""
    B, H, T, D = q.shape
    kv = k.shape[1]
    rep = H // kv
    q = q.reshape(B, kv, rep * T, D)  # q head h -> kv head h // rep, as repeat_interleave would
    scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5  # [B, KV, rep * T, S]
    scores = scores.float().view(B, kv, rep, T, -1).masked_fill(~mask.reshape(mask.shape[0], 1, 1, T, -1),
                                                                 float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, kv, rep * T, -1)
    return torch.matmul(probs, v).reshape(B, H, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.w1 = nn.Linear(hidden, inter, bias=bias)  # gate
        self.w3 = nn.Linear(hidden, inter, bias=bias)  # up
        self.w2 = nn.Linear(inter, hidden, bias=bias)  # down
        self.expert = nn.ModuleDict({"w1": nn.Linear(hidden, inter, bias=bias), "w3": nn.Linear(hidden, inter, bias=bias),
                                     "w2": nn.Linear(inter, hidden, bias=bias)}) if config.experts else None

    def forward(self, x: Tensor, route: Tensor | None = None) -> Tensor:
        if route is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate = _routed(self.w1, self.expert, "w1", x, route)
        return _routed(self.w2, self.expert, "w2", F.silu(gate) * _routed(self.w3, self.expert, "w3", x, route), route)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = _make_norm(config, config.hidden_size)
        self.ffn_norm = _make_norm(config, config.hidden_size)
        self.swin_norm = config.swin_norm
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                kv_cache: KVCache | None = None, layer_idx: int = 0,
                cache_positions: Tensor | None = None, kv_length: int | None = None,
                route: Tensor | None = None) -> Tensor:
        drop = self.resid_dropout
        if self.swin_norm:
            # Chameleon-30B: normalising the branch output bounds its norm, which stabilised training.
            h = x + drop(self.attention_norm(self.attention(x, cos, sin, mask, kv_cache, layer_idx, cache_positions,
                                                            kv_length, route)))
            return h + drop(self.ffn_norm(self.feed_forward(h, route)))
        h = x + drop(self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, layer_idx, cache_positions,
                                    kv_length, route))
        return h + drop(self.feed_forward(self.ffn_norm(h), route))


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = _make_norm(config, config.hidden_size)
        # Tied: no output module at all, so "output.weight" never appears in the state dict.
        self.output = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # ModelConfig.expert_head: the final norm and output head of the experts' tokens (never tied).
        self.expert_norm = _make_norm(config, config.hidden_size) if config.expert_head else None
        self.expert_output = (nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                              if config.expert_head else None)
        # The expert spans' begin and end token ids, from the vocabulary (set_expert_spans); not weights.
        self.span_begin_ids: Tensor | None = None
        self.span_end_ids: Tensor | None = None
        self.span_reset_ids: Tensor | None = None
        self.init_weights()

    def set_expert_spans(self, begin_ids: Sequence[int], end_ids: Sequence[int],
                         reset_ids: Sequence[int] = ()) -> None:
        """The begin and end tokens of the spans that run through the experts (config.experts names their
        modalities; Pipeline takes their ids from the vocabulary), and the tokens that start a document
        (bos), which close any span before themselves, so that in a packed row one document's span never
        routes the next. Under config.expert_scope "rest" the ends close nothing: the experts compute from
        a begin marker to the end of its document."""
        if not self.config.experts:
            raise ValueError("this model has no experts (ModelConfig.experts is empty)")
        device = self.tok_embeddings.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.span_begin_ids = torch.tensor(list(begin_ids), dtype=torch.long, device=device)
        ends = list(end_ids) if self.config.expert_scope == "span" else []  # "rest": a span never closes
        self.span_end_ids = torch.tensor(ends, dtype=torch.long, device=device)
        self.span_reset_ids = torch.tensor(list(reset_ids), dtype=torch.long, device=device)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the span ids with the weights (they are plain tensors, not buffers, so that they
        # never enter a state dict).
        out = super()._apply(fn, *args, **kwargs)
        if self.span_begin_ids is not None:
            device = self.tok_embeddings.weight.device
            if device.type != "meta":
                self.span_begin_ids = self.span_begin_ids.to(device)
                self.span_end_ids = self.span_end_ids.to(device)
                self.span_reset_ids = self.span_reset_ids.to(device)
        return out

    def routed(self, input_ids: Tensor) -> Tensor | None:
        """[B, T] bool: the tokens of `input_ids` (whole documents, no cache) that the expert head computes,
        what `project` takes beside a plain forward's hidden states; None for a model without an expert head
        (its tokens share one head, and project needs no mask)."""
        if self.expert_output is None:
            return None
        route = self._routes(input_ids, None, None)
        inside = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        if route is not None:
            inside[route] = True
        return inside.view(input_ids.shape)

    def project(self, hidden: Tensor, routed: Tensor | None = None) -> Tensor:
        """Logits of final hidden states (a forward's with return_hidden, any leading shape), the experts'
        tokens (`routed`, a bool mask of that leading shape: `routed(input_ids)` indexed alike) through the
        expert head where the model has one."""
        route = None
        if self.expert_output is not None and routed is not None:
            route = routed.flatten().nonzero().squeeze(1)
            route = route if route.numel() else None
        return self._head(hidden, route)

    def _head(self, h: Tensor, route: Tensor | None) -> Tensor:
        shared = self.output if self.output is not None else (lambda x: F.linear(x, self.tok_embeddings.weight))
        return _split(shared, self.expert_output, h, route)

    def _routes(self, input_ids: Tensor, kv_cache: KVCache | None, cache_positions: Tensor | None) -> Tensor | None:
        """Flat indices of the tokens that run through the experts (None: none do)."""
        if not self.config.experts:
            return None
        if self.span_begin_ids is None:
            raise ValueError(f"this model routes {self.config.experts} spans to experts but was not told their "
                             "tokens: load it with tokenloom.load, or call set_expert_spans")
        if kv_cache is not None:
            if kv_cache.open_spans is None:
                raise ValueError("a model with experts needs a KVCache with open_spans (model.allocate_cache)")
            inside = kv_cache.routes(input_ids, cache_positions, self.span_begin_ids, self.span_end_ids,
                                     self.span_reset_ids)
        else:
            inside = span_routes(input_ids, self.span_begin_ids, self.span_end_ids,
                                 reset_ids=self.span_reset_ids)[0]
        route = inside.flatten().nonzero().squeeze(1)
        return route if route.numel() else None

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Transformer:
        model = cls(config)
        model.init_weights(seed)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    @property
    def output_weight(self) -> Tensor:
        """The [vocab, hidden] matrix producing logits (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        if exclude_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, 0.02) weights; residual projections (wo, w2) scaled by 1/sqrt(2 * layers) so the
        residual stream's variance does not grow with depth; norms to identity; biases to zero.

        With a seed, values are drawn on the CPU so the same seed gives the same model on any device.
        """
        gen = None if seed is None else torch.Generator().manual_seed(seed)

        def normal_(p: Tensor, std: float) -> None:
            if gen is None:
                p.normal_(0.0, std)
            else:
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))

        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal_(module.weight, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal_(module.weight, std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm, HeadNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for layer in self.layers:
            normal_(layer.attention.wo.weight, resid_std)
            normal_(layer.feed_forward.w2.weight, resid_std)
            if layer.attention.expert is not None:
                normal_(layer.attention.expert["wo"].weight, resid_std)
                normal_(layer.feed_forward.expert["w2"].weight, resid_std)

    @torch.no_grad()
    def copy_to_experts(self) -> None:
        """Every expert projection := the projection it shadows (the start of growing a model by experts:
        the grown model then computes exactly what the base did, on every token)."""
        for layer in self.layers:
            for module in (layer.attention, layer.feed_forward):
                for name, expert in module.expert.items():
                    expert.load_state_dict(getattr(module, name).state_dict())
        self.copy_to_expert_head()

    @torch.no_grad()
    def copy_to_expert_head(self) -> None:
        """The expert norm and head := the model's (no-op without ModelConfig.expert_head)."""
        if self.expert_output is not None:
            self.expert_norm.load_state_dict(self.norm.state_dict())
            self.expert_output.weight.copy_(self.output_weight)

    def allocate_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A KVCache on the model's device and in its dtype, sized to the request."""
        w = self.tok_embeddings.weight
        return KVCache.allocate(self.config, batch_size, max_length, device=w.device, dtype=w.dtype)

    def _mask_and_positions(self, input_ids: Tensor, positions: Tensor | None, document_ids: Tensor | None,
                            kv_cache: KVCache | None, cache_positions: Tensor | None,
                            key_mask: Tensor | None, kv_length: int | None = None) -> tuple[Tensor | None, Tensor]:
        """Boolean attention mask [B|1, 1, T, S] (None = plain causal) and RoPE positions [B, T]."""
        B, T = input_ids.shape
        device = input_ids.device
        mask = None
        if kv_cache is not None:
            if cache_positions is None:
                raise ValueError("cache_positions is required with kv_cache")
            if document_ids is not None:
                raise ValueError("document_ids is not supported with kv_cache")
            if cache_positions.shape not in ((T,), (B, T)):
                raise ValueError(f"cache_positions must have shape [{T}] (or [{B}, {T}] for rows writing at "
                                 f"their own slots), got {tuple(cache_positions.shape)}")
            slots = torch.arange(kv_length or kv_cache.max_length, device=device)
            per_row = cache_positions if cache_positions.dim() == 2 else cache_positions[None]  # [B|1, T]
            is_self = slots == per_row[..., None]  # [B|1, T, S]
            mask = slots <= per_row[..., None]
            if positions is None:
                positions = per_row.expand(B, T)
        else:
            if cache_positions is not None:
                raise ValueError("cache_positions given without kv_cache")
            idx = torch.arange(T, device=device)
            is_self = idx == idx[:, None]
            causal = idx <= idx[:, None]
            if document_ids is not None:
                if document_ids.shape != (B, T):
                    raise ValueError(f"document_ids must have shape {(B, T)}, got {tuple(document_ids.shape)}")
                document_ids = document_ids.to(device)
                mask = document_mask(document_ids)
                if positions is None:
                    positions = document_positions(document_ids)
            if positions is None:
                positions = idx.expand(B, T)
        if key_mask is not None:
            S = kv_cache.max_length if kv_cache is not None else T
            if key_mask.shape != (B, S):
                raise ValueError(f"key_mask must have shape {(B, S)}, got {tuple(key_mask.shape)}")
            if kv_cache is not None and kv_length is not None:
                key_mask = key_mask[:, :kv_length]
            base = mask if mask is not None else causal[None]
            # Always keep a query's own slot: a padding query that sees no key would produce NaN
            # (softmax over nothing), and NaN values leak through masked attention in later layers.
            mask = (base & key_mask.to(device=device, dtype=torch.bool)[:, None, :]) | is_self
        if positions.dim() == 1:
            positions = positions.expand(B, T)
        if positions.shape != (B, T):
            raise ValueError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
        return (None if mask is None else mask[:, None]), positions.to(device)

    def forward(self, input_ids: Tensor, *, positions: Tensor | None = None, document_ids: Tensor | None = None,
                kv_cache: KVCache | None = None, cache_positions: Tensor | None = None,
                key_mask: Tensor | None = None, kv_length: int | None = None,
                return_hidden: bool = False) -> Tensor:
        """Logits [B, T, vocab] (or final normed hidden states [B, T, hidden] with return_hidden: their logits
        are `project(hidden, routed(input_ids))`).

        - plain: causal attention, positions 0..T-1;
        - packed: ``document_ids`` [B, T] restricts attention to equal ids; positions restart per document;
        - cached: ``kv_cache`` + ``cache_positions`` [T] (slots written, shared by all rows); queries read
          slots <= their own that ``key_mask`` [B, S] marks valid; ``positions`` [B, T] defaults to
          cache_positions (pass per-row positions for left-padded batches). ``cache_positions`` [B, T]
          writes each row at its own slots (rows of different lengths: continuous batching; T > 1:
          a window of speculative drafts after each row's token).
        ``key_mask`` without a cache is [B, T] (padding keys in a plain forward).
        ``kv_length`` (cached only): attend to the first kv_length slots, which must hold every slot
        written so far; a decode loop passes the filled length to skip the empty tail of the cache.
        """
        if kv_length is not None and kv_cache is not None and cache_positions is not None:
            if not 0 < kv_length <= kv_cache.max_length:
                raise ValueError(f"kv_length must be in 1..{kv_cache.max_length}, got {kv_length}")
        if cache_positions is not None:
            cache_positions = cache_positions.to(device=input_ids.device, dtype=torch.long)
        mask, positions = self._mask_and_positions(input_ids, positions, document_ids, kv_cache,
                                                   cache_positions, key_mask, kv_length)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        route = self._routes(input_ids, kv_cache, cache_positions)
        h = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, kv_cache, i, cache_positions, kv_length, route)
        if self.expert_output is None:
            route = None  # past the blocks, the experts' tokens share the norm and head
        h = _split(self.norm, self.expert_norm, h, route)
        if return_hidden:
            return h
        return self._head(h, route)
