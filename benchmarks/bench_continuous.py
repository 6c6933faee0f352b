"""Continuous batching in the engine alone (no HTTP): the same mixed requests served three ways.

    python benchmarks/bench_continuous.py [--requests 96] [--max-batch 32] [--arrive-every 1]

The requests cycle through captions (a shapes-world picture in, text out, greedy), guided text-to-image
(one 64x64 image) and stories ("Tell a story.", text and images, sampled), each with its own seed. A new
request arrives every --arrive-every decode steps (0: all at once). They are served

* continuously: one ContinuousBatcher with --max-batch; a request joins at the first step after it
  arrives and leaves when done;
* one at a time: the same batcher with max_batch 1 (each request waits for the one before);
* in static batches: groups of --max-batch arrived requests through Engine.generate, each group
  waiting for the whole previous group to drain (the reference approach).

Reports generated tokens/s, requests/s and mean latency (arrival to finish) for each, and the
throughput ratios; writes benchmarks/results/continuous_cpu.json. Every run uses the same weights,
requests and seeds, and checks that each request's tokens are the same in all three.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import write_result  # noqa: E402

from tokenloom import load  # noqa: E402
from tokenloom.engine import ContinuousBatcher, Finished  # noqa: E402
from tokenloom.world import random_scene, render  # noqa: E402

KINDS = ("caption", "image", "story")


def build_requests(pipe, n: int) -> list:
    requests = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "caption":
            image = render(random_scene(np.random.default_rng(i)), 64, 64)
            doc = pipe.user_document("Describe the image.", [image])
            requests.append(pipe.chat_request(doc, mode="text", do_sample=False, max_new_tokens=40, seed=i))
        elif kind == "image":
            doc = pipe.image_prompt("a large red circle in the center", 64, 64)
            requests.append(pipe.chat_request(doc, mode="image", max_new_tokens=pipe.format.image_length(8, 8) + 1,
                                              seed=i))
        else:
            requests.append(pipe.chat_request(pipe.user_document("Tell a story."), mode="any", max_new_tokens=400,
                                              seed=i))
    return requests


def serve_continuously(engine, requests, max_batch: int, every: int) -> tuple[dict, float, dict]:
    """(ids by request index, seconds, latency in steps-of-wall by index)."""
    batcher = ContinuousBatcher(engine, max_batch=max_batch)
    arrived, results, latency, rid_of = 0, {}, {}, {}
    arrival_time = {}
    start = time.perf_counter()
    step = 0
    while len(results) < len(requests):
        while arrived < len(requests) and (every == 0 or arrived * every <= step):
            rid_of[batcher.add(requests[arrived])] = arrived
            arrival_time[arrived] = time.perf_counter()
            arrived += 1
        for event in batcher.step():
            if isinstance(event, Finished):
                i = rid_of[event.row]
                results[i] = event.result.ids
                latency[i] = time.perf_counter() - arrival_time[i]
        step += 1
    return results, time.perf_counter() - start, latency


def serve_static(engine, requests, max_batch: int) -> tuple[dict, float]:
    """Groups of max_batch through Engine.generate (arrivals ignored: every request is there at once,
    which only favours this approach)."""
    results = {}
    start = time.perf_counter()
    for g in range(0, len(requests), max_batch):
        for k, result in enumerate(engine.generate(requests[g:g + max_batch])):
            results[g + k] = result.ids
    return results, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded shapes-tiny)")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--arrive-every", type=int, default=1, help="decode steps between arrivals (0: all at once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continuous_cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    engine = pipe.engine
    requests = build_requests(pipe, args.requests)
    serve_continuously(engine, requests[:3], 3, 0)  # warm up

    runs = {}
    cont, t_cont, lat_cont = serve_continuously(engine, requests, args.max_batch, args.arrive_every)
    one, t_one, lat_one = serve_continuously(engine, requests, 1, args.arrive_every)
    static, t_static = serve_static(engine, requests, args.max_batch)
    same = all(cont[i] == one[i] == static[i] for i in range(len(requests)))
    tokens = sum(len(ids) for ids in cont.values())
    for name, seconds, latency in (("continuous", t_cont, lat_cont), ("one_at_a_time", t_one, lat_one),
                                   ("static_batches", t_static, None)):
        runs[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                      "requests_per_s": round(len(requests) / seconds, 3),
                      "mean_latency_s": None if latency is None else round(float(np.mean(list(latency.values()))), 3)}
        print(f"{name:>15}: {seconds:6.2f} s  {tokens / seconds:7.1f} tok/s  {len(requests) / seconds:5.2f} req/s"
              + ("" if latency is None else f"  mean latency {np.mean(list(latency.values())):.2f} s"))
    ratios = {"continuous_over_one_at_a_time": round(t_one / t_cont, 2),
              "continuous_over_static_batches": round(t_static / t_cont, 2)}
    print(f"continuous / one at a time: {ratios['continuous_over_one_at_a_time']}x   "
          f"continuous / static batches: {ratios['continuous_over_static_batches']}x   same tokens: {same}")
    write_result({"benchmark": "continuous batching in the engine: mixed captions, guided images, stories",
                  "model": "shapes-tiny" if args.model is None else args.model, "requests": args.requests,
                  "max_batch": args.max_batch, "arrive_every_steps": args.arrive_every, "tokens": tokens,
                  "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "runs": runs, "ratios": ratios,
                  "same_tokens_in_every_run": same}, args.out)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
