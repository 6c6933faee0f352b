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

Data mixing: ``data.train`` entries ``{path, weight, name}`` instead of paths draw rows from each
source in proportion to its weight (`TrainSource`, `train_sources`). Progressive training: a
``schedule`` list of stages, each ``name``, ``image_size`` and keys of data / optim / train over the
rest (`STAGE_KEYS`; run by `tokenloom.train.schedule`). Errors inside lists name the item:
``'schedule[1].optim.lr'``, ``'data.train[0].weight'``.
"""

from __future__ import annotations

import dataclasses
import json
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

from ..adapters import DEFAULT_TARGETS
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
    # pre-tokenized shard directories: paths (read together, each in proportion to its size), or data
    # mixing: {path, weight, name} entries, rows drawn from each in proportion to its weight
    train: list[str | dict] = field(default_factory=list)
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
    trainable: str = "all"  # "all", "image_head" (only the output rows of image codes), "experts" (a model's
    # expert projections and its expert modalities' rows: tokenloom add-modality --experts) or "lora" (see `lora`)
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
class LoraSection:
    """LoRA (through peft) on the pretrained weights, for ``train.trainable: lora``; the run's final/
    is then an adapter directory (see `tokenloom.adapters`)."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    # Module names (a module matches its name or a name ending in ".NAME") or one regex matched against
    # the whole module name; default: every block's attention and MLP projections.
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)  # trained whole and saved with the adapter


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection | None = None  # only with train.trainable: lora (which uses the defaults without it)
    # Progressive training: stages run in order, each from the previous one's weights; an entry sets
    # name, image_size and keys of data / optim / train over the rest of the config (see STAGE_KEYS)
    schedule: list[dict] = field(default_factory=list)
    out_dir: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it was read from (not a key)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        if not d["schedule"]:  # a run without stages keeps the config.json it always had
            d.pop("schedule")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> TrainConfig:
        """Build and validate; relative paths are resolved against the folder of `source`."""
        return build_config(TrainConfig, data, source, check=_check_train)


CHOICES = {
    "model.weights": ("pretrained", "random"),
    "train.precision": PRECISIONS,
    "train.trainable": ("all", "image_head", "experts", "lora"),
}


# --------------------------------------------------------------------------- parsing


class ConfigParser:
    """Builds a dataclass from parsed YAML/TOML, checking keys and types; errors name file:line."""

    def __init__(self, source: str | None, lines: dict[str, int], hints: dict[str, str] | None = None):
        self.source, self.lines, self.hints = source, lines, hints or {}

    def error(self, key: str, message: str) -> ConfigError:
        where = self.source or "config"
        line = self.lines.get(key)
        while line is None and "[" in key:  # inside a list (schedule[1].optim.lr): the nearest key written
            shorter = re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", key)
            if shorter == key:
                break
            key = shorter
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
            inner = [a for a in args if a is not type(None)]
            kinds = [a for a in inner if isinstance(value, typing.get_origin(a) or a)]
            if len(inner) > 1 and len(kinds) == 1:  # the one option of the value's type: its own errors
                return self._value(kinds[0], value, key)
            for option in inner[:-1]:  # several types (list[str] | str): the first the value is
                try:
                    return self._value(option, value, key)
                except ConfigError:
                    pass
            try:
                return self._value(inner[-1], value, key)
            except ConfigError:
                if len(inner) == 1:
                    raise
                names = " or ".join("a list" if typing.get_origin(a) is list else a.__name__ for a in inner)
                raise self.error(key, f"'{key}' must be {names}, got {value!r}") from None
        if origin is list:
            if not isinstance(value, list):
                raise self.error(key, f"'{key}' must be a list, got {type(value).__name__}")
            if dict in (args[0], *typing.get_args(args[0])):  # mappings in a list: data.train[1].weight
                return [self._value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
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
    if not c.data.train and not c.schedule:  # with a schedule, every stage must have some (checked per stage)
        raise p.error("data.train", "'data.train' needs at least one shard directory")
    _check_lora(p, c)
    _check_sources(p, c)
    base = config_folder(p.source)
    c.model.pipeline = resolve_path(c.model.pipeline, base)
    c.data.train = [resolve_path(x, base) if isinstance(x, str) else {**x, "path": resolve_path(x["path"], base)}
                    for x in c.data.train]
    c.data.eval = [resolve_path(x, base) for x in c.data.eval]
    if c.out_dir is not None:
        c.out_dir = resolve_path(c.out_dir, base)
    if c.schedule:
        _check_schedule(p, c)


def _check_lora(p: ConfigParser, c: TrainConfig) -> None:
    if c.lora is not None and c.train.trainable != "lora":
        raise p.error("lora", f"a 'lora' section only applies with 'train.trainable: lora' "
                              f"(train.trainable is {c.train.trainable!r})")
    if c.train.trainable != "lora":
        return
    if c.model.weights != "pretrained":
        raise p.error("train.trainable", "'train.trainable: lora' adapts pretrained weights; it needs "
                                         "'model.weights: pretrained'")
    lora = c.lora = c.lora or LoraSection()
    if lora.r <= 0:
        raise p.error("lora.r", f"'lora.r' (the rank) must be a positive integer, got {lora.r!r}")
    if not lora.alpha > 0:
        raise p.error("lora.alpha", f"'lora.alpha' must be positive, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise p.error("lora.dropout", f"'lora.dropout' must be in [0, 1), got {lora.dropout!r}")
    targets = lora.target_modules
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise p.error("lora.target_modules",
                          f"'lora.target_modules' is not a valid regex ({e}): {targets!r}") from None
    elif not targets or not all(targets):
        raise p.error("lora.target_modules", f"'lora.target_modules' must name modules, got {targets!r}")
    if not all(lora.modules_to_save):
        raise p.error("lora.modules_to_save", f"'lora.modules_to_save' has an empty name: {lora.modules_to_save!r}")


# --------------------------------------------------------------------------- data mixing

SOURCE_KEYS = ("path", "weight", "name")


@dataclass(frozen=True)
class TrainSource:
    """One entry of data.train, resolved: where it is, its weight (None: in proportion to its size)
    and the name its losses are logged under (loss/<name>)."""

    key: str  # "data.train[1]", for errors
    path: str
    weight: float | None
    name: str


def _check_sources(p: ConfigParser, c: TrainConfig) -> None:
    """data.train entries: paths, or {path, weight, name} mappings (normalised to all three keys)."""
    entries = []
    for i, x in enumerate(c.data.train):
        key = f"data.train[{i}]"
        if isinstance(x, str):
            if not x:
                raise p.error(key, f"'{key}' is an empty path")
            entries.append(x)
            continue
        for k in x:
            if k not in SOURCE_KEYS:
                raise p.error(f"{key}.{k}", f"unknown key '{key}.{k}' (known: {', '.join(SOURCE_KEYS)})")
        path, weight, name = x.get("path"), x.get("weight"), x.get("name")
        if not isinstance(path, str) or not path:
            raise p.error(f"{key}.path" if "path" in x else key,
                          f"'{key}.path' (a shard directory) must be a non-empty string, got {path!r}")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise p.error(f"{key}.weight", f"'{key}.weight' must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise p.error(f"{key}.weight", f"'{key}.weight' must be a finite number >= 0, got {weight!r}")
            weight = float(weight)
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name)):
            raise p.error(f"{key}.name", f"'{key}.name' must be letters, digits, '_', '.' or '-', got {name!r}")
        entries.append({"path": path, "weight": weight, "name": name})
    weighted = [isinstance(x, dict) and x["weight"] is not None for x in entries]
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise p.error(f"data.train[{i}]", f"'data.train[{i}]' has no weight: with data mixing every source needs "
                                          f"one ({{path: ..., weight: ...}}), or none has one")
    if entries and all(weighted) and not sum(x["weight"] for x in entries) > 0:
        raise p.error("data.train", "'data.train' weights are all 0: at least one source needs a positive weight")
    names: dict[str, int] = {}
    for i, x in enumerate(entries):
        if isinstance(x, dict) and x["name"] is not None:
            if x["name"] in names:
                raise p.error(f"data.train[{i}].name", f"'data.train[{i}].name' {x['name']!r} is taken by "
                                                       f"data.train[{names[x['name']]}]")
            names[x["name"]] = i
    c.data.train = entries


def train_sources(c: TrainConfig) -> list[TrainSource]:
    """data.train as TrainSources; unnamed ones are named after their directory (made unique)."""
    sources: list[TrainSource] = []
    explicit = {x["name"] for x in c.data.train if isinstance(x, dict) and x["name"]}
    taken: set[str] = set()
    for i, x in enumerate(c.data.train):
        entry = x if isinstance(x, dict) else {"path": x, "weight": None, "name": None}
        name = entry["name"]
        if not name:
            name = Path(entry["path"]).name or f"source-{i}"
            if name in taken or name in explicit:
                name = f"{name}-{i}"
        taken.add(name)
        sources.append(TrainSource(f"data.train[{i}]", entry["path"], entry["weight"], name))
    return sources


# --------------------------------------------------------------------------- progressive schedules

STAGE_KEYS = ("name", "image_size", "data", "optim", "train")
STAGE_SECTIONS = ("data", "optim", "train")
RESERVED_STAGE_NAMES = ("final", "checkpoints")


def stage_dict(base: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's config as a dict: `base` (a config's to_dict, without its schedule) with the stage's
    data / optim / train keys on top (each key replaced whole: a stage's data.train is its list)."""
    merged = json.loads(json.dumps({k: v for k, v in base.items() if k != "schedule"}))
    for section in STAGE_SECTIONS:
        merged.setdefault(section, {}).update(stage.get(section) or {})
    return merged


class _StageParser(ConfigParser):
    """Errors about a stage's config name it the way the file does: 'schedule[1].optim.lr'."""

    def __init__(self, parent: ConfigParser, prefix: str):
        super().__init__(parent.source, parent.lines, parent.hints)
        self.prefix = prefix

    def error(self, key: str, message: str) -> ConfigError:
        if not key.startswith(self.prefix):
            message = message.replace(f"'{key}", f"'{self.prefix}{key}", 1)
            key = self.prefix + key
        return super().error(key, message)


def _stage_image_size(p: ConfigParser, key: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise p.error(key, f"'{key}' must be a positive number of pixels or [width, height], got {value!r}")
    return list(value)


def _check_schedule(p: ConfigParser, c: TrainConfig) -> None:
    """Each stage: known keys, a unique name, an image size, and a config that checks like a whole one
    (its errors naming schedule[i].<key>). Stored normalised: paths resolved, sizes as [W, H]."""
    base = c.to_dict()
    normalised, names = [], {}
    for i, stage in enumerate(c.schedule):
        prefix = f"schedule[{i}]"
        for k in stage:
            if k not in STAGE_KEYS:
                hint = (" (every stage starts from the previous one's weights: 'model' is set once, at the top)"
                        if k == "model" else "")
                raise p.error(f"{prefix}.{k}", f"unknown key '{prefix}.{k}' (known: {', '.join(STAGE_KEYS)}){hint}")
        name = stage.get("name", f"stage-{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) \
                or name in RESERVED_STAGE_NAMES:
            raise p.error(f"{prefix}.name", f"'{prefix}.name' (the stage's output directory) must be letters, digits, "
                                            f"'_', '.' or '-', and not {' or '.join(RESERVED_STAGE_NAMES)}; got {name!r}")
        if name in names:
            raise p.error(f"{prefix}.name", f"'{prefix}.name' {name!r} is taken by schedule[{names[name]}]")
        names[name] = i
        image_size = _stage_image_size(p, f"{prefix}.image_size", stage.get("image_size"))
        for section in STAGE_SECTIONS:
            if section in stage and not isinstance(stage[section], dict):
                raise p.error(f"{prefix}.{section}", f"'{prefix}.{section}' must be a mapping, "
                                                     f"got {type(stage[section]).__name__}")
        sp = _StageParser(p, prefix + ".")
        config = sp._dataclass(TrainConfig, stage_dict(base, stage), prefix + ".")
        config.source = p.source
        _check_train(sp, config)
        if config.train.trainable == "lora":
            raise sp.error("train.trainable", "'train.trainable: lora' does not go with a 'schedule' (each stage "
                                              "starts from the previous stage's model directory; a LoRA run ends "
                                              "with an adapter): merge the adapter and train the stages on that")
        entry: dict[str, Any] = {"name": name, "image_size": image_size}
        for section in STAGE_SECTIONS:
            if section in stage:
                entry[section] = {k: getattr(getattr(config, section), k) for k in stage[section]}
        normalised.append(entry)
    c.schedule = normalised


def config_error(config: TrainConfig, key: str, message: str) -> ConfigError:
    """ConfigError naming the config's file and the line of dotted `key` (read again from the file),
    for what can be checked only once the model is built (LoRA targets)."""
    lines: dict[str, int] = {}
    if config.source and Path(config.source).is_file():
        try:
            lines = read_config(config.source)[1]
        except ConfigError:
            pass
    return ConfigParser(config.source, lines).error(key, message)


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
        elif isinstance(node, yaml.SequenceNode) and prefix:  # list items: "data.train[1]", "schedule[0].name"
            for i, item in enumerate(node.value):
                key = f"{prefix[:-1]}[{i}]"
                lines[key] = item.start_mark.line + 1
                walk(item, key + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def _toml_lines(text: str) -> dict[str, int]:
    """Dotted key -> line, for `[section]` headers and `key = ...` lines (a textual scan)."""
    lines: dict[str, int] = {}
    section = ""
    tables: dict[str, int] = {}  # [[name]] arrays of tables: items so far
    for number, line in enumerate(text.splitlines(), start=1):
        array = re.match(r"\s*\[\[([A-Za-z0-9_.\-]+)\]\]\s*(#.*)?$", line)
        if array:  # [[schedule]] -> "schedule[0]", "schedule[1]", ...
            name = array.group(1)
            tables[name] = tables.get(name, -1) + 1
            section = f"{name}[{tables[name]}]."
            lines.setdefault(section[:-1], number)
            continue
        header = re.match(r"\s*\[([A-Za-z0-9_.\-]+)\]\s*(#.*)?$", line)
        if header:
            name = header.group(1)
            parent = next((t for t in tables if name.startswith(t + ".")), None)
            if parent is not None:  # [schedule.data] under the last [[schedule]]
                name = f"{parent}[{tables[parent]}]{name[len(parent):]}"
            section = name + "."
            lines.setdefault(name, number)
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
