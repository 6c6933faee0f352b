"""`tokenloom convert | expand | export`: the converters on the command line."""

from __future__ import annotations

import argparse
import sys
import warnings

from ._common import ConversionError

DTYPES = ["bfloat16", "float16", "float32"]


def _run(verb: str, fn, **kwargs) -> int:
    warnings.simplefilter("default")
    try:
        path = fn(**{k: v for k, v in kwargs.items() if v is not None})
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"tokenloom {verb}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def main_convert(argv=None) -> int:
    from . import KINDS, convert

    p = argparse.ArgumentParser(prog="tokenloom convert", description="Convert a real checkpoint (Chameleon, "
                                "Anole, Lumina-mGPT) into a tokenloom model directory. Weights stream from "
                                "memory-mapped files; nothing is unpickled beyond plain tensors.")
    p.add_argument("--from", dest="kind", required=True, choices=list(KINDS), help="checkpoint layout")
    p.add_argument("src", help="checkpoint directory")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--vqgan", help="Meta's vqgan.ckpt + vqgan.yaml (a directory or the .ckpt); HF layouts "
                   "drop the VQ decoder, so without it the model can read images but not draw")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--profile", choices=["chameleon", "anole"], help="Chameleon-family defaults "
                   "(chameleon-meta / chameleon-hf)")
    p.add_argument("--resolution", type=int, choices=[512, 768, 1024], help="Lumina-mGPT default image side")
    p.add_argument("--tokenizer", help="tokenizer.json (or Meta's tokenizer/ directory) if not in SRC")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    a = p.parse_args(argv)
    options = {"vqgan": a.vqgan, "dtype": a.dtype, "overwrite": a.overwrite or None}
    if a.kind == "lumina-mgpt":
        if a.profile:
            p.error("--profile applies to chameleon-meta and chameleon-hf")
        options.update(resolution=a.resolution, tokenizer=a.tokenizer)
    else:
        if a.resolution:
            p.error("--resolution applies to lumina-mgpt")
        options["profile"] = a.profile
        options["tokenizer_dir" if a.kind == "chameleon-meta" else "tokenizer"] = a.tokenizer
    return _run("convert", convert, kind=a.kind, src=a.src, dst=a.dst, **options)


def main_expand(argv=None) -> int:
    from . import expand

    p = argparse.ArgumentParser(prog="tokenloom expand", description="Liquid-style: turn a Hugging Face "
                                "Llama/Qwen/Gemma-family causal LM into a multimodal generator by appending "
                                "image-code rows (initialised at the mean of the existing rows) and special "
                                "tokens. Text logits for text-only input are unchanged.")
    p.add_argument("base", help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--codebook-size", type=int, help="image codes to add (default: the --vq codebook's)")
    p.add_argument("--vq", help="image tokenizer: a tokenloom VQ directory or vqgan.ckpt + vqgan.yaml")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if a.codebook_size is None and a.vq is None:
        p.error("give --codebook-size N, --vq PATH, or both")
    return _run("expand", expand, base=a.base, dst=a.dst, codebook_size=a.codebook_size, vq=a.vq, dtype=a.dtype,
                overwrite=a.overwrite or None)


def main_export(argv=None) -> int:
    from . import export

    p = argparse.ArgumentParser(prog="tokenloom export", description="Export a tokenloom model directory to "
                                "the Hugging Face Chameleon layout (ChameleonForConditionalGeneration).")
    p.add_argument("src", help="tokenloom model directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    return _run("export", export, src=a.src, dst=a.dst, dtype=a.dtype, overwrite=a.overwrite or None)
