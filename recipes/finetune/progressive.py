"""FP-SFT (progressive resolution, as Lumina-mGPT trains) against direct 128 px fine-tuning of the shipped
shapes-tiny on text to image, for the same budget: the data, both trainings and the comparison.

    python recipes/finetune/progressive.py --work runs/fpsft                  # everything (hours on a CPU)
    python recipes/finetune/progressive.py --work runs/fpsft --only data      # or fpsft, direct, compare
    python recipes/finetune/progressive.py --work runs/fpsft-smoke --smoke    # tiny sets, 2 steps a stage

1. data: shapes-world text-to-image sets (`tokenloom.world.tasks.build_dataset`, t2i only) of square
   images at 64, 96 and 128 px, each drawn with a seed of its own (seeds no shapes-tiny stage used),
   and a 128 px eval-loss set; pre-tokenized with the starting model into WORK/shards/t2i-64, t2i-96,
   t2i-128 and eval-128 (their manifests count the images of each size, which is what a stage's
   image_size is checked against);
2. fpsft: fpsft.yaml, written to WORK/fpsft.yaml: stages s64 -> s96 -> s128 in WORK/fpsft/, each from
   the previous one's weights, the last one's model in WORK/fpsft/final;
3. direct: direct.yaml, written to WORK/direct.yaml: 128 px from the start for the schedule's steps x
   batch x seq_len, in WORK/direct/;
4. compare: each model (the starting one, fpsft, direct) draws held-out t2i prompts at 128x128, scored
   by parsing the drawn scene back (exact match); with each run's last eval loss on the 128 px set and
   the document tokens it trained on: WORK/compare.json, WORK/compare.md, WORK/compare-<model>.png.

Every step skips what is done and resumes what was interrupted: rerun the same command. --model starts
from another model directory (default: the shipped one, read only); --device runs the pre-tokenizer's
VQ encoder there; --train-device sets train.device of both runs (e.g. cuda).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

import tokenloom
from tokenloom.data.pretokenize import pretokenize
from tokenloom.pipeline import Pipeline
from tokenloom.world.tasks import build_dataset

HERE = Path(__file__).resolve().parent
SHIPPED = Path(tokenloom.__file__).resolve().parent / "assets" / "shapes-tiny"  # read only
SIZES = (64, 96, 128)
# Documents per training set: about one pass of what its stage reads (seq_len 1024 holds about 11 64 px,
# 5 96 px or 3 128 px documents); the direct run reads t2i-128 for all its 1200 steps.
COUNTS = {64: 26000, 96: 12000, 128: 29000}
EVAL_COUNT = 400
SEEDS = {64: 1064, 96: 1096, 128: 1128, "eval": 2128}  # shapes-tiny's stages used seeds 0-42
SMOKE_COUNT = 12
SHARD_SIZE = 5000
RUNS = ("fpsft", "direct")
STEPS = ("data", *RUNS, "compare")


def set_name(size: int | str) -> str:
    return "eval-128" if size == "eval" else f"t2i-{size}"


# --------------------------------------------------------------------------- data


def build_sets(work: Path, model: Path, smoke: bool = False, device: str | None = None) -> dict[str, Any]:
    """The raw sets (WORK/data/<set>/) and their shards (WORK/shards/<set>), each skipped when done."""
    pipe = None
    summaries = {}
    for size in (*SIZES, "eval"):
        name = set_name(size)
        data = work / "data" / name
        split = "eval" if size == "eval" else "train"
        px = 128 if size == "eval" else size
        if not (data / f"{split}.jsonl").exists():
            count = SMOKE_COUNT if smoke else (EVAL_COUNT if size == "eval" else COUNTS[size])
            build_dataset(data, {"t2i": count}, seed=SEEDS[size], sizes=[(px, px)], split=split)
        if pipe is None:
            if device is not None and torch.device(device).type == "cuda":  # the CPU's codes: no TF32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            pipe = Pipeline.from_pretrained(model, device=device)
        summaries[name] = pretokenize(data / f"{split}.jsonl", pipe, work / "shards" / name, shard_size=SHARD_SIZE)
    return summaries


# --------------------------------------------------------------------------- configs and training


def run_config(run: str, model: Path, smoke: bool = False, train_device: str | None = None) -> dict[str, Any]:
    """fpsft.yaml or direct.yaml with model.pipeline set (and the smoke run's or the device's overrides)."""
    config = copy.deepcopy(yaml.safe_load((HERE / f"{run}.yaml").read_text()))
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
    return config


def write_config(run: str, work: Path, model: Path, smoke: bool = False, train_device: str | None = None) -> Path:
    path = work / f"{run}.yaml"
    path.write_text(f"# written by recipes/finetune/progressive.py from recipes/finetune/{run}.yaml"
                    f"{' (smoke run)' if smoke else ''}; paths are relative to this folder\n"
                    + yaml.safe_dump(run_config(run, model, smoke, train_device), sort_keys=False))
    return path


def train_run(run: str, work: Path, model: Path, smoke: bool = False, train_device: str | None = None) -> dict:
    from tokenloom.train import train

    return train(write_config(run, work, model, smoke, train_device), out_dir=work / run)


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
    return {"steps": sum(s["step"] for s in states), "tokens": sum(s["tokens"] for s in states),
            "positions": sum(s["positions"] for s in states), "eval_loss": evals[-1] if evals else None,
            "eval_curve": curve}


def t2i_at(pipe, n: int, seed: int, size: int, candidates: int, batch_size: int = 16) -> tuple[dict, list]:
    """Exact-scene accuracy of `n` held-out t2i prompts drawn at size x size (one draw each unless
    `candidates`), with its breakdown and the bordered thumbnails."""
    from tokenloom.evaluation import eval_t2i
    from tokenloom.world.tasks import heldout_samples

    pipe.config.image_candidates = candidates
    samples = heldout_samples("t2i", n, seed, sizes=[(size, size)])
    score, breakdown, _, shown = eval_t2i(pipe, samples, batch_size, True, seed)
    return {"t2i_exact": score, "breakdown": breakdown}, shown


def compare(work: Path, model: Path, n: int = 200, seed: int = 0, candidates: int = 1,
            device: str | None = None) -> dict[str, Any]:
    from tokenloom.report import image_grid

    report: dict[str, Any] = {"size": "128x128", "n": n, "seed": seed, "candidates": candidates, "models": {}}
    models = {"start": model, **{run: work / run / "final" for run in RUNS}}
    for name, path in models.items():
        record = {"model": str(path)}
        if name != "start":
            run = run_record(work, name)
            if run is None:
                print(f"compare: {name} has not finished ({work / name}); skipped")
                continue
            record.update(run)
        pipe = tokenloom.load(path, device=device)
        scores, shown = t2i_at(pipe, n, seed, 128, candidates)
        record.update(scores)
        if shown:
            image_grid(shown[:64], columns=8).save(work / f"compare-{name}.png")
        report["models"][name] = record
    (work / "compare.json").write_text(json.dumps(report, indent=2))
    lines = ["# FP-SFT (64 -> 96 -> 128) vs direct 128 px fine-tuning", "",
             f"{n} held-out t2i prompts drawn at 128x128 (seed {seed}, {candidates} draw(s) each, the best "
             "kept), exact scene match.", "",
             "| model | t2i exact @128 | eval loss @128 | steps | document tokens |", "| --- | --- | --- | --- | --- |"]
    for name, r in report["models"].items():
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
        lines.append(f"| {name} | {100 * r['t2i_exact']:.1f}% | {loss} | {r.get('steps', '')} | {r.get('tokens', '')} |")
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
    args = parser.parse_args(argv)
    work, model = Path(args.work), Path(args.model)
    work.mkdir(parents=True, exist_ok=True)
    steps = args.only or STEPS
    if "data" in steps:
        print(json.dumps(build_sets(work, model, args.smoke, args.device), indent=2))
    for run in RUNS:
        if run in steps:
            summary = train_run(run, work, model, args.smoke, args.train_device)
            print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=2, default=str))
    if "compare" in steps:
        compare(work, model, n=args.n or (4 if args.smoke else 200), candidates=args.candidates, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
