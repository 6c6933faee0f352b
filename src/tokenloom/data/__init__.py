"""Training data: raw JSONL documents, pre-tokenized Parquet shards, packed batches."""

from .packing import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    BatchLoader,
    LengthBucketSampler,
    MixtureSampler,
    ShardDataset,
    collate,
    context_dropout,
    non_pad_fraction,
    pack,
    plan_rows,
)
from .pretokenize import pretokenize, read_manifest
from .raw import DataError, DataSummary, DataWarning, RawDocument, RawImage, RawTurn, RawVideo, read_jsonl

__all__ = [
    "IGNORE_INDEX", "PAD_DOCUMENT", "BatchLoader", "LengthBucketSampler", "MixtureSampler", "ShardDataset", "collate",
    "context_dropout", "non_pad_fraction", "pack", "plan_rows", "pretokenize", "read_manifest", "DataError",
    "DataSummary", "DataWarning", "RawDocument", "RawImage", "RawTurn", "RawVideo", "read_jsonl",
]
