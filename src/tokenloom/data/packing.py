"""Shards -> training batches: dataset, length-bucketing sampler, packing, context dropout.

A batch is a dict of [B, T] int64 tensors:

* ``input_ids``: documents laid end to end in each row, then `pad`;
* ``labels``: the next token where it is trained, else -100: on loss-mask-False targets, on padding,
  and on each document's last token (its "next token" would belong to the next document);
* ``document_ids``: 1, 2, ... per document within a row and `PAD_DOCUMENT` (0) on padding, which
  `Transformer.forward(document_ids=...)` uses to block attention between documents and restart
  positions.

Order is a pure function of (seed, epoch): each epoch permutes the documents, cuts the permutation
into windows of `window` documents, sorts each window by length (the bucketing) and packs it
first-fit decreasing, then shuffles the window's rows. The sampler's position (epoch, window, row)
is all the state there is, so a run resumed from `state_dict()` sees the same batches.
`MixtureSampler` draws rows from several sources (shard directories) in given proportions, each
source in that order of its own.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .pretokenize import MANIFEST_NAME, read_manifest
from .raw import DataError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
PAD_DOCUMENT = 0


# --------------------------------------------------------------------------- dataset


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    return pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], type=column.type)


class ShardDataset:
    """Documents of one or more pre-tokenized shard directories, as (ids, loss_mask) numpy arrays.

    Lengths are read up front; a shard's token columns are read (memory-mapped) on first use.
    """

    def __init__(self, dirs: str | os.PathLike | Sequence[str | os.PathLike]):
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        if not dirs:
            raise DataError("no shard directories given")
        self.dirs = [Path(d) for d in dirs]
        self.files: list[Path] = []
        self.vocab: str | None = None
        counts = []
        lengths = []
        self.dir_starts = [0]  # document offset of each directory's first document, then the total
        for d in self.dirs:
            manifest = read_manifest(d)
            if not manifest["complete"]:
                raise DataError(f"{d}: pre-tokenization did not finish (rerun it to resume)")
            vocab = manifest["settings"]["vocab"]
            if self.vocab not in (None, vocab):
                raise DataError(f"{d}: shards use another vocabulary than {self.dirs[0]}")
            self.vocab = vocab
            for shard in manifest["shards"]:
                path = d / shard["name"]
                if not path.is_file():
                    raise DataError(f"{path}: shard listed in {d / MANIFEST_NAME} is missing")
                column = pq.read_table(path, columns=["length"], memory_map=True).column("length")
                lengths.append(column.to_numpy())
                counts.append(len(column))
                self.files.append(path)
            self.dir_starts.append(int(sum(counts)))
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if k not in self._loaded:
            table = pq.read_table(self.files[k], columns=["ids", "loss_mask"], memory_map=True)
            ids, mask = (_one_chunk(table.column(name)) for name in ("ids", "loss_mask"))
            # `offsets` index into the unsliced `values`, so they stay right for a sliced array.
            offsets = ids.offsets.to_numpy().astype(np.int64)
            if not np.array_equal(offsets, mask.offsets.to_numpy()):
                raise DataError(f"{self.files[k]}: ids and loss_mask lengths differ")
            self._loaded[k] = (offsets, ids.values.to_numpy(), mask.values.to_numpy(zero_copy_only=False))
        return self._loaded[k]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range ({len(self)} documents)")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        offsets, ids, mask = self._shard(k)
        r = index - int(self._starts[k])
        a, b = int(offsets[r]), int(offsets[r + 1])
        return ids[a:b], mask[a:b]


# --------------------------------------------------------------------------- packing


def plan_rows(lengths: Sequence[int] | np.ndarray, seq_len: int) -> list[list[int]]:
    """First-fit decreasing: group positions of `lengths` into rows of at most `seq_len` tokens.

    Longest first, each into the first row with room; ties keep their input order, so the plan is
    deterministic. Raises if a document alone exceeds `seq_len`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit a row of {seq_len}")
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(len(lengths), dtype=np.int64)  # at most one row per document
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(room[: len(rows)] >= n)
        if len(fits):
            r = int(fits[0])
            rows[r].append(int(i))
            room[r] -= n
        else:
            rows.append([int(i)])
            room[len(rows) - 1] = seq_len - n
    return rows


def collate(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int) -> dict[str, Any]:
    """Rows of (ids, loss_mask) documents -> a batch of [len(rows), seq_len] tensors.

    Also returns ``num_tokens`` (non-pad tokens) and ``num_targets`` (labels != -100), as ints.
    """
    B = len(rows)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    document_ids = np.full((B, seq_len), PAD_DOCUMENT, dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for d, (ids, mask) in enumerate(row, start=1):
            n = len(ids)
            if pos + n > seq_len:
                raise ValueError(f"row {b} holds more than {seq_len} tokens")
            input_ids[b, pos:pos + n] = ids
            document_ids[b, pos:pos + n] = d
            # Position t predicts t + 1 inside the document; its last token predicts nothing.
            target = np.where(np.asarray(mask[1:], dtype=bool), ids[1:], IGNORE_INDEX)
            labels[b, pos:pos + n - 1] = target
            pos += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "document_ids": torch.from_numpy(document_ids),
        "num_tokens": int((document_ids != PAD_DOCUMENT).sum()),
        "num_targets": int((labels != IGNORE_INDEX).sum()),
    }


def pack(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, Any]:
    """Pack documents into as few rows of `seq_len` as first-fit decreasing finds, and collate them."""
    rows = plan_rows([len(ids) for ids, _ in docs], seq_len)
    return collate([[docs[i] for i in row] for row in rows], seq_len, pad_id)


def non_pad_fraction(batch: dict[str, Any]) -> float:
    """Share of the batch's positions that hold document tokens (1.0 = no padding)."""
    doc = batch["document_ids"]
    return float((doc != PAD_DOCUMENT).sum()) / max(1, doc.numel())


# --------------------------------------------------------------------------- context dropout


def context_dropout(
    ids: np.ndarray, loss_mask: np.ndarray, *, image_begin: int, uncond_prefix: Sequence[int], p: float,
    rng: np.random.Generator, video: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """With probability `p` per image (or video), replace everything before it by `uncond_prefix`.

    `uncond_prefix` is the engine's unconditional context ([bos, uncond], or nothing where the
    vocabulary has no uncond token), so the model learns the unconditional distribution that
    classifier-free guidance samples from. Where several images are picked the last one wins
    (its context contains the others). The prefix is never trained; the rest keeps its mask.

    `video`: the (video_begin, video_end) ids. A video is cut before its video_begin, never between
    its frames: the engine's guidance row restarts at video_begin and sees the earlier frames.
    """
    ids_ = np.asarray(ids)
    begins = ids_ == image_begin
    if video is not None:
        opened = np.cumsum(ids_ == video[0]) - np.cumsum(ids_ == video[1])  # > 0 from a video's begin to its end
        begins = (begins & (opened <= 0)) | (ids_ == video[0])
    starts = np.flatnonzero(begins)
    if p <= 0 or not len(starts):
        return ids, loss_mask
    picked = starts[rng.random(len(starts)) < p]
    if not len(picked):
        return ids, loss_mask
    cut = int(picked[-1])
    prefix = np.asarray(uncond_prefix, dtype=np.asarray(ids).dtype)
    return (np.concatenate([prefix, ids[cut:]]),
            np.concatenate([np.zeros(len(prefix), dtype=bool), np.asarray(loss_mask[cut:], dtype=bool)]))


# --------------------------------------------------------------------------- sampler


class LengthBucketSampler:
    """Rows of document indices, grouped by length, in a seeded and resumable order.

    packing=True: each row holds as many documents as first-fit decreasing fits in `seq_len`.
    packing=False: one document per row; a window sorted by length makes neighbours similar, so
    batches cut from it need little padding. Documents longer than `seq_len` are left out and
    counted in `too_long`. `loop=False` (evaluation) makes one pass; `shuffle=False` keeps file order.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, *, seq_len: int, batch_size: int, seed: int = 0,
                 window: int = 2048, packing: bool = True, shuffle: bool = True, loop: bool = True):
        if seq_len < 2 or batch_size < 1 or window < 1:
            raise ValueError(f"need seq_len >= 2, batch_size >= 1, window >= 1; got {seq_len}, {batch_size}, {window}")
        lengths = np.asarray(lengths, dtype=np.int64)
        self.lengths = lengths
        self.seq_len, self.batch_size, self.seed, self.window = seq_len, batch_size, seed, window
        self.packing, self.shuffle, self.loop = packing, shuffle, loop
        self.indices = np.flatnonzero(lengths <= seq_len)
        self.too_long = int(len(lengths) - len(self.indices))
        if not len(self.indices):
            raise DataError(f"no document fits seq_len {seq_len} ({len(lengths)} documents)")
        self.epoch = self.window_index = self.row = 0

    # -- order ------------------------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return self._rng(0, epoch).permutation(self.indices) if self.shuffle else self.indices

    def _window_rows(self, epoch: int, w: int, order: np.ndarray) -> list[list[int]]:
        docs = order[w * self.window:(w + 1) * self.window]
        lengths = self.lengths[docs]
        if self.packing:
            rows = [[int(docs[i]) for i in row] for row in plan_rows(lengths, self.seq_len)]
        else:
            rows = [[int(docs[i])] for i in np.argsort(-lengths, kind="stable")]
        if self.shuffle:
            if not self.packing:  # shuffle whole batches, keeping similar lengths together
                batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
                perm = self._rng(1, epoch, w).permutation(len(batches))
                return [row for k in perm for row in batches[k]]
            perm = self._rng(1, epoch, w).permutation(len(rows))
            rows = [rows[k] for k in perm]
        return rows

    def _rows(self) -> Iterator[tuple[tuple[int, int, int], list[int]]]:
        """(position after the row, row) from the current position on."""
        epoch, w, r = self.epoch, self.window_index, self.row
        while True:
            order = self._epoch_order(epoch)
            n_windows = -(-len(order) // self.window)
            while w < n_windows:
                rows = self._window_rows(epoch, w, order)
                while r < len(rows):
                    r += 1
                    yield (epoch, w, r) if r < len(rows) else (epoch, w + 1, 0), rows[r - 1]
                w, r = w + 1, 0
            if not self.loop:
                return
            epoch, w, r = epoch + 1, 0, 0

    def iter_rows(self) -> Iterator[list[int]]:
        """Rows one at a time, the position moving past each row as it is handed out (how
        `MixtureSampler` draws from one source while the others wait)."""
        for position, row in self._rows():
            self.epoch, self.window_index, self.row = position
            yield row

    def __iter__(self) -> Iterator[list[list[int]]]:
        """Batches of `batch_size` rows (the last one of a non-looping pass may be smaller)."""
        batch: list[list[int]] = []
        for position, row in self._rows():
            batch.append(row)
            if len(batch) == self.batch_size:
                self.epoch, self.window_index, self.row = position
                yield batch
                batch = []
        if batch:
            self.epoch, self.window_index, self.row = position
            yield batch

    # -- state --------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"documents": int(len(self.lengths)), "tokens": int(self.lengths.sum()), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "window": self.window, "packing": self.packing,
                "shuffle": self.shuffle}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window": self.window_index, "row": self.row, "identity": self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["identity"] != self._identity():
            raise DataError(f"the saved data position belongs to another dataset or sampler setting: "
                            f"{json.dumps(state['identity'], sort_keys=True)} != "
                            f"{json.dumps(self._identity(), sort_keys=True)}")
        self.epoch, self.window_index, self.row = state["epoch"], state["window"], state["row"]


# --------------------------------------------------------------------------- mixing

SOURCE_BLOCK = 1024  # row sources drawn per generator: reaching any position costs one block


class MixtureSampler:
    """Rows drawn from several sources in given proportions: data mixing.

    `starts` are the document offsets of the sources in `lengths` (K + 1 numbers, as
    `ShardDataset.dir_starts` gives them for one directory per source). Row r of the run comes from
    source k with probability weights[k] / sum(weights), drawn by a generator keyed by
    (seed, 3, r // SOURCE_BLOCK); each source's rows follow their own `LengthBucketSampler` order
    (seeded, windowed, packed within the source: a row never mixes sources). The state is the number
    of rows drawn and each source's position, so a resumed run draws the same rows. Weights are shares
    of rows; with packing the rows are about equally full, so they are about shares of tokens too.
    A source of weight 0 is never read.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, starts: Sequence[int], weights: Sequence[float], *,
                 seq_len: int, batch_size: int, seed: int = 0, window: int = 2048, packing: bool = True,
                 names: Sequence[str] | None = None):
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = [int(x) for x in starts]
        weights = [float(w) for w in weights]
        if len(starts) != len(weights) + 1 or starts[0] != 0 or starts[-1] != len(lengths):
            raise ValueError(f"need {len(weights) + 1} source offsets from 0 to {len(lengths)}, got {starts}")
        if any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be >= 0 and not all 0, got {weights}")
        self.names = list(names) if names is not None else [f"source-{k}" for k in range(len(weights))]
        self.lengths, self.starts, self.weights = lengths, starts, weights
        self.seq_len, self.batch_size, self.seed, self.window, self.packing = seq_len, batch_size, seed, window, packing
        self.samplers: list[LengthBucketSampler | None] = []
        for k, w in enumerate(weights):
            if w == 0:
                self.samplers.append(None)
                continue
            try:
                self.samplers.append(LengthBucketSampler(lengths[starts[k]:starts[k + 1]], seq_len=seq_len,
                                                         batch_size=batch_size, seed=seed, window=window,
                                                         packing=packing))
            except DataError as e:
                raise DataError(f"source {self.names[k]!r}: {e}") from None
        self.too_long = sum(s.too_long for s in self.samplers if s is not None)
        self.cumulative = np.cumsum(np.asarray(weights) / sum(weights))
        self.rows = 0  # rows drawn so far
        self._block: tuple[int, np.ndarray] | None = None

    def source_of_row(self, r: int) -> int:
        """The source row `r` of the run (0-based) is drawn from."""
        block, at = divmod(r, SOURCE_BLOCK)
        if self._block is None or self._block[0] != block:
            u = np.random.default_rng([self.seed, 3, block]).random(SOURCE_BLOCK)
            # Float round-off can leave u past the last cumulative share: that row goes to the last source
            # with a positive weight (a weight-0 source is never read).
            last = max(k for k, w in enumerate(self.weights) if w > 0)
            picks = np.minimum(np.searchsorted(self.cumulative, u, side="right"), last)
            self._block = (block, picks)
        return int(self._block[1][at])

    def __iter__(self) -> Iterator[list[list[int]]]:
        """Batches of `batch_size` rows of document indices into `lengths`, forever."""
        streams = [s.iter_rows() if s is not None else None for s in self.samplers]
        batch: list[list[int]] = []
        while True:
            k = self.source_of_row(self.rows)
            row = next(streams[k])  # type: ignore[arg-type]  # a chosen source has weight > 0
            self.rows += 1
            batch.append([self.starts[k] + i for i in row])
            if len(batch) == self.batch_size:
                yield batch
                batch = []

    def _identity(self) -> dict[str, Any]:
        return {"sources": self.names, "weights": self.weights, "documents": self.starts,
                "tokens": int(self.lengths.sum()), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "seed": self.seed, "window": self.window, "packing": self.packing}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "sources": [s.state_dict() if s is not None else None for s in self.samplers],
                "identity": self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("identity") != self._identity():
            raise DataError(f"the saved data position belongs to another data mix or sampler setting: "
                            f"{json.dumps(state.get('identity'), sort_keys=True)} != "
                            f"{json.dumps(self._identity(), sort_keys=True)}")
        for sampler, saved in zip(self.samplers, state["sources"]):
            if sampler is not None:
                sampler.load_state_dict(saved)
        self.rows = state["rows"]


# --------------------------------------------------------------------------- loader


class BatchLoader:
    """Sampler + dataset + collate (+ context dropout): an iterable of training batches.

    Context dropout draws from a generator keyed by (seed, batch number), so a resumed run drops
    the same contexts. Rows are `seq_len` wide when packing, else as wide as the batch's longest
    document (rounded up to a multiple of 8).
    """

    def __init__(self, dataset: ShardDataset, sampler: LengthBucketSampler | MixtureSampler, *, pad_id: int,
                 image_begin: int | None = None, uncond_prefix: Sequence[int] = (), context_dropout: float = 0.0,
                 sources: Sequence[int] | None = None, video: tuple[int, int] | None = None):
        if not 0.0 <= context_dropout <= 1.0:
            raise ValueError(f"context_dropout must be in [0, 1], got {context_dropout}")
        if context_dropout > 0 and image_begin is None:
            raise ValueError("context dropout needs the image_begin id")
        self.dataset, self.sampler, self.pad_id = dataset, sampler, pad_id
        self.image_begin, self.uncond_prefix, self.p = image_begin, list(uncond_prefix), context_dropout
        self.video = video  # (video_begin, video_end) ids where the vocabulary has them
        self.batches = 0  # served so far (part of the state: it keys the dropout generator)
        # Document offsets of the sources (K + 1): batches then carry "sources", each position's source
        # (-1 on padding), for losses per source.
        self.sources = None if sources is None else np.asarray(sources, dtype=np.int64)
        if sampler.too_long:
            warnings.warn(f"{sampler.too_long} of {len(dataset)} documents are longer than seq_len "
                          f"{sampler.seq_len} and are left out", stacklevel=2)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for rows in self.sampler:
            rng = np.random.default_rng([self.sampler.seed, 2, self.batches])
            docs = []
            for row in rows:
                docs.append([])
                for i in row:
                    ids, mask = self.dataset[i]
                    if self.p > 0:
                        ids, mask = context_dropout(ids, mask, image_begin=self.image_begin,
                                                    uncond_prefix=self.uncond_prefix, p=self.p, rng=rng,
                                                    video=self.video)
                    docs[-1].append((ids, mask))
            width = self.sampler.seq_len
            if not self.sampler.packing:
                longest = max(len(ids) for row in docs for ids, _ in row)
                width = min(width, -(-longest // 8) * 8)
            self.batches += 1
            batch = collate(docs, width, self.pad_id)
            if self.sources is not None:
                batch["sources"] = self._position_sources(rows, batch["document_ids"])
            yield batch

    def _position_sources(self, rows: list[list[int]], document_ids: torch.Tensor) -> torch.Tensor:
        doc = document_ids.numpy()
        table = np.full((len(rows), int(doc.max(initial=0)) + 1), -1, dtype=np.int64)  # [row, document] -> source
        for b, row in enumerate(rows):
            table[b, 1:len(row) + 1] = np.searchsorted(self.sources, row, side="right") - 1
        return torch.from_numpy(np.take_along_axis(table, doc, axis=1))

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.batches = state["batches"]
