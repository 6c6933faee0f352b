"""Streamed speech against the whole utterance: seams of chunks decoded alone (the engine's old way)
and of `tokenloom.speech_stream.StreamDecoder` (context, phase carried over, crossfade), on the same
codec and the same codes, with the decode time of each as a ratio to one whole-utterance decode.

    python benchmarks/bench_speech_stream.py --codec runs/grow/codec/best [--n 20 --chunk 10]

Each of `--n` shapes-world captions is said by espeak-ng in a held-out voice, encoded by the codec,
and decoded three ways: whole, in `--chunk`-frame chunks alone, and streamed. Reported per way:
the mel distance to the whole decode (dB; the whole decode against itself is 0), over the whole
utterance and over 60 ms around each chunk boundary, and the seam jump:
the mean absolute sample step across chunk boundaries over the mean step everywhere (1 is no click;
the whole decode's own steps at the same positions are its baseline). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokenloom.speech_codec import SpeechTokenizer, mel_distance  # noqa: E402
from tokenloom.speech_stream import StreamDecoder  # noqa: E402
from tokenloom.world import random_scene  # noqa: E402
from tokenloom.world.phrase import caption  # noqa: E402
from tokenloom.world.speech import random_voice, speak  # noqa: E402

from _results import write_result  # noqa: E402


def seam_mel(wave: np.ndarray, whole: np.ndarray, seams: list[int], config, half: int = 480) -> float:
    """Mean mel distance to the whole decode over 60 ms around each seam (the spectral damage a seam does)."""
    at = [mel_distance(wave[s - half:s + half], whole[s - half:s + half], config)
          for s in seams if half <= s <= wave.size - half]
    return float(np.mean(at)) if at else float("nan")


def seam_jump(wave: np.ndarray, seams: list[int]) -> float:
    steps = np.abs(np.diff(wave))
    at = [steps[s - 1] for s in seams if 0 < s <= steps.size]
    return float(np.mean(at) / max(steps.mean(), 1e-12)) if at else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", required=True, type=Path, help="a trained speech codec directory")
    ap.add_argument("--n", type=int, default=20, help="utterances")
    ap.add_argument("--chunk", type=int, default=10, help="frames per streamed chunk (the engine's default)")
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speech_stream.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok = SpeechTokenizer.from_pretrained(a.codec)
    spf = tok.config.samples_per_frame
    rng = np.random.default_rng(70)
    rows = {"alone": [], "streamed": [], "whole": []}
    seconds = {"whole": 0.0, "alone": 0.0, "streamed": 0.0}
    for _ in range(a.n):
        codes = tok.encode(speak(caption(random_scene(rng)), random_voice(rng, held_out=True)))
        frames = codes.shape[1]
        seams = [k * spf for k in range(a.chunk, frames, a.chunk)]
        t = time.perf_counter()
        whole = tok.decode(codes)
        seconds["whole"] += time.perf_counter() - t
        t = time.perf_counter()
        alone = np.concatenate([tok.decode(codes[:, k:k + a.chunk]) for k in range(0, frames, a.chunk)])
        seconds["alone"] += time.perf_counter() - t
        t = time.perf_counter()
        stream = StreamDecoder(tok, a.context, a.overlap)
        pieces = [stream.push(codes[:, k:k + a.chunk], final=k + a.chunk >= frames) for k in range(0, frames, a.chunk)]
        streamed = np.concatenate(pieces)
        seconds["streamed"] += time.perf_counter() - t
        assert alone.size == streamed.size == whole.size
        # the streamed audio's seams are where its pieces meet, held back by the overlap
        streamed_seams = list(np.cumsum([p.size for p in pieces])[:-1])
        ways = (("alone", alone, seams), ("streamed", streamed, streamed_seams), ("whole", whole, seams))
        for name, wave, at in ways:
            rows[name].append((mel_distance(wave, whole, tok.config), seam_jump(wave, at),
                               seam_mel(wave, whole, seams, tok.config)))
    result = {"codec": str(a.codec), "n": a.n, "chunk_frames": a.chunk, "context_frames": a.context,
              "overlap_frames": a.overlap, "threads": a.threads, "machine": platform.processor() or platform.machine(),
              "ways": {}}
    print(f"{'way':10} {'mel dB to whole':>16} {'at seams':>9} {'seam jump':>10} {'decode s':>9} {'x whole':>8}")
    for name in ("whole", "alone", "streamed"):
        mel, jump, near = (float(np.nanmean([r[i] for r in rows[name]])) for i in (0, 1, 2))
        result["ways"][name] = {"mel_distance_db": mel, "mel_distance_at_seams_db": near, "seam_jump": jump,
                                "decode_seconds": seconds[name],
                                "decode_ratio_to_whole": seconds[name] / seconds["whole"]}
        print(f"{name:10} {mel:16.2f} {near:9.2f} {jump:10.2f} {seconds[name]:9.2f} "
              f"{seconds[name] / seconds['whole']:8.2f}")
    write_result(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
