"""Load test of `tokenloom serve`: concurrent streaming clients on 127.0.0.1, a mixed workload.

    python benchmarks/bench_serve.py                       # a few minutes on 2 CPU cores, embedded model
    python benchmarks/bench_serve.py --clients 200 --requests-per-client 1 --max-queue 256   # 200 streams

Starts the server as a subprocess (`python -m tokenloom.cli serve --port 0`, the port read from its
first line) once with --max-batch B and once with --max-batch 1, and runs the same requests against
each: --clients concurrent clients, each sending --requests-per-client streamed requests in turn, the
mix cycling through

* caption -- a shapes-world picture in (data URI), "Describe the image.", modalities ["text"];
* image   -- POST /v1/images/generations, stream with partial_images 2;
* story   -- "Tell a story.", modalities ["text", "image"] (text with pictures, previews included).

Reported per run: requests/s, generated tokens/s (the servers' usage counts), p50/p95 time to first
output (the first text or image content of a stream) and to completion, and the count of 5xx and other
failures; then the ratio of tokens/s with B to tokens/s with 1. Last, an overload phase against the
B server: --overload requests at once (default 10x --max-queue), counting 200s, 429s and 5xx, and
checking GET /health afterwards. Every request goes to 127.0.0.1 with a timeout; every server is
stopped at the end. Writes JSON (default benchmarks/results/serve_cpu.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokenloom.serve.runner import ServeProcess  # noqa: E402
from tokenloom.world import random_scene, render  # noqa: E402

from _results import write_result  # noqa: E402

KINDS = ("caption", "image", "story")
IMAGE_PROMPTS = ["a large red circle in the center", "a small blue square at the top left",
                 "a green triangle on the left and a purple circle on the right", "a small cyan circle at the bottom"]


# -- the server ---------------------------------------------------------------------------------------------------
class Server(ServeProcess):
    """`tokenloom serve` (this checkout's) with a run's settings, and the model id it serves."""

    def __init__(self, max_batch: int, max_queue: int, model: str | None, threads: int | None, timeout: float,
                 device: str | None = None):
        args = ["--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
        for flag, value in (("--model", model), ("--device", device), ("--threads", threads)):
            if value:
                args += [flag, str(value)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("TOKENLOOM_API_KEY", None)
        super().__init__(args, timeout=timeout, env=env)
        self.model_id = httpx.get(self.url + "/v1/models", timeout=5).json()["data"][0]["id"]


# -- the workload -----------------------------------------------------------------------------------------------
def scene_uris(n: int) -> list[str]:
    uris = []
    for i in range(n):
        buf = io.BytesIO()
        render(random_scene(np.random.default_rng(i)), 64, 64).save(buf, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return uris


def request_for(i: int, uris: list[str], model: str, candidates: int | None = None) -> tuple[str, str, dict]:
    """(kind, path, body) of request i of a run: the same i gives the same request (seed i). `candidates`:
    reranked draws per generated image (None: the model's default)."""
    kind = KINDS[i % len(KINDS)]
    if kind == "caption":
        content = [{"type": "image_url", "image_url": {"url": uris[i % len(uris)]}},
                   {"type": "text", "text": "Describe the image."}]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "modalities": ["text"]}
    elif kind == "story":
        body = {"model": model, "messages": [{"role": "user", "content": "Tell a story."}],
                "modalities": ["text", "image"]}
    else:
        body = {"model": model, "prompt": IMAGE_PROMPTS[i % len(IMAGE_PROMPTS)], "stream": True,
                "partial_images": 2, "seed": i}
        if candidates is not None:
            body["candidates"] = candidates
        return kind, "/v1/images/generations", body
    body.update(stream=True, stream_options={"include_usage": True}, seed=i)
    return kind, "/v1/chat/completions", body


async def one_stream(http: httpx.AsyncClient, kind: str, path: str, body: dict) -> dict:
    """Send one streamed request; time to first output and to the end, tokens from its usage."""
    start = time.perf_counter()
    out = {"kind": kind, "status": None, "ttft": None, "total": None, "tokens": 0, "error": None}
    try:
        async with http.stream("POST", path, json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                out["error"] = r.text[:200]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"].get("message")
                    break
                if out["ttft"] is None and _has_output(event):
                    out["ttft"] = time.perf_counter() - start
                if event.get("usage"):
                    u = event["usage"]
                    out["tokens"] += u.get("completion_tokens", u.get("output_tokens", 0))
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["total"] = time.perf_counter() - start
    return out


def _has_output(event: dict) -> bool:
    if event.get("type", "").startswith("image_generation."):
        return True
    return any(c.get("delta", {}).get("content") for c in event.get("choices", []))


async def run_load(url: str, model: str, clients: int, per_client: int, uris: list[str], timeout: float,
                   candidates: int | None = None) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as http:
        results = []

        async def client(c: int):
            for k in range(per_client):
                results.append(await one_stream(http, *request_for(c * per_client + k, uris, model, candidates)))

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return summarize(results, wall)


def _pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 3)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    total = [r["total"] for r in ok]
    by_kind = {}
    for kind in KINDS:
        rs = [r for r in ok if r["kind"] == kind]
        by_kind[kind] = {"requests": len(rs), "tokens": sum(r["tokens"] for r in rs),
                         "ttft_p50_s": _pct([r["ttft"] for r in rs if r["ttft"] is not None], 50),
                         "completion_p50_s": _pct([r["total"] for r in rs], 50)}
    return {
        "requests": len(results), "ok": len(ok), "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
        "completion_p50_s": _pct(total, 50), "completion_p95_s": _pct(total, 95),
        "status_5xx": sum(1 for r in results if r["status"] is not None and r["status"] >= 500),
        "other_failures": [f"{r['kind']}: {r['status']} {r['error']}" for r in results
                           if r not in ok and not (r["status"] or 0) >= 500][:10],
        "by_kind": by_kind,
    }


async def run_overload(url: str, model: str, n: int, uris: list[str], timeout: float) -> dict:
    """n requests at once (streamed stories and captions); a full queue must answer 429, never 5xx or hang."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout), limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, *request_for(3 * i + (i % 2) * 2, uris, model))
                                         for i in range(n)))
        wall = time.perf_counter() - start
        health = (await http.get("/health")).status_code
    codes: dict[str, int] = {}
    for r in results:
        key = str(r["status"]) if r["status"] is not None else "no response"
        codes[key] = codes.get(key, 0) + 1
    return {"requests": n, "wall_s": round(wall, 3), "status_codes": codes,
            "status_429": codes.get("429", 0), "status_5xx": sum(v for k, v in codes.items() if k.startswith("5")),
            "no_response": codes.get("no response", 0), "health_after": health,
            "errors": sorted({r["error"][:120] for r in results if r["error"] and r["status"] == 200})[:5]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded shapes-tiny)")
    p.add_argument("--max-batch", type=int, default=8, help="B: the batch of the batched run (default: 8)")
    p.add_argument("--max-queue", type=int, default=16, help="the servers' --max-queue (default: 16)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    p.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends in turn")
    p.add_argument("--overload", type=int, default=None,
                   help="requests at once in the overload phase (default: 10 x --max-queue, at most 2000)")
    p.add_argument("--device", default=None, help="the servers' torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="the servers' torch threads (default: 1: the clients share the machine; 0: torch's choice)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a request counts as failed")
    p.add_argument("--skip-batch-1", action="store_true", help="no --max-batch 1 run (no ratio)")
    p.add_argument("--candidates", type=int, default=None,
                   help="reranked draws per generated image (default: the model's; scoring runs on the engine "
                        "thread, between steps, so it is not batched with decoding)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_cpu.json"))
    args = p.parse_args()
    for name in ("max_batch", "clients", "requests_per_client"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.clients > args.max_batch + args.max_queue:
        print(f"note: {args.clients} clients > max_batch + max_queue = {args.max_batch + args.max_queue}: "
              "some requests of the load runs will get 429", file=sys.stderr)
    overload = args.overload or min(2000, 10 * max(1, args.max_queue))
    uris = scene_uris(8)
    runs = {}
    batches = [args.max_batch] if args.skip_batch_1 or args.max_batch == 1 else [args.max_batch, 1]
    result_overload = None
    for b in batches:
        with Server(b, args.max_queue, args.model, args.threads, timeout=120, device=args.device) as server:
            model = server.model_id
            asyncio.run(run_load(server.url, model, 1, 3, uris, args.timeout, args.candidates))  # warm up
            stats = asyncio.run(run_load(server.url, model, args.clients, args.requests_per_client, uris,
                                         args.timeout, args.candidates))
            runs[f"max_batch_{b}"] = stats
            print(f"max-batch {b:3d}: {stats['ok']}/{stats['requests']} ok in {stats['wall_s']:.1f} s   "
                  f"{stats['requests_per_s']:.2f} req/s   {stats['tokens_per_s']:.0f} tok/s   "
                  f"TTFT p50 {stats['ttft_p50_s']} s p95 {stats['ttft_p95_s']} s   "
                  f"completion p50 {stats['completion_p50_s']} s p95 {stats['completion_p95_s']} s   "
                  f"5xx {stats['status_5xx']}", flush=True)
            if b == args.max_batch:
                result_overload = asyncio.run(run_overload(server.url, model, overload, uris, args.timeout))
                o = result_overload
                print(f"overload: {o['requests']} at once -> {o['status_codes']} in {o['wall_s']:.1f} s; "
                      f"/health after: {o['health_after']}", flush=True)
    ratio = None
    if len(batches) == 2 and runs["max_batch_1"]["tokens_per_s"]:
        ratio = round(runs[f"max_batch_{args.max_batch}"]["tokens_per_s"] / runs["max_batch_1"]["tokens_per_s"], 2)
        print(f"throughput ratio, max-batch {args.max_batch} / max-batch 1: {ratio}x (tokens/s)")
    import torch

    result = {
        "benchmark": "tokenloom serve under concurrent streaming clients (captions, text-to-image, stories)",
        "model": model, "clients": args.clients, "requests_per_client": args.requests_per_client,
        "max_batch": args.max_batch, "max_queue": args.max_queue, "mix": list(KINDS), "device": args.device or "cpu",
        "image_candidates": args.candidates or "the model's default",
        "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "runs": runs, "throughput_ratio_batched_over_batch_1": ratio, "overload": result_overload,
    }
    write_result(result, args.out)
    failed = any(r["status_5xx"] for r in runs.values()) or (result_overload or {}).get("status_5xx")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
