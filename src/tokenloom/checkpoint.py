"""Safetensors weights in the Hugging Face directory layout, and atomic file (and directory) writes.

`model.safetensors`, or shards `model-00001-of-0000N.safetensors` with a
`model.safetensors.index.json` weight map once the weights pass `max_shard_bytes`.
Files are written under a temporary name and renamed, so an interrupted save
never leaves a half-written file behind the final name; they get the usual
permissions (0666 less the umask, as `open` gives, whatever the umask: the temporary
file stays readable and writable by its owner until it is complete). Loading memory-maps the
files (safetensors' `safe_open`), so peak host memory stays near one copy.

Weights holding NaN or inf are refused when saving (`NonFiniteError`, unless
`allow_non_finite=True`) and warned about when loading.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class NonFiniteError(ValueError):
    """Weights to be saved hold NaN or inf values; `tensors` names them."""

    def __init__(self, message: str, tensors: tuple[str, ...] = ()):
        super().__init__(message)
        self.tensors = tuple(tensors)


# --------------------------------------------------------------------------- atomic writes


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty file next to `path`: (fd, name). Mode 0666 less the umask, like `open`
    (tempfile.mkstemp would make it 0600, and the rename would keep that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`, renamed to `path` when the block ends
    without error. An existing `path` is renamed aside first and deleted once the new one is in
    place; on an error the temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    tmp = path.with_name(f".{path.name}.{token}.tmp")
    aside = path.with_name(f".{path.name}.{token}.old.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, aside)
        os.replace(tmp, path)
    except BaseException:
        if aside.exists() and not path.exists():
            os.replace(aside, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _chmod(fd: int, path: Path, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # pragma: no cover - Windows before 3.13
        os.chmod(path, mode)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask
        # safetensors writes by name and the fsync below reopens the file: the owner needs read
        # and write while it is written, whatever the umask took away (0o400, 0o444, ...)
        _chmod(fd, tmp, mode | 0o600)
        os.close(fd)
        fd = -1
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode | 0o600)  # in case save_file created the file anew, with the umask's mode
        with open(tmp, "rb+") as f:
            _chmod(f.fileno(), tmp, mode)  # the final mode (the open descriptor keeps its access)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- finiteness


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf."""
    bad = []
    for name, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_finite(tensors: Mapping[str, torch.Tensor], where: str | os.PathLike, allow_non_finite: bool = False) -> None:
    """Refuse (NonFiniteError naming the first bad tensor) or, with allow_non_finite, warn."""
    bad = non_finite_tensors(tensors)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    message = f"{where}: tensor {bad[0]!r}{more} holds NaN or inf values"
    if not allow_non_finite:
        raise NonFiniteError(f"{message}; refusing to save them (allow_non_finite=True saves them anyway)", bad)
    warnings.warn(f"{message}; saving them anyway (allow_non_finite=True)", UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- weights


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
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, allow_non_finite: bool = False) -> list[str]:
    """Write the weights, sharded above `max_shard_bytes`; returns the file names written.

    Weights holding NaN or inf raise NonFiniteError before anything is written (with
    allow_non_finite=True: a warning, and they are written)."""
    directory = Path(directory)
    tensors = _unique_tensors(state_dict)
    check_finite(tensors, directory, allow_non_finite)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], directory / WEIGHTS_NAME, meta)
        written = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            atomic_save_safetensors(shard, directory / name, meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        # the index last: until it is renamed into place, a loader reads the previous save
        atomic_write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = names + [INDEX_NAME]
    # Only now remove what an earlier save with another shard count left: the index first (a
    # loader that finds none reads model.safetensors), then the shards it named.
    if INDEX_NAME not in written:
        (directory / INDEX_NAME).unlink(missing_ok=True)
    for old in directory.glob("model*.safetensors"):
        if old.name not in written:
            old.unlink(missing_ok=True)
    return written


def weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        try:
            index = json.loads((directory / INDEX_NAME).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{directory / INDEX_NAME} is not a valid weight index: {e}") from None
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{directory / INDEX_NAME} names shard files that are missing: {missing}")
        return [directory / f for f in files]
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def warn_non_finite(path: str | os.PathLike, name: str, t: torch.Tensor) -> None:
    """Warn (naming the file and the tensor) when a loaded tensor holds NaN or inf values."""
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        warnings.warn(f"{path}: tensor {name!r} holds NaN or inf values", UserWarning, stacklevel=3)


def iter_weights(directory: Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from memory-mapped files; warns about NaN/inf tensors."""
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                warn_non_finite(path, name, tensor)
                yield name, tensor


def load_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_weights(directory, device))


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; warns about NaN/inf tensors like `load_weights`."""
    path = Path(path)
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
            warn_non_finite(path, name, out[name])
    return out


# --------------------------------------------------------------------------- verification


def verify_safetensors(path: Path) -> None:
    """Raise ValueError (naming the file) unless `path` is a whole safetensors file. Opening it checks
    it: safetensors refuses a header that does not parse, offsets that are not a begin <= end pair
    of integers, and a file whose size is not exactly what the header describes (truncated or padded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
