"""The joint vocabulary: which ids are text, image codes, speech codes, special and size tokens.

A `Vocabulary` is plain data derived from a tokenizer, never hard-coded ids, so
one code path serves every model family:

* native   -- tokenloom's own tokenizers (`<|image_begin|>`, `<|size_7|>`, ...),
              codes appended after the last text id;
* expand_llm -- Liquid style: any LLM tokenizer, tokenloom's specials added to it,
              codes appended after its last id;
* chameleon -- Chameleon / Anole / Lumina-mGPT: image tokens are `IMGIMG*` entries
              already inside the 65k BPE vocabulary, scattered and shuffled.

Speech codes (residual-VQ levels of a speech codec, MIO style) are a second block of codes: one id per
(level, code) pair, level-major, so a content code and a timbre code are never the same id. Like the
video markers they are optional: a vocabulary has speech only where it has them (`has_speech`).

Id <-> code lookups are table gathers (numpy or torch), so they run on whole
batches on any device without Python loops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .document import MAX_FRAMES
from .text_tokenizer import TextTokenizer

SPECIAL_ROLES: tuple[str, ...] = (
    "bos", "eos", "pad", "image_begin", "image_end", "end_of_line",
    "turn_end", "uncond", "user", "assistant", "system", "video_begin", "video_end", "speech_begin", "speech_end",
)  # fmt: skip
# The special roles each modality beyond text and images brings. A vocabulary may lack them: the
# modality is there only where its tokens are (the shipped tokenizers of Chameleon, Anole and
# Lumina-mGPT have none; `tokenloom.modalities.add_modality` adds them).
MODALITY_ROLES: dict[str, tuple[str, ...]] = {"video": ("video_begin", "video_end"),
                                              "speech": ("speech_begin", "speech_end")}
OPTIONAL_ROLES: tuple[str, ...] = tuple(r for roles in MODALITY_ROLES.values() for r in roles)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
NATIVE_SPECIAL_TOKENS: dict[str, str] = {role: f"<|{role}|>" for role in SPECIAL_ROLES}


def native_size_token(n: int) -> str:
    """Name of tokenloom's token meaning `n` grid units."""
    return f"<|size_{n}|>"


# Chameleon names, from HF transformers ChameleonImageVocabularyMapping and
# facebookresearch/chameleon: image tokens are "IMGIMG" + code digits spelled with
# letters A..J (0..9) + one trailing character that carries no digit.
CHAMELEON_IMAGE_PREFIX = "IMGIMG"
CHAMELEON_SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "image_begin": "<racm3:break>",
    "image_end": "<eoss>",
    "turn_end": "<reserved08706>",  # Lumina-mGPT's Conversation.sep_token
}
# Lumina-mGPT (Alpha-VLLM/Lumina-mGPT, lumina_mgpt/data/item_processor.py,
# FlexARItemProcessor): new_line_token = "<reserved08799>" and
# get_n_grids_token(n) = f"<reserved{8800 + n:05d}>". A "grid" there is a 32-pixel
# patch while the VQGAN downsamples by 16, so one size unit is 2 code rows/columns.
LUMINA_END_OF_LINE = "<reserved08799>"
LUMINA_SIZE_UNIT = 2


def lumina_size_token(n: int) -> str:
    return f"<reserved{8800 + n:05d}>"  # 8800 is an offset in the token *name*, not an id


# Per-id kinds, as stored in `Vocabulary.kinds`.
KIND_TEXT, KIND_CODE, KIND_SPECIAL, KIND_SIZE, KIND_SPEECH = 0, 1, 2, 3, 4

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


class VocabularyError(ValueError):
    pass


def _pack_ids(ids: np.ndarray) -> list[int] | dict[str, int]:
    # Contiguous runs (the usual case) are stored as a range to keep configs readable.
    if len(ids) > 1 and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        return {"start": int(ids[0]), "count": int(len(ids))}
    return ids.tolist()


def _unpack_ids(data: list[int] | dict[str, int]) -> list[int]:
    if isinstance(data, dict):
        return list(range(data["start"], data["start"] + data["count"]))
    return list(data)


def _special_property(role: str) -> property:
    def get(self: Vocabulary) -> int | None:
        return self._specials.get(role)

    get.__doc__ = f"Id of the {role} token, or None where the vocabulary has none."
    return property(get)


class Vocabulary:
    def __init__(
        self,
        size: int,
        specials: dict[str, int | None],
        code_ids: Sequence[int] | np.ndarray,
        size_token_ids: Sequence[int] | np.ndarray = (),
        *,
        size_unit: int = 1,
        speech_code_ids: Sequence[int] | np.ndarray = (),
        speech_codebooks: int = 0,
    ) -> None:
        """`code_ids[c]` is the id of codebook entry c; `size_token_ids[n-1]` means n size units.

        `size_unit` is the number of code rows (or columns) one size unit stands for:
        1 for tokenloom, 2 for Lumina-mGPT whose sizes count 32-pixel patches.
        `speech_code_ids[l * N + c]` is the id of code c of speech codebook level l (N codes a level,
        `speech_codebooks` levels).
        """
        if int(size) < 1:
            raise VocabularyError(f"vocabulary size must be positive, got {size}")
        if int(size_unit) < 1:
            raise VocabularyError(f"size_unit must be >= 1, got {size_unit}")
        self._size = int(size)
        self._size_unit = int(size_unit)
        unknown = set(specials) - set(SPECIAL_ROLES)
        if unknown:
            raise VocabularyError(f"unknown special roles {sorted(unknown)}; known: {SPECIAL_ROLES}")
        self._specials = {r: int(i) for r, i in specials.items() if i is not None}
        for role in ("image_begin", "image_end"):
            if role not in self._specials:
                raise VocabularyError(f"a vocabulary needs an {role} token")
        self._code_ids = np.asarray(code_ids, dtype=np.int64).reshape(-1)
        self._size_ids = np.asarray(size_token_ids, dtype=np.int64).reshape(-1)
        if len(self._code_ids) == 0:
            raise VocabularyError("a vocabulary needs at least one image code")
        self._speech_ids = np.asarray(speech_code_ids, dtype=np.int64).reshape(-1)
        self._speech_levels = int(speech_codebooks)
        if (self._speech_levels == 0) != (len(self._speech_ids) == 0) or (
                self._speech_levels and len(self._speech_ids) % self._speech_levels):
            raise VocabularyError(f"{len(self._speech_ids)} speech code ids do not split into "
                                  f"{self._speech_levels} codebook levels of one size")

        special_ids = np.array(list(self._specials.values()), dtype=np.int64)
        everything = np.concatenate([self._code_ids, special_ids, self._size_ids, self._speech_ids])
        bad = everything[(everything < 0) | (everything >= self._size)]
        if len(bad):
            raise VocabularyError(f"ids {bad[:8].tolist()} are outside the vocabulary of size {self._size}")
        uniq, counts = np.unique(everything, return_counts=True)
        if (counts > 1).any():
            raise VocabularyError(f"ids used twice across codes/specials/size tokens/speech codes: "
                                  f"{uniq[counts > 1][:8].tolist()}")

        kinds = np.full(self._size, KIND_TEXT, dtype=np.int8)
        kinds[self._code_ids] = KIND_CODE
        kinds[special_ids] = KIND_SPECIAL
        kinds[self._size_ids] = KIND_SIZE
        kinds[self._speech_ids] = KIND_SPEECH
        self._kinds = kinds
        self._id_to_code = np.full(self._size, -1, dtype=np.int64)
        self._id_to_code[self._code_ids] = np.arange(len(self._code_ids))
        # level * N + code per speech id, -1 elsewhere: one gather gives both level and code
        self._id_to_speech = np.full(self._size, -1, dtype=np.int64)
        self._id_to_speech[self._speech_ids] = np.arange(len(self._speech_ids))
        self._size_of = {int(i): n + 1 for n, i in enumerate(self._size_ids)}
        self._torch_tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}

    # -- basic facts ---------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def codebook_size(self) -> int:
        return len(self._code_ids)

    @property
    def max_grid_size(self) -> int:
        """Largest n with a size token (0 where there are none)."""
        return len(self._size_ids)

    @property
    def size_unit(self) -> int:
        return self._size_unit

    @property
    def specials(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def code_ids(self) -> np.ndarray:
        return self._code_ids.copy()

    @property
    def size_token_ids(self) -> np.ndarray:
        return self._size_ids.copy()

    @property
    def kinds(self) -> np.ndarray:
        """int8 [size]: KIND_TEXT, KIND_CODE, KIND_SPECIAL or KIND_SIZE per id (read-only)."""
        view = self._kinds.view()
        view.flags.writeable = False
        return view

    bos = _special_property("bos")
    eos = _special_property("eos")
    pad = _special_property("pad")
    image_begin = _special_property("image_begin")
    image_end = _special_property("image_end")
    end_of_line = _special_property("end_of_line")
    turn_end = _special_property("turn_end")
    uncond = _special_property("uncond")
    video_begin = _special_property("video_begin")
    video_end = _special_property("video_end")
    speech_begin = _special_property("speech_begin")
    speech_end = _special_property("speech_end")

    @property
    def has_video(self) -> bool:
        return self.video_begin is not None and self.video_end is not None

    @property
    def has_speech(self) -> bool:
        return self.speech_begin is not None and self.speech_end is not None and self._speech_levels > 0

    @property
    def speech_codebooks(self) -> int:
        """Levels of the speech codec this vocabulary holds codes for (0 without speech)."""
        return self._speech_levels

    @property
    def speech_codebook_size(self) -> int:
        return len(self._speech_ids) // self._speech_levels if self._speech_levels else 0

    @property
    def speech_code_ids(self) -> np.ndarray:
        return self._speech_ids.copy()

    @property
    def max_video_frames(self) -> int:
        """The most frames a video may have here: the frame count is a size token, so as many as there
        are size tokens, at most MAX_FRAMES; 0 without video tokens."""
        return min(MAX_FRAMES, self.max_grid_size) if self.has_video else 0

    def role_id(self, role: str) -> int | None:
        if role not in SPECIAL_ROLES:
            raise VocabularyError(f"unknown role {role!r}; known: {SPECIAL_ROLES}")
        return self._specials.get(role)

    def span_markers(self, modalities: Sequence[str]) -> tuple[list[int], list[int]]:
        """The begin and end ids of `modalities`' spans (the spans a model's ModelConfig.experts routes)."""
        begins, ends = [], []
        for modality in modalities:
            if modality not in MODALITY_ROLES:
                raise VocabularyError(f"unknown modality {modality!r}; expected some of {sorted(MODALITY_ROLES)}")
            begin, end = (self.role_id(r) for r in MODALITY_ROLES[modality])
            if begin is None or end is None:
                raise VocabularyError(f"the vocabulary lacks the {modality} markers {MODALITY_ROLES[modality]}")
            begins.append(begin)
            ends.append(end)
        return begins, ends

    def role_of(self, id: int) -> str | None:
        """Special role of an id, or None."""
        for role, i in self._specials.items():
            if i == id:
                return role
        return None

    # -- codes ---------------------------------------------------------------

    def _table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device)
        table = self._torch_tables.get(key)
        if table is None:
            source = {"id_to_code": self._id_to_code, "code_to_id": self._code_ids,
                      "id_to_speech": self._id_to_speech, "speech_to_id": self._speech_ids}[name]
            table = torch.from_numpy(source).to(like.device)
            self._torch_tables[key] = table
        return table

    def ids_to_codes(self, ids: ArrayT) -> ArrayT:
        """Codebook index per id, -1 where the id is not a code (ids outside the vocabulary included)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.long()
            inside = (ids >= 0) & (ids < self._size)
            codes = self._table("id_to_code", ids)[ids.clamp(0, self._size - 1)]
            return torch.where(inside, codes, torch.full_like(codes, -1))
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self._size)
        return np.where(inside, self._id_to_code[np.clip(ids, 0, self._size - 1)], -1)

    def is_code(self, ids: ArrayT) -> ArrayT:
        return self.ids_to_codes(ids) >= 0

    def codes_to_ids(self, codes: ArrayT) -> ArrayT:
        n = self.codebook_size
        if isinstance(codes, torch.Tensor):
            codes = codes.long()
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n):
                raise VocabularyError(f"image codes must lie in [0, {n}), got [{int(codes.min())}, {int(codes.max())}]")
            return self._table("code_to_id", codes)[codes]
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise VocabularyError(f"image codes must be integers, got dtype {codes.dtype}")
        codes = codes.astype(np.int64, copy=False)
        if codes.size and (codes.min() < 0 or codes.max() >= n):
            raise VocabularyError(f"image codes must lie in [0, {n}), got [{codes.min()}, {codes.max()}]")
        return self._code_ids[codes]

    # -- speech codes ----------------------------------------------------------

    def speech_codes_to_ids(self, codes: ArrayT, first_level: int = 0) -> ArrayT:
        """Ids of an [levels, frames] array of speech codes whose row r is codebook level
        first_level + r (a 1-D array is one level)."""
        n, levels = self.speech_codebook_size, self._speech_levels
        if not levels:
            raise VocabularyError("this vocabulary has no speech codes (tokenloom add-modality --modality speech)")
        is_torch = isinstance(codes, torch.Tensor)
        arr = codes.long() if is_torch else np.asarray(codes)
        if not is_torch and arr.dtype.kind not in "iu":
            raise VocabularyError(f"speech codes must be integers, got dtype {arr.dtype}")
        rows = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if first_level < 0 or first_level + rows.shape[0] > levels:
            raise VocabularyError(f"speech code levels {first_level}..{first_level + rows.shape[0] - 1} do not "
                                  f"exist: this vocabulary has {levels} levels")
        if rows.numel() if is_torch else rows.size:
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= n:
                raise VocabularyError(f"speech codes must lie in [0, {n}), got [{lo}, {hi}]")
        offsets = (first_level + (torch.arange if is_torch else np.arange)(rows.shape[0])) * n
        if is_torch:
            flat = self._table("speech_to_id", rows)[rows + offsets.to(rows.device)[:, None]]
        else:
            flat = self._speech_ids[rows.astype(np.int64) + offsets[:, None]]
        return flat.reshape(arr.shape)

    def ids_to_speech(self, ids: ArrayT) -> tuple[ArrayT, ArrayT]:
        """(level, code) per id; both -1 where the id is not a speech code."""
        n = max(self.speech_codebook_size, 1)
        if isinstance(ids, torch.Tensor):
            ids = ids.long()
            inside = (ids >= 0) & (ids < self._size)
            flat = self._table("id_to_speech", ids)[ids.clamp(0, self._size - 1)]
            flat = torch.where(inside, flat, torch.full_like(flat, -1))
            return torch.where(flat >= 0, flat // n, flat), torch.where(flat >= 0, flat % n, flat)
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self._size)
        flat = np.where(inside, self._id_to_speech[np.clip(ids, 0, self._size - 1)], -1)
        return np.where(flat >= 0, flat // n, flat), np.where(flat >= 0, flat % n, flat)

    def speech_level_mask(self, level: int) -> torch.Tensor:
        """bool [size]: the ids of speech codebook level `level`."""
        name = f"speech_level_{level}"
        mask = self._masks.get(name)
        if mask is None:
            if not 0 <= level < self._speech_levels:
                raise VocabularyError(f"no speech codebook level {level}; this vocabulary has {self._speech_levels}")
            n = self.speech_codebook_size
            mask = torch.zeros(self._size, dtype=torch.bool)
            mask[torch.from_numpy(self._speech_ids[level * n:(level + 1) * n])] = True
            self._masks[name] = mask
        return mask

    # -- size tokens ---------------------------------------------------------

    def size_token(self, n: int) -> int:
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= self.max_grid_size:
            raise VocabularyError(f"no size token for {n!r}; this vocabulary has sizes 1..{self.max_grid_size}")
        return int(self._size_ids[int(n) - 1])

    def size_of_token(self, id: int) -> int | None:
        return self._size_of.get(int(id))

    # -- masks ---------------------------------------------------------------

    def _mask(self, name: str, kinds: Iterable[int]) -> torch.Tensor:
        mask = self._masks.get(name)
        if mask is None:
            mask = torch.from_numpy(np.isin(self._kinds, list(kinds)))
            self._masks[name] = mask
        return mask

    @property
    def code_mask(self) -> torch.Tensor:
        return self._mask("code", [KIND_CODE])

    @property
    def special_mask(self) -> torch.Tensor:
        """Special and size tokens, so code/text/special/speech masks partition the vocabulary."""
        return self._mask("special", [KIND_SPECIAL, KIND_SIZE])

    @property
    def speech_mask(self) -> torch.Tensor:
        """Speech codes of every level."""
        return self._mask("speech", [KIND_SPEECH])

    @property
    def size_mask(self) -> torch.Tensor:
        return self._mask("size", [KIND_SIZE])

    @property
    def text_mask(self) -> torch.Tensor:
        return self._mask("text", [KIND_TEXT])

    # -- serialisation ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {
            "size": self._size,
            "specials": dict(self._specials),
            "code_ids": _pack_ids(self._code_ids),
            "size_token_ids": _pack_ids(self._size_ids),
            "size_unit": self._size_unit,
        }
        if self._speech_levels:  # absent for vocabularies without speech, so their configs read as before
            data["speech_code_ids"] = _pack_ids(self._speech_ids)
            data["speech_codebooks"] = self._speech_levels
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(
            data["size"],
            data["specials"],
            _unpack_ids(data["code_ids"]),
            _unpack_ids(data.get("size_token_ids", [])),
            size_unit=data.get("size_unit", 1),
            speech_code_ids=_unpack_ids(data.get("speech_code_ids", [])),
            speech_codebooks=data.get("speech_codebooks", 0),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (
            self._size == other._size
            and self._specials == other._specials
            and self._size_unit == other._size_unit
            and np.array_equal(self._code_ids, other._code_ids)
            and np.array_equal(self._size_ids, other._size_ids)
            and self._speech_levels == other._speech_levels
            and np.array_equal(self._speech_ids, other._speech_ids)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Vocabulary(size={self._size}, codebook_size={self.codebook_size}, "
            f"max_grid_size={self.max_grid_size}, speech={self._speech_levels}x{self.speech_codebook_size}, "
            f"specials={sorted(self._specials)})"
        )

    def with_new_specials(self, roles: Sequence[str]) -> Vocabulary:
        """This vocabulary grown by one id per role (appended after the last id, as codes are after the
        tokenizer's): how a model learns a new modality's markers (`tokenloom.expand`). Roles it
        already has are an error."""
        have = [r for r in roles if r in self._specials]
        if have:
            raise VocabularyError(f"the vocabulary already has {have}")
        specials = dict(self._specials)
        specials.update({r: self._size + k for k, r in enumerate(roles)})
        return Vocabulary(self._size + len(roles), specials, self._code_ids, self._size_ids,
                          size_unit=self._size_unit, speech_code_ids=self._speech_ids,
                          speech_codebooks=self._speech_levels)

    def with_speech_codes(self, codebooks: int, codebook_size: int) -> Vocabulary:
        """This vocabulary grown by a block of `codebooks` x `codebook_size` speech codes appended after
        its last id (Liquid's way with image codes). A vocabulary that has speech codes is an error."""
        if self._speech_levels:
            raise VocabularyError(f"the vocabulary already has {self._speech_levels} levels of speech codes")
        if codebooks < 1 or codebook_size < 1:
            raise VocabularyError(f"speech codebooks and codebook_size must be positive, got {codebooks} and "
                                  f"{codebook_size}")
        ids = np.arange(self._size, self._size + codebooks * codebook_size)
        return Vocabulary(self._size + len(ids), self._specials, self._code_ids, self._size_ids,
                          size_unit=self._size_unit, speech_code_ids=ids, speech_codebooks=codebooks)

    def modality_ids(self, modality: str) -> np.ndarray:
        """The ids of `modality`'s markers the vocabulary has, and speech's codes."""
        if modality not in MODALITY_ROLES:
            raise VocabularyError(f"unknown modality {modality!r}; expected one of {sorted(MODALITY_ROLES)}")
        markers = [self._specials[r] for r in MODALITY_ROLES[modality] if r in self._specials]
        codes = self._speech_ids if modality == "speech" else np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(markers, dtype=np.int64), codes])

    def without_modality(self, modality: str) -> Vocabulary:
        """This vocabulary without `modality`'s markers (and speech's codes): the inverse of with_new_specials
        and with_speech_codes. The ids must be its last ones, so that no id kept moves; another modality's
        after them is an error that says which to remove first."""
        roles = [r for r in MODALITY_ROLES[modality] if r in self._specials]
        ids = np.sort(self.modality_ids(modality))
        if len(ids) == 0:
            raise VocabularyError(f"the vocabulary has no {modality} tokens")
        tail = self._size - len(ids)
        if not np.array_equal(ids, np.arange(tail, self._size)):
            later = " and ".join(m for m in MODALITY_ROLES
                                 if m != modality and self.modality_ids(m).max(initial=-1) > ids[0]) or "other"
            raise VocabularyError(f"the {modality} ids {int(ids[0])}-{int(ids[-1])} are not the vocabulary's last: "
                                  f"{later} ids come after them; remove {later} first")
        specials = {r: i for r, i in self._specials.items() if r not in roles}
        keep_speech = modality != "speech"
        return Vocabulary(tail, specials, self._code_ids, self._size_ids, size_unit=self._size_unit,
                          speech_code_ids=self._speech_ids if keep_speech else (),
                          speech_codebooks=self._speech_levels if keep_speech else 0)

    # -- constructors from tokenizers ------------------------------------------

    @classmethod
    def native(cls, tokenizer: TextTokenizer, codebook_size: int, max_grid_size: int, *, speech_codebooks: int = 0,
               speech_codebook_size: int = 0) -> Vocabulary:
        """tokenloom's own layout: every native special and size token must be in the tokenizer (the
        optional ones, `OPTIONAL_ROLES`, are taken where it has them). Speech codes, when asked for,
        follow the image codes."""
        names = {r: n for r, n in NATIVE_SPECIAL_TOKENS.items() if r not in OPTIONAL_ROLES}
        size_names = [native_size_token(n) for n in range(1, max_grid_size + 1)]
        missing = [n for n in [*names.values(), *size_names] if tokenizer.token_to_id(n) is None]
        if missing:
            raise VocabularyError(f"tokenizer lacks tokenloom tokens: {', '.join(missing[:12])}")
        specials = {role: tokenizer.token_to_id(name) for role, name in NATIVE_SPECIAL_TOKENS.items()}
        size_ids = [tokenizer.token_to_id(n) for n in size_names]
        vocab = cls._append_codes(tokenizer, specials, size_ids, codebook_size)
        if speech_codebooks:
            if vocab.speech_begin is None:
                raise VocabularyError("tokenizer lacks the speech markers <|speech_begin|>, <|speech_end|>")
            vocab = vocab.with_speech_codes(speech_codebooks, speech_codebook_size)
        return vocab

    @classmethod
    def expand_llm(
        cls,
        tokenizer: TextTokenizer,
        codebook_size: int,
        max_grid_size: int,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
    ) -> Vocabulary:
        """Liquid style: extend any LLM tokenizer (in place) with tokenloom's image/chat tokens.

        bos/eos/pad stay the LLM's own tokens; without `pad_token` the vocabulary has no pad.
        """
        own = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        missing = [name for name in own.values() if name is not None and tokenizer.token_to_id(name) is None]
        if missing:
            raise VocabularyError(f"tokenizer lacks its own tokens {missing}")
        added_roles = [r for r in SPECIAL_ROLES if r not in own]
        size_names = [native_size_token(n) for n in range(1, max_grid_size + 1)]
        ids = tokenizer.add_special_tokens([NATIVE_SPECIAL_TOKENS[r] for r in added_roles] + size_names)
        specials: dict[str, int | None] = dict(zip(added_roles, ids[: len(added_roles)]))
        specials.update({r: tokenizer.token_to_id(n) if n is not None else None for r, n in own.items()})
        return cls._append_codes(tokenizer, specials, ids[len(added_roles) :], codebook_size)

    @classmethod
    def _append_codes(
        cls, tokenizer: TextTokenizer, specials: dict[str, int | None], size_ids: Sequence[int], codebook_size: int
    ) -> Vocabulary:
        if codebook_size < 1:
            raise VocabularyError(f"codebook_size must be positive, got {codebook_size}")
        first = tokenizer.vocab_size
        return cls(first + codebook_size, specials, np.arange(first, first + codebook_size), size_ids)

    @classmethod
    def from_chameleon(
        cls,
        tokenizer: TextTokenizer | str | Path,
        *,
        lumina: bool = False,
        max_grid_size: int | None = None,
    ) -> Vocabulary:
        """Chameleon / Anole vocabulary; `lumina=True` adds Lumina-mGPT's end-of-line and size tokens.

        `tokenizer` may be a loaded tokenizer, a tokenizer JSON file, or a directory with
        tokenizer.json. There is no uncond token (Lumina's unconditional context is
        image_begin plus size tokens) and no role tokens (chat roles alternate).
        With `lumina=True` and no `max_grid_size`, every consecutive Lumina size token
        from 1 up is used.
        """
        if not isinstance(tokenizer, TextTokenizer):
            tokenizer = TextTokenizer.from_pretrained(tokenizer)
        vocab = tokenizer.get_vocab()

        image = [(name, i) for name, i in vocab.items() if name.startswith(CHAMELEON_IMAGE_PREFIX)]
        if not image:
            raise VocabularyError(f"tokenizer has no {CHAMELEON_IMAGE_PREFIX}* image tokens")
        codes = np.array([chameleon_code(name) for name, _ in image], dtype=np.int64)
        order = np.argsort(codes)
        codes = codes[order]
        if not np.array_equal(codes, np.arange(len(codes))):
            raise VocabularyError("Chameleon image codes are not exactly 0..N-1 (duplicates or holes)")
        code_ids = np.array([i for _, i in image], dtype=np.int64)[order]

        names = dict(CHAMELEON_SPECIAL_TOKENS)
        size_ids: list[int] = []
        size_unit = 1
        if lumina:
            names["end_of_line"] = LUMINA_END_OF_LINE
            size_unit = LUMINA_SIZE_UNIT
            if max_grid_size is None:
                n = 1
                while lumina_size_token(n) in vocab:
                    n += 1
                max_grid_size = n - 1
            size_names = [lumina_size_token(n) for n in range(1, max_grid_size + 1)]
            missing = [s for s in size_names if s not in vocab]
            if missing or not size_names:
                wanted = missing[:8] or [lumina_size_token(1)]
                raise VocabularyError(f"tokenizer lacks Lumina-mGPT size tokens {wanted}")
            size_ids = [vocab[s] for s in size_names]
        missing = [name for name in names.values() if name not in vocab]
        if missing:
            raise VocabularyError(f"tokenizer lacks Chameleon tokens {missing}")
        specials: dict[str, int | None] = {role: vocab[name] for role, name in names.items()}
        return cls(tokenizer.vocab_size, specials, code_ids, size_ids, size_unit=size_unit)


def chameleon_code(name: str) -> int:
    """Code of a Chameleon image token: `IMGIMGBCDZ` -> "123" -> 123."""
    if not name.startswith(CHAMELEON_IMAGE_PREFIX) or len(name) < len(CHAMELEON_IMAGE_PREFIX) + 2:
        raise VocabularyError(f"{name!r} is not a Chameleon image token")
    letters = name[len(CHAMELEON_IMAGE_PREFIX) : -1]
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in letters)
    if not digits.isdigit() or not digits.isascii():
        raise VocabularyError(f"cannot read a code from Chameleon image token {name!r}")
    return int(digits)


def chameleon_image_token(code: int) -> str:
    """Inverse of `chameleon_code` (trailing character "Z", as in Chameleon's vocabulary)."""
    return CHAMELEON_IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


def build_native(
    texts: Iterable[str], text_vocab_size: int, codebook_size: int, max_grid_size: int, *,
    speech_codebooks: int = 0, speech_codebook_size: int = 0, markers: bool = True,
) -> tuple[TextTokenizer, Vocabulary]:
    """Train a tiny byte-level BPE with tokenloom's special/size tokens and its native vocabulary.

    `text_vocab_size` counts byte and merge tokens; the special and size tokens come on top.
    `markers=False` leaves out the optional modality markers (`OPTIONAL_ROLES`: video, speech), as
    vocabularies made before those modalities have them, for `add_modality` to grow in.
    Meant for tests and toy pipelines.
    """
    specials = [name for role, name in NATIVE_SPECIAL_TOKENS.items() if markers or role not in OPTIONAL_ROLES]
    specials += [native_size_token(n) for n in range(1, max_grid_size + 1)]
    tokenizer = TextTokenizer.train(texts, text_vocab_size + len(specials), specials)
    return tokenizer, Vocabulary.native(tokenizer, codebook_size, max_grid_size, speech_codebooks=speech_codebooks,
                                        speech_codebook_size=speech_codebook_size)
