"""The pipeline's speech verbs: hearing (audio -> a SpeechPart of codes), speaking (text -> audio) and
transcribing (audio -> text), over the same engine as every other modality.

Speech the model hears is fed content-only by default, as MIO does: the first codebook carries what is
said, the others who says it and how, which an answer about the words does not need (and a shorter
span leaves more of the context). Speech it says is drawn at every level, so it decodes to a voice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import audio_io
from .document import MAX_SPEECH_FRAMES, Document, SpeechPart, TextPart, check_text
from .engine import GenerationRequest
from .engine.sampling import check_integer

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
SPEECH_LEVELS = ("content", "all")


class SpeechMixin:
    """Speech methods of `Pipeline` (kept here so each module stays about one thing)."""

    def _codec(self):
        if self.speech_tokenizer is None or not self.vocab.has_speech:
            raise ValueError("this model has no speech codec or no speech codes: it can neither hear nor speak "
                             "(tokenloom add-modality BASE OUT --modality speech --codec CODEC, then train it on speech)")
        return self.speech_tokenizer

    @staticmethod
    def is_speech(x) -> bool:
        """Whether `x` is speech: Audio, a SpeechPart, or a path to a .wav / .flac / .ogg file."""
        if isinstance(x, (audio_io.Audio, SpeechPart)):
            return True
        return isinstance(x, (str, Path)) and Path(x).suffix.lower() in AUDIO_SUFFIXES

    def encode_speech(self, audio, levels: str = "content") -> SpeechPart:
        """Audio -> a SpeechPart of the codec's codes: `levels` "content" (the first codebook only: how
        the model hears) or "all". `audio`: a path to an audio file, an `audio_io.Audio`, a float array
        of samples at the codec's rate, or a SpeechPart (returned as it is)."""
        if isinstance(audio, SpeechPart):
            return audio
        if levels not in SPEECH_LEVELS:
            raise ValueError(f"levels must be one of {SPEECH_LEVELS}, got {levels!r}")
        codec = self._codec()
        rate = codec.config.sample_rate
        if isinstance(audio, (str, Path)):
            samples = audio_io.read_audio(audio, rate)
        elif isinstance(audio, audio_io.Audio):
            samples = audio.at(rate)
        elif isinstance(audio, np.ndarray):
            samples = audio_io.check_samples(audio)
        else:
            raise ValueError(f"speech must be a path, Audio, a float array or a SpeechPart, got {type(audio).__name__}")
        codes = codec.encode(samples)
        if codes.shape[1] > MAX_SPEECH_FRAMES:
            raise ValueError(f"the speech is {len(samples) / rate:.1f} s long: at most "
                             f"{MAX_SPEECH_FRAMES / codec.config.frame_rate:.0f} s fit one utterance")
        part = SpeechPart(codes[:1] if levels == "content" else codes)
        part.audio = samples
        return part

    def decode_speech(self, part: SpeechPart) -> audio_io.Audio:
        """The utterance's waveform (decoded now unless it carries one)."""
        codec = self._codec()
        samples = part.audio if part.audio is not None else codec.decode(part.codes)
        return audio_io.Audio(np.asarray(samples, dtype=np.float32), codec.config.sample_rate)

    def speech_request(self, text: str, *, seed: int | None = None, guidance_scale: float | None = None,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       max_seconds: float | None = None) -> GenerationRequest:
        """The engine request of one text-to-speech draw: the config's speak prompt with `text`, answered
        by one utterance of every codebook level, at most `max_seconds` (default: the config's) long."""
        codec = self._codec()
        text = check_text(text, "text to speak").strip()
        if not text:
            raise ValueError("text to speak is empty")
        seconds = self.config.max_speech_seconds if max_seconds is None else max_seconds
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds:
            raise ValueError(f"max_seconds must be a positive number, got {seconds!r}")
        frames = min(MAX_SPEECH_FRAMES, max(1, int(seconds * codec.config.frame_rate)))
        levels = self.vocab.speech_codebooks
        doc = Document.chat([("user", [TextPart(self.config.speak_prompt.format(text=text))])])
        budget = self.format.speech_length(levels, frames) + 1
        room = self.model.config.max_position_embeddings - len(self.format.encode(doc, generation_role="assistant").ids)
        if room < self.format.speech_length(levels, 1) + 1:
            raise ValueError(f"the text is too long to speak: its prompt leaves {max(room, 0)} of the model's "
                             f"{self.model.config.max_position_embeddings} context tokens for the speech")
        return self.chat_request(doc, mode="speech", max_new_tokens=min(budget, room), seed=seed,
                                 guidance_scale=guidance_scale,
                                 speech_sampling={k: v for k, v in (("temperature", temperature), ("top_k", top_k),
                                                                    ("top_p", top_p)) if v is not None})

    def speak(self, texts: str | list[str], *, seed: int | None = None, batch_size: int = 16,
              progress: bool = False, **sampling):
        """Text to speech: an `audio_io.Audio` per text (one for a str, a list for a list). Keywords:
        guidance_scale, temperature, top_k, top_p, max_seconds. Text k uses seed + k."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise ValueError("texts must be a string or a non-empty list of strings")
        check_integer(batch_size, "batch_size", low=1)
        if seed is not None:
            check_integer(seed, "seed", low=0)
        requests = [self.speech_request(t, seed=None if seed is None else seed + k, **sampling)
                    for k, t in enumerate(texts)]  # every one checked before any is drawn
        out = []
        for result in self.run_batched(requests, batch_size, progress=progress, desc="speaking"):
            parts = result.document.speech
            out.append(self.decode_speech(parts[0]) if parts else audio_io.Audio(np.zeros(0, np.float32),
                                                                                 self._codec().config.sample_rate))
        return out[0] if single else out

    def transcribe(self, audio, **kwargs):
        """Speech to text: what the utterance says (a list of texts for a list of utterances)."""
        many = isinstance(audio, (list, tuple))
        items = list(audio) if many else [audio]
        parts = [self.encode_speech(a) for a in items]
        kwargs.setdefault("mode", "text")
        answers = self.chat([self.config.transcribe_prompt] * len(parts), images=[[p] for p in parts], **kwargs)
        texts = [r.text.strip() for r in answers]
        return texts if many else texts[0]
