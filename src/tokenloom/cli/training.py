"""The data, training and evaluation verbs: pretokenize, train, train-vq, eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path


# -- pretokenize ---------------------------------------------------------------------------------------------
def pretokenize_arguments(p) -> None:
    p.description = "Raw JSONL -> Parquet shards of token ids; resumes an interrupted run."
    p.add_argument("model", help="pipeline directory whose tokenizers and layout to use")
    p.add_argument("out_dir", help="output directory for shards and manifest.json")
    p.add_argument("inputs", nargs="+", help="JSONL files")
    p.add_argument("--shard-size", type=int, default=10_000, help="documents per shard")
    p.add_argument("--image-batch-size", type=int, default=32, help="images loaded and encoded together")
    p.add_argument("--skip-errors", action="store_true", help="warn about and count malformed lines")
    p.add_argument("--max-length", type=int, default=None, help="longest document in tokens")
    p.add_argument("--truncate", action="store_true", help="cut longer documents instead of skipping them")
    p.add_argument("--overwrite", action="store_true", help="start over in a directory made otherwise")
    p.add_argument("--device", default=None, help="torch device for the image tokenizer")


def run_pretokenize(args) -> int:
    from ..data.pretokenize import pretokenize
    from ..pipeline import Pipeline

    for name in ("shard_size", "image_batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    pipeline = Pipeline.from_pretrained(args.model, device=args.device)
    summary = pretokenize(args.inputs, pipeline, args.out_dir, shard_size=args.shard_size,
                          image_batch_size=args.image_batch_size, on_error="skip" if args.skip_errors else "raise",
                          max_length=args.max_length, truncate=args.truncate, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=2))
    return 0


# -- train --------------------------------------------------------------------------------------------------
def train_arguments(p) -> None:
    import argparse

    p.description = ("Train or fine-tune a model from a YAML/TOML config; resumes from the output directory's "
                     "latest intact checkpoint.")
    p.add_argument("config", help="training config (.yaml, .yml or .toml)")
    p.add_argument("--out-dir", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in the output directory (default: yes)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this step (checkpointed; the schedule still spans train.max_steps)")


def run_train(args) -> int:
    from ..train import train

    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    summary = train(args.config, out_dir=args.out_dir, resume=args.resume, max_steps=args.max_steps)
    print(json.dumps(summary, indent=2))
    return 0


# -- train-vq -------------------------------------------------------------------------------------------------
def train_vq_arguments(p) -> None:
    from ..train.vq import add_arguments

    add_arguments(p)


def run_train_vq(args) -> int:
    from ..train.vq import run

    return run(args)


# -- eval -----------------------------------------------------------------------------------------------------
def eval_arguments(p) -> None:
    from ..world.tasks import TASKS

    p.description = "Score a model on held-out shapes-world samples: exact scene matches, exact text matches."
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--out", required=True, help="output directory for report.json, summary.md, samples.png")
    p.add_argument("--n", type=int, default=200, help="samples per task (default 200)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--seed", type=int, default=0, help="which held-out samples, and the seed of sampled draws")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance for text-to-image (default: the model's)")
    p.add_argument("--image-temperature", type=float, default=None,
                   help="text-to-image temperature, of single draws and of reranked candidates (default: the model's)")
    p.add_argument("--image-top-k", type=int, default=None,
                   help="text-to-image top-k, of single draws and of reranked candidates (default: the model's)")
    p.add_argument("--candidates", type=int, default=None,
                   help="text-to-image candidates per prompt, best kept (default: the model's; 1: no reranking)")


def run_eval(args) -> int:
    from ..engine import check_guidance_scale
    from ..evaluation import evaluate
    from ..pipeline import check_candidates, load

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    if args.candidates is not None:
        check_candidates(args.candidates, "--candidates")
    pipe = load(args.model, device=args.device)
    if args.guidance_scale is not None:
        pipe.config.guidance_scale = args.guidance_scale
    if args.candidates is not None:
        pipe.config.image_candidates = args.candidates
    overrides = {k: v for k, v in (("temperature", args.image_temperature), ("top_k", args.image_top_k))
                 if v is not None}
    # Both how single images and how reranked candidates are drawn: an override must reach whichever runs.
    pipe.config.image_sampling = pipe.sampling("image", **overrides).to_dict()  # checks the values
    pipe.config.candidate_sampling = {**pipe.config.candidate_sampling, **overrides}
    pipe.sampling("candidate")  # checks the merged candidate settings
    report = evaluate(pipe, args.out, n=args.n, tasks=[t for t in args.tasks.split(",") if t], seed=args.seed,
                      batch_size=args.batch_size)
    print(json.dumps({k: v for k, v in report.items() if k == "scores" or k.endswith("_breakdown")}, indent=2))
    print(f"wrote {Path(args.out) / 'report.json'}, summary.md and the image grids", file=sys.stderr)
    return 0
