"""One decode loop over one static KV cache for a whole batch.

Rows of a batch may be in different states at once (one writing text while
another draws an image); the cache is kept across every switch between text and
image. Classifier-free guidance runs in the same forward: each guided request
adds rows of its own (unconditional, and for three-way guidance image-only) that
follow the request's tokens but see only the current image after their own short
context. The visibility is a key mask over cache slots, so nothing is prefilled
again when an image starts.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..document import Document, ImagePart, TextPart
from .events import Event, Finished, ImageDone, ImageRow, ImageStarted, TextDelta, TurnEnd
from .grammar import CODES, END, HEIGHT, WIDTH, Grammar, GrammarTables
from .sampling import SamplingParams, apply_repetition_penalty, check_integer, sample

MAX_GUIDANCE_SCALE = 20.0  # far past any useful scale; larger ones only amplify noise into garbage


def check_guidance_scale(value: float, what: str = "guidance_scale") -> None:
    """Guidance scales are finite and in [1, MAX_GUIDANCE_SCALE] (1 = unguided)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and 1.0 <= value <= MAX_GUIDANCE_SCALE):
        raise ValueError(f"{what} must be in [1, {MAX_GUIDANCE_SCALE:g}], got {value!r}")

COND, UNCOND, IMAGE_ONLY = 0, 1, 2


def fresh_seed() -> int:
    """A seed from the operating system's randomness, for a request that names none (63 bits: any
    torch generator takes it, and JSON keeps it exact)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class GenerationRequest:
    """One prompt to continue. `prompt_ids` already formatted (bos, turns, generation role)."""

    prompt_ids: list[int]
    mode: str = "any"
    image_size: tuple[int, int] | None = None  # (height, width) in grid units, forced when given
    max_new_tokens: int = 256
    text: SamplingParams = field(default_factory=SamplingParams)
    image: SamplingParams = field(default_factory=SamplingParams)
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # share of an image's codes that is guided
    uncond_prompt_ids: list[int] = field(default_factory=list)
    image_guidance_scale: float | None = None  # three-way guidance (editing) when set
    image_cond_prompt_ids: list[int] | None = None
    seed: int | None = None  # None: fresh randomness (the seed drawn is kept in the result)


@dataclass
class GenerationResult:
    ids: list[int]
    document: Document
    finish_reason: str  # "stop" or "length"
    seed: int | None = None  # the seed the request sampled with: given, or drawn fresh

    @property
    def image_parts(self) -> list[ImagePart]:
        return [p for p in self.document.parts if isinstance(p, ImagePart)]

    @property
    def images(self):
        return [p.pixels for p in self.image_parts]

    @property
    def text(self) -> str:
        return self.document.text


class _RowOutput:
    """Turns one request's tokens into events and document parts as they come."""

    def __init__(self, index: int, engine: "Engine", seed: int):
        self.index, self.engine, self.seed = index, engine, seed
        self.ids: list[int] = []
        self.parts: list = []
        self.text_ids: list[int] = []
        self.text_sent = ""
        self.codes: list[int] = []
        self.rows: list[list[int]] = []
        self.size: tuple[int, int] | None = None

    def _flush_text(self, final: bool) -> list[Event]:
        if not self.text_ids:
            return []
        text = self.engine.text_tokenizer.decode(self.text_ids)
        # Hold back a partial UTF-8 character until its last byte arrives.
        visible = text if final else text.rstrip("\ufffd")
        events = []
        if len(visible) > len(self.text_sent) and visible.startswith(self.text_sent):
            events.append(TextDelta(self.index, visible[len(self.text_sent):]))
            self.text_sent = visible
        if final:
            self.parts.append(TextPart(text))
            self.text_ids, self.text_sent = [], ""
        return events

    def feed(self, token: int, state_before: int, flags: dict[str, bool], grammar_hw: tuple[int, int]) -> list[Event]:
        e = self.engine
        self.ids.append(token)
        events: list[Event] = []
        if flags["started"]:
            events += self._flush_text(final=True)
            self.codes, self.rows = [], []
            if e.tables.layout == "flat":
                self.size = e.tables.flat_grid
                events.append(ImageStarted(self.index, *self.size))
        elif state_before == WIDTH:
            self.size = grammar_hw
            events.append(ImageStarted(self.index, *self.size))
        elif state_before == CODES and token != e.tables.end_of_line:
            self.codes.append(int(e.vocab.ids_to_codes(np.array([token]))[0]))
        elif state_before == END and flags["ended"]:
            h, w = self.size
            grid = np.array(self.codes, dtype=np.int64).reshape(h, w)
            pixels = e.decode_image(grid)
            self.parts.append(ImagePart(grid, pixels=pixels))
            events.append(ImageDone(self.index, grid, pixels))
        elif state_before not in (HEIGHT, WIDTH, CODES, END) and not flags["stopped"]:
            self.text_ids.append(token)
            events += self._flush_text(final=False)
        if flags["row_done"]:
            h, w = self.size
            r = len(self.rows)
            row = np.array(self.codes[r * w:(r + 1) * w], dtype=np.int64)
            self.rows.append(row.tolist())
            events.append(ImageRow(self.index, r, row))
        if flags["stopped"] or flags["truncated"]:
            events += self._flush_text(final=True)
            if flags["stopped"] and token == e.vocab.turn_end:
                events.append(TurnEnd(self.index))
            reason = "stop" if flags["stopped"] else "length"
            doc = Document.from_parts(self.parts, role="assistant")
            events.append(Finished(self.index, GenerationResult(list(self.ids), doc, reason, self.seed)))
        return events


class Engine:
    def __init__(self, model, vocab, text_tokenizer, layout: str, flat_grid=None, image_tokenizer=None,
                 compile: bool = False):
        self.model, self.vocab, self.text_tokenizer = model, vocab, text_tokenizer
        self.image_tokenizer = image_tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tables = GrammarTables.build(vocab, layout, flat_grid, self.device)
        self._forward = torch.compile(model, dynamic=True) if compile else model

    def decode_image(self, grid: np.ndarray):
        if self.image_tokenizer is None or not self.image_tokenizer.can_decode:
            return None  # the codes are still returned
        return self.image_tokenizer.decode(grid)[0]

    # -- public API ---------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], progress: bool = False) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for event in self.stream(requests, progress=progress):
            if isinstance(event, Finished):
                results[event.row] = event.result
        return results  # type: ignore[return-value]

    def stream(self, requests: list[GenerationRequest], progress: bool = False) -> Iterator[Event]:
        if not requests:
            return
        self._validate(requests)
        with torch.inference_mode():
            yield from self._run(requests, progress)

    # -- internals ------------------------------------------------------------------------------
    def _validate(self, requests: list[GenerationRequest]) -> None:
        limit = self.model.config.max_position_embeddings
        for i, r in enumerate(requests):
            if not r.prompt_ids:
                raise ValueError(f"request {i}: empty prompt")
            check_integer(r.max_new_tokens, f"request {i}: max_new_tokens", low=1)
            if r.seed is not None:
                check_integer(r.seed, f"request {i}: seed", low=0, high=2**64 - 1)
            total = len(r.prompt_ids) + r.max_new_tokens
            if total > limit:
                raise ValueError(f"request {i}: prompt of {len(r.prompt_ids)} tokens plus max_new_tokens "
                                 f"{r.max_new_tokens} exceeds the model's context of {limit} tokens")
            bad = [t for t in r.prompt_ids if not 0 <= t < self.vocab.size]
            if bad:
                raise ValueError(f"request {i}: prompt ids outside the vocabulary (size {self.vocab.size}): {bad[:5]}")
            if r.image_size is not None:
                h, w = r.image_size
                if not (1 <= h <= self.tables.max_grid and 1 <= w <= self.tables.max_grid):
                    raise ValueError(f"request {i}: image size {h}x{w} grid units is outside 1..{self.tables.max_grid}")
                if r.mode == "image" and self.tables.image_length(h, w) > r.max_new_tokens:
                    raise ValueError(f"request {i}: a {h}x{w} image needs {self.tables.image_length(h, w)} tokens, "
                                     f"more than max_new_tokens={r.max_new_tokens}")
            check_guidance_scale(r.guidance_scale, f"request {i}: guidance_scale")
            if r.image_guidance_scale is not None:
                check_guidance_scale(r.image_guidance_scale, f"request {i}: image_guidance_scale")
            if r.image_guidance_scale is not None and r.image_cond_prompt_ids is None:
                raise ValueError(f"request {i}: image_guidance_scale needs image_cond_prompt_ids")

    def _rows(self, requests):
        """Expand requests into batch rows: (request index, kind, prompt ids). Guidance acts inside
        image spans only, so a text-only request gets no guidance rows whatever its scales say."""
        rows = [(i, COND, r.prompt_ids) for i, r in enumerate(requests)]
        for i, r in enumerate(requests):
            if r.mode == "text":
                continue
            three_way = r.image_guidance_scale is not None
            if r.guidance_scale != 1.0 or three_way:
                rows.append((i, UNCOND, r.uncond_prompt_ids))
            if three_way:
                rows.append((i, IMAGE_ONLY, r.image_cond_prompt_ids))
        return rows

    def _run(self, requests: list[GenerationRequest], progress: bool) -> Iterator[Event]:
        dev = self.device
        b = len(requests)
        rows = self._rows(requests)
        n = len(rows)
        owner = torch.tensor([i for i, _, _ in rows], device=dev)
        is_aux = torch.tensor([k != COND for _, k, _ in rows], device=dev)
        prompt_len = max(len(p) for _, _, p in rows)
        max_new = max(r.max_new_tokens for r in requests)
        total = prompt_len + max_new

        # Left-pad every row to the same length; a row's positions count only its real tokens.
        ids = torch.full((n, prompt_len), self.tables.idle, dtype=torch.long)
        valid = torch.zeros((n, prompt_len), dtype=torch.bool)
        for j, (_, _, p) in enumerate(rows):
            if p:
                ids[j, prompt_len - len(p):] = torch.tensor(p)
                valid[j, prompt_len - len(p):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        next_pos = valid.long().sum(-1)
        aux_prompt_len = next_pos.clone()
        key_mask = torch.zeros((n, total), dtype=torch.bool, device=dev)
        key_mask[:, :prompt_len] = valid

        cache = self.model.allocate_cache(n, total)
        vocab_size = self.vocab.size  # a model may have padding rows past the vocabulary: never sampled
        logits = self._forward(ids, positions=positions, kv_cache=cache,
                               cache_positions=torch.arange(prompt_len, device=dev), key_mask=key_mask,
                               kv_length=prompt_len)[:, -1, :vocab_size]

        grammar = Grammar(self.tables, [r.mode for r in requests], [r.image_size for r in requests],
                          [r.max_new_tokens for r in requests], dev)
        params = _ParamTable(requests, dev)
        seeds = [fresh_seed() if r.seed is None else r.seed for r in requests]
        generators = [torch.Generator(device=dev).manual_seed(seed) for seed in seeds]
        outputs = [_RowOutput(i, self, seed) for i, seed in enumerate(seeds)]
        seen = torch.zeros((b, self.vocab.size), dtype=torch.bool, device=dev)
        text_mask = self.vocab.text_mask.to(dev)
        guide = _Guidance(rows, requests, dev)

        steps = range(max_new)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="generating", unit="tok")
        for step in steps:
            state = grammar.state
            cond = guide.combine(logits.float(), grammar)
            allowed = grammar.allowed()
            cond = cond.masked_fill(~allowed, float("-inf"))
            image_state = (state >= HEIGHT) & (state <= END)
            cond = apply_repetition_penalty(cond, seen & ~image_state[:, None], params.pick("repetition_penalty", image_state))
            tokens = sample(cond, params.pick("temperature", image_state), params.pick("top_k", image_state),
                            params.pick("top_p", image_state), generators)
            seen[torch.arange(b, device=dev), tokens] |= ~image_state & text_mask[tokens]
            flags = grammar.advance(tokens)

            # One transfer to the host per step, for the events.
            host = {k: v.tolist() for k, v in flags.items()}
            tok_list, state_list = tokens.tolist(), state.tolist()
            h_list, w_list = grammar.h.tolist(), grammar.w.tolist()
            for i in range(b):
                if not host["active"][i]:
                    continue
                row_flags = {k: host[k][i] for k in host}
                yield from outputs[i].feed(tok_list[i], state_list[i], row_flags, (h_list[i], w_list[i]))
            if bool(grammar.done().all()) or step == max_new - 1:
                break

            # Feed the sampled tokens: guidance rows follow their request's token.
            slot = prompt_len + step
            row_tokens = tokens[owner]
            key_mask[:, slot] = True  # every query sees its own slot during this forward
            restart = flags["started"][owner] & is_aux
            if bool(restart.any()):
                # A new image: the guidance row forgets everything after its own context.
                key_mask[:, prompt_len:slot] &= ~restart[:, None]
                next_pos = torch.where(restart, aux_prompt_len, next_pos)
            logits = self._forward(row_tokens[:, None], positions=next_pos[:, None], kv_cache=cache,
                                   cache_positions=torch.tensor([slot], device=dev), key_mask=key_mask,
                                   kv_length=slot + 1)[:, -1, :vocab_size]
            visible = ~is_aux | flags["in_image"][owner]
            key_mask[:, slot] = visible
            next_pos = next_pos + visible.long()


class _ParamTable:
    """Per-request sampling settings as tensors, picked per step by modality."""

    def __init__(self, requests, device):
        def col(attr, modality, default):
            vals = []
            for r in requests:
                v = getattr(getattr(r, modality), attr)
                vals.append(default if v is None else v)
            return torch.tensor(vals, device=device)

        self.table = {}
        for attr, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("repetition_penalty", 1.0)):
            self.table[attr] = (col(attr, "text", default), col(attr, "image", default))

    def pick(self, attr: str, image_state: torch.Tensor) -> torch.Tensor:
        text, image = self.table[attr]
        return torch.where(image_state, image, text)


class _Guidance:
    """Combines each guided request's rows into one set of logits while it draws codes."""

    def __init__(self, rows, requests, device):
        b = len(requests)
        self.b = b
        self.uncond = torch.full((b,), -1, dtype=torch.long)
        self.image_only = torch.full((b,), -1, dtype=torch.long)
        for j, (i, kind, _) in enumerate(rows):
            if kind == UNCOND:
                self.uncond[i] = j
            elif kind == IMAGE_ONLY:
                self.image_only[i] = j
        self.guided = (self.uncond >= 0).to(device)
        self.three_way = (self.image_only >= 0).to(device)
        self.uncond = self.uncond.clamp(min=0).to(device)
        self.image_only = self.image_only.clamp(min=0).to(device)
        self.scale = torch.tensor([r.guidance_scale for r in requests], device=device)
        self.image_scale = torch.tensor([r.image_guidance_scale or 1.0 for r in requests], device=device)
        self.lo = torch.tensor([r.guidance_interval[0] for r in requests], device=device)
        self.hi = torch.tensor([r.guidance_interval[1] for r in requests], device=device)
        self.any = bool(self.guided.any())

    def combine(self, logits: torch.Tensor, grammar: Grammar) -> torch.Tensor:
        cond = logits[: self.b]
        if not self.any:
            return cond
        progress = grammar.image_progress()
        active = self.guided & grammar.in_codes() & (progress >= self.lo) & (progress < self.hi)
        u = logits[self.uncond]
        m = logits[self.image_only]
        s = self.scale[:, None]
        two_way = u + s * (cond - u)
        three = u + self.image_scale[:, None] * (m - u) + s * (cond - m)
        guided = torch.where(self.three_way[:, None], three, two_way)
        return torch.where(active[:, None], guided, cond)
