"""Pre-tokenization: raw JSONL -> Parquet shards of token ids and loss masks.

Output directory::

    shard-00000.parquet ...   columns ids list<int32>, loss_mask list<bool>, length int32
    manifest.json             settings, shards, counts, and the input position done so far

Documents go to shards in input order, `shard_size` kept documents per shard (the last one may
be smaller). Each shard is written under a temporary name and renamed, then the manifest is
rewritten (atomically too) with the input position just after the shard's last document. A rerun
with the same inputs and settings therefore continues at that position, and because image
batches never straddle a shard boundary it produces exactly the bytes an uninterrupted run
would have. The manifest's ``complete`` flag says the whole input is done.

"The same inputs" means the same bytes: the manifest records each input's path, size and SHA-256,
so an input edited in place, even to the same size, is refused rather than continued (which would
mix shards of the old and the new text).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_json
from ..document import Document, ImagePart, TextPart, Turn
from ..image_processing import ImageLoadError, load_image
from .raw import DataError, DataSummary, RawDocument, RawImage, check_on_error, iter_lines, parse_line, report_error

MANIFEST_NAME = "manifest.json"
HASH_CHUNK = 1 << 20  # bytes read at a time when fingerprinting an input
MANIFEST_FORMAT = "tokenloom-shards/1"
SHARD_TEMPLATE = "shard-{:05d}.parquet"
SCHEMA = pa.schema([("ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_())), ("length", pa.int32())])


class LengthWarning(UserWarning):
    """A document longer than `max_length` was skipped (or truncated)."""


def vocab_fingerprint(vocab) -> str:
    """Identifies the id space: shards and a model must agree on it."""
    return hashlib.sha256(json.dumps(vocab.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def pipeline_fingerprint(pipeline) -> str:
    """Everything that decides which ids a document becomes (tokenizers, vocabulary, layout)."""
    vq = pipeline.image_tokenizer.config.to_dict() if pipeline.image_tokenizer is not None else None
    parts = {
        "vocab": pipeline.vocab.to_dict(),
        "tokenizer": pipeline.text_tokenizer.backend.to_str(),
        "layout": pipeline.config.layout,
        "flat_grid": pipeline.config.flat_grid,
        "image_size": [pipeline.config.image_width, pipeline.config.image_height],
        "vq": vq,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks (inputs can be far larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, docs: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
    """Write documents (ids, loss_mask) as one Parquet row group, atomically; returns its size."""
    lengths = np.array([len(ids) for ids, _ in docs], dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate([d[0] for d in docs]).astype(np.int32, copy=False) if docs else np.zeros(0, np.int32)
    mask = np.concatenate([d[1] for d in docs]).astype(bool, copy=False) if docs else np.zeros(0, bool)
    table = pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, type=pa.int32())),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(mask, type=pa.bool_())),
            pa.array(lengths, type=pa.int32()),
        ],
        schema=SCHEMA,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # One row group per shard: readers get one contiguous chunk per column.
        pq.write_table(table, tmp, row_group_size=max(1, len(docs)), compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


@dataclass
class _Pending:
    where: str  # "file:line"
    doc: RawDocument


class _Run:
    """State of one pre-tokenization; its `manifest` is what gets saved after every shard."""

    def __init__(self, pipeline, out_dir: Path, manifest: dict, on_error: str, image_batch_size: int):
        self.pipeline = pipeline
        self.out_dir = out_dir
        self.manifest = manifest
        self.on_error = on_error
        self.image_batch_size = image_batch_size
        s = manifest["settings"]
        self.shard_size, self.max_length, self.truncate = s["shard_size"], s["max_length"], s["truncate"]
        c = manifest["counts"]
        self.summary = DataSummary(c["lines"], c["documents"], c["skipped"], list(c["errors"]))
        self.too_long, self.truncated, self.tokens = c["too_long"], c["truncated"], c["tokens"]
        self.pending: list[_Pending] = []
        self.pending_images = 0
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []

    # -- counts and manifest -----------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        return {**self.summary.to_dict(), "too_long": self.too_long, "truncated": self.truncated,
                "tokens": self.tokens}

    def save_manifest(self, cursor: dict[str, int], complete: bool = False) -> None:
        self.manifest.update(cursor=cursor, counts=self.counts(), complete=complete)
        atomic_write_json(self.out_dir / MANIFEST_NAME, self.manifest)

    # -- documents ------------------------------------------------------------------------

    def room(self) -> int:
        return self.shard_size - len(self.buffer)

    def add(self, where: str, doc: RawDocument) -> None:
        self.pending.append(_Pending(where, doc))
        self.pending_images += len(doc.images)

    def ready(self) -> bool:
        # Flushing when the shard is about to fill keeps image batches inside one shard.
        return len(self.pending) >= self.room() or self.pending_images >= self.image_batch_size

    def _error(self, message: str) -> None:
        report_error(message, self.on_error, self.summary)

    def flush(self) -> None:
        """Load, VQ-encode and encode the pending documents into the shard buffer."""
        pending, self.pending, self.pending_images = self.pending, [], 0
        # Load every image; a document with a bad one is dropped (or raises) as a whole.
        images: dict[tuple[int, int], list[tuple[int, int, Any]]] = {}  # (w, h) -> (doc, image, PIL)
        ok = [True] * len(pending)
        for d, item in enumerate(pending):
            for k, raw in enumerate(item.doc.images):
                try:
                    size = self._pixel_size(raw)
                    pil = load_image(raw.path)
                except (ImageLoadError, ValueError) as e:
                    self._error(f"{item.where}: {e}")
                    ok[d] = False
                    break
                images.setdefault(size, []).append((d, k, pil))
        codes: dict[tuple[int, int], np.ndarray] = {}
        tokenizer = self.pipeline.image_tokenizer
        for (w, h), group in images.items():
            group = [g for g in group if ok[g[0]]]
            for start in range(0, len(group), self.image_batch_size):
                chunk = group[start:start + self.image_batch_size]
                for (d, k, _), grid in zip(chunk, tokenizer.encode([g[2] for g in chunk], width=w, height=h)):
                    codes[d, k] = grid
        for d, item in enumerate(pending):
            if ok[d]:
                self._encode(item, [codes[d, k] for k in range(len(item.doc.images))])

    def _pixel_size(self, raw: RawImage) -> tuple[int, int]:
        if self.pipeline.image_tokenizer is None:
            raise ValueError("the pipeline has no image tokenizer, so it cannot read images")
        h, w = self.pipeline.grid_size(raw.width, raw.height)  # validates against the layout
        f = self.pipeline.factor
        return w * f, h * f

    def _encode(self, item: _Pending, grids: list[np.ndarray]) -> None:
        grids_iter = iter(grids)
        turns = [Turn(t.role, [p if isinstance(p, TextPart) else ImagePart(next(grids_iter)) for p in t.parts])
                 for t in item.doc.turns]
        try:
            enc = self.pipeline.format.encode(Document(turns))
        except ValueError as e:
            self._error(f"{item.where}: cannot encode: {e}")
            return
        ids, mask = np.asarray(enc.ids, dtype=np.int32), np.asarray(enc.loss_mask, dtype=bool)
        if self.max_length is not None and len(ids) > self.max_length:
            action = "truncated" if self.truncate else "skipped"
            warnings.warn(f"{item.where}: document of {len(ids)} tokens exceeds max_length {self.max_length}; "
                          f"{action}", LengthWarning, stacklevel=2)
            if not self.truncate:
                self.too_long += 1
                return
            self.truncated += 1
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        self.buffer.append((ids, mask))
        self.summary.documents += 1
        self.tokens += len(ids)

    def write_shard(self, cursor: dict[str, int], complete: bool = False) -> None:
        shards = self.manifest["shards"]
        name = SHARD_TEMPLATE.format(len(shards))
        nbytes = _write_shard(self.out_dir / name, self.buffer)
        shards.append({"name": name, "documents": len(self.buffer),
                       "tokens": int(sum(len(ids) for ids, _ in self.buffer)), "bytes": nbytes})
        self.buffer = []
        self.save_manifest(cursor, complete)


# Indirection so tests can interrupt a run after some shards.
_write_shard = write_shard


def _settings(paths: list[Path], pipeline, shard_size: int, image_batch_size: int, max_length: int | None,
              truncate: bool) -> dict[str, Any]:
    return {
        "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in paths],
        "pipeline": pipeline_fingerprint(pipeline),
        "vocab": vocab_fingerprint(pipeline.vocab),
        "vocab_size": pipeline.vocab.size,
        "shard_size": shard_size,
        "image_batch_size": image_batch_size,  # VQ batches decide float rounding, so they must match
        "max_length": max_length,
        "truncate": truncate,
    }


def _input_changes(old: Any, new: list[dict[str, Any]]) -> list[str]:
    """How the inputs a manifest was made from differ from `new`, in words."""
    if not isinstance(old, list) or len(old) != len(new):
        return [f"{len(old) if isinstance(old, list) else 'other'} input files then, {len(new)} now"]
    changes = []
    for then, now in zip(old, new):
        if then.get("path") != now["path"]:
            changes.append(f"{then.get('path')} is now {now['path']}")
        elif then.get("bytes") != now["bytes"]:
            changes.append(f"{now['path']} changed size ({then.get('bytes')} -> {now['bytes']} bytes)")
        elif "sha256" not in then:
            changes.append(f"{now['path']} has no content fingerprint in the manifest (written by an older "
                           f"tokenloom), so its content cannot be checked")
        elif then["sha256"] != now["sha256"]:
            changes.append(f"{now['path']} changed content at the same size (sha256 {then['sha256'][:12]}... "
                           f"-> {now['sha256'][:12]}...)")
    return changes


def _new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    counts = {**DataSummary().to_dict(), "too_long": 0, "truncated": 0, "tokens": 0}
    return {"format": MANIFEST_FORMAT, "settings": settings, "shards": [],
            "cursor": {"file": 0, "line": 0, "byte": 0}, "counts": counts, "complete": False}


def _summary(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return {"out_dir": str(out_dir), "shards": len(manifest["shards"]), "complete": manifest["complete"],
            **manifest["counts"]}


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST_NAME} (not a pre-tokenized shard directory)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: unknown shard format {manifest.get('format')!r}")
    return manifest


def pretokenize(
    jsonl_paths: str | os.PathLike | Sequence[str | os.PathLike],
    pipeline,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    image_batch_size: int = 32,
    on_error: str = "raise",
    max_length: int | None = None,
    truncate: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-tokenize JSONL files with `pipeline` into Parquet shards under `out_dir`.

    shard_size: documents per shard. image_batch_size: images loaded and VQ-encoded together.
    on_error: "raise" a `DataError` at the first malformed line or unreadable image, or "skip" it
    (warned and counted). max_length: longest document kept, in tokens (default: the model's
    max_position_embeddings); longer ones are skipped and counted, or cut when `truncate`.
    A directory left by an interrupted run with the same inputs (the same bytes: each input's SHA-256
    is checked) and settings is resumed; one made from other inputs or settings is refused unless
    `overwrite`, which starts it over. Returns the summary of counts.
    """
    check_on_error(on_error)
    if isinstance(jsonl_paths, (str, os.PathLike)):
        jsonl_paths = [jsonl_paths]
    paths = [Path(p) for p in jsonl_paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    for name, value in (("shard_size", shard_size), ("image_batch_size", image_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_length is None:
        max_length = pipeline.model.config.max_position_embeddings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # left by a run killed mid-write
        stale.unlink()

    settings = _settings(paths, pipeline, shard_size, image_batch_size, max_length, truncate)
    manifest = None
    if (out_dir / MANIFEST_NAME).exists() and not overwrite:
        manifest = read_manifest(out_dir)
        if manifest["settings"] != settings:
            changed = sorted(k for k in settings if manifest["settings"].get(k) != settings[k])
            details = "; ".join(_input_changes(manifest["settings"].get("inputs"), settings["inputs"])
                                if "inputs" in changed else [])
            raise DataError(f"{out_dir} holds shards made from other inputs or settings (differing: "
                            f"{', '.join(changed)}{': ' + details if details else ''}); its shards would mix "
                            f"with new ones, so use a new directory or overwrite=True")
        if manifest["complete"]:
            return _summary(out_dir, manifest)
    if manifest is None:
        for old in [*out_dir.glob("shard-*.parquet"), out_dir / MANIFEST_NAME]:
            old.unlink(missing_ok=True)
        manifest = _new_manifest(settings)
    # Shards past the manifest's list were written after its last save: they will be rewritten.
    run = _Run(pipeline, out_dir, manifest, on_error, image_batch_size)
    cursor = dict(manifest["cursor"])
    sizes = [p.stat().st_size for p in paths]
    done = sum(sizes[: cursor["file"]]) + cursor["byte"]
    with tqdm(total=sum(sizes), initial=done, unit="B", unit_scale=True, desc="pretokenize",
              disable=not progress) as bar:
        for fi in range(cursor["file"], len(paths)):
            path = paths[fi]
            line, byte = (cursor["line"], cursor["byte"]) if fi == cursor["file"] else (0, 0)
            for number, nbytes, raw in iter_lines(path, line, byte):
                byte += nbytes
                bar.update(nbytes)
                try:
                    doc = parse_line(raw, path, number)
                except DataError as e:
                    run.summary.lines += 1
                    report_error(str(e), on_error, run.summary)
                    continue
                if doc is None:
                    continue
                run.summary.lines += 1
                run.add(f"{path}:{number}", doc)
                if run.ready():
                    run.flush()
                    if run.room() == 0:
                        run.write_shard({"file": fi, "line": number, "byte": byte})
                        bar.set_postfix(documents=run.summary.documents, refresh=False)
        run.flush()
        end = {"file": len(paths), "line": 0, "byte": 0}
        if run.buffer:
            run.write_shard(end, complete=True)
        else:
            run.save_manifest(end, complete=True)
    return _summary(out_dir, run.manifest)
