"""Guided image generation: tokenloom's engine against the reference approach, on the same weights.

    python benchmarks/bench_generate.py [--hidden 256 --layers 4 --codes 8192 --grid 32 --batches 1,16]

Builds a random Chameleon-architecture model with transformers (`ChameleonForConditionalGeneration`,
saved with `save_pretrained`), loads it into tokenloom with the chameleon-hf converter, and draws
grid x grid images with classifier-free guidance (scale 3, temperature 1, top-k 2000) both ways:

* reference -- what Lumina-mGPT does: transformers `generate` with a DynamicCache and a logits
  processor that runs the unconditional context as a second, unbatched forward with its own cache;
  prompts one at a time (a batch of B is B calls). HF's forward masks image-token logits to the
  dtype minimum (it cannot draw); the mask is lifted (`vocabulary_mapping.image_tokens = []`) and a
  processor allows only image codes, as the reference projects do.
* engine -- one call for the whole batch: conditional and unconditional rows in one forward over
  one static KV cache, the grammar forcing the flat grid.

With --int8 the engine also runs a copy of the model whose linears are dynamic int8
(`tokenloom.quantize`, what `--dtype int8` loads; CPU only), on the same prompts and seeds.

Tokens/s counts image codes only (grid^2 per image). Also reported: the machine's measured matmul
peak and the fraction of it the engine reaches at the largest batch (model FLOPs: 2 x parameters
per row-token plus attention over the filled cache). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokenloom.convert import load_chameleon_hf  # noqa: E402
from tokenloom.engine import ContinuousBatcher, Engine, Finished, GenerationRequest, SamplingParams  # noqa: E402
from tokenloom.text_tokenizer import TextTokenizer  # noqa: E402
from tokenloom.vocab import chameleon_image_token  # noqa: E402

from _results import write_result  # noqa: E402

CORPUS = ["a red square on a blue field", "two cats and a dog", "draw a small green circle",
          "a large yellow triangle in the top left corner"] * 8
PROMPTS = ["a red square", "two cats", "a green circle at the bottom", "a blue triangle", "a yellow star",
           "three dogs on a beach", "a small house", "a large tree"]


def build_hf_checkpoint(directory: Path, hidden: int, layers: int, codes: int, seed: int) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    tok = TextTokenizer.train(CORPUS, 400, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.add_special_tokens([chameleon_image_token(c) for c in range(codes)]
                           + ["<racm3:break>", "<eoss>", "<reserved08706>", "<image>"])
    heads = max(1, hidden // 64)
    cfg = ChameleonConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, vocabulary_map=tok.get_vocab(), bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"),
        vq_config=dict(embed_dim=8, num_embeddings=codes, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    torch.manual_seed(seed)
    ChameleonForConditionalGeneration(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


class UnbatchedGuidance:
    """Lumina-mGPT's guidance: the unconditional context runs as its own batch-1 forward with its own
    cache, one call per generated token, combined with the conditional logits; only codes allowed."""

    def __init__(self, model, uncond_ids: list[int], scale: float, code_ids: torch.Tensor):
        self.model, self.scale = model, scale
        self.uncond = torch.tensor([uncond_ids])
        self.cache = None
        self.mask = torch.full((model.config.vocab_size,), float("-inf"))
        self.mask[code_ids] = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
            step = self.uncond.to(input_ids.device)
        else:
            step = input_ids[:, -1:]
        out = self.model(input_ids=step, past_key_values=self.cache, use_cache=True)
        uncond = out.logits[:, -1].float()
        guided = uncond + self.scale * (scores.float() - uncond)
        return guided + self.mask.to(guided.device)


def run_reference(hf, prompts_ids, uncond_ids, code_ids, n_codes, scale, top_k, seed) -> float:
    from transformers import DynamicCache, LogitsProcessorList

    start = time.perf_counter()
    for i, ids in enumerate(prompts_ids):
        torch.manual_seed(seed + i)
        guidance = UnbatchedGuidance(hf, uncond_ids, scale, code_ids)
        x = torch.tensor([ids], device=hf.device)
        out = hf.generate(x, max_new_tokens=n_codes, min_new_tokens=n_codes, do_sample=True, temperature=1.0,
                          top_k=top_k, top_p=None, logits_processor=LogitsProcessorList([guidance]),
                          past_key_values=DynamicCache(), pad_token_id=hf.config.pad_token_id, eos_token_id=None)
        assert out.shape[1] - x.shape[1] == n_codes
        assert bool(torch.isin(out[0, x.shape[1]:].cpu(), code_ids).all()), "the reference drew a non-code"
    return time.perf_counter() - start


def run_batch(engine, requests) -> tuple[float, int, list]:
    """Seconds, forwards (batcher steps: one forward each) and results of one batch."""
    batcher = ContinuousBatcher(engine, max_batch=len(requests))
    ids = [batcher.add(r) for r in requests]
    results, steps = {}, 0
    start = time.perf_counter()
    while batcher.has_work():
        for event in batcher.step():
            if isinstance(event, Finished):
                results[event.row] = event.result
        steps += 1
    return time.perf_counter() - start, steps, [results[i] for i in ids]


def run_engine(engine, prompts_ids, uncond_ids, grid, scale, top_k, seed, speculative=None) -> tuple[float, int]:
    """Seconds and forwards for guided images of every prompt in one batch; `speculative`: (window, init)."""
    sampling = SamplingParams(temperature=1.0, top_k=top_k)
    n_new = grid * grid + 2  # image_begin, codes, image_end (flat layout)
    fast = {} if speculative is None else {"speculative": "jacobi", "speculative_window": speculative[0],
                                           "speculative_init": speculative[1]}
    reqs = [GenerationRequest(ids, mode="image", image_size=(grid, grid), max_new_tokens=n_new, image=sampling,
                              text=sampling, guidance_scale=scale, uncond_prompt_ids=uncond_ids, seed=seed + i, **fast)
            for i, ids in enumerate(prompts_ids)]
    elapsed, steps, results = run_batch(engine, reqs)
    for r in results:
        assert r.document.parts and r.document.parts[-1].codes.shape == (grid, grid), "malformed image"
    return elapsed, steps


def matmul_peak(device, dtype, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def model_flops(model, rows: int, prompt_len: int, n_new: int) -> float:
    """Forward FLOPs of generating n_new tokens on `rows` rows: 2 x weights + attention per token."""
    params = sum(p.numel() for p in model.parameters() if p.dim() == 2) - model.tok_embeddings.weight.numel()
    c = model.config
    attn = sum(4 * c.num_layers * c.hidden_size * (prompt_len + t) for t in range(n_new))
    return rows * (2 * params * n_new + attn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--codes", type=int, default=8192)
    p.add_argument("--grid", type=int, default=32, help="image side in codes (32: Chameleon's 1024 codes)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--ref-images", type=int, default=None,
                   help="images the reference draws per batch size (default: all of them; it loops over "
                        "prompts, so its tokens/s does not depend on how many)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    p.add_argument("--speculative-window", type=int, default=16,
                   help="drafts per step of speculative Jacobi decoding, run beside plain decoding (0: not run)")
    p.add_argument("--speculative-init", default="above", choices=["random", "above"])
    p.add_argument("--int8", action="store_true", help="also time the engine with dynamic int8 linears (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = [int(b) for b in args.batches.split(",")]

    from transformers import ChameleonForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        src = build_hf_checkpoint(Path(tmp) / "hf", args.hidden, args.layers, args.codes, args.seed)
        hf = ChameleonForConditionalGeneration.from_pretrained(src, dtype=dtype).to(device).eval()
        with warnings.catch_warnings():  # "no VQ decoder": the benchmark never decodes pixels
            warnings.simplefilter("ignore")
            pipe, _ = load_chameleon_hf(src, dtype=dtype, grid=args.grid)
    hf.model.vocabulary_mapping.__dict__["image_tokens"] = []  # lift HF's image-logit mask (cached_property)
    pipe.model.to(device)
    engine = Engine(pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.config.layout, pipe.config.flat_grid,
                    None, compile=args.compile)
    int8_engine = None
    if args.int8:
        import copy

        from tokenloom.quantize import quantize_int8

        int8_engine = Engine(quantize_int8(copy.deepcopy(pipe.model)), pipe.vocab, pipe.text_tokenizer,
                             pipe.config.layout, pipe.config.flat_grid, None)
    vocab = pipe.vocab
    code_ids = torch.as_tensor(vocab.code_ids)
    uncond_ids = pipe.unconditional_prompt()
    n_codes = args.grid * args.grid

    def prompt_ids(i: int) -> list[int]:
        text = PROMPTS[i % len(PROMPTS)]
        return pipe.format.encode(pipe.image_prompt(text, args.grid * pipe.factor, args.grid * pipe.factor),
                                  generation_role="assistant").ids

    # Warm both paths (allocator, kernels, compile) on a few tokens.
    warm = SamplingParams(temperature=1.0, top_k=args.top_k)
    engine.generate([GenerationRequest(prompt_ids(0), mode="text", max_new_tokens=16, text=warm, seed=0)] * 2)
    run_reference(hf, [prompt_ids(0) + [vocab.image_begin]], uncond_ids + [vocab.image_begin], code_ids, 16,
                  args.guidance_scale, args.top_k, args.seed)

    rows = []
    spec = (args.speculative_window, args.speculative_init) if args.speculative_window else None
    for b in batches:
        prompts = [prompt_ids(i) for i in range(b)]
        t_engine, steps = run_engine(engine, prompts, uncond_ids, args.grid, args.guidance_scale, args.top_k, args.seed)
        n_ref = min(b, args.ref_images or b)
        ref_prompts = [ids + [vocab.image_begin] for ids in prompts[:n_ref]]
        t_ref = run_reference(hf, ref_prompts, uncond_ids + [vocab.image_begin], code_ids, n_codes,
                              args.guidance_scale, args.top_k, args.seed)
        engine_tps = b * n_codes / t_engine
        ref_tps = n_ref * n_codes / t_ref
        flops = model_flops(pipe.model, 2 * b, max(len(x) for x in prompts), n_codes + 2)
        row = {"batch": b, "engine_seconds": round(t_engine, 3), "engine_tokens_per_s": round(engine_tps, 1),
               "engine_forwards": steps, "reference_images_timed": n_ref, "reference_seconds": round(t_ref, 3),
               "reference_tokens_per_s": round(ref_tps, 1), "speedup": round(engine_tps / ref_tps, 2),
               "engine_flops_per_s": flops / t_engine}
        line = (f"batch {b:3d}: engine {engine_tps:9.1f} tok/s ({steps} forwards)   reference {ref_tps:8.1f} tok/s   "
                f"speedup {engine_tps / ref_tps:6.2f}x")
        if spec:
            t_spec, spec_steps = run_engine(engine, prompts, uncond_ids, args.grid, args.guidance_scale, args.top_k,
                                            args.seed, spec)
            spec_tps = b * n_codes / t_spec
            row.update({"jacobi_seconds": round(t_spec, 3), "jacobi_tokens_per_s": round(spec_tps, 1),
                        "jacobi_forwards": spec_steps, "jacobi_fewer_forwards": round(steps / spec_steps, 2),
                        "jacobi_speedup_over_plain": round(t_engine / t_spec, 2),
                        "jacobi_speedup": round(spec_tps / ref_tps, 2)})
            line += (f"   jacobi {spec_tps:9.1f} tok/s ({spec_steps} forwards, {steps / spec_steps:.2f}x fewer; "
                     f"{t_engine / t_spec:.2f}x plain, {spec_tps / ref_tps:.2f}x reference)")
        if int8_engine is not None:
            t_int8, _ = run_engine(int8_engine, prompts, uncond_ids, args.grid, args.guidance_scale, args.top_k,
                                   args.seed)
            row.update({"int8_seconds": round(t_int8, 3), "int8_speedup_over_plain": round(t_engine / t_int8, 2),
                        "int8_speedup": round(b * n_codes / t_int8 / ref_tps, 2)})
            line += f"   int8 {t_engine / t_int8:.2f}x plain"
        rows.append(row)
        print(line, flush=True)

    peak = matmul_peak(device, dtype)
    largest = rows[-1]
    result = {
        "benchmark": "guided image generation, engine vs HF generate + unbatched guidance",
        "model": {"hidden": args.hidden, "layers": args.layers, "codes": args.codes, "vocab_rows": vocab.size,
                  "parameters": sum(p.numel() for p in pipe.model.parameters())},
        "image_grid": args.grid, "guidance_scale": args.guidance_scale, "top_k": args.top_k,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "compile": args.compile, "int8": args.int8, "speculative": {"window": args.speculative_window, "init": args.speculative_init},
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "rows": rows, "matmul_peak_flops_per_s": peak,
        "engine_fraction_of_peak_at_largest_batch": largest["engine_flops_per_s"] / peak,
    }
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; engine at batch {largest['batch']}: "
          f"{largest['engine_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * result['engine_fraction_of_peak_at_largest_batch']:.1f}% of peak")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
