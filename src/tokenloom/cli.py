"""`tokenloom <verb>`: thin over the library, one verb per job."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

MAX_PROMPTS = 10_000  # bound on --prompts-file lines


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the embedded shapes-tiny model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays on GPUs)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed (per draw: seed + index)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)


def _load(args):
    from .pipeline import load

    return load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)


def cmd_info(args) -> int:
    pipe = _load(args)
    m = pipe.model.config
    print(json.dumps({"model": {**m.to_dict(), "parameters": pipe.model.num_parameters()},
                      "vocab": {"size": pipe.vocab.size, "codebook_size": pipe.vocab.codebook_size,
                                "max_grid_size": pipe.vocab.max_grid_size, "specials": pipe.vocab.specials},
                      "pipeline": pipe.config.to_dict(),
                      "image_tokenizer": None if pipe.image_tokenizer is None else
                      {"downsample_factor": pipe.image_tokenizer.factor}}, indent=2, default=str))
    return 0


def cmd_init_random(args) -> int:
    from .pipeline import random_pipeline

    pipe = random_pipeline(seed=args.seed, layout=args.layout)
    pipe.save_pretrained(args.out)
    print(f"wrote a randomly initialised pipeline to {args.out}")
    return 0


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompts file {p} has no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"prompts file {p} has {len(prompts)} prompts; at most {MAX_PROMPTS}")
    return prompts


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise SystemExit("give either PROMPT or --prompts-file")
    if args.prompt is not None and not args.out:
        raise SystemExit("--out FILE.png is required with PROMPT")
    if args.prompts_file is not None and not args.out_dir:
        raise SystemExit("--out-dir DIR is required with --prompts-file")
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts_file)
    pipe = _load(args)
    images = pipe.generate_images(prompts, width=args.width, height=args.height, guidance_scale=args.guidance_scale,
                                  seed=args.seed, num_images=args.num_images, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, candidates=args.candidates,
                                  batch_size=args.batch_size, progress=True)
    if args.prompt is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.num_images == 1:
            images[0].save(out)
            written = [out]
        else:
            written = [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(len(images))]
            for im, path in zip(images, written):
                im.save(path)
    else:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i, im in enumerate(images):
            p, k = divmod(i, args.num_images)
            name = f"{p:04d}.png" if args.num_images == 1 else f"{p:04d}_{k}.png"
            im.save(out_dir / name)
            written.append(out_dir / name)
    print("\n".join(str(p) for p in written))
    return 0


def cmd_chat(args) -> int:
    from .document import Document
    from .report import save_document

    pipe = _load(args)
    user = pipe.user_document(args.prompt, args.image)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    result = pipe.chat(user, max_new_tokens=args.max_new_tokens, guidance_scale=args.guidance_scale,
                       seed=args.seed, text_sampling=sampling)
    doc = Document(user.turns + result.document.turns)
    paths = save_document(doc, args.out, title="tokenloom chat")
    print(result.text)
    print(f"wrote {paths['markdown']} and {paths['html']}", file=sys.stderr)
    return 0


def cmd_ask(args) -> int:
    pipe = _load(args)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.verb == "caption":
        print(pipe.caption(args.image, seed=args.seed, text_sampling=sampling))
    else:
        print(pipe.ask(args.image, args.question, seed=args.seed, text_sampling=sampling))
    return 0


DEMO_PROMPTS = ["a large red circle in the center", "a small blue square at the top left and a large yellow "
                "triangle at the bottom right", "a green triangle on the left, a purple circle in the center and a "
                "cyan square on the right", "a small cyan circle at the bottom"]


def cmd_demo(args) -> int:
    """The main job on the embedded default: draw, describe, answer, tell a story; one HTML page."""
    import numpy as np

    from .document import Document, TextPart
    from .report import image_grid, save_document

    pipe = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    turns = []
    images = pipe.generate_images(DEMO_PROMPTS, seed=args.seed, progress=True)
    for prompt, image in zip(DEMO_PROMPTS, images):
        turns.append(("user", [TextPart(prompt)]))
        turns.append(("assistant", [pipe.encode_image(image)]))
    image_grid(images, columns=len(images)).save(out / "generated.png")
    try:
        from .world import random_scene, render

        scene_image = render(random_scene(np.random.default_rng(args.seed)), 64, 64)
    except ImportError:  # the world module is optional for the demo
        scene_image = images[0]
    for question in ("Describe the image.", "How many shapes are there?"):
        answer = pipe.ask(scene_image, question, seed=args.seed)
        turns.append(("user", [pipe.encode_image(scene_image), TextPart(question)]))
        turns.append(("assistant", [TextPart(answer)]))
    story = pipe.chat("Tell a story.", seed=args.seed, max_new_tokens=args.max_new_tokens)
    turns.append(("user", [TextPart("Tell a story.")]))
    doc = Document.chat(turns)
    doc.turns.extend(story.document.turns)
    paths = save_document(doc, out, title="tokenloom demo")
    print(f"wrote {paths['html']}, {paths['markdown']} and {out / 'generated.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description="Native multimodal token models: "
                                     "text and images as tokens of one vocabulary.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("info", help="describe a model: config, vocabulary, layout")
    _model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: draw, caption, answer and tell a story; writes an HTML page")
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=400)
    _model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("init-random", help="write a small randomly initialised pipeline (for tests and demos)")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["unirep", "flat"], default="unirep")
    p.set_defaults(func=cmd_init_random)

    p = sub.add_parser("generate", help="text to image")
    p.add_argument("prompt", nargs="?", help="the image description")
    p.add_argument("--out", help="output PNG (with PROMPT); with --num-images K: FILE_0.png ... FILE_{K-1}.png")
    p.add_argument("--prompts-file", help="one prompt a line; writes DIR/0000.png, DIR/0001.png, ...")
    p.add_argument("--out-dir", help="output directory (with --prompts-file)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 = off)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--candidates", type=int, default=None,
                   help="draw this many per image and keep the one the model itself rates best for the prompt "
                        "(default: the model's image_candidates; 1 = no reranking)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated in one batch")
    _sampling_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interleaved answer (text and images) to a prompt with optional images")
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    p.add_argument("--out", required=True, help="output directory for index.md, index.html and PNGs")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    _sampling_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_chat)

    for verb, text in DELEGATED_HELP.items():
        sub.add_parser(verb, help=text, add_help=False)

    p = sub.add_parser("caption", help="describe an image")
    p.add_argument("image")
    _sampling_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    _sampling_args(p)
    _model_args(p)
    p.set_defaults(func=cmd_ask)
    return parser


def _delegated(verb: str):
    """Verbs whose own module parses their arguments (so `tokenloom VERB --help` shows theirs)."""
    import importlib

    targets = {"train": "tokenloom.train:main", "pretokenize": "tokenloom.data.pretokenize:main",
               "eval": "tokenloom.evaluation:main", "convert": "tokenloom.convert.cli:main_convert",
               "expand": "tokenloom.convert.cli:main_expand", "export": "tokenloom.convert.cli:main_export"}
    if verb not in targets:
        return None
    module, name = targets[verb].split(":")
    return getattr(importlib.import_module(module), name)


DELEGATED_HELP = {"train": "train or fine-tune from a YAML/TOML config (resumes automatically)",
                  "pretokenize": "raw JSONL -> Parquet token shards (resumable)",
                  "eval": "score a model on held-out shapes-world samples (exact matches)",
                  "convert": "convert a Chameleon / Anole / Lumina-mGPT checkpoint (--from KIND SRC DST)",
                  "expand": "Liquid-style: add image codes to a Hugging Face causal LM",
                  "export": "export a model to the Hugging Face Chameleon layout"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and (run := _delegated(argv[0])) is not None:
        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.simplefilter("default")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenloom {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
