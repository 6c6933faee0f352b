"""Shapes-world tasks with speech (spec: shapes-world.md, "Speech"; issue 26), built like the image and
video tasks of `tasks.py` and registered in its task table:

    asr          user: a spoken caption + "Transcribe the speech."  -> assistant: the caption
    tts          user: "Say: " + a caption                          -> assistant: the caption spoken
    spoken_qa    user: an image + a spoken question                 -> assistant: the answer
    speech_t2i   user: a spoken caption + "Draw what you hear."     -> assistant: the image

Utterances are espeak-ng renders (`speech.speak`) in voices drawn per the spec: training voices in the
training stream, the held-out variants (m7, f4) in the held-out stream only. A sample keeps its
utterances in `audio` (float32, 16 kHz) with a speech part `{"type": "speech", "audio": k}` until
`build_dataset` writes each as a WAV file and the part becomes `{"type": "speech", "path": ...}`. The
assistant's utterance in tts is spoken in a training voice too: the model learns to speak in the voices
it heard; only what is said is scored (by the recogniser), never the voice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .phrase import caption
from .scene import random_scene
from .speech import random_voice, speak
from .tasks import (DEFAULT_SIZES, T2I_VARIANTS, T2I_WEIGHTS, Size, TaskSample, chat_document, image_part,
                    pick_question, register_tasks, scene_image, text_part)

TRANSCRIBE = "Transcribe the speech."
SAY = "Say: "
DRAW_WHAT_YOU_HEAR = "Draw what you hear."


def _speech(k: int) -> dict:
    return {"type": "speech", "audio": k}


def _utterance(rng: np.random.Generator, text: str, held_out: bool) -> tuple[np.ndarray, dict]:
    voice = random_voice(rng, held_out=held_out)
    return speak(text, voice), {"text": text, **voice.to_json()}


def _t2i_caption(rng: np.random.Generator, scene) -> str:
    """A caption as t2i prompts are (size words and locations sometimes left out)."""
    with_size, with_location = T2I_VARIANTS[int(rng.choice(len(T2I_VARIANTS), p=T2I_WEIGHTS))]
    return caption(scene, with_size=with_size, with_location=with_location)


def asr_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES, *,
               held_out: bool = False) -> TaskSample:
    """user: a caption spoken + "Transcribe the speech." -> assistant: the caption as text. The caption
    is the canonical one (sizes and locations), so an exact transcription is one string."""
    scene = random_scene(rng)
    text = caption(scene)
    audio, said = _utterance(rng, text, held_out)
    return TaskSample("asr", chat_document([_speech(0), text_part(TRANSCRIBE)], [text_part(text)]), [], [scene],
                      {"question": TRANSCRIBE, "answer": text, "speech": [said]}, audio=[audio])


def tts_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES, *,
               held_out: bool = False) -> TaskSample:
    """user: "Say: " + a canonical caption -> assistant: the caption spoken (all codebook levels)."""
    scene = random_scene(rng)
    text = caption(scene)
    audio, said = _utterance(rng, text, False)  # the voice the model answers in: always a training voice
    return TaskSample("tts", chat_document([text_part(SAY + text)], [_speech(0)]), [], [scene],
                      {"text": text, "speech": [said]}, audio=[audio])


def spoken_qa_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES, *,
                     held_out: bool = False) -> TaskSample:
    """user: an image + one of the spec's questions about it (`pick_question`, as the qa task), spoken ->
    assistant: the answer as text."""
    scene, image, size = scene_image(rng, sizes)
    question, answer = pick_question(rng, scene)
    audio, said = _utterance(rng, question, held_out)
    return TaskSample("spoken_qa", chat_document([image_part(0, size), _speech(0)], [text_part(answer)]), [image], [scene],
                      {"question": question, "answer": answer, "speech": [said]}, audio=[audio])


def speech_t2i_sample(rng: np.random.Generator, sizes: Sequence[Size] = DEFAULT_SIZES, *,
                      held_out: bool = False) -> TaskSample:
    """user: a caption spoken (as t2i prompts vary) + "Draw what you hear." -> assistant: the image."""
    scene, image, size = scene_image(rng, sizes)
    text = _t2i_caption(rng, scene)
    audio, said = _utterance(rng, text, held_out)
    return TaskSample("speech_t2i", chat_document([_speech(0), text_part(DRAW_WHAT_YOU_HEAR)], [image_part(0, size)]), [image],
                      [scene], {"caption": text, "speech": [said]}, audio=[audio])


SPEECH_TASKS: tuple[str, ...] = ("asr", "tts", "spoken_qa", "speech_t2i")
register_tasks({"asr": asr_sample, "tts": tts_sample, "spoken_qa": spoken_qa_sample,
                "speech_t2i": speech_t2i_sample}, speech=True)
