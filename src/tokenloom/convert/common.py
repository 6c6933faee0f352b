"""Shared machinery of the converters: file checks, safe loading, streaming model assembly, saving.

Weights are read one tensor at a time from memory-mapped files (safetensors, or zip-format
``torch.save`` files opened with ``mmap=True``) and assigned into a model built on the meta
device, so the peak host memory of a conversion stays near one copy of the weights.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import DEFAULT_MAX_SHARD_BYTES, INDEX_NAME, WEIGHTS_NAME, atomic_directory, atomic_write_json
from ..image_processing import ImageTokenizer
from ..model import ModelConfig, Transformer
from ..vqgan import VQGAN, VQGANConfig, load_vqgan_checkpoint

__all__ = [
    "ConversionError",
    "ConversionWarning",
    "resolve_dtype",
    "require_file",
    "safe_torch_load",
    "TensorStore",
    "SafetensorsStore",
    "DictStore",
    "WeightSpec",
    "assemble_model",
    "prepare_destination",
    "save_pipeline",
    "load_taming_vqgan",
    "image_tokenizer_from_path",
]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (bad layout, shapes, values or vocabulary)."""


class ConversionWarning(UserWarning):
    """Something the converted pipeline cannot do, or a value the conversion had to assume."""


# --------------------------------------------------------------------------- small helpers

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def save_derived(pipe, base: Path, dst: Path, key: str, record: dict) -> Path:
    """Write `pipe`, a model made from the model directory `base` (an adapter merged, a modality
    added), to `dst` under a temporary name renamed into place; its config keeps what the base's
    conversion recorded (whether its VQGAN can draw) and says under `key` how it was made (`record`,
    with the tokenloom version and the base's path)."""
    from ..pipeline import CONFIG_NAME

    conversion = json.loads((base / CONFIG_NAME).read_text()).get("conversion")
    with atomic_directory(dst) as tmp:
        pipe.save_pretrained(tmp)
        config = json.loads((tmp / CONFIG_NAME).read_text())
        if conversion is not None:
            config["conversion"] = conversion
        config[key] = {"tokenloom_version": __version__, "base": str(base.resolve()), **record}
        atomic_write_json(tmp / CONFIG_NAME, config)
    return dst


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ConversionError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; expected one of bfloat16, float16, float32")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        where = "missing" if not path.exists() else "not a regular file"
        raise FileNotFoundError(f"{what} not found: {path} is {where}")
    return path


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is {'missing' if not path.exists() else 'not a directory'}")
    return path


def read_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _unpickling_reason(e: BaseException) -> str:
    msg = str(e)
    for line in msg.splitlines():
        line = line.strip()
        if line.startswith(("Trying to load", "Unsupported", "Unsupported global", "Can only build")) or \
                "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:")[-1].strip()
    first = msg.strip().splitlines()[0] if msg.strip() else "empty or truncated file"
    return f"{type(e).__name__}: {first[:300]}"


def safe_torch_load(path: Path) -> Mapping[str, Any]:
    """``torch.load`` with ``weights_only=True`` (and ``mmap=True`` for zip-format files).

    A pickle that references anything but tensors and plain containers is refused by torch's
    restricted unpickler before any of it runs; the error says so and names the file.
    """
    path = require_file(path, "checkpoint")
    errors = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
              ImportError, KeyError, IndexError, OSError)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except errors as first:
        if "mmap can only be used" not in str(first):
            raise _refused(path, first) from first
        # Legacy (non-zip) torch.save format: cannot be memory-mapped, load it whole.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except errors as e:
            raise _refused(path, e) from e
        warnings.warn(f"{path} uses the legacy torch.save format and cannot be memory-mapped; "
                      "it is read into memory whole", ConversionWarning, stacklevel=3)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    return obj


def _refused(path: Path, e: BaseException) -> ConversionError:
    return ConversionError(
        f"{path} is not a plain state dict: torch.load(weights_only=True) refused it ({_unpickling_reason(e)}). "
        "Nothing in it was executed. A checkpoint that pickles Python objects must be re-saved as a plain "
        "state dict (or safetensors) in an environment that trusts it.")


def plain_state_dict(obj: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping of a loaded checkpoint (also under "model" / "state_dict")."""
    if len(obj) == 1:
        (key, inner), = obj.items()
        if key in ("model", "state_dict", "module") and isinstance(inner, Mapping):
            obj = inner
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in bad[:5])
        raise ConversionError(f"{path} is not a plain state dict: entries that are not name -> tensor: {shown}")
    return dict(obj)


# --------------------------------------------------------------------------- tensor sources


class TensorStore:
    """Read-only access to named tensors, one at a time."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in self._key_set()

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DictStore(TensorStore):
    def __init__(self, tensors: Mapping[str, torch.Tensor], origin: str = "checkpoint"):
        self._t = dict(tensors)
        self.origin = origin

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


class SafetensorsStore(TensorStore):
    """The safetensors files of a Hugging Face style directory (single file or index + shards)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                require_file(directory / f, f"shard named by {index.name}")
        elif (directory / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise FileNotFoundError(f"no weights in {directory}: expected {directory / WEIGHTS_NAME} "
                                    f"or {directory / INDEX_NAME} with its shards")
        self.origin = str(directory)
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for f in files:
                handle = self._stack.enter_context(safe_open(str(directory / f), framework="pt", device="cpu"))
                for name in handle.keys():
                    self._where[name] = handle
        except Exception as e:
            self._stack.close()
            if isinstance(e, (FileNotFoundError, ConversionError)):
                raise
            raise ConversionError(f"cannot read safetensors weights in {directory}: {e}") from e

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- model assembly


@dataclass
class WeightSpec:
    """How one tokenloom parameter is made: from `sources` (checked against `shapes`) by `build`."""

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    build: Callable[..., torch.Tensor] | None = None  # None: the single source as is
    note: str = ""  # what the expected shape derives from, for error messages

    def make(self, store: TensorStore) -> torch.Tensor:
        tensors = []
        for key, shape in zip(self.sources, self.shapes):
            if key not in store:
                raise ConversionError(f"weight {key!r} is missing from {store.origin}")
            got = store.shape(key)
            if tuple(got) != tuple(shape):
                extra = f" ({self.note})" if self.note else ""
                raise ConversionError(f"weight {key!r} has shape {tuple(got)}, expected {tuple(shape)}{extra}")
            tensors.append(store.get(key))
        return tensors[0] if self.build is None else self.build(*tensors)


def assemble_model(config: ModelConfig, specs: Mapping[str, WeightSpec], store: TensorStore,
                   dtype: torch.dtype | None, *, ignore: Callable[[str], bool] = lambda k: False) -> Transformer:
    """Build a Transformer on the meta device and fill it from `store` following `specs`.

    Every tokenloom parameter needs a spec; every source key must be used by some spec (or be
    ignored), so a checkpoint of another layout fails loudly instead of loading half its weights.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    missing_specs = sorted(set(expected) - set(specs))
    if missing_specs:  # a bug in a converter, not in the input
        raise AssertionError(f"no conversion rule for {missing_specs[:5]}")
    used = {k for spec in specs.values() for k in spec.sources}
    unexpected = sorted(k for k in store.keys() if k not in used and not ignore(k))
    if unexpected:
        more = f" ... (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise ConversionError(f"{store.origin} has weights this layout does not know: {unexpected[:8]}{more}")
    state = {}
    for name, meta in expected.items():
        t = specs[name].make(store)
        if tuple(t.shape) != tuple(meta.shape):  # a rule produced the wrong shape: converter bug
            raise AssertionError(f"rule for {name} produced {tuple(t.shape)}, model expects {tuple(meta.shape)}")
        if not t.dtype.is_floating_point:
            raise ConversionError(f"weight for {name} ({specs[name].sources[0]!r}) has dtype {t.dtype}, "
                                  "not a floating point type")
        state[name] = t.to(dtype=dtype or t.dtype)
    # One dtype for the whole model: the first tensor's when none was asked for.
    target = dtype or next(iter(state.values())).dtype
    state = {k: v.to(target) for k, v in state.items()}
    # Each parameter gets storage of its own: views into one buffer (a split fused matrix) would
    # otherwise be taken for tied weights when saving.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen or v.storage_offset() or not v.is_contiguous():
            state[k] = v = v.clone(memory_format=torch.contiguous_format)
        seen.add(v.untyped_storage().data_ptr())
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- VQGAN


def _taming_pair(path: Path) -> tuple[Path, Path]:
    """(ckpt, yaml) for a directory holding vqgan.ckpt + vqgan.yaml, or a path to the .ckpt itself."""
    path = Path(path)
    if path.is_dir():
        for sub in (path, path / "tokenizer"):
            if (sub / "vqgan.ckpt").exists() or (sub / "vqgan.yaml").exists():
                path = sub
                break
        return (require_file(path / "vqgan.ckpt", "VQGAN checkpoint"),
                require_file(path / "vqgan.yaml", "VQGAN config"))
    ckpt = require_file(path, "VQGAN checkpoint")
    for candidate in (ckpt.with_suffix(".yaml"), ckpt.parent / "vqgan.yaml"):
        if candidate.is_file():
            return ckpt, candidate
    raise FileNotFoundError(f"VQGAN config not found: no {ckpt.with_suffix('.yaml')} or "
                            f"{ckpt.parent / 'vqgan.yaml'} next to {ckpt}")


def load_taming_vqgan(path: Path) -> VQGAN:
    """A full taming-layout VQGAN (encoder and decoder) from vqgan.ckpt + vqgan.yaml."""
    ckpt, yaml_path = _taming_pair(path)
    try:
        config = VQGANConfig.from_taming_yaml(yaml_path)
    except ValueError as e:
        raise ConversionError(f"{yaml_path}: {e}") from e
    try:
        return load_vqgan_checkpoint(ckpt, config)
    except ValueError as e:
        raise ConversionError(str(e)) from e


def image_tokenizer_from_path(path: Path) -> ImageTokenizer:
    """A tokenloom image tokenizer directory (vq_config.json) or a taming vqgan.ckpt/.yaml pair."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VQ image tokenizer not found: {path} is missing")
    if path.is_dir() and (path / "vq_config.json").is_file():
        return ImageTokenizer.from_pretrained(path)
    return ImageTokenizer(load_taming_vqgan(path))


def encoder_only_vqgan(config: VQGANConfig, tensors: Mapping[str, torch.Tensor], origin: str) -> VQGAN:
    """A VQGAN whose encoder, quantizer and quant convs come from `tensors`; its decoder is all zeros.

    Zeros, not random values: decoding then gives a flat grey image, never a plausible-looking
    picture from weights nobody trained.
    """
    model = VQGAN(config)
    own = model.state_dict()
    needed = {k for k in own if not k.startswith("decoder.")}
    missing = sorted(needed - set(tensors))
    unexpected = sorted(set(tensors) - needed)
    bad_shape = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(needed & set(tensors))
                 if tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = [f"{n}: {items[:5]}" for n, items in (("missing", missing), ("unexpected", unexpected),
                                                     ("shape mismatch", bad_shape)) if items]
        raise ConversionError(f"VQ encoder weights in {origin} do not match its vq_config; " + "; ".join(parts))
    state = {k: (tensors[k].float() if k in needed else torch.zeros_like(v)) for k, v in own.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- destination


def prepare_destination(src: Path | Iterable[Path], dst: Path, overwrite: bool) -> Path:
    dst = Path(dst)
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    for s in sources:
        s = Path(s)
        if dst.exists() and s.exists() and dst.resolve() == s.resolve():
            raise ConversionError(f"destination {dst} is the source directory: converting in place would "
                                  "overwrite the source; choose another destination")
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"destination {dst} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ConversionError(f"destination {dst} is not empty; pass overwrite=True to write into it")
    return dst


def save_pipeline(pipe, dst: Path, record: dict[str, Any], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Save a converted pipeline, then add a "conversion" record (source, warnings) to config.json."""
    dst = Path(dst)
    pipe.save_pretrained(dst, max_shard_bytes=max_shard_bytes)
    config_path = dst / "config.json"
    config = json.loads(config_path.read_text())
    config["conversion"] = {"tokenloom_version": __version__, **record}
    atomic_write_json(config_path, config)
    return dst


@dataclass
class Notes:
    """Warnings raised during a conversion, also kept for the conversion record."""

    items: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.items.append(message)
        warnings.warn(message, ConversionWarning, stacklevel=3)
