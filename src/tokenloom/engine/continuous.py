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
from dataclasses import dataclass, field

import torch

from .events import Event
from .grammar import (AHEAD_CODE, AHEAD_END, AHEAD_EOL, AHEAD_NONE, CODES, END, FLAGS, MODALITY_IMAGE,
                      MODALITY_TEXT, Grammar)
from .request import GenerationRequest, RequestOutput, fresh_seed
from .sampling import apply_repetition_penalty, default_speech_sampling, probabilities, sample
from .speculative import accepted_lengths, draw, next_distribution, next_window

COND, UNCOND, IMAGE_ONLY = 0, 1, 2


@dataclass
class _Running:
    """A request in the batch: its id and everything that samples for it."""

    rid: int
    request: GenerationRequest
    generator: torch.Generator
    output: RequestOutput
    feed: list[int] = field(default_factory=list)  # tokens its rows take in the next forward
    drafts: list[int] = field(default_factory=list)  # speculative codes after its token in the last forward
    proposals: torch.Tensor | None = None  # [len(drafts), V]: what each draft was drawn from


def request_rows(request) -> list[tuple[int, list[int]]]:
    """(kind, prompt ids) of a request's rows. Guidance acts inside image spans (and video frames)
    and utterances only, so a text-only request gets no guidance rows whatever its scales say."""
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
        # the position a guidance row restarts from at each image or video, and the slots it sees.
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
        self._drafted = False  # the last forward fed speculative drafts
        codes = engine.tables.code_ids
        self._code_ids = codes.tolist()
        self._speech_default = default_speech_sampling(engine.vocab.speech_codebook_size)
        self._uniform_codes = engine.tables.code_mask.float() / len(self._code_ids)

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
            for old, fresh in zip(self._cache.tensors, cache.tensors):
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
        for big, small in zip(self._cache.tensors, tmp.tensors):
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
        logits = logits[:, None]  # [rows, tokens fed, V]: a new row has fed one (the prompt's last)
        if self._logits is not None:
            logits = torch.cat([self._logits, logits.expand(-1, self._logits.shape[1], -1)])
        self._logits = logits

        for rid, r in new:
            seed = fresh_seed() if r.seed is None else r.seed
            output = RequestOutput(rid, e, seed, r.decode_images, r.speech_levels or e.tables.speech_levels,
                                   r.speech_chunk_frames)
            self._running.append(_Running(rid, r, torch.Generator(device=dev).manual_seed(seed), output))
        reqs = [r for _, r in new]
        grammar = Grammar(e.tables, [r.mode for r in reqs], [r.image_size for r in reqs],
                          [r.max_new_tokens for r in reqs], dev, [r.video_frames for r in reqs],
                          speech_levels=[r.speech_levels for r in reqs], speech_frames=[r.speech_frames for r in reqs],
                          max_speech_frames=[r.max_speech_frames for r in reqs], modalities=[r.modalities for r in reqs])
        self._grammar = grammar if self._grammar is None else self._grammar.concat(grammar)
        self._seen = torch.cat([self._seen, torch.zeros((len(new), e.vocab.size), dtype=torch.bool, device=dev)])
        self._rebuild()

    def _rebuild(self) -> None:
        """Sampling settings and guidance rows for the current membership."""
        requests = [run.request for run in self._running]
        self._params = ParamTable(requests, self._device, self._speech_default)
        self._guide = Guidance(self._owner.tolist(), self._kind.tolist(), requests, self._device)

    def _decode(self) -> list[Event]:
        e, dev = self.engine, self._device
        running = self._running
        b = len(running)
        grammar, logits = self._grammar, self._logits
        state = grammar.state
        cond = self._guide.combine(logits[:, 0].float(), grammar)
        cond = cond.masked_fill(~grammar.allowed(), float("-inf"))
        # Inside an image or a video (its frames, and the tokens between them) the image settings apply,
        # inside an utterance the speech settings. The repetition penalty acts on text tokens only (a
        # span's rows may emit none).
        modality = grammar.modality()
        text_state = modality == MODALITY_TEXT
        params = self._params
        cond = apply_repetition_penalty(cond, self._seen & text_state[:, None],
                                        params.pick("repetition_penalty", modality))
        # A request verifying drafts draws in _verify instead (its generator is not used here).
        verifying = [i for i, run in enumerate(running) if run.drafts]
        tokens = sample(cond, params.pick("temperature", modality), params.pick("top_k", modality),
                        params.pick("top_p", modality),
                        [None if run.drafts else run.generator for run in running])
        emitted = [[t] for t in tokens.tolist()]
        accepted = torch.zeros(b, dtype=torch.long, device=dev)
        carry: dict[int, torch.Tensor] = {}
        kinds = None
        if verifying:
            kinds = self._verify(verifying, logits, emitted, accepted, carry)
            tokens = torch.tensor([x[0] for x in emitted], device=dev)
        self._seen[torch.arange(b, device=dev), tokens] |= text_state & self._text_mask[tokens]
        flags = grammar.advance(tokens)

        events: list[Event] = []
        host = {k: v.tolist() for k, v in flags.items()}
        tok_list, state_list = tokens.tolist(), state.tolist()
        h_list, w_list = grammar.h.tolist(), grammar.w.tolist()
        for i, run in enumerate(running):
            if host["active"][i]:
                row_flags = {k: host[k][i] for k in host}
                events += run.output.feed(tok_list[i], state_list[i], row_flags, (h_list[i], w_list[i]))
        if verifying:
            events += self._feed_accepted(verifying, emitted, kinds, accepted)
        self._next_windows(emitted, carry)
        finished = [i for i, done in enumerate(grammar.done().tolist()) if done]

        # Rows go on from their request's last token (guidance rows follow their request); a request's
        # accepted drafts are already in its rows' cache, so its next slot moves past them. A guidance
        # row restarts where an image, a video or an utterance begins (a video's frames see the frames
        # before them) and sees that span's tokens only.
        row_tokens = torch.tensor([x[-1] for x in emitted], device=dev)[self._owner]
        restart = flags["opened"][self._owner] & (self._kind != COND)
        in_span = flags["in_span"][self._owner]
        if verifying:
            self._length = self._length + accepted[self._owner]
            self._next_pos = self._next_pos + accepted[self._owner]
        if finished:
            keep = self._remove(finished)
            row_tokens, restart, in_span = row_tokens[keep], restart[keep], in_span[keep]
        n = self.running_rows
        if n:
            feeds = [run.feed for run in self._running]
            width = max(len(f) for f in feeds)
            slot = self._length
            self._ensure_cache(n, int(slot.max()) + width)
            mask = self._key_mask_full[:n]
            rows = torch.arange(n, device=dev)
            if bool(restart.any()):
                # A new image or video: a guidance row forgets everything after its own context.
                after = torch.arange(mask.shape[1], device=dev)[None] >= self._aux_len[:, None]
                mask &= ~(restart[:, None] & after)
                self._next_pos = torch.where(restart, self._aux_start, self._next_pos)
            kv_length = int(slot.max()) + width
            if width == 1 and not self._drafted:
                mask[rows, slot] = True  # every query sees its own slot during this forward
                ids, offsets = row_tokens[:, None], torch.zeros(1, dtype=torch.long, device=dev)
            else:
                # Speculative rows feed their token and drafts; the others pad. Slots from a row's next
                # one on hold nothing valid: rejected drafts of the last step are forgotten here.
                offsets = torch.arange(width, device=dev)
                mask &= torch.arange(mask.shape[1], device=dev)[None] < slot[:, None]
                owner = self._owner.tolist()
                lens = torch.tensor([len(feeds[o]) for o in owner], device=dev)
                ids = torch.tensor([feeds[o] + [e.tables.idle] * (width - len(feeds[o])) for o in owner],
                                   dtype=torch.long, device=dev)
                mask.scatter_(1, slot[:, None] + offsets, offsets[None] < lens[:, None])
            self._drafted = width > 1
            self._logits = e.forward(ids, positions=self._next_pos[:, None] + offsets, kv_cache=self._cache.rows(n),
                                     cache_positions=slot[:, None] + offsets, key_mask=mask,
                                     kv_length=kv_length)[:, :, :e.vocab.size]
            visible = (self._kind == COND) | in_span
            mask[rows, slot] = visible
            self._length = self._length + 1
            self._next_pos = self._next_pos + visible.long()
        else:
            self._logits = None
        with self._lock:
            cancelled = set(self._cancelled)
        return [ev for ev in events if ev.row not in cancelled]

    # -- speculative decoding (engine.speculative) ---------------------------------------------
    def _verify(self, verifying: list[int], logits: torch.Tensor, emitted: list[list[int]],
                accepted: torch.Tensor, carry: dict[int, torch.Tensor]) -> torch.Tensor:
        """Accept or reject the drafts of the requests `verifying`: emitted[i] becomes request i's
        accepted drafts and the code drawn after them, accepted[i] their number, carry[i] the
        distributions of the window past its first rejection. Returns the kinds [S, K+1] of the
        positions verified."""
        dev = self._device
        runs = [self._running[i] for i in verifying]
        idx = torch.tensor(verifying, device=dev)
        n = torch.tensor([len(run.drafts) for run in runs], device=dev)
        k = int(n.max())
        kinds, progress = self._grammar.lookahead(k + 1)
        guided = self._guide.mix(logits[:, :k + 1].float(), kinds <= AHEAD_EOL, progress)[idx]
        kinds = kinds[idx]
        guided = guided.masked_fill(~self._ahead_allowed(kinds), float("-inf"))
        s, v = guided.shape[0], guided.shape[-1]
        # Drafts are image codes only (a window never runs inside an utterance): the image settings.
        image = [col[idx].repeat_interleave(k + 1) for col in
                 (self._params.table[a][MODALITY_IMAGE] for a in ("temperature", "top_k", "top_p"))]
        p = probabilities(guided.view(-1, v), *image).view(s, k + 1, v)
        drafts = torch.zeros((s, k), dtype=torch.long, device=dev)
        q = torch.zeros((s, k, v), device=dev)
        u = torch.ones((s, k), device=dev)
        for j, run in enumerate(runs):
            m = len(run.drafts)
            drafts[j, :m] = torch.tensor(run.drafts, device=dev)
            q[j, :m] = run.proposals
            u[j, :m] = torch.rand(m, generator=run.generator, device=dev)
        a = accepted_lengths(p, drafts, q, n, u)
        after = next_distribution(p, q, a, n)
        for j, (i, run) in enumerate(zip(verifying, runs)):
            aj, m = int(a[j]), len(run.drafts)
            emitted[i] = run.drafts[:aj] + [int(draw(after[j:j + 1], run.generator))]
            accepted[i] = aj
            if aj < m:
                carry[i] = p[j, aj + 1:m + 1]
        return kinds

    def _ahead_allowed(self, kinds: torch.Tensor) -> torch.Tensor:
        """[..., V]: what the grammar allows at positions of these kinds (free codes past the image too,
        so that padding positions never have nothing)."""
        t = self.engine.tables
        allowed = ((kinds == AHEAD_CODE) | (kinds == AHEAD_NONE))[..., None] & t.code_mask
        if t.end_of_line is not None:
            allowed[..., t.end_of_line] |= kinds == AHEAD_EOL
        allowed[..., t.image_end] |= kinds == AHEAD_END
        return allowed

    def _feed_accepted(self, verifying: list[int], emitted: list[list[int]], kinds: torch.Tensor,
                       accepted: torch.Tensor) -> list[Event]:
        """Events of the tokens after each verifying request's first (those the grammar took in one
        `skip`): codes, end-of-lines and the image (or frame) end of its fixed walk."""
        t = self.engine.tables
        hw = list(zip(self._grammar.h.tolist(), self._grammar.w.tolist()))
        # A request's first token was a code or end-of-line (drafts never reach past the image end), so
        # its accepted drafts are the next tokens of the walk; requests not verifying accepted none.
        self._grammar.skip(accepted)
        events: list[Event] = []
        kind_rows = kinds.tolist()
        for j, i in enumerate(verifying):
            run = self._running[i]
            for m, token in enumerate(emitted[i][1:], start=1):
                kind = kind_rows[j][m]
                h, w = hw[i]
                row_done = kind == AHEAD_EOL if t.layout == "unirep" else (
                    kind == AHEAD_CODE and (len(run.output.codes) + 1) % w == 0)
                ended = kind == AHEAD_END
                row_flags = {**dict.fromkeys(FLAGS, False), "active": True, "row_done": row_done,
                             "ended": ended, "in_span": True}
                events += run.output.feed(token, END if ended else CODES, row_flags, (h, w))
        return events

    def _next_windows(self, emitted: list[list[int]], carry: dict[int, torch.Tensor]) -> None:
        """Each request's tokens for the next forward: its last token, then, for a speculative request
        drawing codes, a window of drafts up to the image (or frame) end (at most its
        speculative_window)."""
        t = self.engine.tables
        windows = [run.request.speculative_window if run.request.speculative else 0 for run in self._running]
        room = max(windows)
        lead = torch.zeros(len(windows), dtype=torch.long)
        eol = None
        if room:
            kinds, _ = self._grammar.lookahead(room)
            eol = (kinds == AHEAD_EOL).tolist()
            lead = (kinds <= AHEAD_EOL).long().cumprod(-1).sum(-1).cpu()
        for i, run in enumerate(self._running):
            last = emitted[i][-1]
            k = min(windows[i], int(lead[i]))
            if k == 0:
                run.feed, run.drafts, run.proposals = [last], [], None
                continue
            codes = [self._code_ids[c] for c in run.output.codes]
            frames = run.output.frames
            prior = [self._code_ids[c] for c in frames[-1].codes.ravel().tolist()] if frames else None
            run.drafts, run.proposals = next_window(carry.get(i), eol[i][:k], codes, int(self._grammar.w[i]),
                                                    run.request.speculative_init, self._uniform_codes, t.code_ids,
                                                    t.end_of_line, run.generator, prior)
            run.feed = [last] + run.drafts

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
            for t in self._cache.tensors:
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
    """Per-request sampling settings as tensors, picked per step by modality (grammar.MODALITY_*)."""

    FLOATS = ("temperature", "top_p", "repetition_penalty")

    def __init__(self, requests, device, speech_default=None):
        def params(r, modality):
            p = getattr(r, modality)
            return speech_default if p is None and modality == "speech" else p

        def col(attr, modality, default):
            values = [getattr(params(r, modality), attr) for r in requests]
            dtype = torch.float32 if attr in self.FLOATS else torch.long
            return torch.tensor([default if v is None else v for v in values], dtype=dtype, device=device)

        # [3, requests] per setting: rows text, image, speech (the MODALITY_* order).
        self.table = {attr: torch.stack([col(attr, m, default) for m in ("text", "image", "speech")])
                      for attr, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0),
                                            ("repetition_penalty", 1.0))}

    def pick(self, attr: str, modality: torch.Tensor) -> torch.Tensor:
        """[requests]: each request's setting for the modality [requests] it samples now."""
        return self.table[attr].gather(0, modality[None])[0]


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
        """[rows, V] logits -> [requests, V]: each request's own, guided inside its image's codes and its
        utterance's."""
        if not self.any:
            return logits[self.cond]
        return self.mix(logits, grammar.in_codes(), grammar.image_progress(), grammar.in_speech())

    def mix(self, logits: torch.Tensor, in_codes: torch.Tensor, progress: torch.Tensor,
            in_speech: torch.Tensor | None = None) -> torch.Tensor:
        """[rows, ..., V] logits -> [requests, ..., V], guided where in_codes [requests, ...] and the
        image progress there is inside the request's guidance interval, and where in_speech (every code
        of an utterance: the interval is a share of an image's codes, and an utterance's length is not
        known while it is drawn, so it does not apply there)."""
        cond = logits[self.cond]
        if not self.any:
            return cond
        shape = (-1,) + (1,) * (in_codes.dim() - 1)

        def per_request(x):
            return x.view(shape)

        in_interval = in_codes & (progress >= per_request(self.lo)) & (progress < per_request(self.hi))
        if in_speech is not None:
            in_interval = in_interval | in_speech
        active = per_request(self.guided) & in_interval
        u = logits[self.uncond]
        m = logits[self.image_only]
        s = per_request(self.scale)[..., None]
        two_way = u + s * (cond - u)
        three = u + per_request(self.image_scale)[..., None] * (m - u) + s * (cond - m)
        guided = torch.where(per_request(self.three_way)[..., None], three, two_way)
        return torch.where(active[..., None], guided, cond)
