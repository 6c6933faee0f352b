"""The model verbs: info, demo, generate, generate-video, chat, caption, ask, init-random."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..engine.sampling import check_integer
from . import check_at_least

MAX_PROMPTS = 10_000  # bound on --prompts-file lines
ADAPTER_HELP = ("a LoRA adapter directory (a train.trainable: lora run's final/) made for the model, merged into "
                "its weights")


def model_args(p) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the embedded shapes-tiny model)")
    p.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16, or int8 (dynamic int8 linears, CPU inference of "
                                                        "large models) (default: as saved)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays on GPUs)")
    speculative_args(p)


def speculative_args(p) -> None:
    p.add_argument("--speculative", choices=["jacobi", "off"], default=None,
                   help="draw image codes with speculative Jacobi decoding (the same distribution in fewer "
                        "forwards), or off (default: the model's setting)")
    p.add_argument("--speculative-window", type=int, default=None,
                   help="draft codes per step with --speculative jacobi (default: the model's, 16)")


def apply_speculative(pipe, args):
    """The model's speculative-decoding setting, overridden by --speculative / --speculative-window."""
    return pipe.use_speculative(args.speculative, args.speculative_window)


def sampling_args(p, image: bool = False) -> None:
    kind = "image" if image else "text"
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (default: a fresh one, printed with --verbose); a seed reproduces a run")
    p.add_argument("--temperature", type=float, default=None, help=f"{kind} sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help=f"{kind} top-k")
    p.add_argument("--top-p", type=float, default=None, help=f"{kind} top-p (nucleus)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the seed used and where files went")


def load_pipeline(args):
    from ..pipeline import load

    return apply_speculative(load(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                                  adapter=args.adapter), args)


def run_seed(args) -> int:
    """The run's seed: the one given, or a fresh one (told with --verbose, so the run can be repeated)."""
    from ..engine import fresh_seed

    if args.seed is not None:
        return check_integer(args.seed, "--seed", low=0, high=2**63 - 1)
    seed = fresh_seed() >> 32  # short enough to type back
    if args.verbose:
        print(f"seed: {seed} (repeat this run with --seed {seed})", file=sys.stderr)
    return seed


# -- info, init-random --------------------------------------------------------------------------------
def info_arguments(p) -> None:
    model_args(p)


def run_info(args) -> int:
    pipe = load_pipeline(args)
    m = pipe.model.config
    print(json.dumps({"model": {**m.to_dict(), "parameters": pipe.model.num_parameters()},
                      "vocab": {"size": pipe.vocab.size, "codebook_size": pipe.vocab.codebook_size,
                                "max_grid_size": pipe.vocab.max_grid_size, "specials": pipe.vocab.specials},
                      "pipeline": pipe.config.to_dict(), **_adapter_info(args.adapter, args.model),
                      "image_tokenizer": None if pipe.image_tokenizer is None else
                      {"downsample_factor": pipe.image_tokenizer.factor}}, indent=2, default=str))
    return 0


def _adapter_info(adapter: str | None, model: str | None) -> dict:
    from ..adapters import is_adapter_dir

    if adapter is None and model is not None and is_adapter_dir(model):
        adapter = model  # an adapter directory as --model: its base, with it
    if adapter is None:
        return {}
    settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return {"adapter": {"path": str(adapter), **{k: settings.get(k) for k in ("r", "lora_alpha", "target_modules",
                                                                           "modules_to_save")}}}


def init_random_arguments(p) -> None:
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["unirep", "flat"], default="unirep")


def run_init_random(args) -> int:
    from ..pipeline import random_pipeline

    out = writable_dir(args.out, "output directory")
    random_pipeline(seed=args.seed, layout=args.layout).save_pretrained(out)
    print(f"wrote a randomly initialised pipeline to {out}")
    return 0


# -- output paths, checked before any drawing ---------------------------------------------------------------
def writable_dir(path: str, what: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {out} is not writable")
    return out


def _image_path(path: str) -> Path:
    from PIL import Image

    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'image.png'}")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: unknown image extension {out.suffix or '(none)'!r}; use .png")
    writable_dir(str(out.parent), "directory of --out")
    return out


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist or is not a file")
    if p.stat().st_size > 64 * MAX_PROMPTS * 100:
        raise ValueError(f"prompts file {p} is {p.stat().st_size} bytes; too large for {MAX_PROMPTS} prompts")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {p} is not UTF-8 text: byte {e.object[e.start:e.start + 1]!r} at "
                         f"offset {e.start}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} has no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"prompts file {p} has {len(prompts)} prompts; at most {MAX_PROMPTS}")
    return prompts


# -- generate ---------------------------------------------------------------------------------------------
def generate_arguments(p) -> None:
    from ..pipeline import MAX_NUM_IMAGES

    p.add_argument("prompt", nargs="?", help="the image description")
    p.add_argument("--out", help="output PNG (with PROMPT); with --num-images K: FILE_0.png ... FILE_{K-1}.png")
    p.add_argument("--prompts-file", help="one prompt a line; writes DIR/0000.png, DIR/0001.png, ...")
    p.add_argument("--out-dir", help="output directory (with --prompts-file)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 = off)")
    p.add_argument("--num-images", type=int, default=1, help=f"images per prompt (at most {MAX_NUM_IMAGES})")
    p.add_argument("--candidates", type=int, default=None,
                   help="draw this many per image and keep the one the model itself rates best for the prompt "
                        "(default: the model's image_candidates; 1 = no reranking)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated in one batch")
    sampling_args(p, image=True)
    model_args(p)


def run_generate(args) -> int:
    from ..pipeline import MAX_NUM_IMAGES

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give either PROMPT or --prompts-file")
    if args.prompt is not None and not args.out:
        raise ValueError("--out FILE.png is required with PROMPT")
    if args.prompts_file is not None and not args.out_dir:
        raise ValueError("--out-dir DIR is required with --prompts-file")
    check_at_least(args, "width", "height", "num_images", "candidates", "batch_size")
    check_integer(args.num_images, "--num-images", high=MAX_NUM_IMAGES)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts_file)
    # Every path is checked before the model draws anything; each image is written as soon as it is done.
    if args.prompt is not None:
        out = _image_path(args.out)

        def path_of(i, k):
            return out if args.num_images == 1 else out.with_name(f"{out.stem}_{k}{out.suffix}")
    else:
        out_dir = writable_dir(args.out_dir, "--out-dir")

        def path_of(i, k):
            return out_dir / (f"{i:04d}.png" if args.num_images == 1 else f"{i:04d}_{k}.png")
    seed = run_seed(args)
    pipe = load_pipeline(args)
    images = pipe.iter_images(prompts, width=args.width, height=args.height, guidance_scale=args.guidance_scale,
                              seed=seed, num_images=args.num_images, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, candidates=args.candidates,
                              batch_size=args.batch_size, progress=True)
    for i, k, image in images:
        path = path_of(i, k)
        if image is None:
            print(f"{path}: the model drew no image for prompt {i + 1}", file=sys.stderr)
            continue
        image.save(path)
        print(path, flush=True)
    return 0


# -- generate-video ---------------------------------------------------------------------------------------
VIDEO_SUFFIXES = (".gif", ".webp")


def generate_video_arguments(p) -> None:
    p.add_argument("prompt", help="the video's description, e.g. 'a red circle moves from the top left to the center'")
    p.add_argument("--out", required=True, help="output .gif or .webp (animated), or a folder for PNG frames")
    p.add_argument("--frames", type=int, default=None, help="frames (default: the model's video_frames, 6)")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels (default: the model's)")
    p.add_argument("--fps", type=float, default=4, help="frames a second of the animated file (default: 4)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 = off)")
    sampling_args(p, image=True)
    model_args(p)


def _video_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory named like a file; give another name")
        writable_dir(str(out.parent), "directory of --out")
    elif out.suffix:
        raise ValueError(f"--out {out}: unknown video extension {out.suffix!r}; use .gif, .webp or a folder name")
    else:
        writable_dir(str(out), "--out")
    return out


def run_generate_video(args) -> int:
    from ..video_io import MAX_FPS, MIN_FPS, write_video

    check_at_least(args, "frames", "width", "height")
    if not MIN_FPS <= args.fps <= MAX_FPS:
        raise ValueError(f"--fps must be from {MIN_FPS} to {MAX_FPS}, got {args.fps}")
    out = _video_path(args.out)  # checked before the model draws anything
    seed = run_seed(args)
    pipe = load_pipeline(args)
    video = pipe.generate_videos(args.prompt, frames=args.frames, width=args.width, height=args.height, seed=seed,
                                 guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, progress=True)[0]
    if not video:
        print(f"{out}: the model drew no video", file=sys.stderr)
        return 1
    write_video(video, out, fps=args.fps)
    print(out, flush=True)
    return 0


# -- chat, caption, ask -------------------------------------------------------------------------------------
def chat_arguments(p) -> None:
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    p.add_argument("--video", action="append", default=[],
                   help="input video: an animated GIF / WebP or a folder of frames (repeatable)")
    p.add_argument("--audio", action="append", default=[],
                   help="input speech: a WAV / FLAC / OGG file, heard content-only (repeatable)")
    p.add_argument("--out", required=True, help="output directory for index.md, index.html and PNGs")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--image-temperature", type=float, default=None, help="image sampling temperature")
    p.add_argument("--image-top-k", type=int, default=None, help="image top-k")
    sampling_args(p)
    model_args(p)


def text_sampling(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def run_chat(args) -> int:
    from ..audio_io import Audio, read_audio
    from ..document import Document, ImagePart, SpeechPart, TextPart, VideoPart
    from ..report import save_document
    from ..video_io import read_video

    check_at_least(args, "max_new_tokens")
    out = writable_dir(args.out, "--out")
    # Read before the model loads, so a bad file fails fast; one frame is an --image.
    videos = [read_video(path, min_frames=2) for path in args.video]
    audio = [Audio(read_audio(path)) for path in args.audio]
    seed = run_seed(args)
    pipe = load_pipeline(args)
    user = pipe.user_document(args.prompt, args.image + [pipe.encode_video(frames) for frames in videos] + audio)
    result = pipe.chat(user, max_new_tokens=args.max_new_tokens, guidance_scale=args.guidance_scale, seed=seed,
                       image_temperature=args.image_temperature, image_top_k=args.image_top_k,
                       **text_sampling(args))
    paths = save_document(Document(user.turns + result.document.turns), out, title="tokenloom chat")
    # The answer as a reader sees it: text parts, and a line per image naming its file.
    n_before = sum(p.pixels is not None for p in user.images)
    n = 0
    for part in result.document.parts:
        if isinstance(part, TextPart):
            print(part.text.strip())
        elif isinstance(part, ImagePart):
            name = f"image_{n_before + n:03d}.png" if part.pixels is not None else "not decoded"
            n += part.pixels is not None
            print(f"[image {part.width}x{part.height} codes: {out / name}]")
        elif isinstance(part, VideoPart):
            print(f"[video of {part.num_frames} frames of {part.width}x{part.height} codes]")
        elif isinstance(part, SpeechPart):
            print(f"[speech of {part.num_frames} frames x {part.levels} codebooks]")
    if args.verbose:
        print(f"wrote {paths['markdown']} and {paths['html']}", file=sys.stderr)
    return 0


def caption_arguments(p) -> None:
    p.add_argument("image", help="an image, or a video (an animated GIF / WebP or a folder of frames)")
    sampling_args(p)
    model_args(p)


def ask_arguments(p) -> None:
    p.add_argument("image", help="an image, or a video (an animated GIF / WebP or a folder of frames)")
    p.add_argument("question")
    sampling_args(p)
    model_args(p)


def run_ask(args) -> int:
    from ..image_processing import load_image
    from ..video_io import read_video

    # Read before the model loads, so a bad file fails fast; more than one frame is a video.
    path = Path(args.image)
    frames = read_video(path) if path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES else None
    image = frames if frames is not None and len(frames) > 1 else load_image(args.image)
    seed = run_seed(args)
    pipe = load_pipeline(args)
    if isinstance(image, list):
        image = pipe.encode_video(image)
    if args.verb == "caption":
        print(pipe.caption(image, seed=seed, **text_sampling(args)))
    else:
        print(pipe.ask(image, args.question, seed=seed, **text_sampling(args)))
    return 0


# -- demo ------------------------------------------------------------------------------------------------
DEMO_PROMPTS = ["a large red circle in the center", "a small blue square at the top left and a large yellow "
                "triangle at the bottom right", "a green triangle on the left, a purple circle in the center and a "
                "cyan square on the right", "a small cyan circle at the bottom"]


def demo_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=400)
    model_args(p)


DEMO_VIDEO_PROMPT = "a large blue square moves from the top left to the bottom right"


def _demo_video(pipe, seed: int) -> list:
    import numpy as np

    from ..document import TextPart
    from ..world.video import random_motion, render_video

    frames = pipe.generate_videos(DEMO_VIDEO_PROMPT, seed=seed)[0]
    drawn = pipe.encode_video(frames) if frames else TextPart("(no video drawn)")
    seen = pipe.encode_video(render_video(random_motion(np.random.default_rng(seed))))
    return [("user", [TextPart(DEMO_VIDEO_PROMPT)]), ("assistant", [drawn]),
            ("user", [seen, TextPart(pipe.config.video_caption_prompt)]),
            ("assistant", [TextPart(pipe.caption(seen, seed=seed))])]


DEMO_SPEECH_TEXT = "a small red circle at the top left"


def _demo_speech(pipe, seed: int) -> list:
    """Say a caption; hear one (rendered by espeak-ng, where it is installed) and write it down."""
    import numpy as np

    from ..document import TextPart
    from ..world.speech import espeak_available, random_voice, speak

    said = pipe.run_batched([pipe.speech_request(DEMO_SPEECH_TEXT, seed=seed)], 1)[0].document.speech
    turns = [("user", [TextPart(pipe.config.speak_prompt.format(text=DEMO_SPEECH_TEXT))]),
             ("assistant", said or [TextPart("(nothing said)")])]
    if espeak_available():
        heard = pipe.encode_speech(speak(DEMO_SPEECH_TEXT, random_voice(np.random.default_rng(seed), held_out=True)))
        turns += [("user", [heard, TextPart(pipe.config.transcribe_prompt)]),
                  ("assistant", [TextPart(pipe.transcribe(heard, seed=seed))])]
    return turns


def run_demo(args) -> int:
    """The main job on the embedded default: draw, describe, answer, tell a story (and, for a model with
    video tokens, draw and describe a video; for one that speaks, say a caption and write one down); one
    HTML page."""
    import numpy as np

    from ..document import Document, TextPart
    from ..evaluation import STORY_MODALITIES
    from ..report import image_grid, save_document
    from ..world import random_scene, render

    check_at_least(args, "max_new_tokens")
    out = writable_dir(args.out, "--out")
    pipe = load_pipeline(args)
    turns = []
    images = pipe.generate_images(DEMO_PROMPTS, seed=args.seed, progress=True)
    for prompt, image in zip(DEMO_PROMPTS, images):
        turns.append(("user", [TextPart(prompt)]))
        turns.append(("assistant", [pipe.encode_image(image)]))
    image_grid(images, columns=len(images)).save(out / "generated.png")
    scene_image = render(random_scene(np.random.default_rng(args.seed)), 64, 64)
    for question in ("Describe the image.", "How many shapes are there?"):
        answer = pipe.ask(scene_image, question, seed=args.seed)
        turns.append(("user", [pipe.encode_image(scene_image), TextPart(question)]))
        turns.append(("assistant", [TextPart(answer)]))
    if pipe.vocab.has_video:  # a model that learned video: draw one, and describe another
        turns += _demo_video(pipe, args.seed)
    if pipe.vocab.has_speech and pipe.speech_tokenizer is not None:
        turns += _demo_speech(pipe, args.seed)
    story = pipe.chat("Tell a story.", seed=args.seed, max_new_tokens=args.max_new_tokens,
                      modalities=STORY_MODALITIES)  # a model grown by video or speech tells it as before
    turns.append(("user", [TextPart("Tell a story.")]))
    doc = Document.chat(turns)
    doc.turns.extend(story.document.turns)
    paths = save_document(doc, out, title="tokenloom demo")
    print(f"wrote {paths['html']}, {paths['markdown']} and {out / 'generated.png'}")
    return 0
