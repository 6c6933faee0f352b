"""Safetensors weights in the Hugging Face directory layout.

`model.safetensors`, or shards `model-00001-of-0000N.safetensors` with a
`model.safetensors.index.json` weight map once the weights pass `max_shard_bytes`.
Files are written under a temporary name and renamed, so an interrupted save
never leaves a half-written file behind the final name. Loading memory-maps the
files (safetensors' `safe_open`), so peak host memory stays near one copy.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights are the same view of one storage: keep the first name (the model re-ties on
    # load). Other views of a storage already written (slices of a fused weight) are copied,
    # because safetensors refuses tensors that share memory.
    storages: set[int] = set()
    views: set[tuple] = set()
    out = {}
    for name, t in state_dict.items():
        if t.device.type == "meta" or t.numel() == 0:
            out[name] = t
            continue
        storage = t.untyped_storage().data_ptr()
        view = (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            continue
        out[name] = t.clone() if storage in storages else t
        storages.add(storage)
        views.add(view)
    return out


def save_weights(state_dict: dict[str, torch.Tensor], directory: Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the weights, sharded above `max_shard_bytes`; returns the file names written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _unique_tensors(state_dict)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    # Remove leftovers of an earlier save with another shard count.
    for old in directory.glob("model*.safetensors"):
        old.unlink()
    (directory / INDEX_NAME).unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], directory / WEIGHTS_NAME, meta)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        atomic_save_safetensors(shard, directory / name, meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]


def weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        index = json.loads((directory / INDEX_NAME).read_text())
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{directory / INDEX_NAME} names shard files that are missing: {missing}")
        return [directory / f for f in files]
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def iter_weights(directory: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from memory-mapped files."""
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_weights(directory, device))
