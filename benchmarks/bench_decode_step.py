"""What a decode step spends its time on, and what was tried against it (CPU).

    python benchmarks/bench_decode_step.py [--threads 2]

1. Where the time goes: the embedded model drawing a guided 64x64 image, plain and speculative,
   profiled (cProfile): the share of the step in the model's forward, and in the engine's own
   bookkeeping (guidance, grammar, sampling, verification, events).
2. Writing the KV cache at per-row slots: advanced-index assignment (what the engine does) against
   scatter_ along the slot axis, at batch 2 and 32, one token and 17 (a window).
3. Weight-only int8: one Linear of each model shape with a decode step's activations (2 rows: a
   request and its guidance row) in float32, bfloat16, int8 weights through
   `torch.ops.aten._weight_int8pack_mm` (gpt-fast's weight-only int8) and `torch.ao` dynamic int8.

Prints the numbers and writes JSON. See docs/engine.md#speed for the reading.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import platform
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _results import write_result  # noqa: E402

SHAPES = {"shapes-tiny w1": (256, 704), "~100M model w1": (768, 2048), "Chameleon-7B w1": (4096, 11008)}


def median_ms(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def profile_steps(images: int = 10) -> dict:
    import tokenloom

    pipe = tokenloom.load()
    _, (plain,) = pipe.image_draws("a red circle at the top left", (8, 8), 1, seed=0)
    out = {}
    for name, req in (("plain", plain), ("jacobi", dataclasses.replace(plain, speculative="jacobi"))):
        for _ in range(2):
            pipe.engine.generate([req])
        prof = cProfile.Profile()
        prof.enable()
        t = time.perf_counter()
        for _ in range(images):
            pipe.engine.generate([req])
        seconds = (time.perf_counter() - t) / images
        prof.disable()
        stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, _, tottime, cumtime, _)
        step = next(v[3] for k, v in stats.items() if k[2] == "_decode")
        # The outermost forward of model.py (Transformer.forward) has the largest cumulative time.
        forward = max(v[3] for k, v in stats.items() if k[2] == "forward" and k[0].endswith("model.py"))
        out[name] = {"seconds_per_image_profiled": round(seconds, 4), "forward_share_of_step": round(forward / step, 3),
                     "engine_share_of_step": round(1 - forward / step, 3)}
        print(f"profile {name:6s}: {seconds * 1e3:.1f} ms an image (under cProfile); model forward "
              f"{100 * forward / step:.0f}% of the step, engine bookkeeping {100 * (1 - forward / step):.0f}%", flush=True)
    return out


def kv_writes(reps: int) -> list[dict]:
    out = []
    for b, t in ((2, 1), (32, 1), (2, 17), (32, 17)):
        cache = torch.zeros(b, 4, 512, 32)
        k = torch.randn(b, 4, t, 32)
        slots = torch.randint(0, 400, (b, 1)) + torch.arange(t)
        rows = torch.arange(b)[:, None]

        def assign():
            cache[rows, :, slots] = k.transpose(1, 2)

        def scatter():
            cache.scatter_(2, slots[:, None, :, None].expand(k.shape), k)

        row = {"rows": b, "tokens": t, "index_assign_us": median_ms(assign, reps) * 1e3,
               "scatter_us": median_ms(scatter, reps) * 1e3}
        out.append(row)
        print(f"KV write {b:2d} rows x {t:2d} tokens: index assignment {row['index_assign_us']:9.1f} us, "
              f"scatter_ {row['scatter_us']:7.1f} us", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_step_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notice
    profile = profile_steps()
    kv = kv_writes(args.reps)
    rows = []
    with torch.inference_mode():
        for name, (k, n) in SHAPES.items():
            linear = nn.Linear(k, n, bias=False)
            x = torch.randn(args.rows, k)
            w = linear.weight.detach()
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
            w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            wb, xb = w.bfloat16(), x.bfloat16()
            dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)
            row = {"layer": name, "in": k, "out": n, "rows": args.rows,
                   "fp32_ms": median_ms(lambda: linear(x), args.reps),
                   "bf16_ms": median_ms(lambda: torch.nn.functional.linear(xb, wb), args.reps),
                   "int8_weight_only_ms": median_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scale), args.reps),
                   "int8_dynamic_ms": median_ms(lambda: dynamic(x), args.reps)}
            rows.append(row)
            print(f"{name:18s} [{args.rows}x{k}]x[{k}x{n}]  fp32 {row['fp32_ms']:.3f} ms  bf16 {row['bf16_ms']:.3f} ms  "
                  f"int8 weight-only {row['int8_weight_only_ms']:.3f} ms  int8 dynamic {row['int8_dynamic_ms']:.3f} ms",
                  flush=True)
    write_result({"benchmark": "the decode step: profile, KV writes, int8 linears", "threads": torch.get_num_threads(),
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "profile": profile, "kv_write": kv, "linear": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
