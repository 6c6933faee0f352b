"""The data, training and evaluation verbs: pretokenize, train, train-vq, train-codec, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import check_at_least


# -- pretokenize ---------------------------------------------------------------------------------------------
def _image_size(text: str) -> tuple[int, int]:
    try:
        sizes = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected N or WxH pixels (128, 96x64), got {text!r}")
    return sizes[0], sizes[1]


def pretokenize_arguments(p) -> None:
    p.description = ("Raw JSONL, or Hugging Face imagefolder directories of image-text pairs (metadata.jsonl "
                     "with file_name and a text column) -> Parquet shards of token ids; resumes an interrupted run.")
    p.add_argument("model", help="pipeline directory whose tokenizers and layout to use")
    p.add_argument("out_dir", help="output directory for shards and manifest.json")
    p.add_argument("inputs", nargs="+", help="JSONL files and imagefolder directories")
    p.add_argument("--task", choices=("caption", "t2i", "both"), default="both",
                   help="imagefolders: documents each image-text pair makes (caption: image -> text; t2i: text -> "
                        "image; both, the default)")
    p.add_argument("--text-column", default=None,
                   help="imagefolders: the metadata column of texts (default: text, else caption)")
    p.add_argument("--split", default=None, help="imagefolders: read this split folder (train, test, ...)")
    p.add_argument("--image-size", type=_image_size, default=None,
                   help="N or WxH pixels of every image without a size of its own (JSONL parts without width/height, "
                        "imagefolder images); default: the model's image size")
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

    check_at_least(args, "shard_size", "image_batch_size", "max_length")
    pipeline = Pipeline.from_pretrained(args.model, device=args.device)
    summary = pretokenize(args.inputs, pipeline, args.out_dir, shard_size=args.shard_size,
                          image_batch_size=args.image_batch_size, on_error="skip" if args.skip_errors else "raise",
                          max_length=args.max_length, truncate=args.truncate, overwrite=args.overwrite,
                          task=args.task, text_column=args.text_column, split=args.split, image_size=args.image_size)
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=2))
    return 0


# -- train --------------------------------------------------------------------------------------------------
def train_arguments(p) -> None:
    import argparse

    p.description = ("Train or fine-tune a model from a YAML/TOML config; resumes from the output directory's "
                     "latest intact checkpoint.")
    p.add_argument("config", help="training config (.yaml, .yml or .toml)")
    p.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                   help="output directory (default: the config's out_dir)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in the output directory (default: yes)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this step (checkpointed; the schedule still spans train.max_steps); with a "
                        "'schedule' of stages, the steps of all stages together")
    p.epilog = ("Several devices: torchrun --nproc_per_node N -m tokenloom train CONFIG --out DIR shards the model "
                "(FSDP2) and splits each global batch (data.batch_size) over the N ranks (docs/training.md).")


def run_train(args) -> int:
    from ..train import train

    from ..train.common import TrainError
    from ..train.config import ConfigError
    from ..train.distributed import env_rank

    check_at_least(args, "max_steps")
    try:
        summary = train(args.config, out_dir=args.out_dir, resume=args.resume, max_steps=args.max_steps)
    except (ConfigError, TrainError):
        if env_rank() > 0:  # under torchrun every rank meets these alike (config, all-reduced losses): rank 0 says it
            return 2
        raise
    if env_rank() == 0:
        print(json.dumps(summary, indent=2))
    return 0


# -- train-vq and train-codec (the tokenizer trainers) ------------------------------------------------------
def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected WxH sizes separated by commas (64x64,96x64), got {text!r}")
    return sizes  # type: ignore[return-value]


def _tokenizer_training_arguments(p, what: str, section: str, threads_help: str) -> None:
    """The arguments train-vq and train-codec share: `what` the config trains, `section` its
    training settings' section (which --steps and --max-minutes override)."""
    p.add_argument("config", help=f"{what} training config (.yaml, .yml or .toml)")
    p.add_argument("--out", default=None, help="run directory (default: the config's out_dir)")
    p.add_argument("--steps", type=_count, default=None,
                   help=f"override {section}.steps (the schedule spans them; a resumed run must pass the same)")
    p.add_argument("--max-steps", type=_count, default=None,
                   help=f"stop at this step (checkpointed; the schedule still spans {section}.steps)")
    p.add_argument("--max-minutes", type=float, default=None, help=f"override {section}.max_minutes")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest checkpoint in the run directory (default: yes)")
    p.add_argument("--export", default=None, help="also save the best tokenizer here (save_pretrained)")
    p.add_argument("--threads", type=_count, default=None, help=threads_help)


def _run_tokenizer_training(args, run_config, train, fit, final_eval, **overrides: Any) -> int:
    """What train-vq and train-codec do around their trainer: `train` (the config's training
    section) with --steps, --max-minutes and the verb's own `overrides` (None: keep the config's),
    `fit(out, train)` in the run directory, then `final_eval(tok, train)` (None: none) to
    final_eval.json, --export, and the result on stdout."""
    import dataclasses
    import time

    from ..checkpoint import atomic_write_json
    from ..train.config import ConfigError
    from ..train.tokenizer_trainer import SUMMARY_NAME

    overrides = {"steps": args.steps, "max_minutes": args.max_minutes, **overrides}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        train = dataclasses.replace(train, **overrides)
    except ValueError as e:
        raise ValueError(f"{args.config} with the command line's overrides: {e}") from None
    out = args.out or run_config.out_dir
    if out is None:
        raise ConfigError(f"{args.config}: no output directory (set 'out_dir' or pass --out)")
    start = time.monotonic()
    tok = fit(out, train)
    result: dict[str, Any] = {"out": str(out), "train_seconds": round(time.monotonic() - start, 1),
                              **json.loads((Path(out) / SUMMARY_NAME).read_text())}
    final = final_eval(tok, train)
    if final is not None:
        atomic_write_json(Path(out) / "final_eval.json", final)
        result["final_eval"] = final
    if args.export:
        tok.save_pretrained(args.export)
        result["export"] = str(args.export)
    print(json.dumps(result, indent=2))
    return 0


# -- train-vq ----------------------------------------------------------------------------------------------
def train_vq_arguments(p) -> None:
    p.description = ("Train a VQGAN image tokenizer on shapes-world renders from a YAML/TOML config (model: and "
                     "training: sections); resumes from the run directory's newest intact checkpoint.")
    _tokenizer_training_arguments(p, "VQGAN", "training", threads_help="torch.set_num_threads")
    p.add_argument("--eval-images", type=_count, default=500,
                   help="final evaluation: images per size, on a seed the run never evaluated on (0: skip it)")
    p.add_argument("--eval-sizes", type=_sizes, default=_sizes("64x64,96x64,64x96,48x48,128x128"),
                   help="final evaluation sizes, WxH comma-separated")


def run_train_vq(args) -> int:
    import torch

    from ..train.vq import evaluate_vq, load_vq_config, train_vqgan

    if args.threads:
        torch.set_num_threads(args.threads)
    run_config = load_vq_config(args.config)

    def fit(out, train):
        return train_vqgan(run_config.model, out, train, resume=args.resume, max_steps=args.max_steps)

    def final_eval(tok, train):
        # a seed the run never evaluated on: not the numbers the best was picked by
        return evaluate_vq(tok, args.eval_images, train.seed + 1, args.eval_sizes) if args.eval_images else None

    return _run_tokenizer_training(args, run_config, run_config.training, fit, final_eval)


# -- train-codec -------------------------------------------------------------------------------------------
def train_codec_arguments(p) -> None:
    p.description = ("Train the spectral speech codec (residual VQ; codebook 0 carries the phonemes) on rendered "
                     "speech manifests from a YAML/TOML config (model:, data: and train: sections); resumes from "
                     "the run directory's newest intact checkpoint.")
    _tokenizer_training_arguments(p, "speech codec", "train",
                                  threads_help="torch.set_num_threads (overrides train.threads)")
    p.add_argument("--eval-audio", type=_count, default=16,
                   help="final evaluation of best/ on the whole eval manifest (when data.eval is set): how many "
                        "utterances to round-trip through Griffin-Lim too (default 16)")


def run_train_codec(args) -> int:
    from ..train.codec import evaluate_codec, load_codec_config, read_manifest, train_codec

    run_config = load_codec_config(args.config)
    data = run_config.data

    def fit(out, train):
        return train_codec(run_config.model, data, out, train, resume=args.resume, max_steps=args.max_steps)

    def final_eval(tok, train):
        return None if data.eval is None else evaluate_codec(tok.codec, read_manifest(data.eval), args.eval_audio)

    # --threads 0 keeps the config's train.threads
    return _run_tokenizer_training(args, run_config, run_config.train, fit, final_eval, threads=args.threads or None)


# -- eval -----------------------------------------------------------------------------------------------------
def eval_arguments(p) -> None:
    from ..world.tasks import TASKS
    from .generation import ADAPTER_HELP, speculative_args

    p.description = "Score a model on held-out shapes-world samples: exact scene matches, exact text matches."
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    p.add_argument("--out", required=True, help="output directory for report.json, summary.md, samples.png, edits.png")
    p.add_argument("--n", type=int, default=200, help="samples per task (default 200)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASKS) +
                   " (default: every task the model can express; the video ones need video tokens)")
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
    speculative_args(p)


def run_eval(args) -> int:
    from ..engine import check_guidance_scale
    from ..evaluation import evaluate
    from ..pipeline import check_candidates, load
    from .generation import apply_speculative

    check_at_least(args, "batch_size")
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    if args.candidates is not None:
        check_candidates(args.candidates, "--candidates")
    pipe = apply_speculative(load(args.model, device=args.device, adapter=args.adapter), args)
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
    tasks = None if args.tasks is None else [t for t in args.tasks.split(",") if t]
    report = evaluate(pipe, args.out, n=args.n, tasks=tasks, seed=args.seed, batch_size=args.batch_size)
    print(json.dumps({k: v for k, v in report.items() if k == "scores" or k.endswith("_breakdown")}, indent=2))
    print(f"wrote {Path(args.out) / 'report.json'}, summary.md and the image grids", file=sys.stderr)
    return 0
