"""Text side of the vocabulary: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

Two properties matter to the rest of tokenloom:
* encoding never turns special-token names typed in user text into special ids, so
  nobody can inject an image-begin (or role) token through a prompt;
* tokenizers trained here are byte-level BPE, so `decode(encode(s)) == s` for any string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # Not stored in tokenizer.json, so it must be set on every load.
        self._tok.encode_special_tokens = True
        self._vocab_cache: dict[str, int] | None = None

    # -- loading and saving -------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TextTokenizer:
        """Load `<directory>/tokenizer.json` (a path to the file itself also works)."""
        directory = Path(directory)
        path = directory if directory.is_file() else directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}")
        return cls.from_file(path)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]) -> TextTokenizer:
        """Byte-level BPE; `vocab_size` counts the special tokens too (as `tokenizers` does)."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            # The full byte alphabet keeps every string encodable, whatever the corpus.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    # -- encoding -----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens stay visible by name: silently dropping them would hide bugs.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- vocabulary -----------------------------------------------------------

    def token_to_id(self, name: str) -> int | None:
        return self._tok.token_to_id(name)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(int(id))

    def get_vocab(self) -> dict[str, int]:
        """Name -> id for every token, added tokens included."""
        if self._vocab_cache is None:
            self._vocab_cache = self._tok.get_vocab(with_added_tokens=True)
        return dict(self._vocab_cache)

    @property
    def vocab_size(self) -> int:
        """Max id + 1 (ids may have holes, so this is not the token count)."""
        if self._vocab_cache is None:
            self._vocab_cache = self._tok.get_vocab(with_added_tokens=True)
        return max(self._vocab_cache.values(), default=-1) + 1

    def add_special_tokens(self, names: Sequence[str]) -> list[int]:
        """Add the missing names as special tokens; return the ids of all names."""
        missing = [n for n in dict.fromkeys(names) if self._tok.token_to_id(n) is None]
        if missing:
            self._tok.add_special_tokens(missing)
            self._vocab_cache = None
        ids = [self._tok.token_to_id(n) for n in names]
        assert all(i is not None for i in ids)
        return ids  # type: ignore[return-value]

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for what this wrapper does not cover)."""
        return self._tok

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"
