"""Speculative Jacobi decoding on the embedded model: forwards and wall time per guided 64x64 image
against plain decoding, in one run on the same weights, and the text-to-image score both ways.

    python benchmarks/bench_speculative.py [--windows 8,16,32 --batches 1,16 --repeats 5 --eval 200]

Draws use the model's own settings (guidance 1.75, image temperature 0.1, top-k 32; a 64x64 image is
8x8 codes = 72 codes and end-of-lines, 77 tokens in all). For each batch size and window it reports
the forwards a batch took (one per engine step), the median wall time of `--repeats` runs, and the
ratios to plain decoding; `pipeline` rows time `generate_images` as a user calls it (the model's
default of 8 reranked candidates per image). `--eval N` scores text-to-image on N held-out prompts
with and without (`tokenloom eval --tasks t2i`): lossless decoding must agree within sampling noise.
`--compile` adds the same with the decode step under torch.compile (its warm-up time reported apart).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import tokenloom  # noqa: E402

from _results import write_result  # noqa: E402
from bench_generate import run_batch  # noqa: E402

PROMPTS = ["a red circle at the top left", "a large blue square in the center", "a small green triangle at the bottom",
           "a yellow circle on the right", "two shapes: a red square and a blue circle"]


def requests(pipe, batch: int, speculative):
    out = []
    for i in range(batch):
        _, (req,) = pipe.image_draws(PROMPTS[i % len(PROMPTS)], pipe.grid_size(None, None), 1, seed=100 + i)
        if speculative:
            req = dataclasses.replace(req, speculative="jacobi", speculative_window=speculative[0],
                                      speculative_init=speculative[1])
        out.append(req)
    return out


def timed(pipe, batch, speculative, repeats):
    reqs = requests(pipe, batch, speculative)
    run_batch(pipe.engine, reqs)  # warm
    times, steps = [], None
    for _ in range(repeats):
        t, steps, _ = run_batch(pipe.engine, reqs)
        times.append(t)
    return statistics.median(times), steps


def pipeline_time(pipe, speculative, repeats):
    kw = {"speculative": "jacobi", "speculative_window": speculative[0]} if speculative else {"speculative": "off"}
    pipe.generate_images(PROMPTS[0], seed=0, **kw)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        pipe.generate_images(PROMPTS[r % len(PROMPTS)], seed=r, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def t2i_score(pipe, n, speculative):
    from tokenloom.evaluation import evaluate

    pipe.config.speculative = "jacobi" if speculative else None
    if speculative:
        pipe.config.speculative_window = speculative[0]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = evaluate(pipe, tmp, n=n, tasks=["t2i"], progress=False)
        seconds = time.perf_counter() - t
    pipe.config.speculative = None
    return report["scores"]["t2i"], seconds


def bench(pipe, args, label):
    rows = []
    windows = [int(w) for w in args.windows.split(",")]
    for b in [int(x) for x in args.batches.split(",")]:
        t_plain, f_plain = timed(pipe, b, None, args.repeats)
        rows.append({"setting": label, "batch": b, "method": "plain", "forwards": f_plain,
                     "seconds": round(t_plain, 4)})
        print(f"[{label}] batch {b:2d} plain            {f_plain:4d} forwards  {t_plain:7.3f} s", flush=True)
        for init in args.inits.split(","):
            for w in windows:
                t, f = timed(pipe, b, (w, init), args.repeats)
                rows.append({"setting": label, "batch": b, "method": "jacobi", "window": w, "init": init,
                             "forwards": f, "seconds": round(t, 4), "fewer_forwards": round(f_plain / f, 2),
                             "speedup": round(t_plain / t, 2)})
                print(f"[{label}] batch {b:2d} jacobi {init:6s} W={w:2d} {f:4d} forwards  {t:7.3f} s   "
                      f"{f_plain / f:5.2f}x fewer forwards, {t_plain / t:5.2f}x faster", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", default="8,16,32")
    p.add_argument("--inits", default="random,above")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pipeline-window", type=int, default=16, help="window of the pipeline and eval rows")
    p.add_argument("--eval", type=int, default=0, help="text-to-image eval prompts, both ways (0: skip)")
    p.add_argument("--compile", action="store_true", help="also time the decode step under torch.compile")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = tokenloom.load()
    rows = bench(pipe, args, "eager")
    spec = (args.pipeline_window, "above")
    t_plain = pipeline_time(pipe, None, args.repeats)
    t_spec = pipeline_time(pipe, spec, args.repeats)
    pipeline = {"candidates": pipe.config.image_candidates, "plain_seconds": round(t_plain, 3),
                "jacobi_seconds": round(t_spec, 3), "speedup": round(t_plain / t_spec, 2)}
    print(f"generate_images (best of {pipe.config.image_candidates}): plain {t_plain:.3f} s, "
          f"jacobi W={spec[0]} {t_spec:.3f} s ({t_plain / t_spec:.2f}x)", flush=True)
    result = {"benchmark": "speculative Jacobi decoding vs plain decoding, shapes-tiny guided 64x64 images",
              "device": "cpu", "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "image_sampling": pipe.sampling("image").to_dict(),
              "guidance_scale": pipe.config.guidance_scale, "rows": rows, "pipeline": pipeline}
    if args.eval:
        plain, s_plain = t2i_score(pipe, args.eval, None)
        fast, s_fast = t2i_score(pipe, args.eval, spec)
        result["t2i"] = {"n": args.eval, "plain": plain, "jacobi": fast, "plain_seconds": round(s_plain, 1),
                         "jacobi_seconds": round(s_fast, 1)}
        print(f"t2i on {args.eval} prompts: plain {plain} ({s_plain:.0f} s), jacobi {fast} ({s_fast:.0f} s)", flush=True)
    if args.compile:
        t = time.perf_counter()
        compiled = tokenloom.load(compile=True)
        timed(compiled, 1, None, 1)
        timed(compiled, 1, spec, 1)
        result["compile_warmup_seconds"] = round(time.perf_counter() - t, 1)
        result["rows"] += bench(compiled, argparse.Namespace(**{**vars(args), "windows": str(spec[0]),
                                                                 "inits": "above"}), "compiled")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
