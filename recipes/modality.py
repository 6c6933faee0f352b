"""Steps shared by the recipes that teach shapes-tiny a new modality (recipes/video/, recipes/speech/): draw
shapes-world sets and pre-tokenize them, write a training config from a recipe's template, evaluate a model
once, and install a trained one. Each step skips what is done and resumes what was interrupted."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

import tokenloom
from tokenloom.data.pretokenize import pretokenize
from tokenloom.pipeline import Pipeline
from tokenloom.world.tasks import build_dataset

RECIPES = Path(__file__).resolve().parent
SHIPPED = Path(tokenloom.__file__).resolve().parent / "assets" / "shapes-tiny"
SMOKE_COUNT = 6
SHARD_SIZE = 5000


def build_sets(work: Path, sets: dict, smoke: bool) -> None:
    """Each set {name: (seed, {task: documents})} drawn into WORK/data/NAME and pre-tokenized with WORK/base
    into WORK/shards/NAME."""
    pipe = Pipeline.from_pretrained(work / "base")
    for name, (seed, counts) in sets.items():
        shards = work / "shards" / name
        if (shards / "manifest.json").exists() and json.loads((shards / "manifest.json").read_text()).get("complete"):
            continue
        data = work / "data" / name
        if not (data / "train.jsonl").exists():
            build_dataset(data, {t: SMOKE_COUNT if smoke else n for t, n in counts.items()}, seed=seed)
        pretokenize(data / "train.jsonl", pipe, shards, shard_size=SHARD_SIZE)


def write_config(template: Path, work: Path, smoke: bool) -> Path:
    """WORK/<template's name>: the template with paths relative to WORK; --smoke: a few tiny steps."""
    config = yaml.safe_load(template.read_text())
    if smoke:
        config["train"].update(max_steps=4, eval_every=2, save_every=2, log_every=1)
        config["optim"]["warmup_steps"] = 1
        config["data"]["batch_size"] = 2
    path = work / template.name
    recipe = template.relative_to(RECIPES.parent) if template.is_relative_to(RECIPES.parent) else template
    path.write_text(f"# written from {recipe} by its build.py; paths are relative to this folder\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def train_from(template: Path, work: Path, name: str, smoke: bool) -> dict:
    """Train WORK/<template's name> (written by write_config) into WORK/NAME; WORK/NAME/final is the model."""
    from tokenloom.train import train

    return train(write_config(template, work, smoke), out_dir=(work / name).resolve())


def arguments(doc: str, steps) -> argparse.ArgumentParser:
    """The options every modality recipe takes; a recipe adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path, help="work directory (created; reruns resume)")
    ap.add_argument("--only", choices=steps, help="run one step")
    ap.add_argument("--smoke", action="store_true", help="tiny sets and a few steps: checks the recipe runs")
    ap.add_argument("--n", type=int, default=200, help="held-out samples per task in the evaluations")
    ap.add_argument("--install-to", type=Path, help="then copy the trained model there (a checkout's assets)")
    ap.add_argument("--base", type=Path, default=SHIPPED,
                    help="the model to grow (default: the shipped shapes-tiny); it must not have the new modality "
                         "yet (`tokenloom remove-modality` gives the image-text model these recipes grew: docs/model-growth.md)")
    return ap


def evaluate_model(model: Path, out: Path, tasks, n: int) -> dict:
    from tokenloom.evaluation import evaluate

    if (out / "report.json").exists():
        return json.loads((out / "report.json").read_text())
    return evaluate(tokenloom.load(model), out, n=n, tasks=tasks)


def install_model(final: Path, target: Path) -> Path:
    """Copy a trained model over the shipped one's place in a checkout, as the shapes-tiny recipe installs."""
    sys.path.insert(0, str(RECIPES / "shapes-tiny"))  # its install() and its checks of the target
    from build import install

    return install(final, target)
