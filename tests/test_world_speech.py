"""Speech of the shapes world (tokenloom.world.speech): voices, espeak-ng renders, phonemes, the
sentence grammar and the pocketsphinx recogniser, and speech corpora. Skipped without espeak-ng
(apt-get install espeak-ng); the recogniser's tests need pocketsphinx, a core dependency."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tokenloom.audio_io import read_audio
from tokenloom.world import speech as S
from tokenloom.world.phrase import caption, change_sentence, edit_instruction, questions
from tokenloom.world.scene import random_change, random_scene
from tokenloom.world.video import motion_caption, random_motion, video_questions

needs_espeak = pytest.mark.skipif(not S.espeak_available(), reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def recognizer():
    pytest.importorskip("pocketsphinx")
    return S.Recognizer()


# ----------------------------------------------------------------------------- voices


def test_training_voices_are_never_held_out():
    rng = np.random.default_rng(0)
    voices = [S.random_voice(rng) for _ in range(3000)]
    assert not any(v.held_out or v.variant in S.HELD_OUT_VARIANTS for v in voices)
    assert {v.language for v in voices} == set(S.LANGUAGES)
    assert {v.variant for v in voices} == set(S.TRAIN_VARIANTS) | {None}
    assert min(v.speed for v in voices) == 140 and max(v.speed for v in voices) == 190
    assert min(v.pitch for v in voices) == 30 and max(v.pitch for v in voices) == 70


def test_held_out_voices_are_m7_or_f4_in_en_us_or_en_gb():
    rng = np.random.default_rng(1)
    voices = [S.random_voice(rng, held_out=True) for _ in range(500)]
    assert {v.variant for v in voices} == {"m7", "f4"}
    assert {v.language for v in voices} == {"en-us", "en-gb"}
    assert all(v.held_out for v in voices)


def test_voice_names_and_checks():
    assert S.Voice("en-gb", "f2", 160, 50).espeak_name == "en-gb+f2"
    assert S.Voice("en-029", None, 160, 50).espeak_name == "en-029"
    voice = S.Voice("en-gb-x-rp", "m3", 150, 40)
    assert S.Voice.from_json(voice.to_json()) == voice
    for bad in (dict(language="fr"), dict(variant="m6"), dict(speed=10), dict(pitch=120), dict(speed=150.5)):
        args = dict(language="en-us", variant="m1", speed=160, pitch=50) | bad
        with pytest.raises(S.SpeechError):
            S.Voice(**args)


# ----------------------------------------------------------------------------- espeak-ng


@needs_espeak
def test_speak_pads_exact_silences_and_is_deterministic():
    voice = S.Voice("en-us", "m1", 160, 50)
    samples = S.speak("a small red circle at the top left", voice)
    assert samples.dtype == np.float32 and samples.ndim == 1
    lead, tail = round(S.LEAD_SILENCE * S.SAMPLE_RATE), round(S.TAIL_SILENCE * S.SAMPLE_RATE)
    assert lead == 4800 and tail == 8000
    assert not samples[:lead].any() and not samples[-tail:].any()
    assert abs(samples[lead]) >= S.TRIM_LEVEL and abs(samples[-tail - 1]) >= S.TRIM_LEVEL  # speech starts/ends there
    assert 1.0 < (len(samples) - lead - tail) / S.SAMPLE_RATE < 4.0
    np.testing.assert_array_equal(samples, S.speak("a small red circle at the top left", voice))
    assert np.array_equal(samples * 32768, np.round(samples * 32768))  # on the 16-bit grid: a WAV stores it exactly


@needs_espeak
def test_speak_checks_its_text(monkeypatch):
    voice = S.Voice("en-us", None, 160, 50)
    with pytest.raises(S.SpeechError, match="empty"):
        S.speak("  ", voice)
    with pytest.raises(S.SpeechError, match="401 characters"):
        S.speak("a" * 401, voice)
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.SpeechError, match="apt-get install espeak-ng"):
        S.speak("a red circle", voice)


@needs_espeak
def test_phonemes_are_text_of_the_speech():
    voice = S.Voice("en-gb", "f2", 160, 50)
    red, blue = S.phonemes("a red circle", voice), S.phonemes("a blue circle", voice)
    assert red and blue and red != blue
    assert red == " ".join(red.split())  # whitespace normalised
    assert S.phonemes("a red circle", voice) == red


def test_normalize():
    assert S.normalize("What color is the circle?") == "what color is the circle"
    assert S.normalize("a red circle, a blue square and a cyan triangle") == \
        "a red circle a blue square and a cyan triangle"
    assert S.normalize("Tell a story that starts with:  a red circle") == "tell a story that starts with a red circle"


# ----------------------------------------------------------------------------- the grammar


def test_grammar_words_are_all_in_the_dictionary():
    pocketsphinx = pytest.importorskip("pocketsphinx")
    with open(pocketsphinx.get_model_path("en-us/cmudict-en-us.dict"), encoding="utf-8") as f:
        dictionary = {re.sub(r"\(\d+\)$", "", line.split(maxsplit=1)[0]) for line in f if line.strip()}
    words = S.grammar_words()
    assert {"cyan", "triangle", "disappears", "describe", "continue"} <= words
    assert words - dictionary == set()


def world_sentences(rng: np.random.Generator) -> list[str]:
    """One of every kind of the world's texts, drawn from the world's own generators."""
    scene = random_scene(rng)
    change = random_change(rng, scene)
    motion = random_motion(rng)
    texts = [caption(scene), caption(scene, False, True), caption(scene, True, False), caption(scene, False, False),
             change_sentence(change), edit_instruction(change), motion_caption(motion),
             motion_caption(motion, with_size=False)]
    texts += [t for qa in questions(scene) + video_questions(motion) for t in qa]
    return texts + [S.TELL_A_STORY, S.STORY_FROM + caption(scene), S.CONTINUE_VIDEO]


def test_grammar_accepts_every_world_sentence(recognizer):
    rng = np.random.default_rng(2)
    for _ in range(150):
        for text in world_sentences(rng):
            assert recognizer.accepts(text), text
    for _ in range(200):
        assert recognizer.accepts(S.random_world_text(rng)[1])


@pytest.mark.parametrize("text", [
    "a red circle on the right and a blue square on the left",  # locations out of reading order
    "a red circle at the top and a blue square at the top",  # one cell twice
    "a red circle and a blue square and a green triangle",  # only the last two are joined by "and"
    "a red circle a blue square a green triangle a cyan circle",
    "the red circle turns red", "make the blue square blue",  # a recolor changes the color
    "a red circle moves from the top to the top",
    "a big red circle", "the red circle moves to the middle", "what color is the red circle", "",
])
def test_grammar_rejects_what_the_world_never_says(recognizer, text):
    assert not recognizer.accepts(text)


# ----------------------------------------------------------------------------- recognising


def exact_rate(recognizer, held_out: bool, n: int, seed: int) -> float:
    hits = 0
    for j in range(n):
        rng = np.random.default_rng([seed, j])
        _, text = S.random_world_text(rng, "caption")
        hits += recognizer.recognizes(S.speak(text, S.random_voice(rng, held_out=held_out)), text)
    return hits / n


@pytest.mark.slow
@needs_espeak
def test_recognizer_recognises_espeak_captions(recognizer):
    # measured: 18/20 exact (held-out voices) and 13/20 (training voices, of which en-029 is the hardest) on
    # these draws; 28/30 and 24/30 on others. The floors are far below, so that a changed espeak-ng or
    # pocketsphinx build does not trip them while a broken grammar or decoder setting still does.
    assert exact_rate(recognizer, held_out=True, n=20, seed=7) >= 0.5
    assert exact_rate(recognizer, held_out=False, n=20, seed=8) >= 0.4


@needs_espeak
def test_recognizer_hears_every_kind(recognizer):
    voice = S.Voice("en-us", "m1", 160, 50)
    for text in ("What shape is the cyan object?", "the blue square moves to the bottom left",
                 "move the blue square to the bottom left", "a small purple circle moves from the top to the center"):
        assert recognizer.recognize(S.speak(text, voice)) == S.normalize(text)


def test_recognizer_returns_nothing_for_noise_and_silence(recognizer):
    rng = np.random.default_rng(3)
    for level in (0.01, 0.3):
        assert recognizer.recognize((rng.standard_normal(2 * S.SAMPLE_RATE) * level).astype(np.float32)) == ""
    assert recognizer.recognize(np.zeros(S.SAMPLE_RATE, np.float32)) == ""


# ----------------------------------------------------------------------------- corpora


def test_random_world_texts_cover_every_kind():
    rng = np.random.default_rng(4)
    kinds = {S.random_world_text(rng)[0] for _ in range(200)}
    assert kinds == set(S.TEXT_KINDS)
    with pytest.raises(S.SpeechError, match="unknown text kind"):
        S.random_world_text(rng, "poem")


@needs_espeak
def test_render_corpus_writes_a_manifest_that_reads_back(tmp_path):
    summary = S.render_corpus(tmp_path / "a", 3, seed=5, progress=False)
    assert summary["utterances"] == 3
    records = S.read_manifest(tmp_path / "a")
    assert [r["audio"] for r in records] == [f"audio/{j:06d}.wav" for j in range(3)]
    for record in records:
        assert set(record) == {"audio", "text", "phonemes", "voice", "speed", "pitch", "kind", "path"}
        voice = S.Voice.from_json(record)
        assert not voice.held_out and record["kind"] in S.TEXT_KINDS
        np.testing.assert_array_equal(read_audio(record["path"]), S.speak(record["text"], voice))
    # deterministic in the seed; utterance j does not depend on how many there are
    S.render_corpus(tmp_path / "b", 2, seed=5, progress=False)
    lines = (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    assert (tmp_path / "b" / "manifest.jsonl").read_text().splitlines() == lines[:2]
    held = S.render_corpus(tmp_path / "c", [("question", "How many shapes are there?")], held_out=True,
                           progress=False)
    (record,) = S.read_manifest(held["manifest"])
    assert S.Voice.from_json(record).held_out and record["text"] == "How many shapes are there?"
    assert json.loads((tmp_path / "c" / "manifest.jsonl").read_text())["kind"] == "question"
