"""Image-text pairs from users' own data: Hugging Face imagefolder directories and `datasets.Dataset`
objects, turned into captioning and text-to-image documents for pre-tokenization.

An **imagefolder** is a directory in the layout `datasets.load_dataset("imagefolder", data_dir=DIR)`
reads: image files and a ``metadata.jsonl`` (or ``metadata.csv``) whose rows name an image by
``file_name`` (a path relative to the metadata file's folder; or one ``<name>_file_name`` column)
next to a text column (``text`` or ``caption`` unless told which); ``metadata.parquet`` is not read,
nor a folder without metadata (class-label folders have no texts). Metadata files may sit in
subfolders, each naming the images below it; a directory with split folders (``train/``, ``test/``,
...) is read one split at a time (``split="train"``). It is read here with Pillow alone, without
the `datasets` library.

A **Dataset** (``datasets.Dataset``, one split) needs an image column (PIL images as the ``Image``
feature gives them, undecoded ``{"bytes", "path"}`` values, or paths) and a text column.

Both are read and checked whole, every image decoded once, before anything is written: a missing
or unreadable image is a `DataError` naming the file and the metadata line (or the row), or under
``on_error="skip"`` a record that pre-tokenization reports (and counts) at its turn. The check also
yields a content fingerprint (SHA-256 of the metadata, the texts and the image bytes) that a resumed
pre-tokenization compares.

Each pair makes one or two documents (`pair_documents`), chosen by ``task``:

* ``caption``: user [image, caption prompt] -> assistant [text] (what `Pipeline.caption` asks);
* ``t2i``: user [text] -> assistant [image] (what `Pipeline.generate_images` prompts with);
* ``both``: the caption document, then the text-to-image one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..document import TextPart
from ..image_processing import ImageLoadError, decoded, load_image
from .raw import DataError, RawDocument, RawImage, RawTurn, check_on_error

TASKS = ("caption", "t2i", "both")
TEXT_COLUMNS = ("text", "caption")  # tried in this order when no text column is named
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Folder names `datasets` takes for splits (its data-files patterns)
SPLIT_NAMES = ("train", "training", "test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev")
HASH_CHUNK = 1 << 20


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


@dataclass
class Pair:
    """One image and its text, or (`error` set) a bad record kept to be reported at its turn."""

    where: str  # "DIR/metadata.jsonl:3" or "dataset row 3"
    image: Path | Callable[[], Image.Image] | None  # a file, or a function reading a row's image
    text: str = ""
    error: str | None = None


@dataclass
class PairSource:
    """A checked input of pairs: its records in order and what identifies it in a shard manifest."""

    name: str
    records: list[Pair]
    identity: dict[str, Any] = field(default_factory=dict)


def pair_documents(pair: Pair, task: str, *, size: tuple[int, int], caption_prompt: str,
                   t2i_text: Callable[[str], str] = lambda text: text) -> list[RawDocument]:
    """The documents of one pair: caption and/or text-to-image (see the module docstring).

    size: (width, height) in pixels of the image part; t2i_text: the text-to-image prompt for a
    text (the pipeline's resolution wording, where it uses one)."""
    check_task(task)
    if isinstance(pair.image, Path):
        image = RawImage(pair.image, *size)
    else:
        image = RawImage(None, *size, pixels=pair.image)
    docs = []
    if task in ("caption", "both"):
        docs.append(RawDocument([RawTurn("user", [image, TextPart(caption_prompt)]),
                                 RawTurn("assistant", [TextPart(pair.text)])]))
    if task in ("t2i", "both"):
        docs.append(RawDocument([RawTurn("user", [TextPart(t2i_text(pair.text))]), RawTurn("assistant", [image])]))
    return docs


# --------------------------------------------------------------------------- checks shared by both readers


def _text_of(row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise DataError(f"no text column {column!r} (columns: {', '.join(map(str, row))})")
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"the text column {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"the text column {column!r} is empty")
    return value


def _hash_image(digest: Any, image: Image.Image) -> None:
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())


class _Collector:
    """Records and the content digest, with the one error policy: raise at once, or keep the bad record."""

    def __init__(self, on_error: str):
        check_on_error(on_error)
        self.on_error = on_error
        self.records: list[Pair] = []
        self.digest = hashlib.sha256()

    def bad(self, where: str, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{where}: {message}")
        self.records.append(Pair(where, None, error=f"{where}: {message}"))
        self.digest.update(f"error:{where}\n".encode())

    def good(self, where: str, image: Any, text: str) -> None:
        self.records.append(Pair(where, image, text))
        self.digest.update(json.dumps(text).encode() + b"\n")


# --------------------------------------------------------------------------- imagefolder


def _metadata_files(directory: Path, split: str | None) -> list[Path]:
    root = directory if split is None else directory / split
    if split is not None and not root.is_dir():
        found = sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []
        raise DataError(f"{directory}: no split folder {split!r} (folders: {', '.join(found) or 'none'})")
    files = sorted(p for name in METADATA_NAMES for p in root.rglob(name) if p.is_file())
    if not files:
        raise DataError(f"{root}: no {' or '.join(METADATA_NAMES)} in it or its subfolders (an imagefolder "
                        "names its images and their texts there, one row per image with a 'file_name' column)")
    kinds = {p.suffix for p in files}
    if len(kinds) > 1:
        raise DataError(f"{root}: metadata files of two formats ({', '.join(str(p) for p in files)}); "
                        "keep one format, as the datasets library requires")
    if split is None:
        splits = sorted({p.relative_to(root).parts[0] for p in files
                         if len(p.relative_to(root).parts) > 1 and p.relative_to(root).parts[0].lower() in SPLIT_NAMES})
        if len(splits) > 1:
            raise DataError(f"{root}: holds the splits {', '.join(splits)}; read one at a time (split=..., "
                            f"or --split on the command line)")
    return files


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line, row, None) per row of a metadata file, or (line, None, what is wrong)."""
    if path.suffix == ".csv":
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    yield reader.line_num, dict(row), None
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read it as CSV ({e})") from None
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON: {e.msg} (column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield number, None, f"a row must be a JSON object, got {type(row).__name__}"
                continue
            yield number, row, None


def _file_column(row: dict[str, Any]) -> str | None:
    if "file_name" in row:
        return "file_name"
    named = [k for k in row if k.endswith("_file_name")]
    return named[0] if len(named) == 1 else None


def _image_path(folder: Path, value: Any) -> Path:
    """The image a file_name names, inside the metadata file's folder (the datasets library's rule)."""
    if not isinstance(value, str) or not value:
        raise DataError(f"file_name must be a non-empty string, got {value!r}")
    relative = os.path.normpath(value).replace("\\", "/")
    if "://" in value or os.path.isabs(value) or relative == ".." or relative.startswith("../"):
        raise DataError(f"file_name {value!r} must be a relative path inside the folder of the metadata file")
    return folder / relative


def _file_digest(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)


def read_imagefolder(directory: str | os.PathLike, *, text_column: str | None = None, split: str | None = None,
                     on_error: str = "raise") -> PairSource:
    """Read and check a Hugging Face imagefolder directory (see the module docstring).

    text_column: the metadata column holding each image's text (default: ``text``, else ``caption``).
    split: read only DIR/<split> (needed when the directory holds several splits)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory" if not directory.exists() else f"{directory}: not a directory")
    out = _Collector(on_error)
    metadata = []
    column = text_column
    for path in _metadata_files(directory, split):
        meta_digest = hashlib.sha256()
        _file_digest(path, meta_digest)
        metadata.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": meta_digest.hexdigest()})
        for number, row, problem in _metadata_rows(path):
            where = f"{path}:{number}"
            if problem is not None:
                out.bad(where, problem)
                continue
            if column is None:  # decided by the first row, as every row has the same columns
                column = next((c for c in TEXT_COLUMNS if c in row), None)
                if column is None:
                    raise DataError(f"{where}: no text column (looked for {', '.join(TEXT_COLUMNS)}; columns: "
                                    f"{', '.join(row)}); name the column holding the texts (text_column, --text-column)")
            file_column = _file_column(row)
            try:
                if file_column is None:
                    raise DataError(f"no 'file_name' column (columns: {', '.join(row)})")
                image = _image_path(path.parent, row[file_column])
                text = _text_of(row, column)
                if not image.exists():
                    raise DataError(f"image file {image} does not exist")
                load_image(image)
            except (DataError, ImageLoadError) as e:
                out.bad(where, str(e))
                continue
            out.good(where, image, text)
            _file_digest(image, out.digest)
    identity = {"path": str(directory.resolve()), "kind": "imagefolder", "split": split, "text_column": column,
                "metadata": metadata, "records": len(out.records), "sha256": out.digest.hexdigest()}
    return PairSource(str(directory), out.records, identity)


# --------------------------------------------------------------------------- datasets.Dataset


def _row_image(value: Any, base_dir: Path | None) -> Image.Image:
    """A Dataset cell -> a decoded PIL image (ImageLoadError / DataError when it is not one)."""
    if isinstance(value, Image.Image):
        try:
            return decoded(value)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"cannot decode the image: {type(e).__name__}: {e}") from None
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # the Image feature, undecoded
        if value.get("bytes") is not None:
            try:
                with Image.open(io.BytesIO(value["bytes"])) as img:
                    return decoded(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ImageLoadError(f"cannot load the image bytes ({value.get('path') or 'no path'}): "
                                     f"{type(e).__name__}: {e}") from None
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise DataError(f"image file {path} does not exist")
        return load_image(path)
    raise DataError(f"the image must be a PIL image, image bytes or a path, got {type(value).__name__}")


def read_dataset(dataset: Any, *, image_column: str = "image", text_column: str | None = None,
                 base_dir: str | os.PathLike | None = None, on_error: str = "raise") -> PairSource:
    """Read and check a `datasets.Dataset` (one split) of images and texts (see the module docstring).

    image_column: its column of images (PIL images, ``{"bytes", "path"}`` or paths; relative paths
    are relative to `base_dir`, else the working directory). text_column: default ``text``, else
    ``caption``. Images are decoded once here and again, row by row, when they are encoded."""
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):
        raise DataError(f"got a {type(dataset).__name__} of splits ({', '.join(columns)}); pass one split of it "
                        "(dataset['train'])")
    if not isinstance(columns, list) or not hasattr(dataset, "__len__"):
        raise DataError(f"expected a datasets.Dataset (one split, not streamed), got {type(dataset).__name__}")
    if image_column not in columns:
        raise DataError(f"the dataset has no image column {image_column!r} (columns: {', '.join(columns)})")
    column = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise DataError(f"the dataset has no text column {column or ' or '.join(TEXT_COLUMNS)!r} "
                        f"(columns: {', '.join(columns)}); name it (text_column)")
    base = None if base_dir is None else Path(base_dir)
    out = _Collector(on_error)
    for i in range(len(dataset)):
        where = f"dataset row {i}"
        row = dataset[i]
        try:
            text = _text_of(row, column)
            image = _row_image(row[image_column], base)
        except (DataError, ImageLoadError) as e:
            out.bad(where, str(e))
            continue
        out.good(where, _RowImage(dataset, i, image_column, base), text)
        _hash_image(out.digest, image)
    identity = {"path": f"datasets.Dataset({len(dataset)} rows)", "kind": "dataset", "image_column": image_column,
                "text_column": column, "records": len(out.records), "sha256": out.digest.hexdigest()}
    return PairSource(f"dataset of {len(dataset)} rows", out.records, identity)


class _RowImage:
    """Reads one row's image when it is encoded (holding every decoded image would cost memory)."""

    def __init__(self, dataset: Any, index: int, column: str, base_dir: Path | None):
        self.dataset, self.index, self.column, self.base_dir = dataset, index, column, base_dir

    def __call__(self) -> Image.Image:
        return _row_image(self.dataset[self.index][self.column], self.base_dir)
