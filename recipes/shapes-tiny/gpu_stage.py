"""Train one shapes-tiny stage on a CUDA GPU inside a fixed time budget, from a bare machine.

    python recipes/shapes-tiny/gpu_stage.py --stage 11 [--work runs/shapes-tiny] --deadline 540 --export OUT

Needs only the pipeline the stage starts from (WORK/<start>/final, its row's `start` in stages.yaml)
and the evaluation shards (WORK/shards/eval). In one run it:

1. checks that the VQ encoder gives the CPU's codes on the GPU (float32, TF32 off);
2. draws and pre-tokenizes the stage's training sets, one process per set (`--jobs`), the VQ
   encoder on the GPU; sets not done by `--prep-deadline` are left out (and reported);
3. times training steps of the stage's shape on the evaluation shards, and from that sets
   train.max_steps so that the whole cosine schedule ends by `--train-end` (at most
   `--max-passes` passes over the sets);
4. trains the stage (build.train_stage: the same code and config as the recipe);
5. with time left before `--deadline`, runs a short `tokenloom eval` on the GPU (engine check);
6. exports the trained weights (sharded under 12 MiB a file), metrics, loss curve and a summary.

Times are seconds since the script started. The exported summary (stage.json) records the seeds
and max_steps actually used: record those in the stage's row of stages.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenloom.checkpoint import load_weights, save_weights
from tokenloom.image_processing import ImageTokenizer
from tokenloom.train.config import TrainConfig, load_config
from tokenloom.train.trainer import Trainer
from tokenloom.world import random_scene, render

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as recipe  # noqa: E402 - the recipe next to this file

T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{now():6.1f}s] {msg}", flush=True)


def vq_agreement(pipeline_dir: Path, device: str, n: int = 256) -> dict:
    """Share of codes the VQ encoder gives alike on the CPU and on `device`, over random scenes."""
    rng = np.random.default_rng(1234)
    sizes = [(64, 64), (96, 64), (64, 96), (128, 128)]
    images = [render(random_scene(rng), *sizes[i % len(sizes)]) for i in range(n)]
    recipe.full_float32(device)
    cpu = ImageTokenizer.from_pretrained(pipeline_dir)
    gpu = ImageTokenizer.from_pretrained(pipeline_dir, device=device)
    same = total = images_same = 0
    for w, h in sizes:
        group = [im for im in images if im.size == (w, h)]
        for a, b in zip(cpu.encode(group, w, h), gpu.encode(group, w, h)):
            same += int((a == b).sum())
            total += a.size
            images_same += int((a == b).all())
    return {"images": n, "codes_same": same / total, "images_same": images_same / n}


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(config: TrainConfig, eval_shards: Path, scratch: Path, warmup: int = 5, timed: int = 25) -> float:
    """Seconds per optimizer step of `config`'s shape (on the eval shards: only the shape matters)."""
    probe = dataclasses.replace(config, data=dataclasses.replace(config.data, train=[str(eval_shards)]))
    shutil.rmtree(scratch, ignore_errors=True)
    trainer = Trainer(probe, scratch)
    batches = iter(trainer.loader)
    for _ in range(warmup):
        trainer.train_step(batches)
    sync(trainer.device)
    t = time.perf_counter()
    for _ in range(timed):
        trainer.train_step(batches)
    sync(trainer.device)
    seconds = (time.perf_counter() - t) / timed
    del trainer
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, help="stage number (1-based, as in stages.yaml)")
    parser.add_argument("--work", default="runs/shapes-tiny", help="the recipe's working directory (build.py --work)")
    parser.add_argument("--export", required=True, help="directory for the exported results")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the dataset sizes (smoke runs)")
    parser.add_argument("--prep-deadline", type=float, default=250.0)
    parser.add_argument("--train-end", type=float, default=470.0, help="when the schedule should end")
    parser.add_argument("--deadline", type=float, default=540.0, help="when everything should be done")
    parser.add_argument("--eval-n", type=int, default=50, help="samples per task of the GPU engine check")
    parser.add_argument("--max-steps", type=int, default=None, help="fix max_steps instead of timing")
    parser.add_argument("--max-passes", type=float, default=5.0, help="most passes over the training sets")
    args = parser.parse_args(argv)
    if not 1 <= args.stage <= len(recipe.STAGES) or recipe.stage(args.stage).start == "random":
        parser.error(f"--stage must be one of 1 to {len(recipe.STAGES)} that continues an earlier stage")

    stage = recipe.stage(args.stage)
    work = Path(args.work)
    previous = work / stage.pipeline
    eval_shards = work / "shards" / "eval"
    export = Path(args.export)
    export.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stage": args.stage, "name": stage.name, "device": torch.cuda.get_device_name(0)
                     if torch.device(args.device).type == "cuda" else args.device}
    log(f"stage {args.stage} ({stage.name}) from {previous} on {summary['device']}, torch {torch.__version__}")

    try:
        run(args, summary, work, previous, eval_shards, export, stage)
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        summary["seconds"] = now()
        (export / "stage.json").write_text(json.dumps(summary, indent=2, default=str))
    log("exported")
    return 0


def run(args, summary: dict, work: Path, previous: Path, eval_shards: Path, export: Path,
        stage: recipe.Stage) -> None:
    seeds, out_name = stage.seeds, stage.name
    summary["vq_agreement"] = vq_agreement(previous, args.device)
    log(f"VQ codes CPU vs GPU: {summary['vq_agreement']}")

    # Pre-tokenize the training sets, one worker process each (seeds in order, so a deadline drops the last).
    pool = multiprocessing.get_context("spawn").Pool(min(args.jobs, len(seeds)))
    jobs = {seed: pool.apply_async(recipe._prepare_worker, ((work, seed, recipe.train_counts(seed, args.scale),
                                                              previous, args.device),))
            for seed in seeds}
    done, failed, tokens = [], {}, 0
    for seed, job in jobs.items():
        try:
            tokens += job.get(timeout=max(0.0, args.prep_deadline - now()))["tokens"]
            done.append(seed)
        except multiprocessing.TimeoutError:
            failed[seed] = "not done by the prep deadline"
        except Exception as e:  # noqa: BLE001 - reported, the stage goes on without the set
            failed[seed] = f"{type(e).__name__}: {e}"
    pool.terminate()
    summary.update(prep_seconds=now(), seeds=done, seeds_left_out=failed, train_tokens_per_pass=tokens)
    log(f"prepared {len(done)} of {len(seeds)} sets ({tokens / 1e6:.1f} M tokens); left out: {failed or 'none'}")
    if not done:
        raise SystemExit("no training set was prepared")

    config = load_config(recipe.write_stage_config(stage, work, device=args.device))
    step_seconds = None
    if args.max_steps is not None:
        max_steps = args.max_steps
    else:
        step_seconds = time_steps(config, eval_shards, work / "probe")
        log(f"{step_seconds * 1000:.1f} ms a step of {config.data.batch_size} x {config.data.seq_len}")
        # The schedule ends by --train-end (15 s kept for evaluations and checkpoints), and
        # passes over the data stay at most --max-passes (about 0.92 of a row is document tokens).
        by_time = int((args.train_end - now() - 15) / step_seconds)
        by_data = int(args.max_passes * tokens / (0.92 * config.data.batch_size * config.data.seq_len))
        max_steps = min(by_time, by_data)
    summary.update(step_seconds_probe=step_seconds, max_steps=max_steps)
    log(f"training {max_steps} steps")
    t = now()
    result = recipe.train_stage(stage, work, seeds=tuple(done), max_steps=max_steps, device=args.device)
    summary.update(train=result, train_seconds=now() - t)
    log(f"trained: {json.dumps(result)}")
    final = work / out_name / "final"

    left = args.deadline - now() - 15
    if args.eval_n > 0 and left > 30:
        report_dir = work / "gpu-eval"
        cmd = [sys.executable, "-m", "tokenloom.cli", "eval", "--model", str(final), "--out", str(report_dir),
               "--n", str(args.eval_n), "--device", args.device]
        t = now()
        try:
            subprocess.run(cmd, timeout=left, check=True, stdout=subprocess.DEVNULL)
            report = json.loads((report_dir / "report.json").read_text())
            summary["gpu_eval"] = {"seconds": now() - t, "n": args.eval_n, "scores": report["scores"]}
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError, FileNotFoundError) as e:
            summary["gpu_eval"] = {"error": f"{type(e).__name__}: {e}", "seconds": now() - t}
        log(f"GPU eval: {summary['gpu_eval']}")

    save_weights(load_weights(final), export / "model", max_shard_bytes=12 * 2**20)
    for name in ("metrics.jsonl", "loss.png", f"../{out_name}.yaml"):
        src = work / out_name / name
        if src.exists():
            shutil.copy(src, export / src.name)


if __name__ == "__main__":
    raise SystemExit(main())
