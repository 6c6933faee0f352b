"""The converter verbs: convert, expand, export, merge-adapter."""

from __future__ import annotations

from . import check_at_least

DTYPES = ["bfloat16", "float16", "float32"]


def _wrote(path) -> int:
    print(f"wrote {path}")
    return 0


def _options(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None and v is not False}


def convert_arguments(p) -> None:
    KINDS = ("chameleon-meta", "chameleon-hf", "lumina-mgpt")  # tokenloom.convert.KINDS, without importing it
    p.description = ("Convert a real checkpoint (Chameleon, Anole, Lumina-mGPT) into a tokenloom model directory. "
                     "Weights stream from memory-mapped files; nothing is unpickled beyond plain tensors.")
    p.add_argument("--from", dest="kind", required=True, choices=KINDS, help="checkpoint layout")
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


def run_convert(a) -> int:
    from ..convert import convert

    options = _options(vqgan=a.vqgan, dtype=a.dtype, overwrite=a.overwrite)
    if a.kind == "lumina-mgpt":
        if a.profile:
            raise ValueError("--profile applies to chameleon-meta and chameleon-hf")
        options.update(_options(resolution=a.resolution, tokenizer=a.tokenizer))
    else:
        if a.resolution:
            raise ValueError("--resolution applies to lumina-mgpt")
        tokenizer_key = "tokenizer_dir" if a.kind == "chameleon-meta" else "tokenizer"
        options.update(_options(profile=a.profile, **{tokenizer_key: a.tokenizer}))
    return _wrote(convert(a.kind, a.src, a.dst, **options))


def expand_arguments(p) -> None:
    p.description = ("Liquid-style: turn a Hugging Face Llama/Mistral/Qwen2-family causal LM into a multimodal "
                     "generator by appending image-code rows (initialised at the mean of the existing rows) and "
                     "special tokens. Text logits for text-only input are unchanged.")
    p.add_argument("base", help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("dst", help="output model directory")
    p.add_argument("--codebook-size", type=int, help="image codes to add (default: the --vq codebook's)")
    p.add_argument("--vq", help="image tokenizer: a tokenloom VQ directory or vqgan.ckpt + vqgan.yaml")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")


def run_expand(a) -> int:
    from ..convert import expand

    if a.codebook_size is None and a.vq is None:
        raise ValueError("give --codebook-size N, --vq PATH, or both")
    check_at_least(a, "codebook_size")
    return _wrote(expand(a.base, a.dst, a.codebook_size, a.vq, **_options(dtype=a.dtype, overwrite=a.overwrite)))


def export_arguments(p) -> None:
    p.description = ("Export a tokenloom model directory to the Hugging Face Chameleon layout "
                     "(ChameleonForConditionalGeneration).")
    p.add_argument("src", help="tokenloom model directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--overwrite", action="store_true")


def run_export(a) -> int:
    from ..convert import export

    return _wrote(export(a.src, a.dst, **_options(dtype=a.dtype, overwrite=a.overwrite)))


def merge_adapter_arguments(p) -> None:
    p.description = ("Merge a LoRA adapter (a train.trainable: lora run's final/) into the weights of the base model "
                     "it was made for, and write a plain model directory (merged weights, tokenizers, image "
                     "tokenizer) that loads without peft. OUT is written under a temporary name and renamed into "
                     "place.")
    p.add_argument("base", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", help="the adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("out", help="output model directory")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run_merge_adapter(a) -> int:
    from ..convert import merge_adapter

    return _wrote(merge_adapter(a.base, a.adapter, a.out, overwrite=a.overwrite, dtype=a.dtype))


def add_modality_arguments(p) -> None:
    from ..vocab import MODALITY_ROLES

    p.description = ("Add a modality's tokens to a model: the vocabulary grows by new ids after its last one, the "
                     "embedding and output head by one row each (the mean of the old rows). Train the result on the "
                     "modality's data (recipes/video/). OUT is written under a temporary name and renamed into place.")
    p.add_argument("base", help="the model directory to grow")
    p.add_argument("out", help="output model directory")
    p.add_argument("--modality", required=True, choices=sorted(MODALITY_ROLES), help="the modality to add")
    p.add_argument("--codec", help="speech: the speech codec directory (a `tokenloom train-codec` run's best/) whose "
                                   "codes the vocabulary gains; the new model carries it")
    p.add_argument("--experts", action="store_true",
                   help="the modality's spans run through expert projections (copies of the model's, or its experts): "
                        "trained with train.trainable: experts, the model keeps exactly what it computed on its old "
                        "tasks")
    p.add_argument("--expert-scope", choices=("span", "rest"), default=None,  # model.EXPERT_SCOPES, unimported
                   help="with --experts: what the experts compute, 'span' (the span's tokens; the default) or 'rest' "
                        "(from the span's begin to the end of its document, the answer about it included)")
    p.add_argument("--expert-head", action="store_true",
                   help="with --experts: the experts' tokens get their own final norm and output head (a copy of the "
                        "model's), so they can learn words the model never wrote; a model that routes the modality "
                        "already gains only that")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def remove_modality_arguments(p) -> None:
    p.description = ("Remove modalities' tokens from a model: their embedding and head rows go, and so do the experts "
                     "and the speech codec that only they used. Of a model grown through experts (add-modality "
                     "--experts, trained with train.trainable: experts) this is, bit for bit, the model it grew from. "
                     "The modalities' ids must be the vocabulary's last. OUT is written under a temporary name and "
                     "renamed into place.")
    p.add_argument("base", help="the model directory")
    p.add_argument("out", help="output model directory")
    p.add_argument("--modality", required=True, help="the modalities to remove, comma-separated (video,speech)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def run_remove_modality(a) -> int:
    from ..convert import remove_modality_dir
    from ..vocab import MODALITY_ROLES

    modalities = [m.strip() for m in a.modality.split(",") if m.strip()]
    unknown = [m for m in modalities if m not in MODALITY_ROLES]
    if unknown or not modalities:
        raise ValueError(f"--modality: unknown {unknown or a.modality!r}; expected some of {sorted(MODALITY_ROLES)}")
    return _wrote(remove_modality_dir(a.base, a.out, modalities, overwrite=a.overwrite))


def run_add_modality(a) -> int:
    from ..convert import add_modality_dir

    if (a.expert_scope or a.expert_head) and not a.experts:
        raise ValueError(f"--{'expert-scope' if a.expert_scope else 'expert-head'} is for --experts")
    return _wrote(add_modality_dir(a.base, a.out, a.modality, codec=a.codec, experts=a.experts,
                                     expert_scope=a.expert_scope, expert_head=a.expert_head, overwrite=a.overwrite))
