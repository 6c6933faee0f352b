"""The per-row grammar that keeps every generated image, video and utterance well formed.

State lives in tensors, one entry per row, and the allowed-token mask of a step
is built from a few precomputed vocabulary masks with vectorised operations: no
Python loop over rows or over the vocabulary.

    TEXT --image_begin--> HEIGHT --size--> WIDTH --size--> CODES --...--> END --image_end--> TEXT
    (flat layout: TEXT --image_begin--> CODES, the grid fixed)
    TEXT --video_begin--> COUNT --size(F)--> FRAME --image_begin--> (a frame: HEIGHT ... END as above)
        END --image_end--> FRAME                  while frames of the video remain
        END --image_end--> VIDEO_END --video_end--> TEXT   after the last frame
    TEXT --eos/turn_end--> DONE

In `unirep`, each row of codes is closed by end-of-line (forced when the row is
full) and image end is forced after the last row. Image begin is allowed only
while a whole image still fits in the row's remaining token budget, and the
size tokens offered are only those whose image fits.

A video is F frames of one size (`formats`: the frame count is the size token of
index F). Video begin is allowed only while a whole minimal video fits; the count
(forced when the request fixes it) only while its F minimal frames fit; the first
frame's size (forced when the request fixes it) only while F frames of that size
fit; every later frame's size is forced to the first's. So a video, once begun,
always closes within the budget. Inside a frame the grammar is an image's: the
same states, guidance and speculative walk.

Speech (where the vocabulary has speech codes): an utterance of L' levels (the request's
`speech_levels`, 1..L; 1 = content only) and T frames, in the format's speech layout:

    TEXT --speech_begin--> SPEECH --codes--> SPEECH_END --speech_end--> TEXT
    (free T: SPEECH --speech_end--> TEXT where the model may end it)

* blocks (MIO): in the content block the model emits level-0 codes and, once there is one, may end
  the block with the first level-1 code (speech_end when L' = 1); that fixes T. Every later block is
  exactly T codes of its level (the level mask forced), then speech_end is forced.
* interleaved: each frame's L' codes in level order (forced); at a frame boundary the model may
  begin a frame (a level-0 code) or, once there is a frame, end (speech_end).

With `speech_frames` T is forced (the content block, or the frames, end at T exactly); otherwise
it is bounded by the request's `max_speech_frames` and the budget. Speech begin is allowed only
while a minimal utterance fits (L' * max(T_fixed, 1) + 2 tokens), a content code only while the rest
of the utterance it implies fits (blocks: (L'-1)(T+1) codes and the end; interleaved: the frame and
the end), so an utterance, once begun, always closes within the budget. Inside one only speech codes
of the right level and speech_end where it belongs are allowed. Speech is sampled with the
request's speech settings, guided (guidance rows restart at speech_begin), never speculated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..document import MAX_SPEECH_FRAMES
from ..vocab import Vocabulary

TEXT, HEIGHT, WIDTH, CODES, END, COUNT, FRAME, VIDEO_END, DONE, SPEECH, SPEECH_END = range(11)
# States strictly between TEXT and DONE are inside a visual span (an image, or a video and its frames);
# SPEECH and SPEECH_END (after DONE, so that stays true) inside an utterance.
MODES = ("text", "image", "video", "speech", "any")
OUTPUT_MODALITIES = ("text", "image", "video", "speech")  # what a mode-"any" answer may be limited to
# The modality a row samples with (`Grammar.modality`): its request's text, image or speech settings.
MODALITY_TEXT, MODALITY_IMAGE, MODALITY_SPEECH = range(3)
# What the grammar forces at a position ahead inside an image (`Grammar.lookahead`): a free code, an
# end-of-line, the image end, or nothing known (past the image, or not in one).
AHEAD_CODE, AHEAD_EOL, AHEAD_END, AHEAD_NONE = range(4)
UNLIMITED = 1 << 30
# Per-row flags `Grammar.advance` returns (the events and the batcher read them).
FLAGS = ("active", "started", "row_done", "ended", "video_started", "video_ended", "speech_started",
         "speech_ended", "stopped", "truncated", "opened", "in_span")


@dataclass
class GrammarTables:
    """Vocabulary facts the grammar needs, as tensors on the engine's device."""

    layout: str
    flat_grid: tuple[int, int] | None
    vocab_size: int
    text_mask: torch.Tensor  # [V] text tokens plus the stop tokens
    code_mask: torch.Tensor  # [V]
    size_ids: torch.Tensor  # [G] id of the size token for n units, n = 1..G
    size_value: torch.Tensor  # [V] code rows/columns a size token means (n * unit), 0 otherwise
    size_unit: int  # code rows/columns per size unit (Lumina-mGPT: 2)
    stop_ids: torch.Tensor  # [S]
    image_begin: int
    image_end: int
    end_of_line: int | None
    final_stop: int  # what a row in "image" or "video" mode emits after its span
    idle: int  # fed to finished rows
    code_ids: torch.Tensor  # [C] token id of each code
    video_begin: int | None = None  # None: this vocabulary cannot write videos (no row starts one)
    video_end: int | None = None
    max_frames: int = 0  # the largest frame count a size token can say (0 without video tokens)
    speech_layout: str = "blocks"  # tokenloom.formats.SPEECH_LAYOUTS
    speech_begin: int | None = None  # None: this vocabulary cannot speak (no row starts an utterance)
    speech_end: int | None = None
    speech_levels: int = 0  # L, the codebook levels of the vocabulary's speech codes
    speech_level_masks: torch.Tensor | None = None  # [L, V]: the ids of each level
    speech_level_of: torch.Tensor | None = None  # [V]: the level of a speech code, -1 elsewhere

    @classmethod
    def build(cls, vocab: Vocabulary, layout: str, flat_grid: tuple[int, int] | None, device,
              speech_layout: str = "blocks") -> "GrammarTables":
        if layout not in ("unirep", "flat"):
            raise ValueError(f"unknown layout {layout!r}")
        if speech_layout not in ("blocks", "interleaved"):
            raise ValueError(f"unknown speech layout {speech_layout!r}")
        if layout == "unirep" and (vocab.end_of_line is None or vocab.max_grid_size == 0):
            raise ValueError("the unirep layout needs end-of-line and size tokens in the vocabulary")
        if layout == "flat" and flat_grid is None:
            raise ValueError("the flat layout needs a fixed grid (height, width)")
        stops = [t for t in (vocab.turn_end, vocab.eos) if t is not None]
        if not stops:
            raise ValueError("the vocabulary has neither a turn-end nor an eos token to stop on")
        text_mask = vocab.text_mask.clone()
        text_mask[stops] = True
        size_ids = torch.tensor([vocab.size_token(n) for n in range(1, vocab.max_grid_size + 1)], dtype=torch.long)
        unit = vocab.size_unit
        size_value = torch.zeros(vocab.size, dtype=torch.long)
        if len(size_ids):
            size_value[size_ids] = torch.arange(1, len(size_ids) + 1) * unit
        idle = vocab.pad if vocab.pad is not None else stops[-1]
        # A video's frame count is a size token: without size tokens there is no way to say it.
        video = vocab.max_video_frames > 0
        speech = {}
        if vocab.has_speech:
            levels = vocab.speech_codebooks
            level_of = vocab.ids_to_speech(torch.arange(vocab.size))[0]
            speech = dict(speech_begin=vocab.speech_begin, speech_end=vocab.speech_end, speech_levels=levels,
                          speech_level_masks=torch.stack([vocab.speech_level_mask(k) for k in range(levels)]
                                                         ).to(device),
                          speech_level_of=level_of.to(device=device, dtype=torch.long))
        return cls(layout, tuple(flat_grid) if flat_grid else None, vocab.size, text_mask.to(device),
                   vocab.code_mask.to(device), size_ids.to(device), size_value.to(device),
                   unit, torch.tensor(stops, dtype=torch.long, device=device), vocab.image_begin, vocab.image_end,
                   vocab.end_of_line, stops[0], idle, torch.as_tensor(vocab.code_ids, dtype=torch.long, device=device),
                   vocab.video_begin if video else None, vocab.video_end if video else None,
                   vocab.max_video_frames, speech_layout, **speech)

    @property
    def has_video(self) -> bool:
        return self.video_begin is not None

    @property
    def has_speech(self) -> bool:
        return self.speech_begin is not None

    @property
    def max_grid(self) -> int:
        """Largest image side in code rows/columns."""
        return int(self.size_ids.numel()) * self.size_unit if self.layout == "unirep" else max(self.flat_grid)

    def image_length(self, height: int, width: int) -> int:
        """Tokens of one image, begin and end included."""
        if self.layout == "flat":
            return height * width + 2
        return height * (width + 1) + 4

    def video_length(self, frames: int, height: int, width: int) -> int:
        """Tokens of one video: begin, the frame count, the frames, end."""
        return frames * self.image_length(height, width) + 3

    @staticmethod
    def speech_length(levels, frames):
        """Tokens of one utterance: begin, levels x frames codes, end (both speech layouts)."""
        return levels * frames + 2


class Grammar:
    """Grammar state for B rows. `mode`: "text" (no images, videos or speech), "image" (exactly one
    image and nothing else), "video" (exactly one video and nothing else), "speech" (exactly one
    utterance and nothing else) or "any" (interleaved). `image_size`: (height, width) in code
    rows/columns to force (of an image or of a video's frames), or None to let the model choose
    (unirep only). `video_frames`: the frame count to force, or None to let the model choose.
    `speech_levels`: codebook levels of each utterance (None: all the vocabulary's);
    `speech_frames`: its frame count to force (None: the model ends it); `max_speech_frames`: the
    most frames of an utterance whose count the model chooses (None: document.MAX_SPEECH_FRAMES);
    `modalities`: per row, the modalities a mode-"any" row may write (None: every one; text always may)."""

    def __init__(self, tables: GrammarTables, modes: list[str], image_sizes: list[tuple[int, int] | None],
                 budgets: list[int], device, video_frames: list[int | None] | None = None, *,
                 speech_levels: list[int | None] | None = None, speech_frames: list[int | None] | None = None,
                 max_speech_frames: list[int | None] | None = None,
                 modalities: list[tuple[str, ...] | None] | None = None):
        self.t = tables
        b = len(modes)
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown generation mode(s) {bad}; expected one of {MODES}")
        if "video" in modes and not tables.has_video:
            raise ValueError("mode 'video' needs a vocabulary with video tokens (video_begin, video_end) "
                             "and size tokens to count frames")
        if "speech" in modes and not tables.has_speech:
            raise ValueError("mode 'speech' needs a vocabulary with speech tokens (speech_begin, speech_end, "
                             "speech codes)")
        video_frames = video_frames or [None] * b
        speech_levels = speech_levels or [None] * b
        speech_frames = speech_frames or [None] * b
        max_speech_frames = max_speech_frames or [None] * b
        bad = [n for n in speech_levels if n is not None and not 1 <= n <= tables.speech_levels]
        if bad:
            raise ValueError(f"speech levels {bad} outside 1..{tables.speech_levels}")

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        if tables.layout == "flat":
            for size in image_sizes:
                if size is not None and tuple(size) != tables.flat_grid:
                    raise ValueError(f"the flat layout draws {tables.flat_grid} grids only, not {tuple(size)}")
            image_sizes = [tables.flat_grid] * b
        fixed = [s if s is not None else (0, 0) for s in image_sizes]
        self.fixed_h = tensor([s[0] for s in fixed])
        self.fixed_w = tensor([s[1] for s in fixed])
        self.fixed_f = tensor([f or 0 for f in video_frames])
        self.state = torch.full((b,), TEXT, dtype=torch.long, device=device)
        self.h = self.fixed_h.clone()
        self.w = self.fixed_w.clone()
        self.row = torch.zeros(b, dtype=torch.long, device=device)
        self.col = torch.zeros(b, dtype=torch.long, device=device)
        self.remaining = tensor(budgets)
        self.images_done = torch.zeros(b, dtype=torch.long, device=device)  # images outside videos
        self.videos_done = torch.zeros(b, dtype=torch.long, device=device)
        self.in_video = torch.zeros(b, dtype=torch.bool, device=device)
        self.frames = torch.zeros(b, dtype=torch.long, device=device)  # the current video's frame count
        self.frame = torch.zeros(b, dtype=torch.long, device=device)  # frames of it already closed
        self.allow_text = torch.tensor([m in ("text", "any") for m in modes], device=device)
        modalities = modalities or [None] * b

        def most(name: str, present: bool = True):  # a row's cap on spans of one modality
            return tensor([0 if not present else 1 if m == name else
                           UNLIMITED if m == "any" and (allowed is None or name in allowed) else 0
                           for m, allowed in zip(modes, modalities)])

        self.max_images = most("image")
        self.max_videos = most("video", tables.has_video)
        self.max_speeches = most("speech", tables.has_speech)
        self.speeches_done = torch.zeros(b, dtype=torch.long, device=device)
        # Per row: the utterance's levels L' and its forced frame count (0: free), the most frames it may
        # have; inside one, the level of the next code (blocks: the current block's; interleaved: the
        # next in its frame), codes in the current block (blocks), and frames of content so far, T.
        self.sp_levels = tensor([n or tables.speech_levels for n in speech_levels])
        self.sp_fixed = tensor([n or 0 for n in speech_frames])
        self.sp_cap = tensor([n if n else min(m or MAX_SPEECH_FRAMES, MAX_SPEECH_FRAMES)
                              for n, m in zip(speech_frames, max_speech_frames)])
        self.sp_level = torch.zeros(b, dtype=torch.long, device=device)
        self.sp_pos = torch.zeros(b, dtype=torch.long, device=device)
        self.sp_t = torch.zeros(b, dtype=torch.long, device=device)
        if tables.layout == "unirep":
            bad = [s for s in image_sizes if s is not None and (s[0] % tables.size_unit or s[1] % tables.size_unit)]
            if bad:
                raise ValueError(f"image sizes {bad} are not multiples of the size unit {tables.size_unit}")
        # Code rows/columns each size token stands for, in size-token order; and the frame count.
        self.counts = torch.arange(1, tables.size_ids.numel() + 1, device=device)
        self.sizes = self.counts * tables.size_unit

    ROW_STATE = ("fixed_h", "fixed_w", "fixed_f", "state", "h", "w", "row", "col", "remaining", "images_done",
                 "videos_done", "in_video", "frames", "frame", "allow_text", "max_images", "max_videos",
                 "max_speeches", "speeches_done", "sp_levels", "sp_fixed", "sp_cap", "sp_level", "sp_pos", "sp_t")

    def select(self, rows: torch.Tensor) -> "Grammar":
        """The grammar of some rows (in the given order): requests leaving a running batch."""
        out = object.__new__(Grammar)
        out.t, out.sizes, out.counts = self.t, self.sizes, self.counts
        for name in self.ROW_STATE:
            setattr(out, name, getattr(self, name)[rows])
        return out

    def concat(self, other: "Grammar") -> "Grammar":
        """This grammar's rows followed by another's: requests joining a running batch."""
        out = object.__new__(Grammar)
        out.t, out.sizes, out.counts = self.t, self.sizes, self.counts
        for name in self.ROW_STATE:
            setattr(out, name, torch.cat([getattr(self, name), getattr(other, name)]))
        return out

    # -- what may come next ---------------------------------------------------------------
    def _min_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's smallest image (or frame): its fixed size, else one size unit a side."""
        return (torch.where(self.fixed_h > 0, self.fixed_h, self.t.size_unit),
                torch.where(self.fixed_w > 0, self.fixed_w, self.t.size_unit))

    def min_image_length(self) -> torch.Tensor:
        return self.t.image_length(*self._min_grid())

    def min_video_length(self) -> torch.Tensor:
        return self.t.video_length(torch.where(self.fixed_f > 0, self.fixed_f, 1), *self._min_grid())

    def min_speech_length(self) -> torch.Tensor:
        return self.t.speech_length(self.sp_levels, torch.where(self.sp_fixed > 0, self.sp_fixed, 1))

    def allowed(self) -> torch.Tensor:
        """Bool [B, V]: the tokens each row may emit now."""
        t, s = self.t, self.state
        b = s.shape[0]
        allowed = torch.zeros(b, t.vocab_size, dtype=torch.bool, device=s.device)
        in_text = s == TEXT
        image_len = self.min_image_length()
        allowed |= (in_text & self.allow_text)[:, None] & t.text_mask[None]
        allowed[:, t.image_begin] |= (in_text & (self.images_done < self.max_images) & (self.remaining >= image_len)
                                      ) | (s == FRAME)
        size_ok = torch.zeros(b, self.counts.numel(), dtype=torch.bool, device=s.device)
        if t.has_video:
            allowed[:, t.video_begin] |= in_text & (self.videos_done < self.max_videos) & (
                self.remaining >= self.min_video_length())
            allowed[:, t.video_end] |= s == VIDEO_END
            # Frame counts: the forced one, or every count whose minimal frames (and video end) fit.
            n = self.counts[None]
            count_ok = torch.where(self.fixed_f[:, None] > 0, n == self.fixed_f[:, None],
                                   n * image_len[:, None] + 2 <= self.remaining[:, None]) & (n <= t.max_frames)
            size_ok |= (s == COUNT)[:, None] & count_ok
        in_codes = s == CODES
        if t.layout == "unirep":
            need_eol = in_codes & (self.col == self.w)
            allowed |= (in_codes & ~need_eol)[:, None] & t.code_mask[None]
            allowed[:, t.end_of_line] |= need_eol
            # Size tokens: the forced one (a video's later frames take its first frame's size), or every
            # size whose image fits the budget, with the video's later frames and its end where in one.
            later = self.in_video & (self.frame > 0)
            force_h = torch.where(later, self.h, self.fixed_h)[:, None]
            force_w = torch.where(later, self.w, self.fixed_w)[:, None]
            after = torch.where(self.in_video, self.frames - self.frame - 1, 0)[:, None]
            tail = self.in_video.long()[:, None]
            n = self.sizes[None]
            len_h = t.image_length(n, torch.where(force_w > 0, force_w, t.size_unit))
            len_w = t.image_length(self.h[:, None], n)
            remaining = self.remaining[:, None]
            h_ok = torch.where(force_h > 0, n == force_h, len_h - 1 + after * len_h + tail <= remaining)
            w_ok = torch.where(force_w > 0, n == force_w, len_w - 2 + after * len_w + tail <= remaining)
            size_ok |= ((s == HEIGHT)[:, None] & h_ok) | ((s == WIDTH)[:, None] & w_ok)
        else:
            allowed |= in_codes[:, None] & t.code_mask[None]
        allowed[:, t.size_ids] |= size_ok
        allowed[:, t.image_end] |= s == END
        if t.has_speech:
            allowed |= self._speech_allowed(in_text)
        allowed[:, t.idle] |= s == DONE
        # A row left with nothing (an "image" or "video" row after its span, or one whose span no longer
        # fits) stops.
        allowed[:, t.final_stop] |= ~allowed.any(-1)
        return allowed

    def _speech_allowed(self, in_text: torch.Tensor) -> torch.Tensor:
        """Bool [B, V]: speech_begin, speech codes and speech_end where each row may emit them."""
        t, s = self.t, self.state
        levels, frames, remaining = self.sp_levels, self.sp_t, self.remaining
        allowed = torch.zeros(s.shape[0], t.vocab_size, dtype=torch.bool, device=s.device)
        allowed[:, t.speech_begin] = in_text & (self.speeches_done < self.max_speeches) & (
            remaining >= self.min_speech_length())
        in_speech = s == SPEECH
        # Blocks: in the content block; interleaved: at a frame boundary. There the model chooses.
        choosing = in_speech & (self.sp_level == 0)
        if t.speech_layout == "blocks":
            # One more content code makes every later block one longer: (L'-1)(T+1) codes and the end.
            rest = (levels - 1) * (frames + 1) + 1
        else:
            rest = levels  # the frame's other L'-1 codes and the end
        content_ok = choosing & (frames < self.sp_cap) & (remaining - 1 >= rest)
        can_end = choosing & (frames >= 1) & ((self.sp_fixed == 0) | (frames == self.sp_fixed))
        # Inside a later block or a frame the level is forced; in the content block it is level 0.
        top = t.speech_levels - 1
        level_ok = (in_speech & ~choosing) | content_ok
        allowed |= level_ok[:, None] & t.speech_level_masks[self.sp_level.clamp(max=top)]
        if t.speech_layout == "blocks":
            # The content block ends with the first code of level 1 (speech_end when it is the only one).
            allowed |= (can_end & (levels > 1))[:, None] & t.speech_level_masks[min(1, top)][None]
            can_end = can_end & (levels == 1)
        allowed[:, t.speech_end] |= can_end | (s == SPEECH_END)
        return allowed

    def visual(self) -> torch.Tensor:
        """Rows inside an image or a video (they sample with their request's image settings)."""
        return (self.state > TEXT) & (self.state < DONE)

    def in_codes(self) -> torch.Tensor:
        return self.state == CODES

    def in_speech(self) -> torch.Tensor:
        """Rows drawing an utterance's codes (guidance mixes their logits; speech_end, where only it is
        left, needs none)."""
        return self.state == SPEECH

    def modality(self) -> torch.Tensor:
        """[B] MODALITY_*: whose sampling settings each row draws its next token with (an image's or a
        video's inside one, speech's inside an utterance, text's elsewhere; span openers are text)."""
        s = self.state
        return torch.where(self.visual(), MODALITY_IMAGE,
                           torch.where((s == SPEECH) | (s == SPEECH_END), MODALITY_SPEECH, MODALITY_TEXT))

    def image_progress(self) -> torch.Tensor:
        """Fraction of the current image's (or frame's) codes already emitted (for guidance intervals)."""
        done = self.row * self.w + self.col.clamp(max=self.w)
        return done.float() / (self.h * self.w).clamp(min=1).float()

    def lookahead(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the next n tokens of each row drawing an image (or a frame) are: kinds [B, n] (AHEAD_*)
        and the image progress [B, n] before each (as `image_progress` will say then). Inside an image
        the grammar is a fixed walk over the grid, so this needs no advancing. Past the image end
        nothing is known (AHEAD_NONE), also inside a video: the next frame begins one token at a time."""
        h, w = self.h[:, None], self.w[:, None]
        flat, row_len, area = self._walk(torch.arange(n, device=self.state.device)[None])
        if self.t.layout == "unirep":
            r, c = flat // row_len, flat % row_len
            kind = torch.where(c == w, AHEAD_EOL, AHEAD_CODE)
            done = r * w + c.clamp(max=w)
        else:
            kind = torch.full_like(flat, AHEAD_CODE)
            done = flat
        kind = torch.where(flat < area, kind, torch.where(flat == area, AHEAD_END, AHEAD_NONE))
        kind = torch.where((self.state == CODES)[:, None], kind, AHEAD_NONE)
        kind[:, 0] = torch.where(self.state == END, AHEAD_END, kind[:, 0])
        progress = torch.minimum(done, h * w).float() / (h * w).clamp(min=1).float()
        return kind, progress

    # -- advancing --------------------------------------------------------------------------
    def _after_image(self) -> torch.Tensor:
        """The state after an image end: text, or in a video the next frame or the video's end."""
        return torch.where(self.in_video, torch.where(self.frame + 1 < self.frames, FRAME, VIDEO_END), TEXT)

    def advance(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Consume one token per row; returns per-row flags (`FLAGS`) describing what happened:
        `started`/`ended` an image or a frame opened/closed, `video_started`/`video_ended` a video,
        `speech_started`/`speech_ended` an utterance, `opened` a span (image, video or utterance) begun
        from text (guidance rows restart there), `in_span` the token belongs to a span (guidance rows
        see it)."""
        t, s = self.t, self.state
        active = s != DONE
        new = s.clone()
        started = ((s == TEXT) | (s == FRAME)) & (tokens == t.image_begin)
        stopped = (s == TEXT) & torch.isin(tokens, t.stop_ids)
        video_started = torch.zeros_like(started)
        video_ended = torch.zeros_like(started)
        if t.has_video:
            video_started = (s == TEXT) & (tokens == t.video_begin)
            new = torch.where(video_started, COUNT, new)
            self.in_video = self.in_video | video_started
            self.frame = torch.where(video_started, 0, self.frame)
            got_count = s == COUNT
            # The count is the size token's index (it counts frames, not size units).
            self.frames = torch.where(got_count, t.size_value[tokens] // t.size_unit, self.frames)
            new = torch.where(got_count, FRAME, new)
            video_ended = (s == VIDEO_END) & (tokens == t.video_end)
        speech_started = torch.zeros_like(started)
        speech_ended = torch.zeros_like(started)
        if t.has_speech:
            speech_started, speech_ended, new = self._advance_speech(tokens, new)
        self.row = torch.where(started, 0, self.row)
        self.col = torch.where(started, 0, self.col)
        if t.layout == "unirep":
            new = torch.where(started, HEIGHT, new)
            got_h = s == HEIGHT
            self.h = torch.where(got_h, t.size_value[tokens], self.h)
            new = torch.where(got_h, WIDTH, new)
            got_w = s == WIDTH
            self.w = torch.where(got_w, t.size_value[tokens], self.w)
            new = torch.where(got_w, CODES, new)
            code = (s == CODES) & (tokens != t.end_of_line)
            eol = (s == CODES) & (tokens == t.end_of_line)
            self.col = torch.where(code, self.col + 1, torch.where(eol, 0, self.col))
            self.row = torch.where(eol, self.row + 1, self.row)
            row_done = eol
        else:
            new = torch.where(started, CODES, new)
            code = s == CODES
            wrap = code & (self.col + 1 == self.w)
            self.col = torch.where(code, torch.where(wrap, 0, self.col + 1), self.col)
            self.row = torch.where(wrap, self.row + 1, self.row)
            row_done = wrap
        image_full = (s == CODES) & row_done & (self.row == self.h)
        new = torch.where(image_full, END, new)
        ended = (s == END) & (tokens == t.image_end)
        new = torch.where(ended, self._after_image(), new)
        self.images_done = self.images_done + (ended & ~self.in_video).long()
        self.frame = self.frame + (ended & self.in_video).long()
        new = torch.where(video_ended, TEXT, new)
        self.in_video = self.in_video & ~video_ended
        self.videos_done = self.videos_done + video_ended.long()
        new = torch.where(stopped, DONE, new)
        self.remaining = self.remaining - active.long()
        truncated = active & (new != DONE) & (self.remaining <= 0)
        new = torch.where(truncated, DONE, new)
        self.state = torch.where(active, new, s)
        opened = (started & (s == TEXT)) | video_started | speech_started
        # A span's tokens: everything emitted from inside one (its closing tokens too) and its opening one.
        in_span = ((s > TEXT) & (s < DONE)) | (s == SPEECH) | (s == SPEECH_END) | opened
        flags = {"started": started, "row_done": row_done, "ended": ended, "video_started": video_started,
                 "video_ended": video_ended, "speech_started": speech_started, "speech_ended": speech_ended,
                 "stopped": stopped, "opened": opened, "in_span": in_span}
        return {"active": active, "truncated": truncated, **{k: v & active for k, v in flags.items()}}

    def _advance_speech(self, tokens: torch.Tensor, new: torch.Tensor):
        """The speech part of `advance`: (speech_started, speech_ended, the new states)."""
        t, s = self.t, self.state
        started = (s == TEXT) & (tokens == t.speech_begin)
        ended = ((s == SPEECH) | (s == SPEECH_END)) & (tokens == t.speech_end)
        level = t.speech_level_of[tokens]
        code = (s == SPEECH) & (level >= 0)
        frames = self.sp_t + (level == 0).long()
        complete_t = (self.sp_fixed > 0) & (frames == self.sp_fixed)
        if t.speech_layout == "blocks":
            # A code of the current block extends it; the grammar allows one other level only, the first
            # code of level 1 closing the content block, which starts a block.
            pos = torch.where(level == self.sp_level, self.sp_pos + 1, 1)
            full = (level >= 1) & (pos == frames)
            next_level = torch.where(full, level + 1, level)
            pos = torch.where(full, 0, pos)
            complete = (full & (next_level == self.sp_levels)) | ((level == 0) & complete_t & (self.sp_levels == 1))
        else:
            next_level = (level + 1) % self.sp_levels
            pos = self.sp_pos
            complete = (next_level == 0) & complete_t
        self.sp_level = torch.where(started, 0, torch.where(code, next_level, self.sp_level))
        self.sp_pos = torch.where(started, 0, torch.where(code, pos, self.sp_pos))
        self.sp_t = torch.where(started, 0, torch.where(code, frames, self.sp_t))
        new = torch.where(started, SPEECH, new)
        new = torch.where(code & complete, SPEECH_END, new)
        new = torch.where(ended, TEXT, new)
        self.speeches_done = self.speeches_done + ended.long()
        return started, ended, new

    def skip(self, n: torch.Tensor) -> None:
        """Advance rows drawing an image (or a frame) by n [B] tokens of its fixed walk (codes,
        end-of-lines, the image end) at once: the tokens a row accepted in a speculative step, all of
        which the grammar allowed. A window never passes the image end, so at most its last token is it."""
        go = n > 0
        flat, row_len, area = self._walk(n)
        at = torch.minimum(flat, area)
        closed = go & (flat > area)
        state = torch.where(flat < area, CODES, torch.where(flat == area, END, self._after_image()))
        self.state = torch.where(go, state, self.state)
        self.row = torch.where(go, at // row_len.clamp(min=1), self.row)
        self.col = torch.where(go, at % row_len.clamp(min=1), self.col)
        self.images_done = self.images_done + (closed & ~self.in_video).long()
        self.frame = self.frame + (closed & self.in_video).long()
        self.remaining = self.remaining - n

    def _walk(self, ahead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each row's image walk is `ahead` tokens from now ([B] or [1, n] offsets): the index in
        the walk, tokens a code row takes (w codes, and an end-of-line in unirep), and the walk's length
        before the image end (broadcast as `ahead` is)."""
        per_row = (slice(None),) + (None,) * (ahead.dim() - 1)
        h, w, row, col = (x[per_row] for x in (self.h, self.w, self.row, self.col))
        row_len = w + 1 if self.t.layout == "unirep" else w
        return row * row_len + col + ahead, row_len, h * row_len

    def done(self) -> torch.Tensor:
        return self.state == DONE
