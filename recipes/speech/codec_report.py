"""What the speech codec keeps, heard by the recogniser (issue 26, item 1), on held-out-voice utterances:

* round trips: the recogniser's exact rate on espeak-ng's renders themselves, on their codec round trip
  (every codebook), and on content-only decodes (codebook 0 alone); the mel distance of both; bits a second;
* the timbre swap: utterance A's content codes with utterance B's timbre codes (B's levels 1.. cut or
  repeated to A's length), A and B in different voices. Right when the recogniser still hears A's text;
  the voice is measured by the median pitch (F0): the swap "takes B's voice" when its F0 is nearer B's
  than A's.

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
from tokenloom.speech_codec import SpeechTokenizer, mel_distance
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


def fit(codes: np.ndarray, frames: int) -> np.ndarray:
    """Codes cut or repeated (tiled) to `frames` frames."""
    reps = -(-frames // codes.shape[1])
    return np.tile(codes, (1, reps))[:, :frames]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codec", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path, help="a manifest.jsonl (or its folder) of utterances")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args(argv)
    t0 = time.time()
    codec = SpeechTokenizer.from_pretrained(a.codec)
    rate = codec.config.sample_rate
    records = read_manifest(a.manifest)[: a.n]
    recognizer = Recognizer()
    waves = [read_audio(r["path"], rate) for r in records]
    codes = [codec.encode(w) for w in waves]
    heard = {"espeak": [], "codec": [], "content_only": []}
    mel = {"codec": [], "content_only": []}
    for r, wave, c in zip(records, waves, codes):
        text = normalize(r["text"])
        full, content = codec.decode(c), codec.decode(c[:1])
        heard["espeak"].append(recognizer.recognize(wave) == text)
        heard["codec"].append(recognizer.recognize(full) == text)
        heard["content_only"].append(recognizer.recognize(content) == text)
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
        said = recognizer.recognize(audio)
        swaps.append({"a": records[i]["text"], "b": records[j]["text"], "voice_a": records[i]["voice"],
                      "voice_b": records[j]["voice"], "heard": said, "hears_a": said == normalize(records[i]["text"]),
                      "hears_b": said == normalize(records[j]["text"]), "f0": [round(x, 1) for x in f0],
                      "takes_b_voice": bool(abs(f0[2] - f0[1]) < abs(f0[2] - f0[0]))})
    share = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    usable = [s for s in swaps if not any(np.isnan(s["f0"]))]
    report = {
        "codec": str(a.codec), "manifest": str(a.manifest), "n": len(records),
        "bits_per_second": codec.config.bits_per_second,
        "recognized": {k: share(v) for k, v in heard.items()},
        "mel_db": {k: float(np.mean(v)) for k, v in mel.items()},
        "swap": {"pairs": len(swaps), "hears_a": share([s["hears_a"] for s in swaps]),
                 "hears_b": share([s["hears_b"] for s in swaps]),
                 "hears_a_when_espeak_heard_a": share([s["hears_a"] for s, ok in zip(swaps, heard["espeak"]) if ok]),
                 "takes_b_voice": share([s["takes_b_voice"] for s in usable]),
                 "f0_pairs_measured": len(usable),
                 "median_abs_f0_shift_toward_b_hz": float(np.median([abs(s["f0"][0] - s["f0"][2]) for s in usable]))
                 if usable else None},
        "seconds": round(time.time() - t0, 1), "swaps": swaps,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "swaps"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
