"""Move the shipped model onto another image tokenizer without retraining it from scratch.

    python experiments/tokenizer_swap_experiment.py --vq runs/shapes-vq-local/best --steps 3000

1. Encodes shapes-world training images with both tokenizers and counts which old code each new code
   sits on (code_transfer), then writes the shipped model with the new tokenizer and its
   code rows carried over, once per mode ("mean", "argmax"), under <work>/base-<mode>.
2. Measures each one's eval loss before any training, on the recipe's eval set tokenized the new way,
   next to the shipped model's on the same documents tokenized the old way.
3. Trains the best mode as a recipe stage (the settings of the recipe's stage 13, recipes/shapes-tiny/,
   at --lr) on fresh sets (--seeds, the recipe's late mix: more stories and edits).
4. Evaluates it as `tokenloom eval` does (<work>/eval/) and measures how well it copies edits'
   untouched cells (edit_metrics.edit_copy_accuracy); writes <work>/result.json.

Every phase resumes: what is already written is kept.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from code_transfer import MODES, code_cooccurrence, swap_image_tokenizer
from edit_metrics import edit_copy_accuracy
from tokenloom.data.pretokenize import pretokenize
from tokenloom.evaluation import evaluate
from tokenloom.image_processing import ImageTokenizer
from tokenloom.pipeline import Pipeline, default_model_path
from tokenloom.train import train
from tokenloom.world.tasks import heldout_samples, training_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "shapes-tiny"))
import build as recipe  # noqa: E402 - recipes/shapes-tiny/build.py: the stage configs
STAGE = recipe.stage(13)  # the settings every phase trains with
PAIRING_SEED = 54  # training-stream images counted for the code pairing


def pairing_images(n: int) -> list:
    """n training-stream images: t2i answers and both images of edits, at the default sizes."""
    images = []
    for j in range(n // 3):
        images += training_sample("t2i", j, seed=PAIRING_SEED).images
        images += training_sample("edit", j, seed=PAIRING_SEED).images
    return images[:n]


def eval_loss(pipeline: Path, shards: Path, out: Path) -> float:
    """The trainer's eval loss (stage configs' 8 eval batches) of a model, before any training."""
    if not (out / "metrics.jsonl").exists():
        config = recipe.stage_config(STAGE, pipeline=pipeline.resolve())
        config["data"]["train"] = config["data"]["eval"] = [str(shards.resolve())]
        config["optim"].update(lr=1e-12, warmup_steps=0)  # one step that moves (next to) nothing
        config["train"].update(max_steps=1, save_every=1000)
        path = out.with_suffix(".yaml")
        out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        train(path, out_dir=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in records if "eval_loss" in r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", required=True, help="the new VQGAN (vq.safetensors, vq_config.json)")
    p.add_argument("--work", default="runs/swap")
    p.add_argument("--pairing-images", type=int, default=3000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seeds", default="54,55", help="training sets drawn for the stage")
    p.add_argument("--eval-set", default="runs/shapes-tiny/data/eval.jsonl",
                   help="the recipe's eval documents (recipes/shapes-tiny/build.py writes them); the "
                        "shipped model is measured on their shards beside them (../shards/eval)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=200, help="held-out samples per task measured at the end")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    counts_path = work / "cooccurrence.pt"
    if not counts_path.exists():
        old = ImageTokenizer.from_pretrained(default_model_path())
        counts = code_cooccurrence(old, ImageTokenizer.from_pretrained(args.vq), pairing_images(args.pairing_images))
        torch.save(counts, counts_path)
    counts = torch.load(counts_path, weights_only=True)
    used = counts.sum(1) > 0
    purity = (counts.max(1).values.sum() / counts.sum()).item()
    print(f"pairing: {int(counts.sum())} cells, {int(used.sum())} new codes used, "
          f"{int((counts.sum(0) > 0).sum())} old codes used; a new code's most frequent old partner "
          f"covers {100 * purity:.1f}% of its cells", flush=True)

    for mode in MODES:
        base = work / f"base-{mode}"
        if not (base / "config.json").exists():
            pipe = Pipeline.from_pretrained(default_model_path())
            swap_image_tokenizer(pipe, ImageTokenizer.from_pretrained(args.vq), counts, mode).save_pretrained(base)
    eval_shards = work / "shards" / "eval"  # pretokenize returns at once when they are complete
    pretokenize([args.eval_set], Pipeline.from_pretrained(work / "base-mean"), eval_shards, shard_size=5000)
    old_shards = Path(args.eval_set).parents[1] / "shards" / "eval"
    losses = {"shipped, old tokens": eval_loss(default_model_path(), old_shards, work / "loss0" / "shipped")}
    for mode in MODES:
        losses[f"{mode}, new tokens"] = eval_loss(work / f"base-{mode}", eval_shards, work / "loss0" / mode)
    print("eval loss before training:", json.dumps(losses), flush=True)
    best = min(MODES, key=lambda m: losses[f"{m}, new tokens"])

    seeds = [int(s) for s in args.seeds.split(",")]
    final = work / "train" / "final"
    if not (final / "config.json").exists():
        recipe.prepare_train_shards(work, seeds, work / f"base-{best}", jobs=args.jobs,
                                    counts=recipe.MIXES["late"])
        # Paths relative to the work directory, where the config is written: its shards/train-seed<N>
        # and shards/eval (the eval set tokenized the new way).
        config = recipe.stage_config(STAGE, pipeline=(work / f"base-{best}").resolve(), seeds=seeds,
                                     max_steps=args.steps)
        config["optim"]["lr"] = args.lr
        config_path = work / "stage.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        train(config_path, out_dir=work / "train")

    trained = Pipeline.from_pretrained(final)
    report = evaluate(trained, work / "eval", n=args.eval_n)
    copying = edit_copy_accuracy(trained, heldout_samples("edit", args.eval_n, 0))
    result = {"init_eval_loss": losses, "mode": best, "scores": report["scores"], "edit_copy_accuracy": copying,
              "edit_breakdown": report["edit_breakdown"]}
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
