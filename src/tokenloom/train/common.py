"""What the trainers share: the learning-rate schedule, the metrics log, checkpoint directories
(written atomically, verified on resume) and the optimizer / RNG state as safetensors + JSON.

A checkpoint is a directory ``checkpoints/step-00000200/`` written into a temporary directory and
renamed into place. Its ``state.json`` is written last and lists every other file with its size,
so resume can tell a complete checkpoint from a damaged one (a file missing, truncated, or not
parseable) and falls back to the newest intact one, with a warning. Nothing is pickled: tensors
go to safetensors files, everything else to JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_save_safetensors, atomic_write_json, load_tensors, verify_safetensors, weight_files

CHECKPOINTS = "checkpoints"
STATE_NAME = "state.json"  # written last: lists the checkpoint's other files and their sizes
METRICS_NAME = "metrics.jsonl"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS = "rng.safetensors"
DAMAGED_SUFFIX = ".damaged"
_STEP_DIR = re.compile(r"step-(\d+)")


class TrainError(RuntimeError):
    pass


# --------------------------------------------------------------------------- schedule and log


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class MetricsLog:
    """Append-only metrics.jsonl (flushed per line), truncated to a checkpoint's step on resume."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate(self, step: int) -> None:
        """Keep the records of steps <= `step` (the rest will be logged again)."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def check_finite_step(step: int, **values: float) -> None:
    """TrainError naming the step when a loss or gradient norm is NaN or inf."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} is {v}" for k, v in bad.items())
        raise TrainError(f"training stopped at step {step}: the {what}; the weights were not updated "
                         "(a learning rate too high, or no gradient clipping?)")


def stopped(error: TrainError, checkpoint: Path | None) -> TrainError:
    """`error` with where the run's last good state is."""
    where = (f"the last good checkpoint, {checkpoint}, is untouched and a resumed run starts from it"
             if checkpoint is not None else "no checkpoint was written")
    return TrainError(f"{error}; {where}")


# --------------------------------------------------------------------------- optimizer and RNG


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """optimizer.safetensors (the per-parameter tensors) + optimizer.json (everything else)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                state.setdefault(str(index), {})[key] = value
    atomic_save_safetensors(tensors, Path(directory) / OPTIMIZER_TENSORS)
    atomic_write_json(Path(directory) / OPTIMIZER_JSON, {"param_groups": sd["param_groups"], "state": state})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, device: torch.device | str = "cpu") -> None:
    directory = Path(directory)
    if not (directory / OPTIMIZER_JSON).exists() and (directory / "optimizer.pt").exists():
        # checkpoints written before optimizer.safetensors; weights_only: tensors and plain data only
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
        return
    meta = json.loads((directory / OPTIMIZER_JSON).read_text())
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, tensor in load_tensors(directory / OPTIMIZER_TENSORS, device=str(device)).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_rng(directory: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    atomic_save_safetensors(tensors, Path(directory) / RNG_TENSORS)


def load_rng(directory: Path) -> None:
    directory = Path(directory)
    if not (directory / RNG_TENSORS).exists() and (directory / "rng.pt").exists():
        rng = torch.load(directory / "rng.pt", weights_only=True)  # older checkpoints
        torch.set_rng_state(rng["torch"])
        cuda = rng.get("cuda", [])
    else:
        tensors = load_tensors(directory / RNG_TENSORS)
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- checkpoint directories


def checkpoint_dirs(root: Path) -> list[Path]:
    """The step-N directories under `root`, oldest first (damaged ones included)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None], state: dict[str, Any],
                     keep: int) -> Path:
    """Write checkpoint `step`: `write(directory)` puts the files, then state.json (listing them)
    goes last, into a temporary directory renamed to root/step-N. Keeps the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / STATE_NAME, {**state, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root)[: -max(1, keep)]:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_NAME).read_text())


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint directory is complete and readable, else what is wrong with it.

    state.json must parse; every file it lists must be there with the listed size, and every
    safetensors file must be whole (a checkpoint older than that list: its weight files)."""
    path = Path(path)
    try:
        state = read_state(path)
    except FileNotFoundError:
        return f"{STATE_NAME} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{STATE_NAME} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(state, dict):
        return f"{STATE_NAME} is not a JSON object"
    files = state.get("files")
    if not isinstance(files, dict):
        try:
            files = {p.name: None for p in weight_files(path)}
        except (FileNotFoundError, ValueError) as e:
            return str(e)
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {STATE_NAME} says {size}"
        try:
            if name.endswith(".safetensors"):
                verify_safetensors(file)
            elif name.endswith(".json"):
                json.loads(file.read_text())
        except (ValueError, OSError) as e:
            return str(e) if name.endswith(".safetensors") else f"{name} is unreadable ({e})"
    return None


def resume_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under `root` (None when there is none at all).

    Damaged newer ones are renamed to step-N.damaged, with a warning naming them: the resumed run
    writes those steps again. TrainError when checkpoints exist but none is intact."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(checkpoint_dirs(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in damaged:
                aside = bad.with_name(bad.name + DAMAGED_SUFFIX)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
                warnings.warn(f"skipping damaged checkpoint {bad} ({why}); moved it to {aside.name} and "
                              f"resuming from the newest intact one, {path}", UserWarning, stacklevel=3)
            return path
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise TrainError(f"no intact checkpoint in {root} ({listing}); remove them to start over")
    return None
