"""Exact scores of the shapes world's speech tasks (spec: shapes-world.md, "Speech"; issue 26), for
`evaluate`.

    asr          a spoken caption -> its text, exact (`evaluation.eval_text`)
    spoken_qa    an image and a spoken question -> the answer, exact (`evaluation.eval_text`)
    speech_t2i   a spoken caption -> an image, the exact scene (`evaluation.eval_speech_t2i`)
    tts          a caption -> speech, right when the recogniser hears exactly the caption

The recogniser (`world.speech.Recognizer`: pocketsphinx restricted to the world's sentences) is
imperfect, so tts is reported beside its two ceilings on the same texts: espeak-ng's own renders in
held-out voices, and those renders round-tripped through the model's speech codec (what the model could
reach if it drew the codes of a held-out voice exactly). The model's utterances are written to
`speech/` as WAV files for listening.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import audio_io
from .world.speech import Recognizer, normalize, random_voice, speak

SPEECH_TASKS = ("asr", "tts", "spoken_qa", "speech_t2i")
UTTERANCES_SAVED = 8  # model utterances written to speech/ per evaluation
CEILING_STREAM = 0x5BEE3  # seeds the held-out voices of the ceiling renders (per sample index)


def eval_tts(pipe, samples, batch_size, progress, seed, out_dir: Path | None = None):
    """Text to speech: the caption said by the model, recognised; with the recogniser's ceilings."""
    requests = [pipe.speech_request(s.info["text"], seed=seed * len(samples) + i) for i, s in enumerate(samples)]
    results = pipe.run_batched(requests, batch_size, progress=progress, desc="tts")
    recognizer = Recognizer()
    codec = pipe.speech_tokenizer
    rate = codec.config.sample_rate
    records, right, ceiling, round_trip = [], [], [], []
    from tqdm.auto import tqdm

    # three recognitions a sample (the model's speech, espeak-ng's, espeak-ng's through the codec): minutes
    heard_all = tqdm(zip(samples, results), total=len(samples), desc="tts recognised", unit="utterance",
                     disable=not progress)
    for i, (s, result) in enumerate(heard_all):
        text = normalize(s.info["text"])
        parts = result.document.speech
        audio = pipe.decode_speech(parts[0]).at(rate) if parts else np.zeros(0, np.float32)
        heard = recognizer.recognize(audio) if len(audio) and np.abs(audio).max() > 0 else ""
        reference = speak(s.info["text"], random_voice(np.random.default_rng([CEILING_STREAM, seed, i]),
                                                       held_out=True))
        heard_espeak = recognizer.recognize(reference)
        heard_codec = recognizer.recognize(codec.decode(codec.encode(reference)))
        right.append(heard == text)
        ceiling.append(heard_espeak == text)
        round_trip.append(heard_codec == text)
        records.append({"text": s.info["text"], "heard": heard, "right": heard == text,
                        "seconds": round(len(audio) / rate, 2), "frames": parts[0].num_frames if parts else 0,
                        "espeak_heard": heard_espeak, "codec_round_trip_heard": heard_codec})
        if out_dir is not None and i < UTTERANCES_SAVED and len(audio):
            (out_dir / "speech").mkdir(parents=True, exist_ok=True)
            audio_io.write_audio(out_dir / "speech" / f"tts-{i:03d}.wav", audio, rate)
    n = len(samples)
    score = sum(right) / n
    espeak_rate = sum(ceiling) / n
    breakdown = {"recognizer_on_espeak": espeak_rate, "recognizer_on_codec_round_trip": sum(round_trip) / n,
                 "model_share_of_espeak_ceiling": score / espeak_rate if espeak_rate else 0.0}
    return score, breakdown, records
