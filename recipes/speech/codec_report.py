"""What the speech codec keeps, heard by the recogniser (issue 26, item 1), on held-out-voice utterances:

* round trips: the recogniser's exact rate on espeak-ng's renders themselves, on their codec round trip
  (every codebook), and on content-only decodes (codebook 0 alone); the mel distance of both; bits a second;
* the timbre swap: utterance A's content codes with utterance B's timbre codes (B's levels 1.. cut or
  repeated to A's length), A and B in different voices. Right when the recogniser still hears A's text.
  The voice is measured two ways: the long-term average spectrum (mean log-mel over the frames with
  speech: formants and pitch range, what a voice is made of) and the median pitch (F0, autocorrelation).
  The swap "takes B's voice" by a measure when it is nearer B's original than A's;
* the voice probe: which codebooks name the speaker. Each utterance is described per level by its
  histogram of codes; a leave-one-out nearest-centroid classifier names its voice from one level at a
  time. Independent of the codec's training (the voices are held out, the codec's own voice head never
  saw them): a voice-free codebook 0 names the voice at about chance.

    python recipes/speech/codec_report.py --codec runs/speech/codec/best --manifest runs/speech/corpus/eval \\
        --out runs/speech/codec-report.json [--n 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tokenloom.audio_io import read_audio
import torch

from tokenloom.speech_codec import SpeechTokenizer, log_magnitude, log_mel, mel_distance
from tokenloom.world.speech import Recognizer, normalize, read_manifest

F0_RANGE = (60.0, 400.0)  # Hz: espeak-ng's voices at pitch 30-70 lie inside


def median_f0(samples: np.ndarray, rate: int = 16000, frame: float = 0.04) -> float:
    """Median pitch of the voiced frames, by autocorrelation (a frame is voiced when its normalised
    autocorrelation peak in the pitch range exceeds 0.5); nan without voiced frames."""
    n = int(frame * rate)
    lo, hi = int(rate / F0_RANGE[1]), int(rate / F0_RANGE[0])
    pitches = []
    for start in range(0, len(samples) - n, n // 2):
        x = samples[start:start + n] - samples[start:start + n].mean()
        energy = float(x @ x)
        if energy < 1e-4:
            continue
        ac = np.correlate(x, x, "full")[n - 1:] / energy
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:
            pitches.append(rate / lag)
    return float(np.median(pitches)) if pitches else float("nan")


def average_spectrum(codec: SpeechTokenizer, samples: np.ndarray) -> np.ndarray:
    """Mean log-mel [n_mels] over the frames within 30 dB of the loudest (the speech, not the silences)."""
    c = codec.config
    with torch.no_grad():
        mel = log_mel(log_magnitude(torch.from_numpy(samples)[None], c), codec.codec.filterbank)[0]  # [mels, frames]
    energy = mel.mean(0)
    keep = energy > energy.max() - 30 / (20 / np.log(10))
    return mel[:, keep].mean(1).numpy()


def fit(codes: np.ndarray, frames: int) -> np.ndarray:
    """Codes cut or repeated (tiled) to `frames` frames."""
    reps = -(-frames // codes.shape[1])
    return np.tile(codes, (1, reps))[:, :frames]


def voice_probe(codes: list[np.ndarray], voices: list[str], codebook_size: int) -> dict:
    """Per level: the leave-one-out nearest-centroid (L1 on normalised code histograms) rate of naming
    each utterance's voice, beside chance (the commonest voice's share)."""
    names = sorted(set(voices))
    labels = np.array([names.index(v) for v in voices])
    out = {"voices": len(names), "utterances": len(voices),
           "chance": float(np.bincount(labels).max() / len(labels)), "accuracy": []}
    for level in range(codes[0].shape[0]):
        hist = np.stack([np.bincount(c[level], minlength=codebook_size) / c.shape[1] for c in codes])
        sums = np.stack([hist[labels == v].sum(0) for v in range(len(names))])
        counts = np.bincount(labels, minlength=len(names)).astype(float)
        right = 0
        for i, h in enumerate(hist):
            own = labels[i]
            centroids = sums.copy()
            centroids[own] -= h  # leave utterance i out of its voice's centroid
            n = counts.copy()
            n[own] -= 1
            usable = n > 0
            distance = np.where(usable, np.abs(centroids / np.maximum(n, 1)[:, None] - h).sum(1), np.inf)
            right += int(np.argmin(distance) == own)
        out["accuracy"].append(right / len(hist))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path, help="a manifest.jsonl (or its folder) of utterances")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--no-recognizer", action="store_true",
                    help="leave out what the recogniser hears (most of the time): spectra, pitch and the voice probe only")
    a = ap.parse_args(argv)
    t0 = time.time()
    codec = SpeechTokenizer.from_pretrained(a.codec)
    rate = codec.config.sample_rate
    records = read_manifest(a.manifest)[: a.n]
    recognizer = None if a.no_recognizer else Recognizer()
    hear = (lambda audio: None) if recognizer is None else recognizer.recognize
    waves = [read_audio(r["path"], rate) for r in records]
    codes = [codec.encode(w) for w in waves]
    heard = {"espeak": [], "codec": [], "content_only": []}
    mel = {"codec": [], "content_only": []}
    for r, wave, c in zip(records, waves, codes):
        text = normalize(r["text"])
        full, content = codec.decode(c), codec.decode(c[:1])
        heard["espeak"].append(hear(wave) == text)
        heard["codec"].append(hear(full) == text)
        heard["content_only"].append(hear(content) == text)
        mel["codec"].append(mel_distance(wave, full, codec.config))
        mel["content_only"].append(mel_distance(wave, content, codec.config))
    swaps = []
    for i in range(len(records)):
        j = next((k for k in range(i + 1, len(records)) if records[k]["voice"] != records[i]["voice"]), None)
        if j is None:
            continue
        mixed = np.concatenate([codes[i][:1], fit(codes[j][1:], codes[i].shape[1])])
        audio = codec.decode(mixed)
        f0 = [median_f0(waves[i], rate), median_f0(waves[j], rate), median_f0(audio, rate)]
        spectra = [average_spectrum(codec, x) for x in (waves[i], waves[j], audio)]
        to_a, to_b = (float(np.abs(spectra[2] - spectra[k]).mean()) for k in (0, 1))
        said = hear(audio)
        swaps.append({"a": records[i]["text"], "b": records[j]["text"], "voice_a": records[i]["voice"],
                      "voice_b": records[j]["voice"], "heard": said, "hears_a": said == normalize(records[i]["text"]),
                      "hears_b": said == normalize(records[j]["text"]), "f0": [round(x, 1) for x in f0],
                      "spectrum_distance_to_a": round(to_a, 3), "spectrum_distance_to_b": round(to_b, 3),
                      "takes_b_spectrum": to_b < to_a,
                      "takes_b_pitch": bool(abs(f0[2] - f0[1]) < abs(f0[2] - f0[0]))})
    share = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    heard_share = share if recognizer is not None else (lambda xs: None)  # nothing heard without it
    usable = [s for s in swaps if not any(np.isnan(s["f0"]))]
    report = {
        "codec": str(a.codec), "manifest": str(a.manifest), "n": len(records),
        "bits_per_second": codec.config.bits_per_second,
        "recognized": {k: heard_share(v) for k, v in heard.items()},
        "mel_db": {k: float(np.mean(v)) for k, v in mel.items()},
        "swap": {"pairs": len(swaps), "hears_a": heard_share([s["hears_a"] for s in swaps]),
                 "hears_b": heard_share([s["hears_b"] for s in swaps]),
                 "hears_a_when_espeak_heard_a": heard_share([s["hears_a"] for s, ok in zip(swaps, heard["espeak"])
                                                             if ok]),
                 "takes_b_spectrum": share([s["takes_b_spectrum"] for s in swaps]),
                 "takes_b_pitch": share([s["takes_b_pitch"] for s in usable]), "f0_pairs_measured": len(usable),
                 "median_f0_hz": {k: float(np.median([s["f0"][i] for s in usable])) if usable else None
                                  for i, k in enumerate(("a", "b", "swap"))}},
        "voice_probe": voice_probe(codes, [r["voice"] for r in records], codec.config.codebook_size),
        "seconds": round(time.time() - t0, 1), "swaps": swaps,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "swaps"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
