"""Pre-tokenization: raw JSONL (and image-text pairs: imagefolder directories, `datasets.Dataset`
objects, see `tokenloom.data.pairs`) -> Parquet shards of token ids and loss masks.

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
mix shards of the old and the new text). For pairs it records a fingerprint of the metadata, texts and
image bytes, and how they were read (task, text column, image size).

The manifest's counts include ``image_sizes``: how many kept images there are of each size ("WxH"),
a video's frames counted among them (each is an image in the token stream, so a training stage's
image size must cover it too); and, once there are videos, ``video_sizes``: kept videos by frame size.

A video's frames are VQ-encoded like images (in the same batches) and written as a video span; a
pipeline whose vocabulary has no video tokens refuses an input holding a video before anything is
written (whatever `on_error` says: skipping would quietly drop every video).

A speech part's audio is read (resampled to the codec's rate) and encoded by the pipeline's speech
codec. `speech_inputs="content"` (the default, MIO's way) keeps only the content codebook of
utterances outside assistant turns (what the model hears) and every level of the assistant's (what it
learns to say); "all" keeps every level everywhere. The counts then include ``speech_seconds``.
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
from .. import audio_io
from ..document import Document, ImagePart, SpeechPart, TextPart, Turn, VideoPart
from ..formats import resolution_prompt
from ..image_processing import ImageLoadError, load_image
from .pairs import PairSource, check_task, pair_documents, read_dataset, read_imagefolder
from .raw import (DataError, DataSummary, RawDocument, RawImage, RawSpeech, RawVideo, RawVisual, check_on_error,
                  iter_lines, parse_line, report_error)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tokenloom-shards/1"
SHARD_TEMPLATE = "shard-{:05d}.parquet"
SPEECH_INPUTS = ("content", "all")
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
    if pipeline.speech_tokenizer is not None:  # only then, so fingerprints made before speech stay valid
        parts["speech_codec"] = pipeline.speech_tokenizer.config.to_dict()
    if pipeline.vocab.has_speech:
        parts["speech_layout"] = pipeline.config.speech_layout
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]


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

    def __init__(self, pipeline, out_dir: Path, manifest: dict, on_error: str, image_batch_size: int,
                 speech_inputs: str = "content"):
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
        # "WxH" -> images kept at that size (what a training stage's image_size is checked against); None
        # when a run begun by an older tokenloom, which did not count them, is resumed
        self.image_sizes: dict[str, int] | None = c.get("image_sizes", None if manifest["shards"] else {})
        self.video_sizes: dict[str, int] = dict(c.get("video_sizes", {}))  # "WxH" -> videos kept (frame size)
        self.default_size = s.get("image_size")  # [W, H] for images without their own size (None: the model's)
        self.speech_inputs = speech_inputs
        self.speech_seconds = float(c.get("speech_seconds", 0.0))
        self.pending: list[_Pending] = []
        self.pending_images = 0
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []

    # -- counts and manifest -----------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        counts = {**self.summary.to_dict(), "too_long": self.too_long, "truncated": self.truncated,
                  "tokens": self.tokens}
        if self.image_sizes is not None:
            counts["image_sizes"] = dict(sorted(self.image_sizes.items()))
        if self.video_sizes:  # only once there are videos, so image-only manifests read as they always have
            counts["video_sizes"] = dict(sorted(self.video_sizes.items()))
        if self.speech_seconds:
            counts["speech_seconds"] = round(self.speech_seconds, 3)
        return counts

    def save_manifest(self, cursor: dict[str, int], complete: bool = False) -> None:
        self.manifest.update(cursor=cursor, counts=self.counts(), complete=complete)
        atomic_write_json(self.out_dir / MANIFEST_NAME, self.manifest)

    # -- documents ------------------------------------------------------------------------

    def room(self) -> int:
        return self.shard_size - len(self.buffer)

    def add(self, where: str, doc: RawDocument) -> None:
        if doc.videos and not self.pipeline.vocab.has_video:  # a backstop: `_refuse_modalities` finds these first
            raise DataError(no_video_tokens(where))
        self.pending.append(_Pending(where, doc))
        # a video's frames fill batches like images (its stored frames: a deterministic count, which is
        # what keeps batches, and so float rounding, the same in a resumed run)
        self.pending_images += sum(v.num_frames if isinstance(v, RawVideo) else 1 for v in doc.visuals)

    def ready(self) -> bool:
        # Flushing when the shard is about to fill keeps image batches inside one shard.
        return len(self.pending) >= self.room() or self.pending_images >= self.image_batch_size

    def _error(self, message: str) -> None:
        report_error(message, self.on_error, self.summary)

    def flush(self) -> None:
        """Load, VQ-encode and encode the pending documents into the shard buffer."""
        pending, self.pending, self.pending_images = self.pending, [], 0
        # Load every image and video frame; a document with a bad one is dropped (or raises) as a whole.
        # (w, h) -> (doc, visual, frame, PIL): a video's frames are batched with the images of their size.
        images: dict[tuple[int, int], list[tuple[int, int, int, Any]]] = {}
        frames: dict[tuple[int, int], int] = {}  # (doc, visual) -> frames loaded
        ok = [True] * len(pending)
        speech: dict[tuple[int, int], np.ndarray] = {}  # (doc, utterance) -> codes
        for d, item in enumerate(pending):
            for k, raw in enumerate(item.doc.visuals):
                try:
                    size = self._pixel_size(raw)
                    pils = self._load(raw)
                except (ImageLoadError, ValueError) as e:
                    self._error(f"{item.where}: {e}")
                    ok[d] = False
                    break
                frames[d, k] = len(pils)
                images.setdefault(size, []).extend((d, k, f, pil) for f, pil in enumerate(pils))
            for k, raw in enumerate(item.doc.speech if ok[d] else []):
                try:
                    speech[d, k] = self._speech_codes(raw)
                except ValueError as e:
                    self._error(f"{item.where}: {e}")
                    ok[d] = False
                    break
        codes: dict[tuple[int, int, int], np.ndarray] = {}
        tokenizer = self.pipeline.image_tokenizer
        for (w, h), group in images.items():
            group = [g for g in group if ok[g[0]]]
            for start in range(0, len(group), self.image_batch_size):
                chunk = group[start:start + self.image_batch_size]
                for (d, k, f, _), grid in zip(chunk, tokenizer.encode([g[3] for g in chunk], width=w, height=h)):
                    codes[d, k, f] = grid
        for d, item in enumerate(pending):
            if ok[d]:
                self._encode(item, [codes[d, k, 0] if isinstance(raw, RawImage)
                                    else np.stack([codes[d, k, f] for f in range(frames[d, k])])
                                    for k, raw in enumerate(item.doc.visuals)],
                             [speech[d, k] for k in range(len(item.doc.speech))])

    def _speech_codes(self, raw: RawSpeech) -> np.ndarray:
        """The utterance's codes, every level ([codebooks, frames])."""
        codec = self.pipeline.speech_tokenizer
        if codec is None or not self.pipeline.vocab.has_speech:
            raise ValueError(no_speech_tokens())
        samples = audio_io.read_audio(raw.path, codec.config.sample_rate)
        self.speech_seconds += len(samples) / codec.config.sample_rate
        return codec.encode(samples)

    @staticmethod
    def _load(raw: RawVisual) -> list[Any]:
        """The PIL images to VQ-encode: an image's one, or a video's frames."""
        if isinstance(raw, RawVideo):
            return raw.load()
        if raw.path is not None:
            return [load_image(raw.path)]
        return [raw.pixels() if callable(raw.pixels) else raw.pixels]

    def _pixel_size(self, raw: RawVisual) -> tuple[int, int]:
        if self.pipeline.image_tokenizer is None:
            raise ValueError("the pipeline has no image tokenizer, so it cannot read images")
        width, height = raw.width, raw.height
        if self.default_size is not None:
            width = self.default_size[0] if width is None else width
            height = self.default_size[1] if height is None else height
        h, w = self.pipeline.grid_size(width, height)  # validates against the layout
        f = self.pipeline.factor
        return w * f, h * f

    def _encode(self, item: _Pending, grids: list[np.ndarray], utterances: Sequence[np.ndarray] = ()) -> None:
        """Encode a document given its visuals' codes: a grid per image, a [frames, h, w] stack per video
        (every frame is encoded at the video's one size, so its grids stack); and its utterances' codes."""
        grids_iter, speech_iter = iter(grids), iter(utterances)

        def part(p, role):
            if isinstance(p, TextPart):
                return p
            if isinstance(p, RawSpeech):
                codes = next(speech_iter)
                heard = self.speech_inputs == "content" and role not in ("assistant", None)
                return SpeechPart(codes[:1] if heard else codes)
            return VideoPart(next(grids_iter)) if isinstance(p, RawVideo) else ImagePart(next(grids_iter))

        turns = [Turn(t.role, [part(p, t.role) for p in t.parts]) for t in item.doc.turns]
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
        f = self.pipeline.factor if grids else 1
        for grid in grids:
            key = f"{grid.shape[-1] * f}x{grid.shape[-2] * f}"
            if self.image_sizes is not None:
                self.image_sizes[key] = self.image_sizes.get(key, 0) + (grid.shape[0] if grid.ndim == 3 else 1)
            if grid.ndim == 3:
                self.video_sizes[key] = self.video_sizes.get(key, 0) + 1

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


def _settings(inputs: list[_JsonlInput | _PairInput], pipeline, shard_size: int, image_batch_size: int,
              max_length: int | None, truncate: bool, image_size: tuple[int, int] | None) -> dict[str, Any]:
    settings = {
        "inputs": [x.identity() for x in inputs],
        "pipeline": pipeline_fingerprint(pipeline),
        "vocab": vocab_fingerprint(pipeline.vocab),
        "vocab_size": pipeline.vocab.size,
        "shard_size": shard_size,
        "image_batch_size": image_batch_size,  # VQ batches decide float rounding, so they must match
        "max_length": max_length,
        "truncate": truncate,
    }
    if image_size is not None:  # only when given, so that directories made before it existed still resume
        settings["image_size"] = list(image_size)
    return settings


def _input_changes(old: Any, new: list[dict[str, Any]]) -> list[str]:
    """How the inputs a manifest was made from differ from `new`, in words."""
    if not isinstance(old, list) or len(old) != len(new):
        return [f"{len(old) if isinstance(old, list) else 'other'} input files then, {len(new)} now"]
    changes = []
    for then, now in zip(old, new):
        if then.get("path") != now["path"]:
            changes.append(f"{then.get('path')} is now {now['path']}")
        elif then.get("kind") is not None and then.get("sha256") == now.get("sha256") and then != now:
            keys = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
            changes.append(f"{now['path']} is read otherwise ({', '.join(keys)})")
        elif then.get("kind") is not None and then != now:
            changes.append(f"{now['path']} changed content (sha256 {str(then.get('sha256'))[:12]}... -> "
                           f"{now['sha256'][:12]}...)")
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
    inputs: Any,
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
    task: str = "both",
    image_size: int | Sequence[int] | None = None,
    text_column: str | None = None,
    image_column: str = "image",
    split: str | None = None,
    speech_inputs: str = "content",
) -> dict[str, Any]:
    """Pre-tokenize inputs with `pipeline` into Parquet shards under `out_dir`.

    inputs: one or a list of JSONL files, Hugging Face imagefolder directories and `datasets.Dataset`
    objects (`tokenloom.data.pairs`). An imagefolder or Dataset is a set of image-text pairs: `task`
    ("caption", "t2i" or "both") says which documents each pair makes; `text_column` names the column
    of texts (default: text, else caption), `image_column` a Dataset's column of images, `split` the
    split folder of an imagefolder that has several. They are read and checked whole (every image
    decoded) before anything is written.
    shard_size: documents per shard. image_batch_size: images loaded and VQ-encoded together.
    on_error: "raise" a `DataError` at the first malformed line or unreadable image, or "skip" it
    (warned and counted). max_length: longest document kept, in tokens (default: the model's
    max_position_embeddings); longer ones are skipped and counted, or cut when `truncate`.
    image_size: N or (W, H) pixels for every image without a size of its own (JSONL parts without
    width/height, every image of pairs); default: the pipeline's image size. The manifest counts the
    images kept per size (``counts.image_sizes``), which a training stage's ``image_size`` is checked
    against. speech_inputs: "content" (utterances outside assistant turns keep their content codebook
    only) or "all" (see the module docstring).
    A directory left by an interrupted run with the same inputs (the same bytes: each input's SHA-256
    is checked) and settings is resumed; one made from other inputs or settings is refused unless
    `overwrite`, which starts it over. Returns the summary of counts.
    """
    check_on_error(on_error)
    check_task(task)
    if speech_inputs not in SPEECH_INPUTS:
        raise ValueError(f"speech_inputs must be one of {SPEECH_INPUTS}, got {speech_inputs!r}")
    if isinstance(inputs, (str, os.PathLike)) or _is_dataset(inputs):
        inputs = [inputs]
    inputs = list(inputs)
    for x in inputs:
        if not _is_dataset(x) and not Path(x).exists():
            raise DataError(f"{x}: no such file")
    for name, value in (("shard_size", shard_size), ("image_batch_size", image_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    size = None if image_size is None else _check_image_size(pipeline, image_size)
    # Every input is read (and an imagefolder or Dataset checked whole) before anything is written.
    readers = [_open_input(x, fi, pipeline, on_error=on_error, task=task, size=size, text_column=text_column,
                           image_column=image_column, split=split) for fi, x in enumerate(inputs)]
    _refuse_modalities(readers, pipeline)
    if max_length is None:
        max_length = pipeline.model.config.max_position_embeddings
    settings = _settings(readers, pipeline, shard_size, image_batch_size, max_length, truncate, size)
    if pipeline.vocab.has_speech:  # only then, so directories made before speech still resume
        settings["speech_inputs"] = speech_inputs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # left by a run killed mid-write
        stale.unlink()

    manifest = None
    if (out_dir / MANIFEST_NAME).exists() and not overwrite:
        manifest = read_manifest(out_dir)
        if manifest["settings"] != settings:
            changed = sorted(k for k in settings.keys() | manifest["settings"].keys()
                             if manifest["settings"].get(k) != settings.get(k))
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
    run = _Run(pipeline, out_dir, manifest, on_error, image_batch_size, speech_inputs)
    cursor = dict(manifest["cursor"])
    done = sum(r.size for r in readers[: cursor["file"]])
    if cursor["file"] < len(readers):
        done += readers[cursor["file"]].done(cursor)
    unit = "B" if all(isinstance(r, _JsonlInput) for r in readers) else "it"
    with tqdm(total=sum(r.size for r in readers), initial=done, unit=unit, unit_scale=True, desc="pretokenize",
              disable=not progress) as bar:
        for fi in range(cursor["file"], len(readers)):
            at = (cursor["line"], cursor["byte"], cursor.get("part", 0)) if fi == cursor["file"] else (0, 0, 0)
            for item in readers[fi].items(*at):
                bar.update(item.progress)
                if item.error is not None:
                    run.summary.lines += 1
                    report_error(item.error, on_error, run.summary)
                    continue
                if item.doc is None:
                    continue
                if item.new_line:
                    run.summary.lines += 1
                run.add(item.where, item.doc)
                if run.ready():
                    run.flush()
                    if run.room() == 0:
                        run.write_shard(item.cursor)
                        bar.set_postfix(documents=run.summary.documents, refresh=False)
        run.flush()
        end = {"file": len(readers), "line": 0, "byte": 0}
        if run.buffer:
            run.write_shard(end, complete=True)
        else:
            run.save_manifest(end, complete=True)
    return _summary(out_dir, run.manifest)


# --------------------------------------------------------------------------- inputs


def no_speech_tokens() -> str:
    return ("a speech part, but the pipeline has no speech codes or no speech codec; give the model them with "
            "`tokenloom add-modality BASE OUT --modality speech --codec CODEC` (a `tokenloom train-codec` run's best/)")


def no_video_tokens(where: str) -> str:
    return (f"{where}: a video part, but the pipeline's vocabulary has no video tokens (video_begin, video_end); "
            f"give the model them with `tokenloom add-modality BASE OUT --modality video` (or "
            f"tokenloom.modalities.add_modality) and pre-tokenize with the grown model")


def _refuse_modalities(readers: list[_JsonlInput | _PairInput], pipeline) -> None:
    """DataError at the first video (speech) part of a JSONL input when the pipeline cannot write videos
    (speech): skipping them one by one would quietly drop a whole modality. The same pass hashes the
    file for its identity, so a JSONL input is read once before the run rather than twice."""
    video = not pipeline.vocab.has_video
    speech = not (pipeline.vocab.has_speech and pipeline.speech_tokenizer is not None)
    for reader in readers:
        if isinstance(reader, _JsonlInput):  # pairs are images only
            reader.read_ahead(refuse_video=video, refuse_speech=speech)


@dataclass
class _Item:
    """One step through an input: the progress it makes, and a document (where it is from, and the
    cursor just past it, which a shard ending with it saves) or a malformed record's message."""

    progress: int
    where: str = ""
    doc: RawDocument | None = None
    cursor: dict[str, int] | None = None
    error: str | None = None
    new_line: bool = True  # its line's first document (a line of pairs may make two): lines count once


class _JsonlInput:
    """A JSONL file; the cursor is (line, byte) just past the last line done."""

    def __init__(self, path: Path, index: int):
        self.path, self.index = path, index
        self.size = path.stat().st_size
        self._sha256: str | None = None

    def read_ahead(self, refuse_video: bool = False, refuse_speech: bool = False) -> None:
        """One pass before the run: the file's SHA-256 and, where refused, a DataError at the first line
        with a video (speech) part. A line that does not parse is left to the run, which reports it in order."""
        digest = hashlib.sha256()
        for number, _, raw in iter_lines(self.path):
            digest.update(raw)
            # a cheap filter: a video (speech) part's line says "video" ("speech")
            if not ((refuse_video and b"video" in raw) or (refuse_speech and b"speech" in raw)):
                continue
            try:
                doc = parse_line(raw, self.path, number)
            except DataError:
                continue
            if doc is not None and refuse_video and doc.videos:
                raise DataError(no_video_tokens(f"{self.path}:{number}"))
            if doc is not None and refuse_speech and doc.speech:
                raise DataError(f"{self.path}:{number}: {no_speech_tokens()}")
        self._sha256 = digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        if self._sha256 is None:
            self.read_ahead()
        return {"path": str(self.path.resolve()), "bytes": self.path.stat().st_size, "sha256": self._sha256}

    def done(self, cursor: dict[str, int]) -> int:
        return cursor["byte"]

    def items(self, line: int, byte: int, part: int):
        for number, nbytes, raw in iter_lines(self.path, line, byte):
            byte += nbytes
            try:
                doc = parse_line(raw, self.path, number)
            except DataError as e:
                yield _Item(nbytes, error=str(e))
                continue
            yield _Item(nbytes, f"{self.path}:{number}", doc, {"file": self.index, "line": number, "byte": byte})


class _PairInput:
    """Checked image-text pairs (an imagefolder or a Dataset); the cursor is (records done, documents
    done of the next record): with task "both" a shard may end between a pair's two documents."""

    def __init__(self, source: PairSource, index: int, task: str, size: tuple[int, int], caption_prompt: str,
                 t2i_prompt: bool):
        self.source, self.index, self.task, self.size_px = source, index, task, size
        self.caption_prompt, self.t2i_prompt = caption_prompt, t2i_prompt
        self.size = len(source.records)

    def t2i_text(self, text: str) -> str:
        return resolution_prompt(text, *self.size_px) if self.t2i_prompt else text

    def identity(self) -> dict[str, Any]:
        return {**self.source.identity, "task": self.task, "image_size": list(self.size_px),
                "caption_prompt": self.caption_prompt, "t2i_prompt": self.t2i_text("{text}")}

    def done(self, cursor: dict[str, int]) -> int:
        return cursor["line"]

    def items(self, line: int, byte: int, part: int):
        for index in range(line, len(self.source.records)):
            pair = self.source.records[index]
            if pair.error is not None:
                yield _Item(1, error=pair.error)
                part = 0
                continue
            docs = pair_documents(pair, self.task, size=self.size_px, caption_prompt=self.caption_prompt,
                                  t2i_text=self.t2i_text)
            for k in range(part, len(docs)):
                last = k == len(docs) - 1
                cursor = ({"file": self.index, "line": index + 1, "byte": 0} if last
                          else {"file": self.index, "line": index, "byte": 0, "part": k + 1})
                yield _Item(int(last), pair.where, docs[k], cursor, new_line=k == 0)
            part = 0


def _is_dataset(x: Any) -> bool:
    """A `datasets.Dataset` (or DatasetDict), told apart by its columns: the library is not imported."""
    return hasattr(x, "column_names") and not isinstance(x, (str, os.PathLike))


def _check_image_size(pipeline, image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (isinstance(image_size, (str, bytes)) or not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)):
        raise ValueError(f"image_size must be N or (W, H) pixels, got {image_size!r}")
    width, height = image_size
    try:
        pipeline.grid_size(width, height)
    except ValueError as e:
        raise ValueError(f"image_size {width}x{height}: {e}") from None
    return int(width), int(height)


def _open_input(x: Any, index: int, pipeline, *, on_error: str, task: str, size: tuple[int, int] | None,
                text_column: str | None, image_column: str, split: str | None) -> _JsonlInput | _PairInput:
    if not _is_dataset(x) and Path(x).is_file():
        return _JsonlInput(Path(x), index)
    if _is_dataset(x):
        source = read_dataset(x, image_column=image_column, text_column=text_column, on_error=on_error)
    else:
        source = read_imagefolder(x, text_column=text_column, split=split, on_error=on_error)
    if size is None:  # the model's own size, checked like a given one
        size = _check_image_size(pipeline, (pipeline.config.image_width, pipeline.config.image_height))
    return _PairInput(source, index, task, size, pipeline.config.caption_prompt, pipeline.config.resolution_prompt)
