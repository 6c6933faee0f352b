"""Training-step time in fp32 against bf16 autocast, on this machine: what `precision: auto` decides.

    python benchmarks/bench_train_precision.py [--batch 8 --seq 512 --steps 3 --threads 2]

Times forward + backward + AdamW of the shipped shapes-tiny shape (random weights, random tokens,
the trainer's own loss) in both precisions, after one warm-up step each. bf16 pays only where the
matmuls are native (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX); elsewhere autocast
emulates them. Prints a table and writes JSON with the ratio and what `auto` resolves to here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from _results import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokenloom.model import ModelConfig, Transformer  # noqa: E402
from tokenloom.precision import native_bf16, resolve_precision  # noqa: E402
from tokenloom.train.trainer import token_losses  # noqa: E402

ASSET_CONFIG = ROOT / "src" / "tokenloom" / "assets" / "shapes-tiny" / "config.json"


def seconds_per_step(model, batch, precision: str, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        with autocast:
            ce, z = token_losses(model, batch, torch.device("cpu"))
        (ce / batch["labels"].numel() + 1e-5 * z).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_precision_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(**json.loads(ASSET_CONFIG.read_text())["model"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1),
             "document_ids": torch.zeros_like(ids)}
    results = {}
    for precision in ("fp32", "bf16"):
        model = Transformer.random(config, seed=0).train()
        results[precision] = seconds_per_step(model, batch, precision, args.steps)
    tokens = args.batch * args.seq
    cpu = torch.device("cpu")
    result = {"machine": platform.processor() or platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(cpu),
              "auto_resolves_to": resolve_precision("auto", cpu),
              "threads": args.threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "seconds_per_step": results, "tokens_per_second": {k: tokens / v for k, v in results.items()},
              "bf16_over_fp32_time": results["bf16"] / results["fp32"]}
    print("| precision | s/step | tokens/s |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.3f} | {tokens / v:.0f} |")
    print(f"bf16 takes {result['bf16_over_fp32_time']:.2f}x the fp32 time; native bf16: {result['native_bf16']}; "
          f"auto -> {result['auto_resolves_to']} ({result['cpu_capability']})")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
