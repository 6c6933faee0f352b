"""Per-row, per-modality sampling, vectorised over the batch.

Every row draws its own Gumbel noise from its own generator, so a row samples
the same tokens whatever else shares its batch (the seed belongs to the row).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 open_low: bool = False) -> float:
    """A finite real number within [low, high] ((low, high] with open_low), or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if open_low else value < low):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return float(value)


def check_integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool, not 2.5) within [low, high], or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return int(value)


MAX_TOP_K = 2**31 - 1  # past any vocabulary; the engine holds top-k as a tensor of int64


@dataclass(frozen=True)
class SamplingParams:
    """How one modality is sampled. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_number(self.temperature, "temperature", low=0.0)
        if self.top_k is not None:
            check_integer(self.top_k, "top_k", low=1, high=MAX_TOP_K)
        if self.top_p is not None:
            check_number(self.top_p, "top_p", low=0.0, high=1.0, open_low=True)
        check_number(self.repetition_penalty, "repetition_penalty", low=0.0, open_low=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling keys: {sorted(unknown)}")
        return cls(**d)


def default_text_sampling() -> SamplingParams:
    return SamplingParams(temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.0)


def default_image_sampling(codebook_size: int) -> SamplingParams:
    # Lumina-mGPT samples 8192-code images with top_k 2000; keep that share for other codebooks.
    return SamplingParams(temperature=1.0, top_k=max(1, round(codebook_size * 2000 / 8192)), top_p=None)


def default_speech_sampling(codebook_size: int) -> SamplingParams:
    """Inside an utterance. Codec language models sample their codes at temperature 1 from the few most
    likely (VALL-E-style TTS decodes with a top-k of tens of a 1024-code level): a sixteenth of a level's
    codes (64 of 1024). Greedy decoding of speech codes falls into loops (a held sound, silence), so it
    is no default. The grammar allows one level at a time, so top-k counts codes of that level."""
    return SamplingParams(temperature=1.0, top_k=max(1, round(codebook_size / 16)), top_p=None)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on already generated tokens. seen: bool [B, V]; penalty: [B] (1 = off)."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p, with a different k and p per row (k <= 0 and p >= 1 mean off).

    At most one sort per step (top-p only), no Python loop over rows or tokens.
    """
    vocab = logits.shape[-1]
    use_p = bool((top_p < 1.0).any())
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if not use_p:
        if bool((k == vocab).all()):
            return logits
        k_max = int(k.max())
        if bool((k == k_max).all()):
            # One k for every row (the usual case): the unordered k largest and their minimum
            # (faster than sorting them).
            kth = torch.topk(logits, k_max, dim=-1, sorted=False).values.min(-1, keepdim=True).values
        else:
            kth = torch.topk(logits, k_max, dim=-1, sorted=True).values.gather(-1, (k - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))
    # top-p needs the whole order: one sort over the vocabulary.
    sorted_logits = torch.topk(logits, vocab, dim=-1, sorted=True).values
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # Keep the smallest prefix whose mass reaches p: a token stays if the mass before it is < p.
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < top_p[:, None]
    n_keep = keep.sum(-1).clamp(min=1)
    threshold = sorted_logits.gather(-1, (n_keep - 1)[:, None])
    return logits.masked_fill(logits < threshold, float("-inf"))


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] float32: the distribution `sample` draws from (softmax of the filtered, scaled logits;
    one-hot at the argmax for temperature 0). Speculative decoding verifies drafts against it."""
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None].float()
    scaled = filter_logits(scaled, top_k, top_p)
    one_hot = torch.zeros_like(scaled).scatter_(-1, scaled.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, torch.softmax(scaled, dim=-1))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Temperature, then top-k/top-p, then Gumbel-max with one generator per row (the Hugging Face order).

    logits: [B, V] with disallowed tokens at -inf; temperature, top_k, top_p: [B]; a row with
    temperature 0 (or no generator) takes the argmax. Returns [B] token ids.
    """
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None].float()
    scaled = filter_logits(scaled, top_k, top_p)
    u = torch.full_like(scaled, 0.5)
    for i, gen in enumerate(generators):
        # A row draws every step, greedy or not, so its stream depends on nothing but itself.
        if gen is not None:
            torch.rand(scaled.shape[-1], generator=gen, out=u[i])
    noise = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))  # Gumbel, all rows at once
    no_noise = greedy | torch.tensor([g is None for g in generators], device=scaled.device)
    noise = noise.masked_fill(no_noise[:, None], 0.0)
    return torch.argmax(scaled + noise, dim=-1)
