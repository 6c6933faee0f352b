"""Anole's image-head recipe on shapes-tiny: re-initialise the image-code rows of the output head,
then fine-tune them alone, against LoRA and full fine-tuning on the same budget.

    OMP_NUM_THREADS=1 python experiments/anole_head_experiment.py --work runs/anole [--steps 200] [--batch 8]

Anole (GAIR, 2024) took Chameleon, whose released weights could not draw, and trained only the
output rows of its image codes (He-normal initialised), every other weight frozen, so that text
stays exactly as it was. This script does the same to shapes-tiny, where drawing can be scored exactly:

1. writes WORK/reinit: the shipped model with the 1024 image-code rows of its output head replaced
   by kaiming-normal draws (std sqrt(2 / hidden), seed --init-seed); every other weight is the
   shipped one, bit for bit;
2. draws and pre-tokenizes text-to-image training data the way recipes/shapes-tiny/build.py does
   (world.tasks.build_dataset + data.pretokenize), from training-stream seeds the recipe never used
   (--train-seed, default 56, and --eval-seed 57 for the runs' eval loss; seeds 0 to 55 went to the
   recipe and to earlier experiments); the eval's held-out samples come from another seed stream
   (world.tasks.HELDOUT_STREAM), and WORK/data-overlap.json counts how many held-out scenes and
   prompts still recur in the training set (the scene space is finite);
3. trains runs from WORK/reinit, each config written to WORK/<run>.yaml and trained with
   `tokenloom train` into WORK/<run>/. Three on the same budget (steps, batch, rows, data order, lr):
   `head` (`train.trainable: image_head`, Anole), `lora` (the documented defaults: r 8 on every
   attention and MLP projection; the head cannot take LoRA, so its random code rows stay as they are)
   and `full` (`all`); and three more: `head-long` and `head-x10`, the head alone for 3 and 10 times
   the steps, and
   `lora-head`, LoRA with `modules_to_save: [output]` (the whole head; not run for docs/finetuning.md);
4. measures every model's eval loss on the --eval-seed set (WORK/reference/ for the untrained two),
   runs `tokenloom eval --n N --tasks t2i,caption,qa --candidates C` on the shipped model, WORK/reinit
   and each run's final/ (WORK/eval/<model>/), checks that the head-only runs changed nothing but the
   code rows, compares the per-sample caption and question records with the shipped model's, and
   writes WORK/results.json and WORK/results.md.

Every phase skips what is already written, so a rerun continues. Runs one job at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "shapes-tiny"))
import build as recipe  # noqa: E402 - recipes/shapes-tiny/build.py: data preparation, base config

from tokenloom.checkpoint import load_weights  # noqa: E402
from tokenloom.pipeline import Pipeline, default_model_path  # noqa: E402
from tokenloom.world.tasks import count_seen, heldout_samples  # noqa: E402

# run -> (train.trainable, steps as a multiple of --steps, lora section or None)
RUNS = {
    "head": ("image_head", 1, None),  # Anole: the code rows of the head alone
    "lora": ("lora", 1, None),  # the documented LoRA defaults: the head (its random code rows too) stays frozen
    "full": ("all", 1, None),
    "head-long": ("image_head", 3, None),  # the head alone for 3 times the steps
    "head-x10": ("image_head", 10, None),  # and for 10 times: where the head alone levels off
    "lora-head": ("lora", 1, {"modules_to_save": ["output"]}),  # LoRA plus the whole output head
}
MAIN_RUNS = ("head", "lora", "full")  # the same budget: steps, batch, rows, data order
DEFAULT_RUNS = (*MAIN_RUNS, "head-long")  # what docs/finetuning.md reports
TASKS = ("t2i", "caption", "qa")


def tokenloom_cli() -> list[str]:
    return [str(Path(sys.executable).parent / "tokenloom")]  # the console script beside this interpreter


def reinit_image_head(pipe: Pipeline, seed: int) -> Pipeline:
    """Replace the image-code rows of the output head by kaiming-normal draws (He: std sqrt(2 / fan_in),
    fan_in = hidden size), in place; every other row and weight is left as it is."""
    weight = pipe.model.output_weight
    rows = torch.as_tensor(pipe.vocab.code_ids, dtype=torch.long)
    fresh = torch.empty(len(rows), weight.shape[1], dtype=torch.float32)
    torch.nn.init.kaiming_normal_(fresh, mode="fan_in", nonlinearity="relu",
                                  generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weight[rows] = fresh.to(weight.dtype)
    return pipe


def write_reinit(work: Path, seed: int) -> Path:
    out = work / "reinit"
    if not (out / "config.json").exists():
        pipe = reinit_image_head(Pipeline.from_pretrained(default_model_path()), seed)
        pipe.save_pretrained(out)
    return out


def prepare_data(work: Path, train_seed: int, eval_seed: int, train_docs: int, eval_docs: int,
                 n_eval: int) -> dict:
    """The t2i training and eval-loss sets (WORK/data-seedN, WORK/shards/train-seedN), as build.py makes
    them; and how many held-out t2i samples share a scene or a prompt with the training set."""
    pipeline = default_model_path()  # the shipped vocabulary, tokenizers and VQGAN (the re-init shares them)
    t0 = time.perf_counter()
    recipe.prepare_train_shards(work, [train_seed], pipeline, counts={"t2i": train_docs})
    recipe.prepare_train_shards(work, [eval_seed], pipeline, counts={"t2i": eval_docs})
    overlap_path = work / "data-overlap.json"
    if not overlap_path.exists():
        overlap = count_seen(heldout_samples("t2i", n_eval, 0), work / f"data-seed{train_seed}" / "train.meta.jsonl")
        overlap["seconds_to_prepare"] = round(time.perf_counter() - t0, 1)
        overlap_path.write_text(json.dumps(overlap, indent=2))
    return json.loads(overlap_path.read_text())


def run_config(name: str, args) -> dict:
    """base.yaml of the recipe, from WORK/reinit, on the t2i shards, with the experiment's budget."""
    trainable, times, lora = RUNS[name]
    steps = args.steps * times
    config = recipe.stage_config(recipe.stage(13), pipeline="reinit", seeds=[args.train_seed],
                                 max_steps=steps, batch_size=args.batch)
    config["data"].update(eval=[recipe.train_shards_name(args.eval_seed)], seq_len=args.seq_len, window=2048)
    config["optim"].update(lr=args.lr, warmup_steps=args.warmup)
    config["train"].update(trainable=trainable, seed=args.seed, eval_every=steps // 2,
                           save_every=steps, log_every=10, progress=False)
    if lora is not None:
        config["lora"] = dict(lora)
    return config


def train_run(work: Path, name: str, args) -> dict:
    out = work / name
    summary_path = work / f"{name}.summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    config_path = work / f"{name}.yaml"
    config_path.write_text(f"# experiments/anole_head_experiment.py: run {name!r}\n"
                           + yaml.safe_dump(run_config(name, args), sort_keys=False))
    command = [*tokenloom_cli(), "train", str(config_path), "--out-dir", str(out)]
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - t0
    (work / f"{name}.stdout.json").write_text(done.stdout)
    if done.returncode:
        raise SystemExit(f"training {name} failed ({done.returncode}); see {work / f'{name}.log'}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    trainable_line = next((line.strip() for line in (work / f"{name}.log").read_text().splitlines()
                           if line.startswith("trainable ")), None)
    summary.update(wall_seconds=round(wall, 1), trainable_line=trainable_line,
                   command="tokenloom " + " ".join(command[1:]))
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def reference_eval_loss(work: Path, name: str, pipeline: Path, args) -> float:
    """The runs' eval loss (the --eval-seed t2i set, the same 8 batches) of a model before any training:
    one head-only step at lr 1e-12, evaluated after it (WORK/reference/<model>/)."""
    out = work / "reference" / name
    if not (out / "metrics.jsonl").exists():
        config = run_config("head", args)
        config["model"]["pipeline"] = str(Path(pipeline).resolve())
        config["optim"].update(lr=1e-12, warmup_steps=0)
        config["train"].update(max_steps=1, eval_every=1, save_every=1000)
        path = work / f"reference-{name}.yaml"  # in WORK: the config's relative paths are WORK's
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([*tokenloom_cli(), "train", str(path), "--out-dir", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in records if "eval_loss" in r)


def eval_model(work: Path, name: str, model: Path | None, n: int, candidates: int) -> dict:
    out = work / "eval" / name
    if not (out / "report.json").exists():
        command = [*tokenloom_cli(), "eval", "--n", str(n), "--tasks", ",".join(TASKS),
                   "--candidates", str(candidates), "--out", str(out)]
        if model is not None:
            command[2:2] = ["--model", str(model)]
        t0 = time.perf_counter()
        with open(work / "eval" / f"{name}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return json.loads((out / "report.json").read_text())


def changed_outside_code_rows(base: Path, tuned: Path, code_ids) -> dict:
    """Which tensors of `tuned` differ from `base`, and whether the output head moved outside the code rows."""
    a, b = load_weights(base), load_weights(tuned)
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    head = next(k for k in a if k.startswith("output"))
    other_rows = torch.ones(a[head].shape[0], dtype=torch.bool)
    other_rows[torch.as_tensor(code_ids)] = False
    return {"changed_tensors": changed,
            "text_rows_identical": bool(torch.equal(a[head][other_rows], b[head][other_rows])),
            "code_rows_changed": int((a[head][~other_rows] != b[head][~other_rows]).any(1).sum())}


def same_records(a: dict, b: dict, task: str) -> dict:
    ra, rb = a["details"][task], b["details"][task]
    same = sum(x == y for x, y in zip(ra, rb))
    return {"identical": same, "of": len(ra)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/anole")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr, the same for every run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=56, help="train.seed (data order, dropout)")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the kaiming-normal code rows")
    parser.add_argument("--train-seed", type=int, default=56, help="training-stream seed of the t2i set")
    parser.add_argument("--eval-seed", type=int, default=57, help="training-stream seed of the eval-loss set")
    parser.add_argument("--train-docs", type=int, default=6000)
    parser.add_argument("--eval-docs", type=int, default=200)
    parser.add_argument("--n", type=int, default=200, help="tokenloom eval --n")
    parser.add_argument("--candidates", type=int, default=1,
                        help="tokenloom eval --candidates (1: one draw per prompt, no reranking; the model's "
                             "default is 8)")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"which of {','.join(RUNS)} to train "
                        f"({','.join(MAIN_RUNS)}: the same budget; head-long, head-x10: 3 and 10 times the steps; "
                        f"lora-head: LoRA and the whole output head); default {','.join(DEFAULT_RUNS)}")
    parser.add_argument("--phase", choices=("all", "data", "train", "eval"), default="all")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "eval").mkdir(exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    reinit = write_reinit(work, args.init_seed)
    overlap = prepare_data(work, args.train_seed, args.eval_seed, args.train_docs, args.eval_docs, args.n)
    if args.phase == "data":
        return 0
    summaries = {}
    if args.phase in ("all", "train"):
        for name in runs:
            summaries[name] = train_run(work, name, args)
            print(f"{name}: {json.dumps({k: summaries[name][k] for k in ('step', 'tokens', 'wall_seconds')})}")
        if args.phase == "train":
            return 0
    for name in runs:
        summaries[name] = json.loads((work / f"{name}.summary.json").read_text())

    eval_losses = {name: reference_eval_loss(work, name, path, args)
                   for name, path in (("shipped", default_model_path()), ("reinit", reinit))}
    for name in runs:
        records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        eval_losses[name] = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    models = {"shipped": None, "reinit": reinit, **{name: work / name / "final" for name in runs}}
    reports = {name: eval_model(work, name, model, args.n, args.candidates) for name, model in models.items()}
    code_ids = Pipeline.from_pretrained(reinit).vocab.code_ids
    results = {
        "settings": vars(args), "data_overlap": overlap, "runs": summaries,
        "scores": {name: r["scores"] for name, r in reports.items()},
        "t2i_breakdown": {name: r["t2i_breakdown"] for name, r in reports.items()},
        "eval_seconds": {name: r["seconds"] for name, r in reports.items()},
        "reinit_vs_shipped": changed_outside_code_rows(default_model_path(), reinit, code_ids),
        "eval_loss": eval_losses,
        **{f"{name}_vs_reinit": changed_outside_code_rows(reinit, work / name / "final", code_ids)
           for name in runs if RUNS[name][0] == "image_head"},
        "records_vs_shipped": {name: {t: same_records(reports["shipped"], r, t) for t in ("caption", "qa")}
                               for name, r in reports.items() if name != "shipped"},
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| model | t2i eval loss | t2i exact | caption exact | questions | caption records = shipped | "
             "qa records = shipped |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in reports.items():
        same = results["records_vs_shipped"].get(name)
        cells = ["-", "-"] if same is None else [f"{same[t]['identical']}/{same[t]['of']}" for t in ("caption", "qa")]
        scores = r["scores"]
        lines.append(f"| {name} | {eval_losses[name]:.3f} | {100 * scores['t2i']:.1f}% | "
                     f"{100 * scores['caption']:.1f}% | {100 * scores['qa']:.1f}% | {cells[0]} | {cells[1]} |")
    lines += ["", "| run | trainable | steps | tokens | wall |", "| --- | --- | --- | --- | --- |"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['trainable_line']} | {s['step']} | {s['tokens']:,} | {s['wall_seconds']:.0f} s |")
    (work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
