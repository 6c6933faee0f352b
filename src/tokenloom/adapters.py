"""LoRA adapters on a tokenloom Transformer, through Hugging Face `peft`.

An adapter directory (what a `train.trainable: lora` run writes as its final/) is peft's own format,
so `peft.PeftModel.from_pretrained(transformer, directory)` reads it as it is:

    adapter_config.json          peft.LoraConfig (r, lora_alpha, target_modules, modules_to_save, ...)
    adapter_model.safetensors    the adapter weights ("base_model.model.<module>.lora_A.weight", ...)
    tokenloom_adapter.json       the base it was trained on: its directory, a fingerprint of its shape
                                 (model config and weight shapes) and one of its weights (sampled rows)

Loading (`apply_adapter`, which `tokenloom.load(base, adapter=DIR)` calls) checks the adapter against
the base first: a tensor shaped for another model, or a fingerprint that differs, is a ValueError naming
the file, before peft touches the model. The adapter is then merged into the weights, so the pipeline
runs a plain Transformer (no extra matmuls, nothing of peft left in it).

peft is imported only where an adapter is made or applied: loading a plain model never imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import __version__
from .checkpoint import atomic_directory, atomic_write_json, weight_files
from .model import ModelConfig, Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "tokenloom_adapter.json"
FORMAT = "tokenloom-lora"
# The Linear projections of every block: attention (wq, wk, wv, wo) and the SwiGLU MLP (w1, w2, w3).
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_PREFIX = "base_model.model."  # how peft names the base model's modules in adapter_model.safetensors
_SAMPLED_ROWS = 64  # rows per weight matrix that the weights fingerprint reads
# ModelConfig fields that change neither the weights nor what the model computes at inference
_NOT_FINGERPRINTED = ("dropout",)


class LoraTargetError(ValueError):
    """A LoRA setting names modules the model does not have (or cannot adapt); `key` is the setting."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- targets


def _matches_target(name: str, target: str | Sequence[str]) -> bool:
    """peft's rule for target_modules: a regex must match the whole module name; a name in a list
    matches a module of that name or whose name ends with ".name"."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _linear_names(model: Transformer) -> list[str]:
    """The names LoRA can target: of every Linear layer but the output head."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m is not model.output and m is not model.expert_output})


def check_lora_targets(model: Transformer, target_modules: str | Sequence[str],
                       modules_to_save: Sequence[str] = ()) -> list[str]:
    """The names of the modules LoRA would adapt; LoraTargetError when a target (each entry of a list,
    or the regex) matches no module, or matches one that is not an adaptable Linear projection."""
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    known = ", ".join(_linear_names(model))
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries:
        raise LoraTargetError("target_modules", "'lora.target_modules' names no module")
    matched: list[str] = []
    for entry in entries:
        found = [n for n in names if _matches_target(n, entry if isinstance(target_modules, str) else [entry])]
        if not found:
            kind = "the regex" if isinstance(target_modules, str) else ""
            raise LoraTargetError("target_modules", f"'lora.target_modules': {kind + ' ' if kind else ''}{entry!r} "
                                                    f"matches no module of the model (its Linear layers: {known})")
        for name in found:
            module = modules[name]
            if module in (model.output, model.expert_output) or (model.output is None and module is model.tok_embeddings):
                raise LoraTargetError("target_modules", f"'lora.target_modules': {entry!r} matches the output head "
                                      f"{name!r}, which training and scoring read as a matrix (not through its "
                                      "forward): list it under lora.modules_to_save to train the whole head")
            if not isinstance(module, nn.Linear):
                raise LoraTargetError("target_modules", f"'lora.target_modules': {entry!r} matches {name!r} "
                                      f"({type(module).__name__}), not a Linear layer (the Linear layers: {known})")
        matched += [n for n in found if n not in matched]
    for entry in modules_to_save:
        # peft's rule for modules_to_save: every module whose name ends with the entry
        found = [n for n in names if n.endswith(entry)]
        if not found:
            raise LoraTargetError("modules_to_save", f"'lora.modules_to_save': {entry!r} matches no module of the "
                                  "model (e.g. output, tok_embeddings, norm)")
        both = sorted(set(found) & set(matched))
        if both:
            raise LoraTargetError("modules_to_save", f"'lora.modules_to_save': {entry!r} matches {both[0]!r}, which "
                                  "lora.target_modules adapts too; a module is either adapted or trained whole")
    return matched


def add_lora(model: Transformer, *, r: int, alpha: float, dropout: float, target_modules: str | Sequence[str],
             modules_to_save: Sequence[str] = (), base: str | Path | None = None):
    """Inject LoRA layers into `model` in place (peft.get_peft_model) and return the PeftModel
    wrapping it. Only the adapter weights (and modules_to_save copies) stay trainable; `model` keeps
    its forward, `output_weight` and everything else, so a trainer can go on calling it directly.
    The LoRA A matrices are initialised from torch's global RNG (seed it for a reproducible run)."""
    from peft import LoraConfig, get_peft_model

    check_lora_targets(model, target_modules, modules_to_save)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                        modules_to_save=list(modules_to_save) or None)
    peft_model = get_peft_model(model, config)
    if base is not None:  # recorded in adapter_config.json (get_peft_model takes it from the model, which has none)
        peft_model.peft_config["default"].base_model_name_or_path = str(base)
    return peft_model


# --------------------------------------------------------------------------- fingerprints


def model_fingerprint(config: ModelConfig) -> str:
    """sha256 of the model config and the shape of every weight: equal for models that one adapter fits."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps({"config": fields, "shapes": shapes}, sort_keys=True).encode()).hexdigest()


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 of evenly spaced rows of every weight in a model directory's files (memory-mapped: a few
    rows per matrix are read, whatever the model's size), rounded to bfloat16 so that a float32
    base and its bfloat16 copy agree. Another training of the same shape gives another fingerprint."""
    samples: dict[str, tuple[list[int], torch.Tensor]] = {}
    for path in weight_files(Path(directory)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shape = piece.get_shape()
                if len(shape) >= 2 and shape[0] > _SAMPLED_ROWS:
                    rows = sorted({round(k * (shape[0] - 1) / (_SAMPLED_ROWS - 1)) for k in range(_SAMPLED_ROWS)})
                    sample = torch.cat([piece[i:i + 1] for i in rows])
                else:
                    sample = f.get_tensor(name)
                if sample.is_floating_point():
                    sample = sample.to(torch.bfloat16).view(torch.int16)
                samples[name] = (list(shape), sample)
    digest = hashlib.sha256()
    for name in sorted(samples):  # whatever the sharding
        shape, sample = samples[name]
        digest.update(f"{name}:{shape}:".encode())
        digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_record(directory: str | Path, config: ModelConfig) -> dict[str, Any]:
    """What tokenloom_adapter.json says about the base: where it was, and its two fingerprints."""
    return {"path": str(Path(directory).resolve()), "model_fingerprint": model_fingerprint(config),
            "weights_fingerprint": weights_fingerprint(directory), "model": config.to_dict()}


# --------------------------------------------------------------------------- saving


def save_adapter(peft_model, directory: str | Path, base: dict[str, Any], extra: dict[str, Any] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write peft's adapter files and tokenloom_adapter.json (`base`: a `base_record`) into a temporary
    directory renamed to `directory` (an existing one is replaced only once the new one is complete).
    `state_dict`: the PeftModel's tensors to take the adapter from, instead of the model's own (a
    sharded model's, gathered)."""
    import peft

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        # embeddings are never LoRA targets here; "auto" would look for the base's config (on the Hub too)
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False, **kwargs)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of ours
        atomic_write_json(tmp / ADAPTER_META, {"format": FORMAT, "format_version": 1, "tokenloom_version": __version__,
                                               "peft_version": peft.__version__, "base": base, **(extra or {})})
    return directory


# --------------------------------------------------------------------------- loading


def is_adapter_dir(path: str | Path) -> bool:
    """An adapter directory rather than a model directory (no config.json, an adapter_config.json)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").exists()


def read_adapter_meta(directory: str | Path) -> dict[str, Any] | None:
    """tokenloom_adapter.json of an adapter directory (None for a plain peft adapter without one)."""
    path = Path(directory) / ADAPTER_META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("base"), dict):
        raise ValueError(f"{path} is not a tokenloom adapter record")
    return meta


def adapter_base(directory: str | Path) -> Path:
    """The base model directory an adapter directory names (its tokenloom_adapter.json)."""
    meta = read_adapter_meta(directory)
    if meta is None or not meta["base"].get("path"):
        raise ValueError(f"{Path(directory)} is an adapter directory with no {ADAPTER_META} naming its base; "
                         "give the base model too (tokenloom.load(BASE, adapter=DIR), --model BASE --adapter DIR)")
    base = Path(meta["base"]["path"])
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{Path(directory) / ADAPTER_META} names the base model {base}, which is not there "
                                "any more; give the base model too (tokenloom.load(BASE, adapter=DIR), "
                                "--model BASE --adapter DIR)")
    return base


def _differences(recorded: dict[str, Any], actual: dict[str, Any]) -> str:
    keys = sorted(k for k in recorded.keys() | actual.keys()
                  if k not in _NOT_FINGERPRINTED and recorded.get(k) != actual.get(k))
    return ", ".join(f"{k} {recorded.get(k)!r} there, {actual.get(k)!r} here" for k in keys[:4])


def check_adapter(directory: str | Path, model: Transformer, base_dir: str | Path | None) -> None:
    """ValueError naming the file when the adapter at `directory` was made for another base than `model`
    (loaded from `base_dir`): a fingerprint in tokenloom_adapter.json differs, or a tensor of
    adapter_model.safetensors does not fit the module it adapts."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {directory}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not a LoRA adapter directory")
    meta = read_adapter_meta(directory)
    if meta is not None:
        base, where = meta["base"], directory / ADAPTER_META
        if base.get("model_fingerprint") != model_fingerprint(model.config):
            diff = _differences(base.get("model") or {}, model.config.to_dict())
            raise ValueError(f"{where}: this adapter was made for another base model ({diff or 'other weight shapes'})"
                             f"; it was trained on {base.get('path')}")
        if base_dir is not None and base.get("weights_fingerprint") != weights_fingerprint(base_dir):
            raise ValueError(f"{where}: this adapter was made for another base model: {base_dir} has the shape of "
                             f"the base it was trained on ({base.get('path')}) but other weights")
    _check_adapter_shapes(directory / ADAPTER_WEIGHTS, model)


def _check_adapter_shapes(path: Path, model: Transformer) -> None:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError is a bare Exception
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    for key, shape in shapes.items():
        name = key.removeprefix(_PREFIX)
        lora = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        if lora:
            module = modules.get(lora.group(1))
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{path}: tensor {key!r} adapts {lora.group(1)!r}, which the base model has no "
                                 "Linear layer of: this adapter was made for another base model")
            ok = len(shape) == 2 and (shape[1] == module.in_features if lora.group(2) == "A"
                                      else shape[0] == module.out_features)
            expected = f"[r, {module.in_features}]" if lora.group(2) == "A" else f"[{module.out_features}, r]"
        elif name in params:
            ok, expected = shape == tuple(params[name].shape), str(list(params[name].shape))
        else:
            raise ValueError(f"{path}: tensor {key!r} belongs to no module of the base model: this adapter was "
                             "made for another base model")
        if not ok:
            raise ValueError(f"{path}: tensor {key!r} has shape {list(shape)}, the base model needs {expected}: "
                             "this adapter was made for another base model")


def apply_adapter(model: Transformer, directory: str | Path, base_dir: str | Path | None = None) -> Transformer:
    """`model` (the base, loaded from `base_dir`) with the LoRA adapter at `directory` merged into its
    weights, checked first (`check_adapter`). Returns a plain Transformer (peft's layers unloaded)."""
    from peft import PeftModel

    directory = Path(directory)
    check_adapter(directory, model, base_dir)
    device = next(model.parameters()).device
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), torch_device=str(device))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: peft cannot apply this adapter: {e}") from None
    merged = peft_model.merge_and_unload(safe_merge=True)
    return merged.eval()

