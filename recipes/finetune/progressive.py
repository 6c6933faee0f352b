"""FP-SFT (progressive resolution, as Lumina-mGPT trains) against direct 96 px fine-tuning of the shipped
shapes-tiny on text to image, for the same budget and the same share of replay: the data, both trainings
and the comparison.

    python recipes/finetune/progressive.py --work runs/fpsft                  # everything (~1 h on 2 cores)
    python recipes/finetune/progressive.py --work runs/fpsft --only data      # or fpsft, direct, compare
    python recipes/finetune/progressive.py --work runs/fpsft-smoke --smoke    # tiny sets, 2 steps a stage

1. data: shapes-world text-to-image sets (`tokenloom.world.tasks.build_dataset`, t2i only) of square
   images at 64, 80 and 96 px, each drawn with a seed of its own (seeds no shapes-tiny stage used), two
   replay sets of the shipped model's old tasks (t2i, caption, qa, story, edit), at 64x64 and at its
   own sizes, and a 96 px eval-loss set; pre-tokenized with the starting model into WORK/shards/t2i-64,
   t2i-80, t2i-96, replay-64, replay-all and eval-96 (their manifests count the images of each size,
   which is what a stage's image_size is checked against);
2. fpsft: fpsft.yaml, written to WORK/fpsft.yaml: stages s64 -> s80 -> s96 in WORK/fpsft/, each from
   the previous one's weights, the last one's model in WORK/fpsft/final;
3. direct: direct.yaml, written to WORK/direct.yaml: 96 px from the start for the schedule's steps x
   batch x seq_len, in WORK/direct/; direct-all-sizes (direct.yaml with the replay at the shipped model's
   sizes, WORK/shards/replay-all: 64x64, 96x64 and 64x96; written to WORK/direct-all-sizes.yaml), in
   WORK/direct-all-sizes/;
4. compare: each model (the starting one and each run's) draws the same --n held-out t2i prompts at
   96x96 (the new size) and at 64x64 (the old one, which fine-tuning must keep), scored by parsing the
   drawn scene back (exact match), and answers --n held-out caption and question prompts (the text
   skills, which must hold too; about images of the shipped model's three sizes, scored by size too);
   with each run's steps, last eval loss on the 96 px set, the document tokens it trained on and its
   training wall time: WORK/compare.json, WORK/compare.md, WORK/compare-<model>-<size>.png. A second
   compare scores only the models that are new since the last.

--scale F (default 1) multiplies every training set's document count, every stage's max_steps and the
direct run's steps (the sum of the scaled stages, so both runs keep the same budget); below 1 each
stage's warmup is min(warmup, steps // 5) and both runs evaluate and checkpoint every third of the
direct run's steps. The scale is recorded in WORK/recipe.json; a work directory built at another scale
(or by the recipe's first design, 64 -> 96 -> 128 without replay) is refused. Measured on two CPU cores:
docs/finetuning.md.

Every step skips what is done and resumes what was interrupted: rerun the same command. --model starts
from another model directory (default: the shipped one, read only); --device runs the pre-tokenizer's
VQ encoder there; --train-device sets train.device of both runs (e.g. cuda).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import tokenloom
from tokenloom.data.pretokenize import pretokenize
from tokenloom.pipeline import Pipeline
from tokenloom.world.tasks import DEFAULT_SIZES, build_dataset

HERE = Path(__file__).resolve().parent
SHIPPED = Path(tokenloom.__file__).resolve().parent / "assets" / "shapes-tiny"  # read only
SIZES = (64, 80, 96)
TARGET = SIZES[-1]
DESIGN = 2  # 1: 64 -> 96 -> 128 without replay at lr 3e-4 (docs/finetuning.md has its numbers)
# Documents per training set. Two thirds of a row's positions are t2i (seq_len 1024 holds about 11 64 px,
# 8 80 px or 5-6 96 px documents): a little more than the fpsft stages read, and about what the direct
# run reads of t2i-96 (one pass). The replay third reads most of replay-64 once.
COUNTS = {64: 4000, 80: 5000, 96: 12000}
REPLAY = {"t2i": 3000, "caption": 1200, "qa": 2400, "story": 1000, "edit": 2400}  # stage 13's proportions
EVAL_COUNT = 400
SEEDS = {64: 1064, 80: 1080, 96: 1096, "replay": 1264, "replay-all": 1265, "eval": 2096}  # shapes-tiny used 0-42
SMOKE_COUNT = 12
COMPARE_SIZES = (TARGET, 64)  # the new size, then the old one (the shipped model draws 64x64 by default)
TEXT_TASKS = ("caption", "qa")  # the skills that must not be lost, scored after the drawing
SHARD_SIZE = 5000
RUNS = ("fpsft", "direct", "direct-all-sizes")
# direct-all-sizes is direct.yaml with this replay instead of replay-64. Replay at 64x64 alone kept 64x64
# captions but not captions of the 96x64 and 64x96 images the shipped model also reads (docs/finetuning.md);
# the fpsft stages s64 and s80 cannot take it (a stage's image_size check refuses larger images).
ALL_SIZES_REPLAY = ("shards/replay-64", "shards/replay-all")
STEPS = ("data", *RUNS, "compare")


def set_name(size: int | str) -> str:
    return {"eval": f"eval-{TARGET}", "replay": "replay-64", "replay-all": "replay-all"}.get(size, f"t2i-{size}")


# --------------------------------------------------------------------------- data


def set_counts(size: int | str, smoke: bool = False, scale: float = 1.0) -> dict[str, int]:
    """Documents a set draws per task: the eval set's EVAL_COUNT, a training set's COUNTS (or REPLAY) x
    scale; SMOKE_COUNT (a task) in a smoke run."""
    if size in ("replay", "replay-all"):
        return {task: SMOKE_COUNT if smoke else max(1, round(n * scale)) for task, n in REPLAY.items()}
    if smoke:
        return {"t2i": SMOKE_COUNT}
    return {"t2i": EVAL_COUNT if size == "eval" else max(1, round(COUNTS[size] * scale))}


def build_sets(work: Path, model: Path, smoke: bool = False, device: str | None = None,
               scale: float = 1.0) -> dict[str, Any]:
    """The raw sets (WORK/data/<set>/) and their shards (WORK/shards/<set>), each skipped when done."""
    pipe = None
    summaries = {}
    for size in (*SIZES, "replay", "replay-all", "eval"):
        name = set_name(size)
        data = work / "data" / name
        split = "eval" if size == "eval" else "train"
        # replay-all: the shipped model's own sizes (64x64, 96x64, 64x96), the rest square
        sizes = DEFAULT_SIZES if size == "replay-all" else [({"eval": TARGET, "replay": 64}.get(size, size),) * 2]
        if not (data / f"{split}.jsonl").exists():
            build_dataset(data, set_counts(size, smoke, scale), seed=SEEDS[size], sizes=sizes, split=split)
        if pipe is None:
            if device is not None and torch.device(device).type == "cuda":  # the CPU's codes: no TF32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            pipe = Pipeline.from_pretrained(model, device=device)
        summaries[name] = pretokenize(data / f"{split}.jsonl", pipe, work / "shards" / name, shard_size=SHARD_SIZE)
    return summaries


# --------------------------------------------------------------------------- configs and training


def scaled_steps(scale: float) -> list[int]:
    """fpsft.yaml's stage steps x scale (at least 1 each); the direct run takes their sum."""
    schedule = yaml.safe_load((HERE / "fpsft.yaml").read_text())["schedule"]
    return [max(1, round(stage["train"]["max_steps"] * scale)) for stage in schedule]


def template(run: str) -> str:
    """The recipe file a run's config comes from."""
    return "direct.yaml" if run == "direct-all-sizes" else f"{run}.yaml"


def run_config(run: str, model: Path, smoke: bool = False, train_device: str | None = None,
               scale: float = 1.0) -> dict[str, Any]:
    """fpsft.yaml or direct.yaml (also for direct-all-sizes, with ALL_SIZES_REPLAY's swap) with
    model.pipeline set (and the smoke run's, the scale's or the device's overrides)."""
    config = copy.deepcopy(yaml.safe_load((HERE / template(run)).read_text()))
    if run == "direct-all-sizes":
        old, new = ALL_SIZES_REPLAY
        config["data"]["train"] = [{**x, "path": new} if x["path"] == old else x for x in config["data"]["train"]]
    config["model"]["pipeline"] = str(model)
    if train_device is not None:
        config["train"]["device"] = train_device
    if smoke:  # 2 steps a stage, the direct run as many as the whole schedule
        config["data"]["batch_size"] = 2
        config["optim"]["warmup_steps"] = 1
        config["train"].update(log_every=1, eval_every=2, eval_batches=2, save_every=2)
        stages = len(yaml.safe_load((HERE / "fpsft.yaml").read_text())["schedule"])
        if "schedule" in config:
            for stage in config["schedule"]:
                stage["train"]["max_steps"] = 2
        else:
            config["train"]["max_steps"] = 2 * stages
    elif scale != 1.0:  # at scale 1 the configs are the yaml files' own
        steps = scaled_steps(scale)
        every = max(1, sum(steps) // 3)
        config["train"].update(eval_every=min(config["train"]["eval_every"], every),
                               save_every=min(config["train"]["save_every"], every),
                               log_every=min(config["train"]["log_every"], max(1, min(steps) // 5)))
        warmup = config["optim"]["warmup_steps"]
        if "schedule" in config:
            for stage, n in zip(config["schedule"], steps):
                stage["train"]["max_steps"] = n
                stage.setdefault("optim", {})["warmup_steps"] = min(warmup, max(1, n // 5))
        else:
            config["train"]["max_steps"] = sum(steps)
            config["optim"]["warmup_steps"] = min(warmup, max(1, sum(steps) // 5))
    return config


def write_config(run: str, work: Path, model: Path, smoke: bool = False, train_device: str | None = None,
                 scale: float = 1.0) -> Path:
    path = work / f"{run}.yaml"
    note = " (smoke run)" if smoke else (f" at scale {scale:g}" if scale != 1.0 else "")
    swap = " with the replay at the shipped sizes" if run == "direct-all-sizes" else ""
    path.write_text(f"# written by recipes/finetune/progressive.py from recipes/finetune/{template(run)}{swap}"
                    f"{note}; paths are relative to this folder\n"
                    + yaml.safe_dump(run_config(run, model, smoke, train_device, scale), sort_keys=False))
    return path


def train_run(run: str, work: Path, model: Path, smoke: bool = False, train_device: str | None = None,
              scale: float = 1.0) -> dict:
    """Train (or resume) a run; its training wall time, summed over the calls that trained steps, is kept in
    WORK/<run>.time.json."""
    from tokenloom.train import train

    # An absolute out_dir: a schedule's stage directories under a relative one are resolved again against
    # the config's folder (WORK/WORK/fpsft/s64), where compare does not look.
    summary = train(write_config(run, work, model, smoke, train_device, scale), out_dir=(work / run).resolve())
    timing = work / f"{run}.time.json"
    record = json.loads(timing.read_text()) if timing.exists() else {"seconds": 0.0, "calls": []}
    if summary["steps_this_run"]:
        record["seconds"] += summary["seconds"]
        record["calls"].append({"steps": summary["steps_this_run"], "seconds": summary["seconds"]})
        timing.write_text(json.dumps(record, indent=2))
    return summary


def check_work(work: Path, smoke: bool, scale: float) -> None:
    """Record the work directory's scale in WORK/recipe.json; refuse one recorded at another."""
    path = work / "recipe.json"
    want = {"design": DESIGN, "smoke": smoke, "scale": scale}
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            raise SystemExit(f"{work} was made with {have}, not {want}: use another --work")
    else:
        path.write_text(json.dumps(want) + "\n")


# --------------------------------------------------------------------------- comparison


def _run_dirs(work: Path, run: str) -> list[Path]:
    """The training directories of a run: the schedule's stages, or the run itself."""
    config = json.loads((work / run / "config.json").read_text())
    return [work / run / stage["name"] for stage in config.get("schedule", [])] or [work / run]


def run_record(work: Path, run: str) -> dict[str, Any] | None:
    """A finished run's last eval loss, its document tokens and steps (from its checkpoints' state)."""
    from tokenloom.train.common import latest_checkpoint, read_state
    from tokenloom.train.trainer import MetricsLog

    if not (work / run / "final" / "config.json").exists():
        return None
    dirs = _run_dirs(work, run)
    states = [read_state(latest_checkpoint(d / "checkpoints")) for d in dirs]
    evals = [r["eval_loss"] for r in MetricsLog(dirs[-1] / "metrics.jsonl").read() if "eval_loss" in r]
    curve = []
    offset = 0
    for d, state in zip(dirs, states):
        curve += [(offset + r["step"], r["eval_loss"]) for r in MetricsLog(d / "metrics.jsonl").read() if "eval_loss" in r]
        offset += state["step"]
    timing = work / f"{run}.time.json"
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
    step_seconds = sorted(r["seconds"] for d in dirs for r in MetricsLog(d / "metrics.jsonl").read() if "seconds" in r)
    return {"steps": sum(s["step"] for s in states), "tokens": sum(s["tokens"] for s in states),
            "positions": sum(s["positions"] for s in states), "eval_loss": evals[-1] if evals else None,
            "eval_curve": curve, "train_seconds": seconds,
            "step_seconds_median": step_seconds[len(step_seconds) // 2] if step_seconds else None}


def t2i_at(pipe, n: int, seed: int, size: int, candidates: int, batch_size: int = 16) -> tuple[dict, list]:
    """Exact-scene accuracy of `n` held-out t2i prompts drawn at size x size (one draw each unless
    `candidates`), with its breakdown and the bordered thumbnails."""
    from tokenloom.evaluation import eval_t2i
    from tokenloom.world.tasks import heldout_samples

    pipe.config.image_candidates = candidates
    samples = heldout_samples("t2i", n, seed, sizes=[(size, size)])
    score, breakdown, _, shown = eval_t2i(pipe, samples, batch_size, True, seed)
    return {"t2i_exact": score, "breakdown": breakdown}, shown


def text_at(pipe, task: str, n: int, seed: int, batch_size: int = 32) -> dict:
    """Exact answers of `n` held-out `task` prompts (captions or questions, greedy, about images of the
    shipped model's sizes), with the breakdown and the exact rate by image size."""
    from PIL import Image

    from tokenloom.evaluation import eval_text
    from tokenloom.world.tasks import heldout_samples

    samples = heldout_samples(task, n, seed)
    score, breakdown, records = eval_text(pipe, samples, batch_size, True, task)
    by_size: dict[str, list[bool]] = {}
    for sample, record in zip(samples, records):
        image = next(x for x in sample.prompt if isinstance(x, Image.Image))
        by_size.setdefault(f"{image.width}x{image.height}", []).append(record["right"])
    return {"exact": score, "breakdown": breakdown,
            "by_size": {size: sum(right) / len(right) for size, right in sorted(by_size.items())}}


def _pct(score: float | None) -> str:
    return "" if score is None else f"{100 * score:.1f}%"


def _objects(breakdown: dict[str, float]) -> str:
    return " / ".join(f"{100 * breakdown[f'objects_{k}']:.0f}" for k in (1, 2, 3) if f"objects_{k}" in breakdown)


def _earlier_scores(work: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The models of an earlier WORK/compare.json made with the same prompts and draws, whose final/ has
    not been written since (a rerun scores only what is new: a run finished later, a new measure)."""
    path = work / "compare.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if any(old.get(k) != report[k] for k in ("sizes", "n", "seed", "candidates")):
        return {}
    made = path.stat().st_mtime

    def unchanged(model: Path) -> bool:
        return (model / "config.json").exists() and (model / "config.json").stat().st_mtime < made

    return {name: r for name, r in old.get("models", {}).items() if name == "start" or unchanged(Path(r["model"]))}


def compare(work: Path, model: Path, n: int = 200, seed: int = 0, candidates: int = 1,
            device: str | None = None, sizes: tuple[int, ...] = COMPARE_SIZES,
            text_tasks: tuple[str, ...] = TEXT_TASKS) -> dict[str, Any]:
    from tokenloom.report import image_grid

    labels = [f"{size}x{size}" for size in sizes]
    report: dict[str, Any] = {"sizes": labels, "n": n, "seed": seed, "candidates": candidates, "models": {}}
    recipe = work / "recipe.json"
    if recipe.exists():
        report["recipe"] = json.loads(recipe.read_text())
    models = {"start": model, **{run: work / run / "final" for run in RUNS}}
    earlier = _earlier_scores(work, report)
    for name, path in models.items():
        record: dict[str, Any] = {"model": str(path)}
        if name != "start":
            run = run_record(work, name)
            if run is None:
                print(f"compare: {name} has not finished ({work / name}); skipped")
                continue
            record.update(run)
        pipe = tokenloom.load(path, device=device)
        old = earlier.get(name, {})
        if old.get("model") == str(path) and set(old.get("t2i", {})) == set(labels):
            record["t2i"] = old["t2i"]  # scored before, with these settings, of this same final/
        else:
            record["t2i"] = {}
            for size, label in zip(sizes, labels):
                started = time.perf_counter()
                scores, shown = t2i_at(pipe, n, seed, size, candidates)
                record["t2i"][label] = {**scores, "seconds": time.perf_counter() - started}
                if shown:
                    image_grid(shown[:64], columns=8).save(work / f"compare-{name}-{size}.png")
        record["t2i_exact"] = record["t2i"][labels[0]]["t2i_exact"]  # the new size's
        record["text"] = {task: old["text"][task] if "by_size" in old.get("text", {}).get(task, {})
                          else text_at(pipe, task, n, seed) for task in text_tasks}
        report["models"][name] = record
    (work / "compare.json").write_text(json.dumps(report, indent=2))
    scale = report.get("recipe", {}).get("scale", 1.0)
    stages = " -> ".join(str(size) for size in SIZES)
    lines = [f"# FP-SFT ({stages}) vs direct {TARGET} px fine-tuning, each with a third of replay", "",
             f"{n} held-out t2i prompts (the same scenes at every size; seed {seed}, {candidates} draw(s) each, "
             f"the best kept), exact scene match, and {n} held-out prompts of each text task (greedy, exact)"
             f"{f'; recipe at scale {scale:g}' if scale != 1.0 else ''}. "
             "Objects: exact % of 1 / 2 / 3-object scenes. Text tasks: exact, and in brackets by the size of "
             "the image asked about (64x64 / 64x96 / 96x64).", "",
             "| model | " + " | ".join(f"t2i exact @{s} | objects @{s}" for s in sizes)
             + "".join(f" | {task}" for task in text_tasks)
             + f" | eval loss @{TARGET} | steps | document tokens | row positions | train time | s/step (median) |",
             "| --- " * (2 * len(sizes) + len(text_tasks) + 7) + "|"]
    for name, r in report["models"].items():
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
        cells = [f"{_pct(r['t2i'][label]['t2i_exact'])} | {_objects(r['t2i'][label]['breakdown'])}" for label in labels]
        for task in text_tasks:
            by_size = " / ".join(f"{100 * v:.0f}" for v in r["text"][task]["by_size"].values())
            cells.append(f"{_pct(r['text'][task]['exact'])} ({by_size})")
        seconds, per_step = r.get("train_seconds"), r.get("step_seconds_median")
        wall = "" if seconds is None else f"{seconds / 60:.1f} min"
        step = "" if per_step is None else f"{per_step:.2f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {loss} | {r.get('steps', '')} | {r.get('tokens', '')} "
                     f"| {r.get('positions', '')} | {wall} | {step} |")
    (work / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python recipes/finetune/progressive.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="working directory (data, shards, both runs, the comparison)")
    parser.add_argument("--model", default=str(SHIPPED), help="the model both runs start from (default: shipped)")
    parser.add_argument("--only", choices=STEPS, action="append", help="run only these steps (repeatable)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_COUNT} documents a set, 2 steps a stage")
    parser.add_argument("--device", default=None, help="the VQ encoder's device for pre-tokenizing (e.g. cuda)")
    parser.add_argument("--train-device", default=None, help="train.device of both runs (e.g. cuda)")
    parser.add_argument("--n", type=int, default=None, help="held-out t2i prompts to compare on (default 200; "
                                                             "smoke: 4)")
    parser.add_argument("--candidates", type=int, default=1, help="t2i draws per prompt, the best kept (default 1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the training sets' documents and every run's steps (default 1)")
    args = parser.parse_args(argv)
    if not 0 < args.scale < float("inf"):
        parser.error(f"--scale must be a positive number, got {args.scale}")
    if args.smoke and args.scale != 1.0:
        parser.error("--smoke and --scale do not combine")
    work, model = Path(args.work), Path(args.model)
    work.mkdir(parents=True, exist_ok=True)
    check_work(work, args.smoke, args.scale)
    steps = args.only or STEPS
    if "data" in steps:
        started = time.perf_counter()
        summaries = build_sets(work, model, args.smoke, args.device, args.scale)
        print(json.dumps(summaries, indent=2))
        print(f"data: {time.perf_counter() - started:.0f} s")
    for run in RUNS:
        if run in steps:
            summary = train_run(run, work, model, args.smoke, args.train_device, args.scale)
            print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2, default=str))
    if "compare" in steps:
        compare(work, model, n=args.n or (4 if args.smoke else 200), candidates=args.candidates, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
