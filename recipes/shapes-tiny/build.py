"""Build shapes-tiny, the embedded default model, from nothing but this repository.

    python recipes/shapes-tiny/build.py --work runs/shapes-tiny [--install-to DIR]

1. writes the shapes-world training and evaluation-loss datasets (raw JSONL + PNGs) under --work;
2. trains a byte-level BPE on their text and builds the native vocabulary;
3. assembles the base pipeline (WORK/base): that tokenizer, the shapes VQGAN (--vq; vq.yaml here is
   its training config, for `tokenloom train-vq`) and stages.yaml's model_shape;
4. pre-tokenizes the datasets into Parquet shards (WORK/shards/);
5. trains the stages of stages.yaml in order, each config being base.yaml with the stage's row on top
   (written to WORK/<stage>.yaml; training output in WORK/<stage>/); each stage resumes if interrupted;
6. with --install-to DIR, copies the last stage's pipeline into DIR (to ship it as the embedded model,
   DIR is src/tokenloom/assets/shapes-tiny of a source checkout; nothing is installed without it).
Every step skips work already done, so rerunning after an interruption continues.
What each stage found, and the stages that were dropped: docs/recipe-notes.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

import tokenloom
from tokenloom.data.pretokenize import pretokenize
from tokenloom.image_processing import ImageTokenizer
from tokenloom.model import ModelConfig, Transformer
from tokenloom.pipeline import Pipeline, PipelineConfig
from tokenloom.vocab import build_native
from tokenloom.world.tasks import build_dataset

HERE = Path(__file__).resolve().parent
# Read only: the VQGAN shipped with the package (the default --vq).
SHIPPED = Path(tokenloom.__file__).resolve().parent / "assets" / "shapes-tiny"
TEXT_VOCAB = 512  # byte-level BPE merges; the world's text is a few dozen words
MAX_GRID = 64  # size tokens: images up to 64 codes a side (512 px at factor 8)
SHARD_SIZE = 5000  # documents per Parquet shard
# The base pipeline's generation settings; why these: docs/model-card.md,
# "How the default sampling settings were chosen".
PIPELINE = dict(profile="shapes-tiny", layout="unirep", image_width=64, image_height=64, max_image_side=512,
                resolution_prompt=False, guidance_scale=1.75, max_new_tokens=400, text_sampling={"temperature": 0.0},
                image_sampling={"temperature": 0.1, "top_k": 32}, image_candidates=8,
                candidate_sampling={"temperature": 0.4})


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """One row of stages.yaml (see its header)."""

    number: int  # 1-based position in the table
    name: str
    start: str  # "random" or an earlier stage's name
    seeds: tuple[int, ...]
    mix: str
    steps: int
    lr: float
    warmup: int
    seed: int
    other: dict[str, Any] = field(default_factory=dict)  # the row's `set`: dotted key -> value

    @property
    def pipeline(self) -> str:
        """Where the stage starts, relative to the work directory."""
        return "base" if self.start == "random" else f"{self.start}/final"


ROW_KEYS = {"name", "start", "seeds", "mix", "steps", "lr", "warmup", "seed", "set"}


class RecipeError(ValueError):
    pass


def _load_stages(table: Mapping[str, Any], source: str) -> tuple[Stage, ...]:
    stages: list[Stage] = []
    seed_mix: dict[int, str] = {}
    for number, row in enumerate(table["stages"], start=1):
        where = f"{source}: stage {number} ({row.get('name', '?')})"
        if set(row) - ROW_KEYS or ROW_KEYS - {"set"} - set(row):
            raise RecipeError(f"{where}: keys must be {sorted(ROW_KEYS)} ('set' optional), got {sorted(row)}")
        if row["start"] != "random" and row["start"] not in {s.name for s in stages}:
            raise RecipeError(f"{where}: start must be 'random' or an earlier stage, got {row['start']!r}")
        if row["name"] in {s.name for s in stages} or row["name"] in ("base", "data", "shards"):
            raise RecipeError(f"{where}: the name {row['name']!r} is taken")
        if row["mix"] not in table["mixes"]:
            raise RecipeError(f"{where}: unknown mix {row['mix']!r} (mixes: {', '.join(table['mixes'])})")
        for seed in row["seeds"]:
            if seed == table["eval_set"]["seed"]:
                raise RecipeError(f"{where}: seed {seed} draws the eval set")
            if seed_mix.setdefault(seed, row["mix"]) != row["mix"]:
                raise RecipeError(f"{where}: seed {seed}'s set is mix {seed_mix[seed]!r} in an earlier stage")
        other = dict(row.get("set") or {})
        for key in other:
            if len(key.split(".")) != 2:
                raise RecipeError(f"{where}: set keys are section.key, got {key!r}")
        stages.append(Stage(number, row["name"], row["start"], tuple(row["seeds"]), row["mix"], row["steps"],
                            float(row["lr"]), row["warmup"], row["seed"], other))
    return tuple(stages)


BASE: dict[str, Any] = yaml.safe_load((HERE / "base.yaml").read_text())
TABLE: dict[str, Any] = yaml.safe_load((HERE / "stages.yaml").read_text())
STAGES = _load_stages(TABLE, str(HERE / "stages.yaml"))
MIXES: dict[str, dict[str, int]] = TABLE["mixes"]
EVAL_SEED: int = TABLE["eval_set"]["seed"]
EVAL_COUNTS: dict[str, int] = TABLE["eval_set"]["counts"]
MODEL_SHAPE: dict[str, Any] = TABLE["model_shape"]
SEED_MIX = {seed: s.mix for s in STAGES for seed in s.seeds}


def stage(key: int | str) -> Stage:
    """A stage by its 1-based number or its name."""
    for s in STAGES:
        if key in (s.number, s.name):
            return s
    raise KeyError(f"no stage {key!r} (stages 1 to {len(STAGES)}: {', '.join(s.name for s in STAGES)})")


def _scaled(counts: Mapping[str, int], scale: float) -> dict[str, int]:
    return {k: max(1, int(v * scale)) for k, v in counts.items()}


def train_counts(seed: int, scale: float = 1.0) -> dict[str, int]:
    """Documents per task in the training set drawn with `seed` (the mix of the stages that read it)."""
    if seed not in SEED_MIX:
        raise KeyError(f"no stage reads seed {seed}; pass the counts to prepare_train_shards")
    return _scaled(MIXES[SEED_MIX[seed]], scale)


def train_shards_name(seed: int) -> str:
    """The shard directory of seed `seed`'s training set, relative to the work directory."""
    return "shards/train" if seed == 0 else f"shards/train-seed{seed}"


def stage_config(s: Stage, *, pipeline: str | Path | None = None, seeds: Sequence[int] | None = None,
                 max_steps: int | None = None, device: str | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
    """The stage's training config: base.yaml with the row on top, paths relative to the work directory.

    pipeline and seeds replace where it starts and what it reads; max_steps, device (train.device) and
    batch_size override the table (a GPU stage run on the CPU, smoke runs).
    """
    config = copy.deepcopy(BASE)
    model = {"pipeline": s.pipeline, **config.get("model", {})}
    if s.start == "random":
        model.update(weights="random", config=dict(MODEL_SHAPE))
    if pipeline is not None:
        model["pipeline"] = str(pipeline)
    config["model"] = model
    config["data"] = {"train": [train_shards_name(seed) for seed in (s.seeds if seeds is None else seeds)],
                      **config.get("data", {})}
    config.setdefault("optim", {}).update(lr=s.lr, warmup_steps=s.warmup)
    config.setdefault("train", {}).update(max_steps=s.steps, seed=s.seed)
    for dotted, value in s.other.items():
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = value
    for section, key, value in (("train", "max_steps", max_steps), ("train", "device", device),
                                ("data", "batch_size", batch_size)):
        if value is not None:
            config[section][key] = value
    return config


# --------------------------------------------------------------------------- data


def _texts(jsonl: Path):
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            for msg in json.loads(line)["messages"]:
                for part in msg["content"]:
                    if part["type"] == "text":
                        yield part["text"]


def _train_dir(work: Path, seed: int) -> Path:
    return work / ("data" if seed == 0 else f"data-seed{seed}")


def _train_data(work: Path, seed: int, counts: Mapping[str, int]) -> Path:
    """The raw training set drawn with `seed` (written if missing); seed 0's is also the BPE's text."""
    data = _train_dir(work, seed)
    if not (data / "train.jsonl").exists():
        build_dataset(data, counts, seed=seed, split="train")
    return data / "train.jsonl"


def _train_shards(work: Path, seed: int) -> Path:
    return work / train_shards_name(seed)


def full_float32(device: str | None) -> None:
    """On a CUDA device, turn TF32 off: the VQ encoder's codes must be the CPU's, and TF32
    convolutions would move some at quantization boundaries."""
    if device is not None and torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def _prepare_one(work: Path, seed: int, counts: Mapping[str, int], pipeline: Path, device: str | None,
                 progress: bool) -> dict:
    full_float32(device)
    pipe = Pipeline.from_pretrained(pipeline, device=device)
    return pretokenize([_train_data(work, seed, counts)], pipe, _train_shards(work, seed), shard_size=SHARD_SIZE,
                       progress=progress)


def _prepare_worker(args: tuple) -> dict:
    torch.set_num_threads(1)  # one process per core
    return _prepare_one(*args, progress=False)


def prepare_train_shards(work: Path, seeds: Sequence[int], pipeline: Path, scale: float = 1.0, jobs: int = 1,
                         device: str | None = None, counts: Mapping[str, int] | None = None) -> list[dict]:
    """Write and pre-tokenize the training sets drawn with `seeds`, `jobs` processes at a time.

    Each set holds train_counts(seed) documents per task, or `counts` (for seeds no stage reads),
    times `scale`. Sets already done are skipped (and an interrupted one resumes). The VQ encoder,
    almost all the work, runs on `device` (float32, so its codes are the CPU's).
    """
    work = Path(work)
    tasks = [(work, seed, train_counts(seed, scale) if counts is None else _scaled(counts, scale), Path(pipeline),
              device) for seed in seeds]
    if jobs <= 1 or len(tasks) <= 1:
        return [_prepare_one(*task, progress=True) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(_prepare_worker, tasks, chunksize=1)


# --------------------------------------------------------------------------- training


def write_stage_config(s: Stage, work: Path, **overrides: Any) -> Path:
    """Write the stage's config to WORK/<stage>.yaml (its relative paths are then the work directory's)."""
    path = Path(work) / f"{s.name}.yaml"
    path.write_text(f"# shapes-tiny stage {s.number}: recipes/shapes-tiny/base.yaml + stages.yaml row {s.name!r}\n"
                    + yaml.safe_dump(stage_config(s, **overrides), sort_keys=False))
    return path


def train_stage(s: Stage, work: Path, **overrides: Any) -> dict:
    """Train one stage into WORK/<stage>/ (resuming it if interrupted); overrides as for stage_config."""
    from tokenloom.train import train

    wanted = stage_config(s, **overrides)["train"].get("device")
    if wanted is not None and torch.device(wanted).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"stage {s.number} ({s.name}) trains on a CUDA GPU (train.device: {wanted}) and this "
                         f"machine has none; pass --train-device cpu to run it on the CPU (days at full scale), "
                         f"or --stages {s.number - 1} to stop before it")
    return train(write_stage_config(s, work, **overrides), out_dir=Path(work) / s.name)


def base_pipeline(work: Path, vq_dir: Path, bpe_text: Path) -> Path:
    """Assemble WORK/base (once): BPE and vocabulary on `bpe_text`, the VQGAN, random weights."""
    base = work / "base"
    if not (base / "config.json").exists():
        image_tokenizer = ImageTokenizer.from_pretrained(vq_dir)
        tokenizer, vocab = build_native(_texts(bpe_text), TEXT_VOCAB, image_tokenizer.vqgan.config.codebook_size,
                                        MAX_GRID)
        model = Transformer.random(ModelConfig(vocab_size=vocab.size, **MODEL_SHAPE), seed=0)
        Pipeline(model, vocab, tokenizer, image_tokenizer, PipelineConfig(**PIPELINE)).save_pretrained(base)
    return base


def check_install_target(target: Path) -> Path:
    """Refuse an install directory inside an installed environment, or one holding other files."""
    target = Path(target).resolve()
    if {"site-packages", "dist-packages"} & set(target.parts):
        raise SystemExit(f"--install-to {target} is inside an installed environment; the recipe does not write "
                         f"into installed packages (ship a model through src/tokenloom/assets/ of a checkout)")
    if target.exists():
        if not target.is_dir():
            raise SystemExit(f"--install-to {target} is not a directory")
        if any(target.iterdir()) and not (target / "config.json").exists():
            raise SystemExit(f"--install-to {target} holds files but no pipeline (config.json); not replacing them")
    return target


def install(final: Path, target: Path) -> Path:
    """Copy the pipeline `final` into `target`, replacing the pipeline there (if any)."""
    target = check_install_target(target)
    if target.exists():
        for f in target.iterdir():
            if f.is_file():
                f.unlink()
    target.mkdir(parents=True, exist_ok=True)
    for f in Path(final).iterdir():
        shutil.copy2(f, target / f.name)
    return target


def build(work: Path, vq_dir: Path = SHIPPED, install_to: Path | None = None, scale: float = 1.0,
          max_steps: int | None = None, stages: int = len(STAGES), jobs: int = 1, device: str | None = None,
          train_device: str | None = None, batch_size: int | None = None) -> Path:
    """Run the recipe in `work` (steps done already are skipped); returns the last stage's pipeline.

    stages: run the first N. scale multiplies every set's document counts; max_steps and batch_size
    override every stage's (smoke runs); train_device every stage's train.device. jobs and device:
    pre-tokenize that many sets at once, their VQ encoder on `device`.
    """
    if install_to is not None:
        check_install_target(install_to)  # before days of training, not after
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    bpe_text = _train_data(work, 0, train_counts(0, scale))
    if not (data / "eval.jsonl").exists():
        build_dataset(data, _scaled(EVAL_COUNTS, scale), seed=EVAL_SEED, split="eval")
    base = base_pipeline(work, Path(vq_dir), bpe_text)
    pretokenize([data / "eval.jsonl"], Pipeline.from_pretrained(base), work / "shards" / "eval", shard_size=SHARD_SIZE)
    prepare_train_shards(work, sorted({0} | {seed for s in STAGES[:stages] for seed in s.seeds}), base, scale,
                         jobs=jobs, device=device)

    final, summary = base, None
    for s in STAGES[:stages]:
        summary = train_stage(s, work, max_steps=max_steps, device=train_device, batch_size=batch_size)
        final = work / s.name / "final"
    if install_to is not None:
        print(f"installed {final} into {install(final, install_to)}")
    print(json.dumps(summary, indent=2, default=str))
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python recipes/shapes-tiny/build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working directory (datasets, shards, every stage's run)")
    parser.add_argument("--install-to", default=None,
                        help="copy the result into this directory (default: install nothing)")
    parser.add_argument("--stages", type=int, default=len(STAGES), help=f"run the first N of {len(STAGES)} stages")
    parser.add_argument("--vq", default=str(SHIPPED), help="directory with the trained shapes VQGAN "
                        "(default: the one shipped in the tokenloom package, read only)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the dataset sizes (smoke runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=None, help="override data.batch_size (smoke runs)")
    parser.add_argument("--jobs", type=int, default=1, help="pre-tokenize this many training sets at once")
    parser.add_argument("--device", default=None, help="run the VQ encoder of pre-tokenization here (e.g. cuda)")
    parser.add_argument("--train-device", default=None, help="train every stage here, whatever its config says")
    args = parser.parse_args(argv)
    if not 0 <= args.stages <= len(STAGES):
        parser.error(f"--stages must be 0 to {len(STAGES)}")
    build(Path(args.work), Path(args.vq), None if args.install_to is None else Path(args.install_to), args.scale,
          args.max_steps, args.stages, args.jobs, args.device, args.train_device, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
