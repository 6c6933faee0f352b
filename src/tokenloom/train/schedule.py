"""Progressive training (Lumina-mGPT's FP-SFT: growing image sizes): a config's ``schedule`` of stages,
run in order in one output directory, each stage from the previous one's weights.

    schedule:
      - {name: s64,  image_size: 64,  data: {train: [shards/t2i-64]},  train: {max_steps: 600}}
      - {name: s96,  image_size: 96,  data: {train: [shards/t2i-96]},  train: {max_steps: 600}}
      - {name: s128, image_size: 128, data: {train: [shards/t2i-128]}, train: {max_steps: 800}, optim: {lr: 1.0e-4}}

A stage is the rest of the config with the stage's ``data`` / ``optim`` / ``train`` keys on top (each
key replaced whole). Stage 0 starts from ``model`` as the config says; stage i from stage i-1's
``final/``, with a fresh optimizer and its own warmup and cosine over its own ``train.max_steps``.

    OUT/config.json   the whole config, stages included
    OUT/<stage>/      each stage's run: config.json, metrics.jsonl, loss.png, checkpoints/, final/
    OUT/final/        a copy of the last stage's final/, once every stage is done
    OUT/loss.png      every stage's losses against the step of the whole schedule

Pre-tokenized shards fix their images' sizes, so a stage's ``image_size`` does not resize anything.
It is checked, before any stage trains: the image tokenizer must encode that size (sides multiples
of its downsampling factor, within the vocabulary's grid limit), and the stage's training shards
(their manifests count the images of each size) must hold images of that size and none larger
(smaller ones, replay data at an earlier size, may be mixed in). It is also the default image size
of the pipeline the stage saves (``final/``), so the last stage's model draws at its size. Every
stage's training sources are checked up front too (present, finished, of the model's vocabulary).

Running the same command again after an interruption goes through the stages in order: a finished
stage resumes at its last step and only writes its ``final/`` again, the interrupted one resumes at
its checkpoint, and the later ones run, so the losses are those of an uninterrupted run. A
``max_steps`` (``--max-steps``) counts optimizer steps over the whole schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_directory, atomic_write_json
from ..data.pretokenize import read_manifest, vocab_fingerprint
from ..data.raw import DataError
from ..pipeline import Pipeline
from .common import CHECKPOINTS, CONFIG_NAME, METRICS_NAME, MetricsLog, TrainError, checkpoint_dirs
from .config import STAGE_SECTIONS, TrainConfig, config_error, stage_dict
from .plot import plot_losses
from .trainer import Trainer, check_same_run, check_sources

__all__ = ["Stage", "check_stages", "run_schedule", "schedule_stages"]

FINAL = "final"


@dataclass
class Stage:
    index: int
    name: str
    image_size: tuple[int, int] | None
    config: TrainConfig  # complete: model.pipeline is the previous stage's final/, out_dir OUT/<name>
    sets: frozenset[str]  # the dotted keys the stage sets itself ("data.train", "optim.lr", "image_size")

    def key(self, dotted: str) -> str:
        """Where `dotted` is written in the config file: the stage's entry, or the top level."""
        return f"schedule[{self.index}].{dotted}" if dotted in self.sets else dotted

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def schedule_stages(config: TrainConfig, out_dir: str | os.PathLike) -> list[Stage]:
    """The stages of a config with a schedule, each a complete TrainConfig training into out_dir/<name>."""
    out = Path(out_dir).resolve()  # absolute: the stage configs resolve relative paths against the config file
    base = config.to_dict()
    stages: list[Stage] = []
    for i, entry in enumerate(config.schedule):
        merged = stage_dict(base, entry)
        if i:
            merged["model"] = {"pipeline": str(out / stages[-1].name / FINAL), "weights": "pretrained", "config": {}}
        merged["out_dir"] = str(out / entry["name"])
        stage_config = TrainConfig.from_dict(merged, source=config.source)
        sets = {f"{section}.{k}" for section in STAGE_SECTIONS for k in entry.get(section) or {}}
        sets |= {k for k in ("name", "image_size") if entry.get(k) is not None}
        size = entry.get("image_size")
        stages.append(Stage(i, entry["name"], tuple(size) if size else None, stage_config, frozenset(sets)))
    return stages


def _sizes(text: str) -> tuple[int, int]:
    w, h = text.split("x")
    return int(w), int(h)


def check_stages(config: TrainConfig, stages: list[Stage]) -> None:
    """Everything a stage needs that the config file alone cannot tell, before any stage trains (see
    the module docstring): ConfigErrors naming the stage, the key and its line."""
    try:
        pipe = Pipeline.from_pretrained(config.model.pipeline)
    except (FileNotFoundError, ValueError) as e:
        raise config_error(config, "model.pipeline", f"'model.pipeline': {e}") from None
    vocab = vocab_fingerprint(pipe.vocab)
    for stage in stages:
        label = f"stage {stage.index} ({stage.name})"
        size_key = stage.key("image_size")
        if stage.image_size is not None:
            w, h = stage.image_size
            try:
                pipe.grid_size(w, h)
            except ValueError as e:
                raise config_error(config, size_key, f"{label}: '{size_key}' {w}x{h} cannot be encoded by the image "
                                                     f"tokenizer of {config.model.pipeline}: {e}") from None
        train_key = stage.key("data.train")
        prefix = f"schedule[{stage.index}]." if "data.train" in stage.sets else ""
        sources = check_sources(stage.config, prefix, label)
        found: dict[str, dict[str, int] | None] = {}
        for j, source in enumerate(sources):
            key = f"{train_key}[{j}]"
            manifest = read_manifest(source.path)
            if manifest["settings"].get("vocab") != vocab:
                raise config_error(config, key, f"{label}: '{key}': {source.path} was pre-tokenized with another "
                                                f"vocabulary than {config.model.pipeline}")
            if source.weight != 0:
                found[key] = manifest["counts"].get("image_sizes")
        for j, path in enumerate(stage.config.data.eval):
            key = f"{stage.key('data.eval')}[{j}]"
            try:
                read_manifest(path)
            except (DataError, OSError) as e:
                raise config_error(config, key, f"{label}: '{key}': {e}") from None
        if stage.image_size is not None:
            _check_image_sizes(config, stage, label, size_key, found)


def _check_image_sizes(config: TrainConfig, stage: Stage, label: str, size_key: str,
                       found: dict[str, dict[str, int] | None]) -> None:
    w, h = stage.image_size  # type: ignore[misc]
    unknown = [key for key, sizes in found.items() if sizes is None]
    if unknown:
        warnings.warn(f"{label}: the shards of {', '.join(unknown)} were made by an older tokenloom, which did not "
                      f"count image sizes, so '{size_key}' {w}x{h} cannot be checked against them", UserWarning,
                      stacklevel=3)
    exact = False
    for key, sizes in found.items():
        for text in sizes or {}:
            sw, sh = _sizes(text)
            if sw > w or sh > h:
                raise config_error(config, key, f"{label}: '{key}' holds {text} images, larger than the stage's "
                                                f"'{size_key}' {w}x{h}")
            exact = exact or (sw, sh) == (w, h)
    if not exact and not unknown:
        held = ", ".join(f"{key}: {', '.join(sizes) or 'no images'}" for key, sizes in found.items())
        raise config_error(config, size_key, f"{label}: no training images of the stage's '{size_key}' {w}x{h} "
                                             f"({held}); pre-tokenize its data at that size (tokenloom pretokenize "
                                             f"--image-size, or images of that size)")


def _install_final(source: Path, target: Path) -> None:
    """Copy the last stage's final/ to OUT/final (a temporary directory renamed into place: a crash
    leaves the old one or the new one, never neither)."""
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def _check_started_stages(out: Path, config: TrainConfig, stages: list[Stage]) -> None:
    """A rerun may change the stages that have not started, no other: each started stage's config
    (with its image_size) is checked before anything is written, so a refused rerun leaves OUT as it was."""
    saved_path = out / CONFIG_NAME
    saved = (json.loads(saved_path.read_text()).get("schedule") or []) if saved_path.exists() else []
    new = config.to_dict().get("schedule") or []
    for i, stage in enumerate(stages):
        if not checkpoint_dirs(stage.out_dir / CHECKPOINTS):
            continue
        check_same_run(stage.out_dir, stage.config)
        if saved and (i >= len(saved) or saved[i].get("image_size") != new[i].get("image_size")):
            raise TrainError(f"schedule[{i}] ({stage.name}) has started in {out} at another image_size than "
                             f"{config.source or 'this config'} gives it now (use a new output directory)")


def _plot(out: Path, stages: list[Stage]) -> None:
    train, evals, offset = [], [], 0
    for stage in stages:
        for r in MetricsLog(stage.out_dir / METRICS_NAME).read():
            if "loss" in r:
                train.append((offset + r["step"], r["loss"]))
            if "eval_loss" in r:
                evals.append((offset + r["step"], r["eval_loss"]))
        offset += stage.config.train.max_steps
    if train or evals:
        plot_losses(out / "loss.png", train, evals, title=f"loss ({out.name}: {' -> '.join(s.name for s in stages)})")


def run_schedule(config: TrainConfig, resume: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) the stages of `config.schedule` in config.out_dir; returns a summary with each
    stage's. max_steps: stop once this many optimizer steps of the whole schedule are done."""
    out = Path(config.out_dir)  # type: ignore[arg-type]
    stages = schedule_stages(config, out)
    check_stages(config, stages)
    if checkpoint_dirs(out / CHECKPOINTS):
        raise TrainError(f"{out} holds the checkpoints of a run without a schedule; use a new output directory")
    if not resume:
        started = [s.name for s in stages if checkpoint_dirs(s.out_dir / CHECKPOINTS)]
        if started:
            raise TrainError(f"{out} already holds checkpoints (of {', '.join(started)}); resume, or use a new "
                             "output directory")
    _check_started_stages(out, config, stages)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, config.to_dict())
    started_at = time.perf_counter()
    summaries: list[dict[str, Any]] = []
    steps = steps_this_run = 0
    finished = True
    for stage in stages:
        budget = None if max_steps is None else max_steps - steps
        if budget is not None and budget <= 0:
            finished = False
            break
        trainer = Trainer(stage.config, stage.out_dir, resume=resume)
        if stage.image_size is not None:  # the size the stage's final/ draws by default
            trainer.pipeline.config.image_width, trainer.pipeline.config.image_height = stage.image_size
        summary = trainer.run(budget)
        summaries.append({"stage": stage.name, "image_size": list(stage.image_size) if stage.image_size else None,
                          **summary})
        steps += summary["step"]
        steps_this_run += summary["steps_this_run"]
        if summary["final_dir"] is None:
            finished = False
            break
    final = out / FINAL
    if finished:
        _install_final(stages[-1].out_dir / FINAL, final)
    _plot(out, stages)
    last = summaries[-1] if summaries else {}
    return {"out_dir": str(out), "stages": summaries, "step": steps, "steps_this_run": steps_this_run,
            "total_steps": sum(s.config.train.max_steps for s in stages), "stage": last.get("stage"),
            "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
            "tokens": sum(s["tokens"] for s in summaries), "seconds": time.perf_counter() - started_at,
            "checkpoint": last.get("checkpoint"), "final_dir": str(final) if finished else None}

