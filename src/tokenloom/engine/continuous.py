"""Continuous batching: requests join a running batch between decode steps and leave it when done.

    batcher = ContinuousBatcher(engine, max_batch=16)
    rid = batcher.add(request)          # joins at the next step (or waits while the batch is full)
    while batcher.has_work():
        for event in batcher.step():    # events of every running request; event.row is its id
            ...
    batcher.cancel(rid)                 # frees its rows at the next step

One static KV cache holds every running row (a request's own row and its guidance rows); rows are
kept packed at the front, so each forward reads a view of the first n rows. Each row writes at its
own slot (rows differ in length once requests join at different steps), and a per-row key mask says
which slots it sees. A request that joins is prefilled on its own rows, then copied into the cache;
a request that finishes or is cancelled leaves at the end of the step and rows from the end move
into its places (a request's rows need not stay together: each row knows its request and kind). Sampling draws from each request's own generator, so a request's tokens do not depend on
what else shares the batch (up to float rounding of batched matmuls; exact on the CPU in float32,
which the tests check).

Thread-safety: one thread (the serving loop) owns the batcher; `add` and `cancel` are the only
calls other threads may make, and they only queue work for the next `step`.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass

import torch

from .events import Event
from .grammar import END, HEIGHT, Grammar
from .request import GenerationRequest, RequestOutput, fresh_seed
from .sampling import apply_repetition_penalty, sample

COND, UNCOND, IMAGE_ONLY = 0, 1, 2


@dataclass
class _Running:
    """A request in the batch: its id and everything that samples for it."""

    rid: int
    request: GenerationRequest
    generator: torch.Generator
    output: RequestOutput


def request_rows(request) -> list[tuple[int, list[int]]]:
    """(kind, prompt ids) of a request's rows. Guidance acts inside image spans only, so a text-only
    request gets no guidance rows whatever its scales say."""
    rows = [(COND, request.prompt_ids)]
    if request.mode != "text":
        three_way = request.image_guidance_scale is not None
        if request.guidance_scale != 1.0 or three_way:
            rows.append((UNCOND, request.uncond_prompt_ids))
        if three_way:
            rows.append((IMAGE_ONLY, request.image_cond_prompt_ids))
    return rows


class ContinuousBatcher:
    def __init__(self, engine, max_batch: int = 16, max_rows: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.max_rows = max_rows or 3 * max_batch  # a request has at most three rows
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._waiting: deque[tuple[int, object]] = deque()
        self._cancelled: set[int] = set()
        self._running: list[_Running] = []
        dev = engine.device
        self._device = dev
        self._cache = None  # KVCache of rows x length, grown on demand (at most max_rows rows)
        # Per row (packed, first n): owner (index into _running), kind, next slot, RoPE position,
        # the position a guidance row restarts from at each image, and the slots it sees.
        self._owner = torch.zeros(0, dtype=torch.long, device=dev)
        self._kind = torch.zeros(0, dtype=torch.long, device=dev)
        self._length = torch.zeros(0, dtype=torch.long, device=dev)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=dev)
        self._aux_start = torch.zeros(0, dtype=torch.long, device=dev)
        self._aux_len = torch.zeros(0, dtype=torch.long, device=dev)
        self._key_mask_full = torch.zeros((0, 0), dtype=torch.bool, device=dev)  # [max_rows, cache length]
        self._logits = None  # [n rows, V] logits for the next token of each row
        self._grammar: Grammar | None = None
        self._seen = torch.zeros((0, engine.vocab.size), dtype=torch.bool, device=dev)
        self._text_mask = engine.vocab.text_mask.to(dev)
        self._params = None
        self._guide = None

    # -- any thread ---------------------------------------------------------------------------
    def add(self, request: GenerationRequest, validated: bool = False) -> int:
        """Queue a request (checked now: a bad request raises ValueError here); returns its id."""
        if not validated:
            self.engine.validate([request])
        rows = len(request_rows(request))
        if rows > self.max_rows:
            raise ValueError(f"a request needs {rows} rows; this batcher holds {self.max_rows}")
        with self._lock:
            rid = next(self._ids)
            self._waiting.append((rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        """Drop a request, waiting or running: it emits nothing more and frees its rows next step."""
        with self._lock:
            self._cancelled.add(rid)

    # -- the owning thread --------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def running_rows(self) -> int:
        return int(self._owner.numel())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting)

    def step(self) -> list[Event]:
        """Admit waiting requests that fit, draw one token for every running request, and return the
        events; finished and cancelled requests leave the batch."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            return self._decode() if self._running else []

    # -- internals ------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            self._waiting = deque((rid, r) for rid, r in self._waiting if rid not in cancelled)
        gone = [i for i, run in enumerate(self._running) if run.rid in cancelled]
        if gone:
            self._remove(gone)

    def _admit(self) -> None:
        new = []
        rows = self.running_rows
        with self._lock:
            while self._waiting and len(self._running) + len(new) < self.max_batch:
                rid, request = self._waiting[0]
                need = len(request_rows(request))
                if rows + need > self.max_rows:
                    break
                self._waiting.popleft()
                new.append((rid, request))
                rows += need
        if new:
            self._prefill(new)

    def _ensure_cache(self, rows: int, length: int) -> None:
        """A cache of at least `rows` rows and `length` slots. It grows by doubling in both, keeping what
        it holds, so memory follows the rows and lengths in use, up to max_rows rows."""
        have_rows, have_len = (0, 0) if self._cache is None else (self._cache.batch_size, self._cache.max_length)
        if rows <= have_rows and length <= have_len:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        new_len = max(length, have_len if length <= have_len else 2 * have_len, 64)
        cache = self.engine.model.allocate_cache(new_rows, new_len)
        mask = torch.zeros((new_rows, new_len), dtype=torch.bool, device=self._device)
        if self._cache is not None:
            for old, fresh in zip(self._cache.k + self._cache.v, cache.k + cache.v):
                fresh[:have_rows, :, :have_len] = old
            mask[:have_rows, :have_len] = self._key_mask_full
        self._cache, self._key_mask_full = cache, mask

    def _prefill(self, new) -> None:
        """Run the new requests' prompts on their own rows, then move their keys and values into the
        batch's cache behind the running rows."""
        e, dev = self.engine, self._device
        rows = [(j, kind, ids) for j, (_, r) in enumerate(new) for kind, ids in request_rows(r)]
        k = len(rows)
        prompt_len = max(len(ids) for _, _, ids in rows)
        # Slots a new row may reach: the padded prompt, then one per token of the longest budget.
        self._ensure_cache(self.running_rows + k, prompt_len + max(r.max_new_tokens for _, r in new))

        ids = torch.full((k, prompt_len), e.tables.idle, dtype=torch.long)
        valid = torch.zeros((k, prompt_len), dtype=torch.bool)
        for i, (_, _, p) in enumerate(rows):
            if p:
                ids[i, prompt_len - len(p):] = torch.tensor(p)
                valid[i, prompt_len - len(p):] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        next_pos = valid.long().sum(-1)
        tmp = e.model.allocate_cache(k, prompt_len)
        logits = e.forward(ids, positions=positions, kv_cache=tmp, cache_positions=torch.arange(prompt_len, device=dev),
                           key_mask=valid, kv_length=prompt_len)[:, -1, :e.vocab.size]

        n = self.running_rows
        for big, small in zip(self._cache.k + self._cache.v, tmp.k + tmp.v):
            big[n:n + k, :, :prompt_len] = small
        self._key_mask_full[n:n + k] = False
        self._key_mask_full[n:n + k, :prompt_len] = valid

        base = len(self._running)
        owner = torch.tensor([base + j for j, _, _ in rows], device=dev)
        self._owner = torch.cat([self._owner, owner])
        self._kind = torch.cat([self._kind, torch.tensor([kind for _, kind, _ in rows], device=dev)])
        self._length = torch.cat([self._length, torch.full((k,), prompt_len, dtype=torch.long, device=dev)])
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._aux_start = torch.cat([self._aux_start, next_pos.clone()])
        self._aux_len = torch.cat([self._aux_len, torch.full((k,), prompt_len, dtype=torch.long, device=dev)])
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

        for rid, r in new:
            seed = fresh_seed() if r.seed is None else r.seed
            self._running.append(_Running(rid, r, torch.Generator(device=dev).manual_seed(seed),
                                          RequestOutput(rid, e, seed, r.decode_images)))
        grammar = Grammar(e.tables, [r.mode for _, r in new], [r.image_size for _, r in new],
                          [r.max_new_tokens for _, r in new], dev)
        self._grammar = grammar if self._grammar is None else self._grammar.concat(grammar)
        self._seen = torch.cat([self._seen, torch.zeros((len(new), e.vocab.size), dtype=torch.bool, device=dev)])
        self._rebuild()

    def _rebuild(self) -> None:
        """Sampling settings and guidance rows for the current membership."""
        requests = [run.request for run in self._running]
        self._params = ParamTable(requests, self._device)
        self._guide = Guidance(self._owner.tolist(), self._kind.tolist(), requests, self._device)

    def _decode(self) -> list[Event]:
        e, dev = self.engine, self._device
        b = len(self._running)
        grammar, logits = self._grammar, self._logits
        state = grammar.state
        cond = self._guide.combine(logits.float(), grammar)
        cond = cond.masked_fill(~grammar.allowed(), float("-inf"))
        image_state = (state >= HEIGHT) & (state <= END)
        params = self._params
        cond = apply_repetition_penalty(cond, self._seen & ~image_state[:, None],
                                        params.pick("repetition_penalty", image_state))
        tokens = sample(cond, params.pick("temperature", image_state), params.pick("top_k", image_state),
                        params.pick("top_p", image_state), [run.generator for run in self._running])
        self._seen[torch.arange(b, device=dev), tokens] |= ~image_state & self._text_mask[tokens]
        flags = grammar.advance(tokens)

        events: list[Event] = []
        host = {k: v.tolist() for k, v in flags.items()}
        tok_list, state_list = tokens.tolist(), state.tolist()
        h_list, w_list = grammar.h.tolist(), grammar.w.tolist()
        for i, run in enumerate(self._running):
            if host["active"][i]:
                row_flags = {k: host[k][i] for k in host}
                events += run.output.feed(tok_list[i], state_list[i], row_flags, (h_list[i], w_list[i]))
        finished = [i for i, done in enumerate(grammar.done().tolist()) if done]

        # Feed the sampled tokens to the rows that go on (guidance rows follow their request's token).
        row_tokens = tokens[self._owner]
        started = flags["started"][self._owner] & (self._kind != COND)
        in_image = flags["in_image"][self._owner]
        if finished:
            keep = self._remove(finished)
            row_tokens, started, in_image = row_tokens[keep], started[keep], in_image[keep]
        n = self.running_rows
        if n:
            slot = self._length
            self._ensure_cache(n, int(slot.max()) + 1)
            mask = self._key_mask_full[:n]
            rows = torch.arange(n, device=dev)
            if bool(started.any()):
                # A new image: a guidance row forgets everything after its own context.
                after = torch.arange(mask.shape[1], device=dev)[None] >= self._aux_len[:, None]
                mask &= ~(started[:, None] & after)
                self._next_pos = torch.where(started, self._aux_start, self._next_pos)
            mask[rows, slot] = True  # every query sees its own slot during this forward
            kv_length = int(slot.max()) + 1
            self._logits = e.forward(row_tokens[:, None], positions=self._next_pos[:, None],
                                     kv_cache=self._cache.rows(n), cache_positions=slot[:, None],
                                     key_mask=mask, kv_length=kv_length)[:, -1, :e.vocab.size]
            visible = (self._kind == COND) | in_image
            mask[rows, slot] = visible
            self._length = self._length + 1
            self._next_pos = self._next_pos + visible.long()
        else:
            self._logits = None
        with self._lock:
            cancelled = set(self._cancelled)
        return [ev for ev in events if ev.row not in cancelled]

    def _remove(self, gone: list[int]) -> torch.Tensor:
        """Drop requests (indices into _running) and their rows. The rows that stay fill the first
        places: each freed place below the new row count takes one of the last rows, so only those
        rows' keys and values are copied. Returns the old indices of the rows kept, in their new order."""
        dev = self._device
        gone_set = set(gone)
        keep_req = [i for i in range(len(self._running)) if i not in gone_set]
        kept = [o not in gone_set for o in self._owner.tolist()]
        m = sum(kept)
        holes = [r for r in range(m) if not kept[r]]
        movers = [r for r in range(m, len(kept)) if kept[r]]
        order = list(range(m))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            src = torch.tensor(movers, dtype=torch.long, device=dev)
            dst = torch.tensor(holes, dtype=torch.long, device=dev)
            for t in self._cache.k + self._cache.v:
                t[dst] = t[src]
            self._key_mask_full[dst] = self._key_mask_full[src]
        keep_rows = torch.tensor(order, dtype=torch.long, device=dev)
        remap = torch.full((len(self._running),), -1, dtype=torch.long, device=dev)
        remap[torch.tensor(keep_req, dtype=torch.long, device=dev)] = torch.arange(len(keep_req), device=dev)
        self._owner = remap[self._owner[keep_rows]]
        for name in ("_kind", "_length", "_next_pos", "_aux_start", "_aux_len"):
            setattr(self, name, getattr(self, name)[keep_rows])
        if self._logits is not None:
            self._logits = self._logits[keep_rows]
        keep_idx = torch.tensor(keep_req, dtype=torch.long, device=dev)
        self._running = [self._running[i] for i in keep_req]
        self._seen = self._seen[keep_idx]
        self._grammar = self._grammar.select(keep_idx) if keep_req else None
        if keep_req:
            self._rebuild()
        return keep_rows


class ParamTable:
    """Per-request sampling settings as tensors, picked per step by modality."""

    def __init__(self, requests, device):
        def col(attr, modality, default):
            values = [getattr(getattr(r, modality), attr) for r in requests]
            return torch.tensor([default if v is None else v for v in values], device=device)

        self.table = {attr: (col(attr, "text", default), col(attr, "image", default))
                      for attr, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                            ("repetition_penalty", 1.0))}

    def pick(self, attr: str, image_state: torch.Tensor) -> torch.Tensor:
        text, image = self.table[attr]
        return torch.where(image_state, image, text)


class Guidance:
    """Combines each guided request's rows into one set of logits while it draws codes."""

    def __init__(self, owners: list[int], kinds: list[int], requests, device):
        b = len(requests)
        index = {kind: torch.full((b,), -1, dtype=torch.long) for kind in (COND, UNCOND, IMAGE_ONLY)}
        for row, (owner, kind) in enumerate(zip(owners, kinds)):
            index[kind][owner] = row
        self.cond = index[COND].to(device)
        self.guided = (index[UNCOND] >= 0).to(device)
        self.three_way = (index[IMAGE_ONLY] >= 0).to(device)
        self.uncond = index[UNCOND].clamp(min=0).to(device)
        self.image_only = index[IMAGE_ONLY].clamp(min=0).to(device)
        self.scale = torch.tensor([r.guidance_scale for r in requests], device=device)
        self.image_scale = torch.tensor([r.image_guidance_scale or 1.0 for r in requests], device=device)
        self.lo = torch.tensor([r.guidance_interval[0] for r in requests], device=device)
        self.hi = torch.tensor([r.guidance_interval[1] for r in requests], device=device)
        self.any = bool(self.guided.any())

    def combine(self, logits: torch.Tensor, grammar: Grammar) -> torch.Tensor:
        """[rows, V] logits -> [requests, V]: each request's own, guided inside its image's codes."""
        cond = logits[self.cond]
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
