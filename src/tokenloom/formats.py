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

from .document import MAX_FRAMES, Document, ImagePart, Part, TextPart, Turn, VideoPart
from .text_tokenizer import TextTokenizer
from .vocab import CHAT_ROLES, KIND_CODE, KIND_SIZE, KIND_TEXT, Vocabulary, VocabularyError


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

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer) -> None:
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self._kinds: list[int] = vocab.kinds.tolist()
        self._id_to_code: list[int] = vocab.ids_to_codes(np.arange(vocab.size)).tolist()
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

    # -- encoding --------------------------------------------------------------

    def _part_ids(self, part: Part) -> list[int]:
        if isinstance(part, TextPart):
            return self.text_tokenizer.encode(part.text)
        if isinstance(part, VideoPart):
            return self.video_ids(part.codes)
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
            role = self._roles_by_id[t]
            if role == "eos":
                break
            if t in skip:
                pos += 1
                continue
            if role in ("image_begin", "video_begin"):
                flush_text()
                parse = self._parse_image if role == "image_begin" else self._parse_video
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
            else:  # image_end, end_of_line, video_end
                report(pos, f"stray {role} id {t} outside an {'video' if role == 'video_end' else 'image'}; skipped")
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

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer) -> None:
        if vocab.end_of_line is None or vocab.max_grid_size == 0:
            raise VocabularyError("the unirep layout needs end_of_line and size tokens in the vocabulary")
        super().__init__(vocab, text_tokenizer)

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

    def __init__(self, vocab: Vocabulary, text_tokenizer: TextTokenizer, grid: tuple[int, int] = (32, 32)) -> None:
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (height, width) with positive sides, got {grid}")
        super().__init__(vocab, text_tokenizer)
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
