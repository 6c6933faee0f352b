"""`tokenloom <verb>`: one table of verbs, one error handler.

Each verb names two functions by "module:function", imported only when that verb runs (so
`tokenloom --help` starts fast): one adds the verb's arguments to its parser, one runs it. A user
error (bad argument, bad file, bad config, a device this machine lacks) ends with exit status 2 and
one line on stderr that says what and where; `--debug` (anywhere on the line) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from dataclasses import dataclass

from .. import __version__


@dataclass(frozen=True)
class Verb:
    help: str
    arguments: str  # "module:function(parser)"
    run: str  # "module:function(args) -> exit status"


_G, _T, _C = "tokenloom.cli.generation", "tokenloom.cli.training", "tokenloom.cli.conversion"
_S = "tokenloom.cli.speech"
VERBS = {
    "info": Verb("describe a model: config, vocabulary, layout", f"{_G}:info_arguments", f"{_G}:run_info"),
    "demo": Verb("the main job: draw, caption, answer and tell a story; writes an HTML page",
                 f"{_G}:demo_arguments", f"{_G}:run_demo"),
    "generate": Verb("text to image: PNG files", f"{_G}:generate_arguments", f"{_G}:run_generate"),
    "generate-video": Verb("text to video: an animated GIF / WebP or a folder of PNG frames",
                           f"{_G}:generate_video_arguments", f"{_G}:run_generate_video"),
    "chat": Verb("interleaved answer (text and images) to a prompt with optional images, videos and audio",
                 f"{_G}:chat_arguments", f"{_G}:run_chat"),
    "caption": Verb("describe an image or a video", f"{_G}:caption_arguments", f"{_G}:run_ask"),
    "ask": Verb("answer a question about an image or a video", f"{_G}:ask_arguments", f"{_G}:run_ask"),
    "transcribe": Verb("speech to text: what an audio file says", f"{_S}:transcribe_arguments", f"{_S}:run_transcribe"),
    "speak": Verb("text to speech: a WAV file", f"{_S}:speak_arguments", f"{_S}:run_speak"),
    "init-random": Verb("write a small randomly initialised pipeline (for tests and demos)",
                        f"{_G}:init_random_arguments", f"{_G}:run_init_random"),
    "train": Verb("train or fine-tune from a YAML/TOML config (resumes automatically)",
                  f"{_T}:train_arguments", f"{_T}:run_train"),
    "train-vq": Verb("train a VQGAN image tokenizer on shapes-world renders from a YAML/TOML config",
                     f"{_T}:train_vq_arguments", f"{_T}:run_train_vq"),
    "train-codec": Verb("train the speech codec (speech <-> residual-VQ codes) on rendered speech manifests",
                        f"{_T}:train_codec_arguments", f"{_T}:run_train_codec"),
    "pretokenize": Verb("raw JSONL or imagefolder directories -> Parquet token shards (resumable)",
                        f"{_T}:pretokenize_arguments",
                        f"{_T}:run_pretokenize"),
    "eval": Verb("score a model on held-out shapes-world samples (exact matches)", f"{_T}:eval_arguments",
                 f"{_T}:run_eval"),
    "convert": Verb("convert a Chameleon / Anole / Lumina-mGPT checkpoint (--from KIND SRC DST)",
                    f"{_C}:convert_arguments", f"{_C}:run_convert"),
    "expand": Verb("Liquid-style: add image codes to a Hugging Face causal LM", f"{_C}:expand_arguments",
                   f"{_C}:run_expand"),
    "export": Verb("export a model to the Hugging Face Chameleon layout", f"{_C}:export_arguments",
                   f"{_C}:run_export"),
    "merge-adapter": Verb("merge a LoRA adapter into its base model: a plain model directory (BASE ADAPTER OUT)",
                          f"{_C}:merge_adapter_arguments", f"{_C}:run_merge_adapter"),
    "add-modality": Verb("grow a model's vocabulary by a modality's tokens (BASE OUT --modality video), to train it",
                         f"{_C}:add_modality_arguments", f"{_C}:run_add_modality"),
    "remove-modality": Verb("a model without modalities' tokens (BASE OUT --modality video,speech): a grown model's base",
                            f"{_C}:remove_modality_arguments", f"{_C}:run_remove_modality"),
    "serve": Verb("an OpenAI-compatible HTTP server with a web page", "tokenloom.cli.serving:serve_arguments",
                  "tokenloom.cli.serving:run_serve"),
}


def check_at_least(args, *names: str, low: int = 1) -> None:
    """Options (by dest name) given below `low` are errors naming the flag: 0 never means "the default"."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit status 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def verb_parser(verb: str) -> ArgumentParser:
    spec = VERBS[verb]
    parser = ArgumentParser(prog=f"tokenloom {verb}", description=spec.help[:1].upper() + spec.help[1:] + ".")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    _resolve(spec.arguments)(parser)
    return parser


def _overview() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: tokenloom VERB [options]   (tokenloom VERB --help for a verb's options)", "",
             "Native multimodal token models: text and images as tokens of one vocabulary.", "", "verbs:"]
    lines += [f"  {name:<{width}}  {spec.help}" for name, spec in VERBS.items()]
    lines += ["", "options: --version, --debug (a traceback on errors)"]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input rather than a bug in tokenloom: reported in one line."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)  # UnicodeError is a ValueError
    if "tokenloom.train.common" in sys.modules:  # training failures the user can act on (a NaN loss)
        errors += (sys.modules["tokenloom.train.common"].TrainError,)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:  # older safetensors: its errors are OSErrors
        pass
    return errors


def _message(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return "; ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TOKENLOOM_DEBUG") == "1"
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tokenloom {__version__}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"tokenloom: error: unknown verb {verb!r}; expected one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    parser = verb_parser(verb)
    args = parser.parse_args(argv[1:])
    args.verb = verb
    warnings.simplefilter("default")
    try:
        return _resolve(VERBS[verb].run)(args)
    except KeyboardInterrupt:
        print(f"tokenloom {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not isinstance(e, _user_errors()):
            raise  # a bug: the traceback is what a report needs
        print(f"tokenloom {verb}: error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
