"""Sequence layouts: Documents <-> token ids, with loss masks.

Image layouts
-------------
* ``unirep`` (Lumina-mGPT / tokenloom): ``image_begin, size(h), size(w), [w codes, end_of_line] * h,
  image_end``. Sizes count `vocab.size_unit` code rows/columns (Lumina: 2, tokenloom: 1), so any
  resolution is self-describing.
* ``flat`` (Chameleon / Anole): ``image_begin, h*w codes, image_end`` on a fixed grid (32x32).

Video (both layouts, where the vocabulary has video tokens): ``video_begin, size(F)``, then each of
the F frames as an image span of the layout (all of one size), then ``video_end``. The frame count
is the size token whose index is F (it counts frames, not size units).

Speech (both image layouts, where the vocabulary has speech codes): ``speech_begin``, the codes of an
[L, T] `SpeechPart` (L codebook levels, T frames), ``speech_end``, in one of two speech layouts:

* ``blocks`` (MIO, the default): all T content codes (level 0), then all T codes of level 1, ...,
  then level L-1. A content-only utterance (L = 1; how MIO feeds inputs) is just its content block.
* ``interleaved``: frame by frame, the L codes of each frame in level order.

Each level has its own ids, so the levels (and the block boundaries) read off the ids themselves.

Chat layout
-----------
``[bos]``, then per turn: the role token (when the turn has a role and the vocabulary has that
role token), the turn's parts, then ``turn_end`` when the turn has a role. A roleless turn
(pretraining style, e.g. caption then image) is just its parts. ``add_eos`` (default: when no
``generation_role``) appends eos; ``generation_role`` appends that role's token (if the
vocabulary has one) as the prompt for generation and no eos.

Loss mask: if the document has an assistant turn, True exactly on the assistant turns' parts and
their turn_end (never on role tokens, other turns, bos or eos); otherwise True on every token but
bos.

Decoding is tolerant and total: any sequence of ints gives a Document or a `DecodeError`.
Recoverable damage (a truncated image, a stray code or end_of_line in text, a row of the wrong
length, a missing size token, ...) keeps what can be recovered and warns with `DecodeWarning`
naming the position; ``strict=True`` raises `DecodeError` instead. bos, pad and uncond are
skipped; decoding stops at eos. Vocabularies without role tokens (Chameleon) cannot say who
speaks, so once a turn_end has been seen the turns are given alternating roles user, assistant,
user, ...; a system turn encoded with such a vocabulary therefore decodes as a user turn.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .document import MAX_FRAMES, MAX_SPEECH_FRAMES, Document, ImagePart, Part, SpeechPart, TextPart, Turn, VideoPart
from .text_tokenizer import TextTokenizer
from .vocab import CHAT_ROLES, KIND_CODE, KIND_SIZE, KIND_SPEECH, KIND_TEXT, Vocabulary, VocabularyError

SPEECH_LAYOUTS = ("blocks", "interleaved")


class DecodeError(ValueError):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"position {position}: {message}")
        self.position = position


class DecodeWarning(UserWarning):
    pass


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(f"{len(self.ids)} ids but {len(self.loss_mask)} loss-mask entries")

    def __len__(self) -> int:
        return len(self.ids)


def resolution_prompt(prompt: str, width: int, height: int) -> str:
    """Lumina-mGPT's image-generation instruction (width x height in pixels)."""
    return f"Generate an image of {width}x{height} according to the following prompt:\n{prompt}"


@dataclass
class _Reporter:
    strict: bool
    count: int = 0

    def __call__(self, position: int, message: str) -> None:
        if self.strict:
            raise DecodeError(message, position)
        self.count += 1
        warnings.warn(f"position {position}: {message}", DecodeWarning, stacklevel=4)


@dataclass
class _OpenTurn:
    role: str | None
    parts: list[Part] = field(default_factory=list)


class Format:
    name: str = ""

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer, *, speech_layout: str = "blocks") -> None:
        if speech_layout not in SPEECH_LAYOUTS:
            raise ValueError(f"unknown speech layout {speech_layout!r}; expected one of {SPEECH_LAYOUTS}")
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self.speech_layout = speech_layout
        self._kinds: list[int] = vocab.kinds.tolist()
        self._id_to_code: list[int] = vocab.ids_to_codes(np.arange(vocab.size)).tolist()
        level, code = vocab.ids_to_speech(np.arange(vocab.size))
        self._speech_level: list[int] = level.tolist()
        self._speech_code: list[int] = code.tolist()
        self._roles_by_id = {i: r for r, i in vocab.specials.items()}
        self._chat_role_ids = {r: vocab.role_id(r) for r in CHAT_ROLES if vocab.role_id(r) is not None}
        # Ids that no tokenizer entry names (e.g. a vocabulary padded past the tokenizer)
        # would decode to nothing; knowing them lets decode warn instead.
        known = np.zeros(vocab.size, dtype=bool)
        ids = np.fromiter(text_tokenizer.get_vocab().values(), dtype=np.int64)
        known[ids[ids < vocab.size]] = True
        self._known_text: list[bool] = known.tolist()

    # -- images (per layout) ---------------------------------------------------

    def image_ids(self, codes: np.ndarray) -> list[int]:
        raise NotImplementedError

    def image_length(self, height: int, width: int) -> int:
        raise NotImplementedError

    def _parse_image(self, seq: list[int], start: int, report: _Reporter) -> tuple[ImagePart | None, int]:
        """Parse an image whose image_begin is at `start`; return it (or None) and the next position."""
        raise NotImplementedError

    # -- videos (both layouts) -------------------------------------------------

    def check_video(self, frames: int) -> None:
        """ValueError unless this vocabulary can write a video of `frames` frames."""
        v = self.vocab
        if not v.has_video:
            raise ValueError("the vocabulary has no video tokens (video_begin, video_end); "
                             "a model gains them with `tokenloom add-modality` and learns them by training on videos")
        most = v.max_video_frames
        if not 1 <= frames <= most:
            raise ValueError(f"a video has 1 to {most} frames here, got {frames}")

    def video_ids(self, codes: np.ndarray) -> list[int]:
        codes = np.asarray(codes)
        if codes.ndim != 3 or 0 in codes.shape:
            raise ValueError(f"video codes must be a non-empty [frames, height, width] stack, got shape {codes.shape}")
        self.check_video(len(codes))
        v = self.vocab
        ids = [v.video_begin, v.size_token(len(codes))]
        for frame in codes:
            ids += self.image_ids(frame)
        return ids + [v.video_end]

    def video_length(self, frames: int, height: int, width: int) -> int:
        """Tokens of one video, its begin and end included."""
        return frames * self.image_length(height, width) + 3

    def _parse_video(self, seq: list[int], start: int, report: _Reporter) -> tuple[VideoPart | None, int]:
        """Parse a video whose video_begin is at `start`; return it (or None) and the next position."""
        v = self.vocab
        pos = start + 1
        count = None
        if pos < len(seq) and self._kinds[self._check_id(seq, pos)] == KIND_SIZE:
            count = v.size_of_token(seq[pos])
            pos += 1
        elif pos < len(seq):
            report(pos, f"video at {start} lacks its frame-count token")
        frames: list[ImagePart] = []
        closed = False
        while pos < len(seq):
            t = self._check_id(seq, pos)
            if t == v.video_end:
                pos, closed = pos + 1, True
                break
            if t != v.image_begin:
                report(pos, f"video at {start} not closed by video_end (found id {t})")
                break
            frame, pos = self._parse_image(seq, pos, report)
            if frame is None:
                continue
            if frames and frame.codes.shape != frames[0].codes.shape:
                report(pos, f"frame of {frame.height}x{frame.width} codes in video at {start} "
                            f"(frames {frames[0].height}x{frames[0].width}) dropped")
                continue
            frames.append(frame)
        if not closed and pos >= len(seq):
            report(pos, "sequence ends inside a video (truncated)")
        if count is not None and len(frames) != count:
            report(pos, f"video at {start} has {len(frames)} frames, its count token says {count}")
        if not frames:
            report(start, "video with no complete frame dropped")
            return None, pos
        return VideoPart(np.stack([f.codes for f in frames[:MAX_FRAMES]])), pos

    # -- speech (both image layouts) -------------------------------------------

    def check_speech(self, levels: int = 1, frames: int = 1) -> None:
        """ValueError unless this vocabulary can write an utterance of `levels` x `frames` codes."""
        v = self.vocab
        if not v.has_speech:
            raise ValueError("the vocabulary has no speech tokens (speech_begin, speech_end, speech codes); a model "
                             "gains them with `tokenloom add-modality --modality speech` and learns them by training")
        if not 1 <= levels <= v.speech_codebooks:
            raise ValueError(f"an utterance has 1 to {v.speech_codebooks} codebook levels here, got {levels}")
        if not 1 <= frames <= MAX_SPEECH_FRAMES:
            raise ValueError(f"an utterance has 1 to {MAX_SPEECH_FRAMES} code frames, got {frames}")

    def speech_ids(self, codes: np.ndarray) -> list[int]:
        codes = np.asarray(codes)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or 0 in codes.shape:
            raise ValueError(f"speech codes must be a non-empty [levels, frames] array, got shape {codes.shape}")
        self.check_speech(*codes.shape)
        v = self.vocab
        body = v.speech_codes_to_ids(codes)  # [levels, frames]
        if self.speech_layout == "interleaved":
            body = body.T
        return [v.speech_begin, *body.ravel().tolist(), v.speech_end]

    def speech_length(self, levels: int, frames: int) -> int:
        """Tokens of one utterance, its begin and end included."""
        return levels * frames + 2

    def _parse_speech(self, seq: list[int], start: int, report: _Reporter) -> tuple[SpeechPart | None, int]:
        """Parse an utterance whose speech_begin is at `start`; return it (or None) and the next position."""
        v = self.vocab
        pos = start + 1
        levels: list[int] = []
        codes: list[int] = []
        closed = False
        while pos < len(seq):
            t = self._check_id(seq, pos)
            if self._kinds[t] != KIND_SPEECH:
                if t == v.speech_end:
                    pos, closed = pos + 1, True
                else:
                    report(pos, f"speech at {start} not closed by speech_end (found id {t})")
                break
            levels.append(self._speech_level[t])
            codes.append(self._speech_code[t])
            pos += 1
        if not closed and pos >= len(seq):
            report(pos, "sequence ends inside speech (truncated)")
        rows = (self._speech_blocks if self.speech_layout == "blocks" else self._speech_frames)(
            levels, codes, start, report)
        if not rows or not rows[0]:
            report(start, "speech with no complete frame dropped")
            return None, pos
        return SpeechPart(np.array(rows, dtype=np.int64)[:, :MAX_SPEECH_FRAMES]), pos

    @staticmethod
    def _speech_blocks(levels: list[int], codes: list[int], start: int, report: _Reporter) -> list[list[int]]:
        """Rows of a blocks-layout body: runs of one level, in level order 0, 1, ..., all of the content
        block's length. The first run out of order or of another length ends the utterance (what came
        before it is kept)."""
        rows: list[list[int]] = []
        i = 0
        while i < len(levels):
            j = i
            while j < len(levels) and levels[j] == levels[i]:
                j += 1
            if levels[i] != len(rows):
                report(start, f"speech at {start}: a block of level {levels[i]} where level {len(rows)} belongs; "
                              f"the rest dropped")
                break
            if rows and j - i != len(rows[0]):
                report(start, f"speech at {start}: level {levels[i]} has {j - i} codes, the content block "
                              f"{len(rows[0])}; it and the rest dropped")
                break
            rows.append(codes[i:j])
            i = j
        return rows

    @staticmethod
    def _speech_frames(levels: list[int], codes: list[int], start: int, report: _Reporter) -> list[list[int]]:
        """Rows of an interleaved body: frames of levels 0..L-1, L set by the first frame. A frame out of
        that pattern ends the utterance; an incomplete last frame is dropped."""
        width = 1
        while width < len(levels) and levels[width] == width:
            width += 1
        frames: list[list[int]] = []
        for i in range(0, len(levels), width):
            if len(levels) - i < width:
                report(start, f"speech at {start}: incomplete last frame of {len(levels) - i} codes dropped")
                break
            if levels[i:i + width] != list(range(width)):
                report(start, f"speech at {start}: frame {len(frames)} is not levels 0..{width - 1} in order; "
                              f"it and the rest dropped")
                break
            frames.append(codes[i:i + width])
        return [list(row) for row in zip(*frames)] if frames else []

    # -- encoding --------------------------------------------------------------

    def _part_ids(self, part: Part) -> list[int]:
        if isinstance(part, TextPart):
            return self.text_tokenizer.encode(part.text)
        if isinstance(part, VideoPart):
            return self.video_ids(part.codes)
        if isinstance(part, SpeechPart):
            return self.speech_ids(part.codes)
        return self.image_ids(part.codes)

    def _require(self, role: str) -> int:
        i = self.vocab.role_id(role)
        if i is None:
            raise ValueError(f"the vocabulary has no {role} token")
        return i

    def encode(
        self,
        doc: Document,
        *,
        add_bos: bool = True,
        add_eos: bool | None = None,
        generation_role: str | None = None,
    ) -> Encoded:
        if generation_role is not None and generation_role not in CHAT_ROLES:
            raise ValueError(f"generation_role must be one of {CHAT_ROLES}, got {generation_role!r}")
        if add_eos is None:
            add_eos = generation_role is None
        elif add_eos and generation_role is not None:
            raise ValueError("a generation prompt ends with the role token, not eos")
        chat = any(t.role == "assistant" for t in doc.turns)
        ids: list[int] = []
        mask: list[bool] = []

        def emit(tokens: Sequence[int], train: bool) -> None:
            ids.extend(tokens)
            mask.extend([train] * len(tokens))

        if add_bos:
            emit([self._require("bos")], False)
        for turn in doc.turns:
            train = turn.role == "assistant" if chat else True
            if turn.role is not None and turn.role in self._chat_role_ids:
                emit([self._chat_role_ids[turn.role]], not chat)
            for part in turn.parts:
                emit(self._part_ids(part), train)
            if turn.role is not None:
                emit([self._require("turn_end")], train)
        if generation_role is not None and generation_role in self._chat_role_ids:
            emit([self._chat_role_ids[generation_role]], not chat)
        if add_eos:
            emit([self._require("eos")], not chat)
        return Encoded(ids, mask)

    # -- decoding --------------------------------------------------------------

    @staticmethod
    def _as_int_list(ids: Any) -> list[int]:
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise DecodeError(f"expected a sequence of ints, got {type(ids).__name__}", 0)
        out = []
        for pos, x in enumerate(ids):
            if isinstance(x, bool):
                raise DecodeError(f"id {x!r} is not an int", pos)
            try:
                out.append(operator.index(x))
            except TypeError:
                raise DecodeError(f"id {x!r} is not an int", pos) from None
        return out

    def _check_id(self, seq: list[int], pos: int) -> int:
        t = seq[pos]
        if not 0 <= t < self.vocab.size:
            raise DecodeError(f"id {t} is outside the vocabulary (size {self.vocab.size})", pos)
        return t

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, strict: bool = False) -> Document:
        seq = self._as_int_list(ids)
        report = _Reporter(strict)
        v = self.vocab
        skip = {i for i in (v.bos, v.pad, v.uncond) if i is not None}
        has_role_tokens = bool(self._chat_role_ids)
        turns: list[_OpenTurn] = []
        cur = _OpenTurn(None)
        text: list[int] = []
        saw_turn_end = False

        def flush_text() -> None:
            if text:
                try:
                    s = self.text_tokenizer.decode(text)
                except Exception as e:  # the tokenizer's own errors must not escape
                    raise DecodeError(f"text tokenizer failed on ids {text[:8]}: {e}", pos) from None
                if s:
                    if cur.parts and isinstance(cur.parts[-1], TextPart):
                        cur.parts[-1] = TextPart(cur.parts[-1].text + s)
                    else:
                        cur.parts.append(TextPart(s))
                text.clear()

        pos, n = 0, len(seq)
        while pos < n:
            t = self._check_id(seq, pos)
            kind = self._kinds[t]
            if kind == KIND_TEXT:
                if self._known_text[t]:
                    text.append(t)
                else:
                    report(pos, f"id {t} is not known to the text tokenizer; skipped")
                pos += 1
                continue
            if kind == KIND_CODE:
                report(pos, f"stray image code id {t} outside an image; skipped")
                pos += 1
                continue
            if kind == KIND_SIZE:
                report(pos, f"stray size token id {t} outside an image; skipped")
                pos += 1
                continue
            if kind == KIND_SPEECH:
                report(pos, f"stray speech code id {t} outside speech; skipped")
                pos += 1
                continue
            role = self._roles_by_id[t]
            if role == "eos":
                break
            if t in skip:
                pos += 1
                continue
            if role in ("image_begin", "video_begin", "speech_begin"):
                flush_text()
                parse = {"image_begin": self._parse_image, "video_begin": self._parse_video,
                         "speech_begin": self._parse_speech}[role]
                part, pos = parse(seq, pos, report)
                if part is not None:
                    cur.parts.append(part)
                continue
            if role in CHAT_ROLES:
                flush_text()
                if cur.role is not None:
                    report(pos, f"{cur.role} turn not closed by turn_end before role token id {t}")
                if cur.role is not None or cur.parts:
                    turns.append(cur)
                cur = _OpenTurn(role)
            elif role == "turn_end":
                flush_text()
                if cur.role is None and has_role_tokens:
                    report(pos, f"turn_end id {t} closes a turn without a role token")
                turns.append(cur)
                cur = _OpenTurn(None)
                saw_turn_end = True
            else:  # image_end, end_of_line, video_end, speech_end
                where = {"video_end": "a video", "speech_end": "speech"}.get(role, "an image")
                report(pos, f"stray {role} id {t} outside {where}; skipped")
            pos += 1
        flush_text()
        if cur.role is not None or cur.parts:
            turns.append(cur)

        if saw_turn_end and not has_role_tokens:
            for k, turn in enumerate(turns):
                turn.role = "user" if k % 2 == 0 else "assistant"
        return Document([Turn(t.role, t.parts) for t in turns])

    # Shared by both layouts: collect an image body up to image_end.
    def _scan_body(
        self, seq: list[int], pos: int, report: _Reporter, allow_eol: bool
    ) -> tuple[list[tuple[list[int], int]], list[int], int, int, bool]:
        """Return (rows ended by end_of_line with their start positions, trailing codes,
        start of trailing codes, next position, terminated by image_end)."""
        v = self.vocab
        rows: list[tuple[list[int], int]] = []
        row: list[int] = []
        row_start = pos
        n = len(seq)
        while pos < n:
            t = self._check_id(seq, pos)
            kind = self._kinds[t]
            if kind == KIND_CODE:
                if not row:
                    row_start = pos
                row.append(self._id_to_code[t])
            elif t == v.image_end:
                return rows, row, row_start, pos + 1, True
            elif allow_eol and t == v.end_of_line:
                rows.append((row, row_start if row else pos))
                row = []
            elif kind == KIND_SIZE or t == v.end_of_line:
                what = "size token" if kind == KIND_SIZE else "end_of_line"
                report(pos, f"stray {what} id {t} inside an image; skipped")
            else:
                report(pos, f"image not closed by image_end (found id {t})")
                return rows, row, row_start, pos, False
            pos += 1
        report(pos, "sequence ends inside an image (truncated)")
        return rows, row, row_start, pos, False


class UniRepFormat(Format):
    """Lumina-mGPT layout: sizes up front, one end_of_line after every row."""

    name = "unirep"

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer, **kwargs: Any) -> None:
        if vocab.end_of_line is None or vocab.max_grid_size == 0:
            raise VocabularyError("the unirep layout needs end_of_line and size tokens in the vocabulary")
        super().__init__(vocab, text_tokenizer, **kwargs)

    def _units(self, extent: int, what: str) -> int:
        unit = self.vocab.size_unit
        if extent % unit:
            raise ValueError(f"image {what} {extent} is not a multiple of the size unit {unit}")
        return extent // unit

    def image_ids(self, codes: np.ndarray) -> list[int]:
        v = self.vocab
        codes = np.asarray(codes)
        if codes.ndim != 2 or 0 in codes.shape:
            raise ValueError(f"image codes must be a non-empty 2-D grid, got shape {codes.shape}")
        h, w = codes.shape
        head = [v.image_begin, v.size_token(self._units(h, "height")), v.size_token(self._units(w, "width"))]
        body = np.empty((h, w + 1), dtype=np.int64)
        body[:, :w] = v.codes_to_ids(codes)
        body[:, w] = v.end_of_line
        return head + body.ravel().tolist() + [v.image_end]

    def image_length(self, height: int, width: int) -> int:
        return height * (width + 1) + 4

    def _parse_image(self, seq: list[int], start: int, report: _Reporter) -> tuple[ImagePart | None, int]:
        v = self.vocab
        pos = start + 1
        sizes: list[int] = []
        while pos < len(seq) and len(sizes) < 2 and self._kinds[self._check_id(seq, pos)] == KIND_SIZE:
            sizes.append(v.size_of_token(seq[pos]) * v.size_unit)  # type: ignore[operator]
            pos += 1
        if len(sizes) < 2 and pos < len(seq):
            report(pos, f"image at {start} lacks its {('height', 'width')[len(sizes)]} size token")
        rows, tail, tail_start, pos, closed = self._scan_body(seq, pos, report, allow_eol=True)

        height = sizes[0] if sizes else None
        width = sizes[1] if len(sizes) == 2 else None
        if width is None:
            lengths = [len(r) for r, _ in rows if r] or ([len(tail)] if tail else [])
            width = max(lengths, key=lengths.count) if lengths else None  # most common; ties: first
        if tail:
            if closed and len(tail) == width:
                report(tail_start, f"last row of image at {start} lacks end_of_line")
                rows.append((tail, tail_start))
            else:
                report(tail_start, f"incomplete row of {len(tail)} codes in image at {start} dropped")
        good = []
        for row, row_start in rows:
            if len(row) == width:
                good.append(row)
            else:
                report(row_start, f"row of {len(row)} codes in image at {start} (width {width}) dropped")
        if height is not None and len(good) != height:
            report(pos, f"image at {start} has {len(good)} rows, its size token says {height}")
            good = good[:height]
        if not good:
            report(start, "image with no complete row dropped")
            return None, pos
        return ImagePart(np.array(good, dtype=np.int64)), pos


class FlatFormat(Format):
    """Chameleon / Anole layout: a fixed grid of codes between image_begin and image_end."""

    name = "flat"

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer, grid: tuple[int, int] = (32, 32),
                 **kwargs: Any) -> None:
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (height, width) with positive sides, got {grid}")
        super().__init__(vocab, text_tokenizer, **kwargs)
        self.grid = (int(grid[0]), int(grid[1]))

    def image_ids(self, codes: np.ndarray) -> list[int]:
        codes = np.asarray(codes)
        if codes.shape != self.grid:
            raise ValueError(f"the flat layout needs {self.grid[0]}x{self.grid[1]} images, got shape {codes.shape}")
        v = self.vocab
        return [v.image_begin, *v.codes_to_ids(codes).ravel().tolist(), v.image_end]

    def image_length(self, height: int, width: int) -> int:
        return height * width + 2

    def _parse_image(self, seq: list[int], start: int, report: _Reporter) -> tuple[ImagePart | None, int]:
        rows, tail, _, pos, _ = self._scan_body(seq, start + 1, report, allow_eol=False)
        assert not rows
        h, w = self.grid
        if len(tail) != h * w:
            report(pos, f"image at {start} has {len(tail)} codes, the grid needs {h * w}")
        tail = tail[: h * w]
        full = len(tail) // w
        if full == 0:
            report(start, "image with no complete row dropped")
            return None, pos
        return ImagePart(np.array(tail[: full * w], dtype=np.int64).reshape(full, w)), pos


FORMATS: dict[str, type[Format]] = {UniRepFormat.name: UniRepFormat, FlatFormat.name: FlatFormat}


def get_format(name: str, vocab: Vocabulary, text_tokenizer: TextTokenizer, **kwargs: Any) -> Format:
    try:
        cls = FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {sorted(FORMATS)}") from None
    return cls(vocab, text_tokenizer, **kwargs)
