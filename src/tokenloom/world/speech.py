"""Speech of the shapes world (spec: shapes-world.md, "Speech"): the world's texts spoken by espeak-ng
in drawn voices, their phonemes, and an offline recogniser (pocketsphinx, restricted to a grammar of
exactly this world's sentences) that decides whether audio says a given text.

- `speak(text, voice)`: 16 kHz mono float32 on the 16-bit PCM grid, espeak-ng's own leading and
  trailing near-silence trimmed, then exactly LEAD_SILENCE s of silence before and TAIL_SILENCE s after.
- `phonemes(text, voice)`: espeak-ng's phoneme mnemonics, the content target a speech codec's first
  codebook is trained to carry.
- `sentence_grammar()`: a JSGF grammar of the world's sentences, normalised (`normalize`).
- `Recognizer`: one pocketsphinx decoder with that grammar; `recognize(samples) -> text`.
- `render_corpus`: a folder of WAVs and a `manifest.jsonl` of random world texts in drawn voices.

Nothing here knows of models. espeak-ng is a Debian program (apt-get install espeak-ng); pocketsphinx
is imported only when a Recognizer is made.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .. import audio_io
from .phrase import NUMBERS, caption, change_sentence, edit_instruction, questions
from .scene import CELLS, COLORS, LOCATIONS, SHAPES, SIZES, pick, random_change, random_scene
from .tasks import (CONTINUE_VIDEO, DESCRIBE, STORY_FROM, T2I_VARIANTS, T2I_WEIGHTS, T2V_WITH_SIZE,
                    TELL_A_STORY)
from .video import DESCRIBE_VIDEO, motion_caption, random_motion, video_questions

SAMPLE_RATE = audio_io.SAMPLE_RATE
LANGUAGES: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
EVAL_LANGUAGES: tuple[str, ...] = ("en-us", "en-gb")  # the languages of held-out (evaluation) utterances
TRAIN_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")
HELD_OUT_VARIANTS: tuple[str, ...] = ("m7", "f4")  # never in training data
SPEED_RANGE = (140, 190)  # words per minute, both ends included
PITCH_RANGE = (30, 70)  # espeak-ng's 0-99 pitch scale, both ends included
LEAD_SILENCE = 0.3  # seconds of silence before the speech
TAIL_SILENCE = 0.5  # seconds after it
MAX_TEXT_CHARS = 400  # the longest world text (a story prompt with a 3-object caption) is under 150
TRIM_LEVEL = 1e-3  # |sample| below this at either end is espeak-ng's silence (or resampling ripple): trimmed
ESPEAK_TIMEOUT_S = 60
TEXT_KINDS: tuple[str, ...] = ("caption", "question", "answer", "change", "instruction", "motion_caption")
MANIFEST_NAME = "manifest.jsonl"
# SeedSequence entropy tags of render_corpus: the training and the held-out streams are disjoint
TRAIN_SPEECH_STREAM, HELDOUT_SPEECH_STREAM = 0x5BEE1, 0x5BEE2


class SpeechError(ValueError):
    """Speech that cannot be made or recognised: bad text, a bad voice, espeak-ng missing or failing."""


# ----------------------------------------------------------------------------- voices


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: a language, a variant (`m1`..., `f1`..., or None for the language's own), a
    speed in words per minute and a pitch (0-99)."""

    language: str
    variant: str | None
    speed: int
    pitch: int

    def __post_init__(self):
        if self.language not in LANGUAGES:
            raise SpeechError(f"voice language {self.language!r} is not one of {list(LANGUAGES)}")
        if self.variant is not None and self.variant not in TRAIN_VARIANTS + HELD_OUT_VARIANTS:
            raise SpeechError(f"voice variant {self.variant!r} is not one of "
                              f"{list(TRAIN_VARIANTS + HELD_OUT_VARIANTS)} or None")
        # espeak-ng's own limits; the spec's narrower ranges are what random_voice draws from
        for name, value, low, high in (("speed", self.speed, 80, 450), ("pitch", self.pitch, 0, 99)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise SpeechError(f"voice {name} must be a whole number from {low} to {high}, got {value!r}")

    @property
    def espeak_name(self) -> str:
        """What `espeak-ng -v` takes: `en-gb+f2`, or `en-gb` without a variant."""
        return self.language if self.variant is None else f"{self.language}+{self.variant}"

    @property
    def held_out(self) -> bool:
        return self.variant in HELD_OUT_VARIANTS

    def to_json(self) -> dict[str, Any]:
        return {"voice": self.espeak_name, "speed": int(self.speed), "pitch": int(self.pitch)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Voice:
        """The voice of a manifest line (`to_json`'s keys)."""
        language, _, variant = record["voice"].partition("+")
        return cls(language, variant or None, int(record["speed"]), int(record["pitch"]))


def random_voice(rng: np.random.Generator, *, held_out: bool = False) -> Voice:
    """A voice drawn per the spec: for training any language, a training variant or none, speed and
    pitch uniform in their ranges; held out: `en-us` or `en-gb` with `m7` or `f4`."""
    languages = EVAL_LANGUAGES if held_out else LANGUAGES
    variants: Sequence[str | None] = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS + (None,)
    voice = Voice(pick(rng, languages), pick(rng, variants),
                  int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
                  int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))
    if voice.held_out != held_out:  # the evaluation is only honest if this can never happen
        raise AssertionError(f"drew {voice.espeak_name} for held_out={held_out}")
    return voice


# ----------------------------------------------------------------------------- espeak-ng


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise SpeechError(f"text to speak must be a string, got {type(text).__name__}")
    if not text.strip():
        raise SpeechError("text to speak is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise SpeechError(f"text to speak is {len(text)} characters long, more than {MAX_TEXT_CHARS}: {text[:60]!r}...")
    if "\x00" in text:
        raise SpeechError(f"text to speak holds a NUL character: {text[:60]!r}")
    return text


def _espeak(args: list[str], text: str) -> bytes:
    """espeak-ng's stdout for `text` on its stdin (never in argv, never through a shell)."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng)")
    try:
        done = subprocess.run([program, *args], input=text.encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise SpeechError(f"espeak-ng {' '.join(args)} took more than {ESPEAK_TIMEOUT_S} s on {text[:60]!r}") from e
    if done.returncode != 0:
        raise SpeechError(f"espeak-ng {' '.join(args)} failed (exit {done.returncode}) on {text[:60]!r}: "
                          f"{done.stderr.decode('utf-8', 'replace').strip()}")
    return done.stdout


def speak(text: str, voice: Voice) -> np.ndarray:
    """`text` spoken by espeak-ng in `voice`: float32 mono at 16 kHz on the 16-bit PCM grid (what a
    written WAV reads back exactly), with exactly LEAD_SILENCE s of silence before the speech and
    TAIL_SILENCE s after. Deterministic: the same text and voice give the same samples."""
    _check_text(text)
    wav = _espeak(["--stdout", "-v", voice.espeak_name, "-s", str(voice.speed), "-p", str(voice.pitch)], text)
    # espeak-ng streams its WAV, so the header's sizes are placeholders; libsndfile takes the real length
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    speech = _trim(audio_io.resample(samples.mean(axis=1), rate, SAMPLE_RATE))
    if speech.size == 0:
        raise SpeechError(f"espeak-ng said nothing for {text[:60]!r} in voice {voice.espeak_name}")
    return np.concatenate([np.zeros(round(LEAD_SILENCE * SAMPLE_RATE), np.float32),
                           audio_io.quantize_16bit(speech),
                           np.zeros(round(TAIL_SILENCE * SAMPLE_RATE), np.float32)])


def _trim(samples: np.ndarray) -> np.ndarray:
    """Samples from the first to the last one at or above TRIM_LEVEL (none when all are below)."""
    loud = np.flatnonzero(np.abs(samples) >= TRIM_LEVEL)
    return samples[loud[0]:loud[-1] + 1] if loud.size else samples[:0]


def phonemes(text: str, voice: Voice) -> str:
    """espeak-ng's phoneme mnemonics for `text` in `voice`'s language and variant (`espeak-ng -q -x`),
    whitespace normalised to single spaces."""
    _check_text(text)
    out = " ".join(_espeak(["-q", "-x", "-v", voice.espeak_name], text).decode("utf-8", "replace").split())
    if not out:
        raise SpeechError(f"espeak-ng gave no phonemes for {text[:60]!r} in voice {voice.espeak_name}")
    return out


# ----------------------------------------------------------------------------- the grammar


def normalize(text: str) -> str:
    """How texts are compared with what is recognised: lower case, punctuation dropped (each mark
    becomes a space), single spaces. `What color is the circle?` -> `what color is the circle`."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", text.lower()).split())


def _alternatives(options: Iterable[str]) -> str:
    return " | ".join(f"({o})" if " " in o else o for o in options)


def _location_from(first: int) -> list[str]:
    """The location phrases of cells first.. in reading order."""
    return [LOCATIONS[cell] for cell in CELLS[first:]]


def _caption_rules() -> dict[str, str]:
    """Captions of 1-3 objects whose named locations are distinct and in reading order (as
    `parse_caption` requires), normalised: `x y and z`. Rule `last_k` is the last object, `mid_k` a
    middle one followed by the last, where k is the first cell a location may still name."""
    n = len(CELLS)
    rules: dict[str, str] = {}
    for k in range(n + 1):
        later = _location_from(k)
        rules[f"last_{k}"] = "and <object>" + (f" [{_alternatives(later)}]" if later else "")
    for k in range(n + 1):
        rules[f"mid_{k}"] = _then_rest(k, "last")
    rules["caption1"] = "<object> [<location>]"
    rules["caption2"] = _then_rest(0, "last")
    rules["caption3"] = _then_rest(0, "mid")
    rules["caption"] = "<caption1> | <caption2> | <caption3>"
    return rules


def _then_rest(first: int, rest: str) -> str:
    """An object without a location, or with that of a cell from `first` on, then rule `rest`_k."""
    options = [f"<object> <{rest}_{first}>"]
    options += [f"<object> {LOCATIONS[cell]} <{rest}_{i + 1}>" for i, cell in enumerate(CELLS) if i >= first]
    return " | ".join(options)


def _other_colors(template: str) -> str:
    """`template` with {color} and {new} for every pair of two different colors."""
    return " | ".join(f"({template.format(color=c, new=n)})" for c in COLORS for n in COLORS if n != c)


def _journeys() -> str:
    """`the {cell A} to the {cell B}` for every two different cells."""
    return " | ".join(f"(the {a} to the {b})" for a in CELLS for b in CELLS if a != b)


def _grammar_rules() -> dict[str, str]:
    rules = {
        "color": _alternatives(COLORS), "shape": _alternatives(SHAPES), "size": _alternatives(SIZES),
        "cell": _alternatives(CELLS), "location": _alternatives(LOCATIONS.values()),
        "number": _alternatives(NUMBERS.values()),
        "object": "a [<size>] <color> <shape>", "name": "the <color> <shape>", "added": "a <size> <color> <shape>",
    }
    rules.update(_caption_rules())
    rules["question"] = _alternatives([
        "what color is the <shape>", "what shape is the <color> object", "how many shapes are there",
        "where is <name>", normalize(DESCRIBE),
        "where does <name> start", "where does <name> end up", normalize(DESCRIBE_VIDEO),
    ])
    # a caption and a motion caption are answers too; they are sentences of their own below
    rules["answer"] = "<color> | <shape> | <number> | (the <cell>)"
    rules["change"] = _alternatives([
        "<name> moves to the <cell>", _other_colors("the {color} <shape> turns {new}"),
        "<added> appears <location>", "<name> disappears",
    ])
    rules["instruction"] = _alternatives([
        "move <name> to the <cell>", _other_colors("make the {color} <shape> {new}"),
        "add <added> <location>", "remove <name>",
    ])
    rules["motion"] = f"<object> moves from ({_journeys()})"
    rules["prompt"] = _alternatives([normalize(TELL_A_STORY), f"{normalize(STORY_FROM)} <caption>",
                                     normalize(CONTINUE_VIDEO)])
    return rules


GRAMMAR_NAME = "shapes_world"
TOP_RULE = "sentence"


def sentence_grammar() -> str:
    """A JSGF grammar whose public rule <sentence> accepts exactly this world's sentences, normalised:
    captions (named locations distinct and in reading order), the questions about images and videos
    and their answers, change sentences (a recolor names two different colors), editing instructions,
    motion captions (two different cells) and the task prompts (`tell a story`, `tell a story that
    starts with {caption}`, `continue the video`). What it cannot know (whether a change applies to
    some scene) is left to the world's parsers."""
    lines = ["#JSGF V1.0;", f"grammar {GRAMMAR_NAME};", ""]
    lines += [f"<{name}> = {body};" for name, body in _grammar_rules().items()]
    lines.append(f"public <{TOP_RULE}> = <caption> | <question> | <answer> | <change> | <instruction> | <motion> "
                 "| <prompt>;")
    return "\n".join(lines) + "\n"


def grammar_words(grammar: str | None = None) -> set[str]:
    """Every word of the grammar (of `sentence_grammar()` by default): each must be in the dictionary."""
    grammar = sentence_grammar() if grammar is None else grammar
    bodies = [line.split("=", 1)[1] for line in grammar.splitlines() if "=" in line]
    words = set()
    for body in bodies:
        words.update(re.sub(r"<[^>]*>|[()\[\]|;*+]", " ", body).split())
    return words


# ----------------------------------------------------------------------------- recognising

SPAN_FRAME = SAMPLE_RATE // 100  # 10 ms, the recogniser's own frame step
SPAN_LEVEL = 0.05  # a frame is speech when its RMS is at least this share of the loudest frame's...
SPAN_FLOOR = 1e-3  # ...and at least this (about -60 dB): a silent input has no speech at all


def speech_span(samples: np.ndarray) -> tuple[int, int]:
    """(start, end) sample indices from the first to the last 10 ms frame loud enough to be speech
    (see SPAN_LEVEL, SPAN_FLOOR); (0, 0) when none is."""
    n_frames = -(-len(samples) // SPAN_FRAME)
    frames = np.zeros(n_frames * SPAN_FRAME, np.float64)
    frames[:len(samples)] = samples
    rms = np.sqrt((frames.reshape(n_frames, SPAN_FRAME) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms >= max(SPAN_FLOOR, SPAN_LEVEL * rms.max()))
    if loud.size == 0:
        return 0, 0
    return int(loud[0]) * SPAN_FRAME, min(len(samples), (int(loud[-1]) + 1) * SPAN_FRAME)



# Decoder settings, each measured on espeak-ng renders (30 held-out-voice captions, 60 texts of all kinds):
# - pocketsphinx's silence and noise fillers, which it allows at every grammar state, swallow most of
#   espeak-ng's synthetic speech (8/30 captions exact with them): they are off, and the quiet before and
#   after the speech is cut here instead (`speech_span`): 28/30;
# - wider beams than pocketsphinx's defaults (1e-48...) keep the right path of a long caption from being
#   pruned, where the defaults found no sentence at all: 43/60 -> 47/60 texts, at the same speed;
# - no best-path pass over the lattice: nothing measured changes, and it takes ten times less time.
DECODER_SETTINGS: dict[str, Any] = {"fsgusefiller": False, "bestpath": False, "beam": 1e-80, "pbeam": 1e-80,
                                    "wbeam": 1e-60, "lpbeam": 1e-70, "lponlybeam": 1e-60}
PHONE_LOOP = "phone_loop"
# Without fillers the grammar must explain every frame, so noise comes out as a short sentence ("the
# top", "blue"). A phone loop (any phones in any order) explains noise far better than any sentence
# can, and speech about as well. The shortfall (loop - sentence) / |loop| of the two paths' log scores
# measured from -0.5 to 0.7 on some 220 espeak-ng renders (all voices, all kinds of text), and from 1.7 to 12
# on white noise and 2.3 to 4.5 on brown noise (0.5-5 s, any level); a sentence that falls further
# short than this is noise. (A buzzing tone falls 0.8-1.0 short: it can still pass for a sentence.)
MAX_SCORE_SHORTFALL = 1.2


class Recognizer:
    """pocketsphinx with the en-us acoustic model and dictionary its wheel ships, restricted to
    `sentence_grammar()` (settings: DECODER_SETTINGS, MAX_SCORE_SHORTFALL). One decoder, reused by every
    call; a lock makes concurrent calls take turns."""

    def __init__(self, grammar: str | None = None):
        try:
            from pocketsphinx import Decoder, get_model_path
        except ImportError as e:  # a core dependency; a broken install should still say what to do
            raise SpeechError("pocketsphinx is not installed (pip install 'pocketsphinx>=5.0')") from e
        self.grammar = sentence_grammar() if grammar is None else grammar
        self.dictionary_path = get_model_path("en-us/cmudict-en-us.dict")
        self._decoder = Decoder(hmm=get_model_path("en-us/en-us"), dict=self.dictionary_path, lm=None,
                                samprate=float(SAMPLE_RATE), loglevel="FATAL", **DECODER_SETTINGS)
        try:
            self._decoder.add_jsgf_string(GRAMMAR_NAME, self.grammar)
        except (RuntimeError, ValueError) as e:
            raise SpeechError(f"pocketsphinx cannot use the grammar: {e}") from e
        self._decoder.add_allphone_file(PHONE_LOOP, get_model_path("en-us/en-us-phone.lm.bin"))
        self._lock = threading.Lock()

    def accepts(self, text: str) -> bool:
        """Whether the grammar accepts `text` (normalised first): is it one of the world's sentences?"""
        words = normalize(text)
        return bool(words) and bool(self._decoder.get_fsg(GRAMMAR_NAME).accept(words))

    def analyse(self, samples, sample_rate: int = SAMPLE_RATE) -> dict[str, Any]:
        """What `recognize` decides, and why: {"text": the result, "hypothesis": the grammar's best
        sentence before the noise check ("" when none), "shortfall": (loop - grammar) / |loop| of the
        two paths' log scores, None when not measured}."""
        samples = audio_io.check_samples(samples, what="speech to recognise")
        if sample_rate != SAMPLE_RATE:
            samples = audio_io.resample(samples, sample_rate, SAMPLE_RATE)
        start, end = speech_span(samples)
        if end <= start:  # silence says nothing
            return {"text": "", "hypothesis": "", "shortfall": None}
        pcm = audio_io.to_pcm16(samples[start:end]).astype("<i2").tobytes()
        with self._lock:
            sentence = self._decode(pcm, GRAMMAR_NAME)
            loop = self._decode(pcm, PHONE_LOOP) if sentence is not None and sentence.hypstr else None
        if sentence is None or not sentence.hypstr:
            return {"text": "", "hypothesis": "", "shortfall": None}
        hypothesis = normalize(sentence.hypstr)
        if loop is None:  # the phone loop found no path (not seen so far): nothing to judge the sentence by
            return {"text": hypothesis, "hypothesis": hypothesis, "shortfall": None}
        shortfall = _shortfall(sentence.score, loop.score)
        return {"text": hypothesis if shortfall <= MAX_SCORE_SHORTFALL else "", "hypothesis": hypothesis,
                "shortfall": shortfall}

    def recognize(self, samples, sample_rate: int = SAMPLE_RATE) -> str:
        """The world sentence the samples say, normalised; "" when there is none (silence, noise, or
        speech that no sentence of the grammar fits)."""
        return self.analyse(samples, sample_rate)["text"]

    def recognizes(self, samples, text: str, sample_rate: int = SAMPLE_RATE) -> bool:
        """True when the samples are recognised as exactly `text` (both normalised)."""
        return self.recognize(samples, sample_rate) == normalize(text)

    def _decode(self, pcm: bytes, search: str):
        self._decoder.activate_search(search)
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)  # the whole utterance: normalise over all of it
        self._decoder.end_utt()
        return self._decoder.hyp()


def _shortfall(sentence_score: float, loop_score: float) -> float:
    """(loop - sentence) / |loop| of two paths' log scores. pocketsphinx reports a score as exp(log
    score); 0 (an underflow) counts as infinitely short."""
    if sentence_score <= 0:
        return math.inf
    if loop_score <= 0:
        return -math.inf
    loop, sentence = math.log(loop_score), math.log(sentence_score)
    return (loop - sentence) / max(abs(loop), 1e-12)


# ----------------------------------------------------------------------------- world texts and corpora


def _pool_questions(rng: np.random.Generator) -> list[tuple[str, str]]:
    """The questions, with answers, of a random scene and of a random motion."""
    return questions(random_scene(rng)) + video_questions(random_motion(rng))


def random_world_text(rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
    """(kind, text): a random text of the world, its kind uniform among TEXT_KINDS unless given,
    drawn with the world's own generators: captions with and without size and location words (the
    t2i prompt mix), questions and answers about a scene or a video, change sentences, editing
    instructions, motion captions (with the size word as often as t2v prompts)."""
    kind = pick(rng, TEXT_KINDS) if kind is None else kind
    if kind == "caption":
        with_size, with_location = T2I_VARIANTS[int(rng.choice(len(T2I_VARIANTS), p=T2I_WEIGHTS))]
        return kind, caption(random_scene(rng), with_size, with_location)
    if kind in ("question", "answer"):
        question, answer = pick(rng, _pool_questions(rng))
        return kind, question if kind == "question" else answer
    if kind in ("change", "instruction"):
        scene = random_scene(rng)
        change = random_change(rng, scene)
        return kind, change_sentence(change) if kind == "change" else edit_instruction(change)
    if kind == "motion_caption":
        return kind, motion_caption(random_motion(rng), with_size=bool(rng.random() < T2V_WITH_SIZE))
    raise SpeechError(f"unknown text kind {kind!r}; expected one of {list(TEXT_KINDS)}")


def _texts(texts: int | Sequence[tuple[str, str]], stream: int, seed: int) -> list[tuple[str, str]]:
    if isinstance(texts, (int, np.integer)) and not isinstance(texts, bool):
        if texts < 0:
            raise SpeechError(f"render_corpus: the number of texts must be >= 0, got {texts}")
        return [random_world_text(np.random.default_rng([stream, seed, 0, j])) for j in range(int(texts))]
    pairs = [tuple(pair) for pair in texts]
    for j, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise SpeechError(f"render_corpus: text {j} must be a (kind, text) pair of strings, got {pair!r}")
    return pairs


def render_corpus(out_dir: str | os.PathLike, texts: int | Sequence[tuple[str, str]], seed: int = 0, *,
                  held_out: bool = False, progress: bool = True) -> dict[str, Any]:
    """Speak texts into `out_dir/audio/NNNNNN.wav` and describe each in `out_dir/manifest.jsonl`:
    {"audio": "audio/000000.wav", "text", "phonemes", "voice": "en-gb+f2", "speed", "pitch", "kind"}.

    texts: a number of random world texts (`random_world_text`), or (kind, text) pairs. Voices are
    training voices, or held-out ones with held_out=True (`random_voice`). Deterministic in (texts,
    seed, held_out): utterance j's text and voice come from their own generators, seeded by
    (stream, seed, j), so they do not depend on how many there are. The manifest appears under its
    name only once complete. Returns a summary."""
    stream = HELDOUT_SPEECH_STREAM if held_out else TRAIN_SPEECH_STREAM
    pairs = _texts(texts, stream, seed)
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    manifest = out / MANIFEST_NAME
    tmp = manifest.with_name(manifest.name + ".tmp")
    seconds = 0.0
    with open(tmp, "w", encoding="utf-8") as f:
        for j, (kind, text) in enumerate(tqdm(pairs, desc="utterances", unit="utt", disable=not progress)):
            voice = random_voice(np.random.default_rng([stream, seed, 1, j]), held_out=held_out)
            samples = speak(text, voice)
            name = f"audio/{j:06d}.wav"
            audio_io.write_audio(out / name, samples)
            seconds += len(samples) / SAMPLE_RATE
            f.write(json.dumps({"audio": name, "text": text, "phonemes": phonemes(text, voice), **voice.to_json(),
                                "kind": kind}) + "\n")
    os.replace(tmp, manifest)
    return {"manifest": str(manifest), "utterances": len(pairs), "seconds": round(seconds, 2), "seed": seed,
            "held_out": held_out}


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `manifest.jsonl` (a folder means its manifest), each with `path`: the audio
    file's full path."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["path"] = str(path.parent / record["audio"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SpeechError(f"{path} line {number}: not a manifest record ({e})") from e
            records.append(record)
    return records
