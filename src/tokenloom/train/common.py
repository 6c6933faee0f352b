"""What the trainers share: the learning-rate schedule, the metrics log, checkpoint directories
(written atomically, verified on resume), the optimizer / RNG state as safetensors + JSON, and the
start of a run (`start_run`: refuse, clean up, resume or seed, truncate the log, save the config).

A checkpoint is a directory ``checkpoints/step-00000200/`` written into a temporary directory
(``.step-00000200.tmp``) and renamed into place. Its ``state.json`` is written last and lists every
other file with its size, so resume can tell a complete checkpoint from a damaged one (a file
missing, truncated, or not parseable) and falls back to the newest intact one, with a warning.
Temporary directories an interrupted run left are removed at the next start, with a warning.
Nothing is pickled: tensors go to safetensors files, everything else to JSON; checkpoints of
older versions (pickled optimizer.pt / rng.pt, no file list) are refused, not read. A run on
several ranks writes its tensors with torch.distributed.checkpoint instead, and its state.json says
"format": "dcp" (`train.distributed`); the rest (state.json, file list, verification) is the same.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (NonFiniteError, atomic_save_safetensors, atomic_write_bytes, atomic_write_json, fsync_dir,
                          load_tensors, save_weights, verify_safetensors)

CHECKPOINTS = "checkpoints"
CONFIG_NAME = "config.json"  # the run's config, rewritten at every start
STATE_NAME = "state.json"  # written last: lists the checkpoint's other files and their sizes
METRICS_NAME = "metrics.jsonl"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
RNG_TENSORS = "rng.safetensors"
LEGACY_FILES = ("optimizer.pt", "rng.pt")  # pickled state of older checkpoints: refused, never read
DAMAGED_SUFFIX = ".damaged"
SHARDED_FORMAT = "dcp"  # state.json "format" of a checkpoint written by several ranks (`train.distributed`)
_STEP_DIR = re.compile(r"step-(\d+)")
_TEMP_DIR = re.compile(r"\.(step-\d+)(\.old)?\.tmp")


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
    """Append-only metrics.jsonl (flushed per line), truncated to a checkpoint's step on resume.

    A line that does not parse (the torn last line of a killed run) is skipped with a warning
    naming the file and the line; `truncate` drops it from the file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _records(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a JSON object with an integer 'step'")
            except ValueError as e:
                warnings.warn(f"{self.path}:{number}: skipping a metrics line that does not parse ({e})",
                              UserWarning, stacklevel=3)
                continue
            out.append((line, record))
        return out

    def truncate(self, step: int) -> None:
        """Keep the records of steps <= `step` (the rest will be logged again); rewritten atomically."""
        if not self.path.exists():
            return
        kept = [line for line, record in self._records() if record["step"] <= step]
        atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [record for _, record in self._records()]


def check_finite_step(step: int, **values: float) -> None:
    """TrainError naming the step when a loss or gradient norm is NaN or inf."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} is {v}" for k, v in bad.items())
        raise TrainError(f"training stopped at step {step}: the {what}; the weights were not updated "
                         "(a learning rate too high, or no gradient clipping?)")


def check_step(optimizer: torch.optim.Optimizer, step: int, **values: float) -> None:
    """check_finite_step, dropping the step's gradients (zero_grad) before its TrainError propagates,
    so that nothing of the failed step reaches an update."""
    try:
        check_finite_step(step, **values)
    except TrainError:
        optimizer.zero_grad(set_to_none=True)
        raise


def stopped(error: TrainError, checkpoint: Path | None, restart: str) -> TrainError:
    """`error` with where the run's last good state is and how to go on from it. `restart` says how
    to train with a lower learning rate or other clipping, which a resumed run may not change."""
    if checkpoint is None:
        return TrainError(f"{error}; no checkpoint was written, so running again starts over (with any settings)")
    return TrainError(f"{error}; the last good checkpoint, {checkpoint}, is untouched, but resuming it with the same "
                      f"config would most likely stop here again (a run is a function of its config); {restart}")


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


def read_optimizer(directory: Path) -> dict[str, Any]:
    """What save_optimizer wrote, as an optimizer state dict (keyed by parameter index, tensors on the CPU)."""
    directory = Path(directory)
    meta = json.loads((directory / OPTIMIZER_JSON).read_text())
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, tensor in load_tensors(directory / OPTIMIZER_TENSORS).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restore what save_optimizer wrote. Tensors are read on the CPU: `load_state_dict` moves the
    moments to their parameters' device and dtype, and keeps `step` where a fresh run has it."""
    optimizer.load_state_dict(read_optimizer(directory))


def save_rng(directory: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    atomic_save_safetensors(tensors, Path(directory) / RNG_TENSORS)


def load_rng(directory: Path) -> None:
    tensors = load_tensors(Path(directory) / RNG_TENSORS)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- checkpoint directories


def checkpoint_dirs(root: Path) -> list[Path]:
    """The step-N directories under `root`, oldest first, unverified (a damaged one is listed until
    resume sets it aside as step-N.damaged, which is not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest step-N directory under `root` (unverified), or None."""
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def remove_stale_temps(root: Path) -> None:
    """Clear what an interrupted checkpoint write left in `root`, with a warning each: a
    `.step-N.tmp` being written is removed; a `.step-N.old.tmp` (an existing step-N set aside
    while it was replaced) is removed, or moved back when step-N itself is missing."""
    root = Path(root)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        m = _TEMP_DIR.fullmatch(path.name)
        if m is None or not path.is_dir():
            continue
        final = root / m.group(1)
        if m.group(2) and not final.exists():
            os.replace(path, final)
            warnings.warn(f"moved {path} back to {final.name}: an interrupted checkpoint write had set it aside",
                          UserWarning, stacklevel=3)
        else:
            shutil.rmtree(path)
            warnings.warn(f"removed {path}, a temporary checkpoint directory left by an interrupted run",
                          UserWarning, stacklevel=3)
    fsync_dir(root)


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None], state: dict[str, Any],
                     keep: int) -> Path:
    """Write checkpoint `step`: `write(directory)` puts the files, then state.json (listing them)
    goes last, into a temporary directory renamed to root/step-N. Keeps the newest `keep`.

    An existing step-N is renamed aside first and deleted only once the new one is in place, so
    some step-N exists at every moment (`remove_stale_temps` moves it back after a crash between
    the two renames)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    aside = root / f".{final.name}.old.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / STATE_NAME, {**state, "files": files})
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)  # the rename is durable before anything older is deleted
    shutil.rmtree(aside, ignore_errors=True)
    for old in checkpoint_dirs(root)[: -max(1, keep)]:
        shutil.rmtree(old)
    return final


def save_training_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any], keep: int,
                             extra: Callable[[Path], None] | None = None,
                             weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """write_checkpoint of the weights, optimizer and RNG state (and what `extra(directory)` adds).
    `weights`: the tensors to save as the model's (default: its whole state dict; a LoRA run saves
    its adapter only). Weights holding NaN or inf are a TrainError naming the step and the tensor:
    nothing is written."""
    def write(directory: Path) -> None:
        save_weights(model.state_dict() if weights is None else dict(weights), directory)
        save_optimizer(optimizer, directory)
        save_rng(directory)
        if extra is not None:
            extra(directory)

    try:
        return write_checkpoint(root, step, write, state, keep)
    except NonFiniteError as e:
        more = f" (and {len(e.tensors) - 1} more)" if len(e.tensors) > 1 else ""
        raise TrainError(f"training stopped at step {step}: weight {e.tensors[0] if e.tensors else '?'!r}{more} "
                         f"holds NaN or inf values, so checkpoint step-{step:08d} was not written") from None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_NAME).read_text())


def _older_format(path: Path) -> str | None:
    """Why checkpoint directory `path` was written by an older tokenloom, or None."""
    legacy = [name for name in LEGACY_FILES if (path / name).exists()]
    if legacy:
        return f"pickled {' and '.join(legacy)}"
    try:
        state = read_state(path)
    except (OSError, ValueError):
        return None  # damage, for verify_checkpoint
    if isinstance(state, dict) and "files" not in state:
        return f"a {STATE_NAME} that lists no files"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint directory is complete and readable, else what is wrong with it.

    state.json must parse and list the other files; each must be there with the listed size, and
    every safetensors file must be whole and every JSON file parse."""
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
        return f"{STATE_NAME} lists no files (written by an older tokenloom)"
    for name, size in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            return f"{STATE_NAME} lists {name!r}, which is not a file name"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            actual = file.stat().st_size
        except OSError as e:
            return f"{name} is unreadable ({type(e).__name__}: {e})"
        if size is not None and actual != size:
            return f"{name} is {actual} bytes, {STATE_NAME} says {size}"
        try:
            if name.endswith(".safetensors"):
                verify_safetensors(file)
            elif name.endswith(".json"):
                json.loads(file.read_text())
        except (ValueError, OSError) as e:
            return str(e) if name.endswith(".safetensors") else f"{name} is unreadable ({e})"
    if state.get("format") == SHARDED_FORMAT:  # a sharded (DCP) checkpoint: its metadata and the chunks it names
        from .distributed import verify_sharded

        return verify_sharded(path)
    return None


def resume_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under `root` (None when there is none at all).

    Damaged newer ones are renamed to step-N.damaged, with a warning naming them: the resumed run
    writes those steps again. TrainError when checkpoints exist but none is intact, and when one
    was written by an older tokenloom (pickled optimizer.pt / rng.pt, which are not read)."""
    dirs = checkpoint_dirs(root)
    for path in dirs:
        why = _older_format(path)
        if why is not None:
            raise TrainError(f"{path} was written by an older tokenloom ({why}), which is not read any more; "
                             "start a new output directory")
    damaged: list[tuple[Path, str]] = []
    for path in reversed(dirs):
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


# --------------------------------------------------------------------------- starting a run


def check_max_steps(max_steps: int | None) -> None:
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")


def check_resumable(where: str, before: Mapping[str, Any], now: Mapping[str, Any],
                    resumable: Collection[str] = (), label: str = "") -> None:
    """TrainError listing the keys (outside `resumable`, a trainer's RESUMABLE_CHANGES) whose
    values differ between the interrupted run's config and this one's: that is another run."""
    changed = sorted(k for k in before.keys() | now.keys() if k not in resumable and before.get(k) != now.get(k))
    if changed:
        def shown(d: Mapping[str, Any], k: str) -> str:
            return repr(d[k]) if k in d else "unset"

        diffs = ", ".join(f"{label}{k} was {shown(before, k)}, now {shown(now, k)}" for k in changed)
        raise TrainError(f"cannot resume {where}: {diffs} (that would be another run; use a new output directory)")


def start_run(out_dir: Path, resume: bool, *, seed: int, config: dict[str, Any], metrics: MetricsLog,
              load: Callable[[Path], int]) -> Path | None:
    """What both trainers do before their first step; returns the checkpoint resumed from, or None.

    Refuses an output directory holding checkpoints unless `resume`; clears the temporary
    directories of an interrupted checkpoint write (`remove_stale_temps`); resumes from the newest
    intact checkpoint (`load(path)` restores it, checking the config, and returns its step), or
    else seeds torch's RNG with `seed`; drops the metrics past the resumed step (the interrupted run
    logged them, this one logs them again); and writes `config` to config.json."""
    out_dir = Path(out_dir)
    root = out_dir / CHECKPOINTS
    if checkpoint_dirs(root) and not resume:
        raise TrainError(f"{out_dir} already holds checkpoints; resume, or use a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    latest = resume_checkpoint(root) if resume else None
    if latest is not None:
        step = load(latest)
    else:
        torch.manual_seed(seed)
        step = -1
    metrics.truncate(step)
    atomic_write_json(out_dir / CONFIG_NAME, config)
    return latest
