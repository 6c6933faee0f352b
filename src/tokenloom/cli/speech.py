"""The speech verbs: transcribe (audio -> text) and speak (text -> a WAV file)."""

from __future__ import annotations

import sys
from pathlib import Path

from . import check_at_least
from .generation import load_pipeline, model_args, run_seed, sampling_args, text_sampling, writable_dir


def transcribe_arguments(p) -> None:
    p.add_argument("audio", help="an audio file (WAV, FLAC or OGG; any sample rate, stereo mixed down)")
    sampling_args(p)
    model_args(p)


def run_transcribe(args) -> int:
    from ..audio_io import read_audio

    read_audio(args.audio)  # checked (and a bad file refused) before the model loads
    seed = run_seed(args)
    pipe = load_pipeline(args)
    print(pipe.transcribe(args.audio, seed=seed, **text_sampling(args)))
    return 0


def speak_arguments(p) -> None:
    p.add_argument("text", help="what to say, e.g. 'a small red circle at the top left'")
    p.add_argument("--out", required=True, help="output WAV file")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="the longest utterance to draw (default: the model's max_speech_seconds, 10)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1 = off)")
    sampling_args(p)
    model_args(p)


def run_speak(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".wav":
        raise ValueError(f"--out {out}: speak writes WAV files; name it *.wav")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name")
    writable_dir(str(out.parent), "directory of --out")
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be positive, got {args.max_seconds}")
    check_at_least(args, "top_k")
    seed = run_seed(args)
    pipe = load_pipeline(args)
    audio = pipe.speak(args.text, seed=seed, max_seconds=args.max_seconds, guidance_scale=args.guidance_scale,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if not len(audio.samples):
        print(f"{out}: the model said nothing", file=sys.stderr)
        return 1
    audio.save(out)
    print(out, flush=True)
    if args.verbose:
        print(f"{audio.seconds:.2f} s at {audio.sample_rate} Hz", file=sys.stderr)
    return 0
