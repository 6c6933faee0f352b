"""Training configuration: a YAML or TOML file parsed into dataclasses.

Unknown keys, wrong types and bad values (NaN and inf included) raise `ConfigError` naming the
file, the line (where the parser can tell it) and the dotted key. Relative paths are relative to
the config file's folder (to the working directory for a config built in Python).

`load_config` reads the transformer trainer's `TrainConfig`; `read_config` + `build_config`
parse any dataclass the same way (the VQGAN trainer's config is one, see `train.vq`).

Example (YAML)::

    model:
      pipeline: ../models/base      # vocabulary, tokenizers, image tokenizer (and weights)
      weights: pretrained           # fine-tune them; "random": new weights shaped by `config`
    data:
      train: [shards/train]
      eval: [shards/eval]
      seq_len: 2048
      batch_size: 8
    optim:
      lr: 3.0e-4
      warmup_steps: 200
    train:
      max_steps: 10000
      grad_accum: 4
      precision: auto               # bf16 where it is native (GPU, AVX512-BF16/AMX CPU), else fp32
      z_loss: 1.0e-5
      save_every: 500
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..precision import PRECISIONS


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    pipeline: str = ""  # pipeline directory: vocabulary, tokenizers, image tokenizer, weights
    weights: str = "pretrained"  # "pretrained" (fine-tune) or "random" (new model shaped by `config`)
    config: dict = field(default_factory=dict)  # ModelConfig fields for weights: random


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # pre-tokenized shard directories
    eval: list[str] = field(default_factory=list)  # held-out shard directories (none: no evaluation)
    seq_len: int = 2048  # row width; longer documents are left out
    batch_size: int = 8  # rows per micro-batch
    packing: bool = True  # several documents per row (else one, bucketed by length)
    window: int = 2048  # documents sorted and packed together
    context_dropout: float = 0.1  # per image: replace its context by [bos, uncond] (guidance)


@dataclass
class OptimSection:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 100  # linear warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on Linear weights only (not norms, biases, embeddings)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps; the schedule spans them
    grad_accum: int = 1  # micro-batches per step
    precision: str = "auto"  # "fp32", "bf16" (autocast; weights and optimizer stay float32) or "auto":
    # bf16 where the device has native bf16 matmuls, else fp32
    trainable: str = "all"  # "all" or "image_head" (only the output rows of image codes)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2); Lumina-mGPT uses 1e-5
    seed: int = 0
    device: str | None = None  # torch device; None: where the pipeline loads (the CPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms during training
    log_every: int = 1  # steps between metrics lines
    eval_every: int = 200  # steps between evaluations (0: only at the end)
    eval_batches: int | None = None  # None: the whole eval set
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    out_dir: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it was read from (not a key)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> TrainConfig:
        """Build and validate; relative paths are resolved against the folder of `source`."""
        return build_config(TrainConfig, data, source, check=_check_train)


CHOICES = {
    "model.weights": ("pretrained", "random"),
    "train.precision": PRECISIONS,
    "train.trainable": ("all", "image_head"),
}


# --------------------------------------------------------------------------- parsing


class ConfigParser:
    """Builds a dataclass from parsed YAML/TOML, checking keys and types; errors name file:line."""

    def __init__(self, source: str | None, lines: dict[str, int], hints: dict[str, str] | None = None):
        self.source, self.lines, self.hints = source, lines, hints or {}

    def error(self, key: str, message: str) -> ConfigError:
        where = self.source or "config"
        line = self.lines.get(key)
        return ConfigError(f"{where}:{line}: {message}" if line else f"{where}: {message}")

    def build(self, cls: type, data: Any) -> Any:
        config = self._dataclass(cls, data, "")
        if "source" in {f.name for f in dataclasses.fields(cls)}:
            config.source = self.source
        return config

    def _dataclass(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip("."), f"'{prefix.rstrip('.') or 'the config'}' must be a mapping, "
                                                 f"got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
        for key in data:
            if key not in names:
                dotted = prefix + str(key)
                hint = f" ({self.hints[dotted]})" if dotted in self.hints else ""
                raise self.error(dotted, f"unknown key '{dotted}' (known: {', '.join(names)}){hint}")
        values = {}
        for name in names:
            if name in data:
                values[name] = self._value(hints[name], data[name], prefix + name)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            # a dataclass's own checks (__post_init__): blame the field its message starts with
            message = str(e)
            field_name = next((n for n in names if re.match(rf"{re.escape(n)}\b", message)), None)
            if field_name is None:
                raise self.error(prefix.rstrip("."), f"'{prefix.rstrip('.') or 'the config'}': {message}") from None
            raise self.error(prefix + field_name, f"'{prefix}{field_name}'{message[len(field_name):]}") from None

    def _value(self, tp: Any, value: Any, key: str) -> Any:
        if dataclasses.is_dataclass(tp):
            return self._dataclass(tp, value, key + ".")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self._value(inner, value, key)
        if origin is list:
            if not isinstance(value, list):
                raise self.error(key, f"'{key}' must be a list, got {type(value).__name__}")
            return [self._value(args[0], v, key) for v in value]
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                raise self.error(key, f"'{key}' must be a list, got {value!r}")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self._value(args[0], v, key) for v in value)
            if len(value) != len(args):
                raise self.error(key, f"'{key}' must be a list of {len(args)}, got {value!r}")
            return tuple(self._value(a, v, key) for a, v in zip(args, value))
        if tp is dict:
            if not isinstance(value, dict):
                raise self.error(key, f"'{key}' must be a mapping, got {type(value).__name__}")
            self._finite_inside(value, key)
            return dict(value)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is float and isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise self.error(key, f"'{key}' must be {tp.__name__}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise self.error(key, f"'{key}' must be a finite number, got {value!r}")
        return value

    def _finite_inside(self, value: Any, key: str) -> None:
        """NaN / inf anywhere in a free-form mapping (model.config) is an error too."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"'{key}' must be a finite number, got {value!r}")
        if isinstance(value, dict):
            for k, v in value.items():
                self._finite_inside(v, f"{key}.{k}")
        elif isinstance(value, list):
            for v in value:
                self._finite_inside(v, key)


def build_config(cls: type, data: Any, source: str | None = None, lines: dict[str, int] | None = None,
                 check: Callable[[ConfigParser, Any], None] | None = None, hints: dict[str, str] | None = None) -> Any:
    """Build dataclass `cls` from parsed data; `check(parser, config)` validates across fields
    (raising `parser.error(dotted_key, message)`). `lines`: dotted key -> line, from `read_config`."""
    parser = ConfigParser(source, lines or {}, hints)
    config = parser.build(cls, data)
    if check is not None:
        check(parser, config)
    return config


def _check_train(p: ConfigParser, c: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(c, section), name) not in allowed:
            raise p.error(key, f"'{key}' must be one of {', '.join(allowed)}, "
                               f"got {getattr(getattr(c, section), name)!r}")
    positive = {"data.seq_len": c.data.seq_len, "data.batch_size": c.data.batch_size,
                "data.window": c.data.window, "train.max_steps": c.train.max_steps,
                "train.grad_accum": c.train.grad_accum, "train.log_every": c.train.log_every,
                "train.keep_checkpoints": c.train.keep_checkpoints}
    if c.train.eval_batches is not None:
        positive["train.eval_batches"] = c.train.eval_batches
    non_negative = {"optim.warmup_steps": c.optim.warmup_steps, "optim.weight_decay": c.optim.weight_decay,
                    "optim.grad_clip": c.optim.grad_clip, "train.z_loss": c.train.z_loss,
                    "train.eval_every": c.train.eval_every, "train.save_every": c.train.save_every}
    for key, v in positive.items():
        if v <= 0:
            raise p.error(key, f"'{key}' must be positive, got {v!r}")
    for key, v in non_negative.items():
        if v < 0:
            raise p.error(key, f"'{key}' must be >= 0, got {v!r}")
    if not c.optim.lr > 0:
        raise p.error("optim.lr", f"'optim.lr' must be positive, got {c.optim.lr!r}")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise p.error("optim.min_lr_ratio", f"'optim.min_lr_ratio' must be in [0, 1], got {c.optim.min_lr_ratio}")
    if len(c.optim.betas) != 2 or not all(0 <= b < 1 for b in c.optim.betas):
        raise p.error("optim.betas", f"'optim.betas' must be two numbers in [0, 1), got {c.optim.betas}")
    if not c.optim.eps > 0:
        raise p.error("optim.eps", f"'optim.eps' must be positive, got {c.optim.eps!r}")
    if not 0 <= c.data.context_dropout <= 1:
        raise p.error("data.context_dropout", f"'data.context_dropout' must be in [0, 1], "
                                              f"got {c.data.context_dropout}")
    if not c.model.pipeline:
        raise p.error("model.pipeline", "'model.pipeline' (a pipeline directory) is required")
    if c.model.config and c.model.weights != "random":
        raise p.error("model.config", "'model.config' only applies with 'model.weights: random'")
    if not c.data.train:
        raise p.error("data.train", "'data.train' needs at least one shard directory")
    base = config_folder(p.source)
    c.model.pipeline = resolve_path(c.model.pipeline, base)
    c.data.train = [resolve_path(x, base) for x in c.data.train]
    c.data.eval = [resolve_path(x, base) for x in c.data.eval]
    if c.out_dir is not None:
        c.out_dir = resolve_path(c.out_dir, base)


def config_folder(source: str | None) -> Path | None:
    """The folder relative paths in a config are relative to (None: the working directory)."""
    return Path(source).resolve().parent if source else None


def resolve_path(path: str, base: Path | None) -> str:
    """`path` relative to `base` (the config's folder; None: the working directory), normalised."""
    p = Path(os.path.expanduser(path))
    # normpath: one spelling per directory ("configs/../runs/x" is "runs/x"), or a resumed run
    # would see its own data under another name and refuse to continue.
    return os.path.normpath(p if p.is_absolute() or base is None else base / p)


def _yaml_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of the key, from YAML's node tree."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _toml_lines(text: str) -> dict[str, int]:
    """Dotted key -> line, for `[section]` headers and `key = ...` lines (a textual scan)."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"\s*\[([A-Za-z0-9_.\-]+)\]\s*(#.*)?$", line)
        if header:
            section = header.group(1) + "."
            lines.setdefault(header.group(1), number)
            continue
        assign = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*=", line)
        if assign:
            lines.setdefault(section + assign.group(1), number)
    return lines


def read_config(path: str | os.PathLike) -> tuple[Any, dict[str, int]]:
    """Parse a .yaml/.yml or .toml file -> (data, dotted key -> line); ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        lines = _toml_lines(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        lines = _yaml_lines(text)
    else:
        raise ConfigError(f"{path}: unknown config format (use .yaml, .yml or .toml)")
    return ({} if data is None else data), lines


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a .yaml/.yml or .toml training config."""
    data, lines = read_config(path)
    return build_config(TrainConfig, data, str(path), lines, check=_check_train)
