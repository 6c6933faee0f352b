"""tokenloom serve with speech, through the official openai client on 127.0.0.1: input_audio parts heard
as the pipeline hears them, audio answers (modalities ["audio"]) as OpenAI's message.audio (a base64
WAV of the utterance) and streamed delta.audio (base64 pcm16 of the SpeechChunks, resampled as one
stream), what /v1/models says the model can hear and speak, and bad audio refused with a 400 naming
the parameter."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import torch

from tokenloom.audio_io import Audio, audio_bytes, read_audio_bytes, resample, to_pcm16
from tokenloom.document import Document, TextPart
from tokenloom.engine import Finished, SpeechChunk
from tokenloom.pipeline import random_pipeline
from tokenloom.serve import ServerThread, ServeSettings, create_app

SAY = [{"role": "user", "content": "Say something."}]
SAMPLES_PER_FRAME = 960  # the answers' 24 kHz (OpenAI's rate) / 25 code frames a second


def at_24k(samples) -> np.ndarray:
    """What the server sends of the codec's 16 kHz samples: 16-bit PCM at 24 kHz."""
    return to_pcm16(np.clip(resample(samples, 16000, 24000), -1.0, 1.0))
MAX_AUDIO_BYTES = 64 << 10
MAX_AUDIO_SECONDS = 2.0


def speaking_pipeline():
    """The suite's random speech pipeline (4 codebooks of 32, blocks layout), its level-1 output rows
    scaled by 0.6 so that it goes on with its content block: utterances of tens of frames, not one."""
    p = random_pipeline(seed=2, hidden_size=64, num_layers=2, codebook_size=64, image_size=32, speech=(4, 32))
    with torch.no_grad():
        p.model.output.weight[p.vocab.speech_level_mask(1)] *= 0.6
    return p


@pytest.fixture(scope="module")
def reference():
    """The served model's twin (same weights), for the answers the pipeline itself gives."""
    return speaking_pipeline()


@pytest.fixture(scope="module")
def speaker():
    settings = ServeSettings(max_audio_bytes=MAX_AUDIO_BYTES, max_audio_seconds=MAX_AUDIO_SECONDS, max_input_audio=2)
    with ServerThread(create_app(settings, pipe=speaking_pipeline())) as server:
        yield server


@pytest.fixture(scope="module")
def mute():
    """A model without speech."""
    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32)
    with ServerThread(create_app(ServeSettings(), pipe=pipe)) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60.0)


def tone(seconds=1.0, rate=16000, freq=220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def encoded(samples, fmt: str, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt.upper(), **({"subtype": "VORBIS"} if fmt == "ogg" else {}))
    return buffer.getvalue()


def audio_part(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def chat(server, **kwargs):
    return client(server).chat.completions.create(model=server.app.state.worker.model_id, **kwargs)


def drawn(pipe, doc: Document, **kwargs):
    """The pipeline's own answer to a chat document, and its streamed events."""
    events = list(pipe.engine.stream([pipe.chat_request(doc, **kwargs)]))
    return next(e.result for e in events if isinstance(e, Finished)), events


# -- what the model can do ----------------------------------------------------------------------------------
def test_the_model_card_says_whether_the_model_hears_and_speaks(speaker, mute):
    (card,) = client(speaker).models.list().data
    both = ["text", "image", "video", "audio"]  # the random models' vocabularies have the video markers
    assert card.input_modalities == both and card.output_modalities == both
    (card,) = client(mute).models.list().data
    assert card.input_modalities == card.output_modalities == ["text", "image", "video"]


# -- audio in ---------------------------------------------------------------------------------------------------
def test_input_audio_is_heard_as_the_pipeline_hears_it(speaker, reference):
    wav = audio_bytes(tone())
    question = "Transcribe the speech."
    r = chat(speaker, messages=[{"role": "user", "content": [audio_part(b64(wav)), {"type": "text", "text": question}]}],
             modalities=["text"], max_tokens=8, seed=0)
    heard = reference.encode_speech(Audio(read_audio_bytes(wav)))  # content only: one level of 25 frames
    assert heard.levels == 1 and heard.num_frames == 25
    expected, _ = drawn(reference, Document.chat([("user", [heard, TextPart(question)])]), mode="text",
                        max_new_tokens=8, seed=0)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.audio is None
    doc = Document.chat([("user", [heard, TextPart(question)])])
    assert r.usage.prompt_tokens == len(reference.chat_request(doc, mode="text").prompt_ids)
    # FLAC and OGG too (and a data URI, as a browser's FileReader gives it), at another sample rate
    for fmt in ("flac", "ogg"):
        data = b64(encoded(tone(rate=22050), fmt, 22050))
        for given in (data, f"data:audio/{fmt};base64,{data}"):
            r = chat(speaker, messages=[{"role": "user", "content": [audio_part(given, fmt)]}], modalities=["text"],
                     max_tokens=3, seed=0)
            assert r.choices[0].finish_reason in ("stop", "length")


# -- audio out --------------------------------------------------------------------------------------------------
def test_an_audio_answer_is_a_wav_of_the_utterance(speaker, reference):
    expected, _ = drawn(reference, Document.chat([("user", [TextPart("Say something.")])]), mode="speech",
                        max_new_tokens=120, seed=0)
    (utterance,) = expected.speech_parts
    assert utterance.num_frames > 10  # several streamed chunks of 10 frames below
    for modalities in (["audio"], ["text", "audio"]):  # both the engine's mode "speech": one utterance, no text
        r = chat(speaker, messages=SAY, modalities=modalities, audio={"voice": "alloy", "format": "wav"},
                 max_tokens=120, seed=0)
        message = r.choices[0].message
        assert message.content is None and message.audio is not None
        assert message.audio.id.startswith("audio_") and message.audio.transcript == ""
        assert isinstance(message.audio.expires_at, int)
        raw = base64.b64decode(message.audio.data)
        assert raw[:4] == b"RIFF"
        samples, rate = sf.read(io.BytesIO(raw), dtype="int16")
        assert rate == 24000 and len(samples) == utterance.num_frames * SAMPLES_PER_FRAME
        assert np.array_equal(samples, at_24k(utterance.audio))
        assert r.usage.completion_tokens == len(expected.ids)
    # pcm16 without streaming: the same samples, raw 16-bit little-endian
    r = chat(speaker, messages=SAY, modalities=["audio"], audio={"voice": "x", "format": "pcm16"}, max_tokens=120,
             seed=0)
    pcm = np.frombuffer(base64.b64decode(r.choices[0].message.audio.data), dtype="<i2")
    assert np.array_equal(pcm, at_24k(utterance.audio))


def test_streamed_audio_is_the_speech_chunks_as_pcm16(speaker, reference):
    expected, events = drawn(reference, Document.chat([("user", [TextPart("Say something.")])]), mode="speech",
                             max_new_tokens=120, seed=0)
    chunks = [e.audio for e in events if isinstance(e, SpeechChunk)]
    assert len(chunks) == 3  # 29 frames: 10 + 10 + 9
    stream = chat(speaker, messages=SAY, modalities=["audio"], audio={"voice": "alloy", "format": "pcm16"},
                  max_tokens=120, seed=0, stream=True)
    audio, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.audio is not None:
                audio.append(choice.delta.audio)
            if choice.finish_reason is not None:
                reasons.append(choice.finish_reason)
    first, *data, last = audio
    assert first.id.startswith("audio_") and first.transcript == "" and first.data is None
    # one piece per chunk, and one with what the resampler held back at the end
    assert all(a.id == first.id and a.data for a in data) and len(data) == len(chunks) + 1
    assert last.id == first.id and last.data is None and isinstance(last.expires_at, int)
    assert reasons == [expected.finish_reason]
    streamed = [np.frombuffer(base64.b64decode(a.data), dtype="<i2") for a in data]
    whole = np.concatenate(streamed)  # as long as the plain answer's WAV; near the seams slightly different
    assert len(whole) == expected.speech_parts[0].num_frames * SAMPLES_PER_FRAME
    # the engine's chunks, resampled as one stream: equal to resampling their concatenation whole
    assert np.array_equal(whole, at_24k(np.concatenate(chunks)))
    # no audio parameter: a stream's audio is pcm16 all the same
    stream = chat(speaker, messages=SAY, modalities=["audio"], max_tokens=120, seed=0, stream=True)
    data = [c.choices[0].delta.audio.data for c in stream if c.choices and c.choices[0].delta.audio is not None]
    assert np.array_equal(np.concatenate([np.frombuffer(base64.b64decode(d), "<i2") for d in data if d]), whole)


def test_every_modality_at_once_is_accepted(speaker):
    r = chat(speaker, messages=SAY, modalities=["text", "image", "audio"], max_tokens=10, seed=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_an_answer_speaks_only_when_audio_is_asked_for(speaker, monkeypatch):
    """The engine's speak flag follows the request's modalities: a client that asked for text (and images),
    or named no modalities, gets no audio, even from a model that can speak."""
    from tokenloom.serve import jobs

    seen = []
    build = jobs.ChatJob.build

    def spy(self, pipe):
        requests = build(self, pipe)
        seen.append([(r.mode, r.modalities is None or "speech" in r.modalities) for r in requests])
        return requests

    monkeypatch.setattr(jobs.ChatJob, "build", spy)
    for modalities, want in ((None, ("any", False)), (["text", "image"], ("any", False)), (["text"], ("text", False)),
                             (["text", "image", "audio"], ("any", True)), (["audio"], ("speech", True))):
        r = chat(speaker, messages=SAY, max_tokens=10, seed=0, **({} if modalities is None else
                                                                 {"modalities": modalities}))
        assert seen[-1] == [want], modalities
        if not want[1]:
            assert r.choices[0].message.audio is None


# -- bad input --------------------------------------------------------------------------------------------------
def _with_audio(data: str, fmt: str = "wav", **fields) -> dict:
    return {"messages": [{"role": "user", "content": [audio_part(data, fmt), {"type": "text", "text": "Hi."}]}],
            "max_tokens": 3, **fields}


DATA = "messages[0].content[0].input_audio.data"
WAV = b64(audio_bytes(tone(0.5)))
BAD = [  # (name, request, param, code)
    ("not base64", _with_audio("@@@not base64@@@"), DATA, "invalid_audio"),
    ("not audio", _with_audio(b64(b"hello, this is text and not a sound file at all")), DATA, "invalid_audio"),
    ("a WAV header and nothing to read", _with_audio(b64(b"RIFF\x00\x00\x00\x00WAVEjunk")), DATA, "invalid_audio"),
    ("FLAC said to be WAV", _with_audio(b64(encoded(tone(0.5), "flac")), "wav"), DATA, "invalid_audio"),
    ("silent", _with_audio(b64(audio_bytes(np.zeros(8000, np.float32)))), DATA, "invalid_audio"),
    ("empty", _with_audio(""), DATA, "invalid_audio"),
    ("mp3", _with_audio(WAV, "mp3"), "messages[0].content[0].input_audio.format", "unsupported_value"),
    ("no format", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": WAV}}]}]},
     "messages[0].content[0].input_audio.format", "missing_required_parameter"),
    ("input_audio a string", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": WAV}]}]},
     "messages[0].content[0].input_audio", "invalid_type"),
    ("too many bytes", _with_audio(b64(audio_bytes(tone(2.5)))), DATA, "audio_too_large"),
    ("too long", _with_audio(b64(audio_bytes(tone(2.5, rate=8000), 8000))), DATA, "audio_too_long"),
    ("rate too low", _with_audio(b64(audio_bytes(tone(0.5, rate=2000, freq=200.0), 2000))), DATA, "invalid_audio"),
    ("too many parts", {"messages": [{"role": "user", "content": [audio_part(WAV)] * 3}]}, "messages", None),
    ("an earlier answer's audio by id", {"messages": SAY + [{"role": "assistant", "audio": {"id": "audio_1"}},
                                                            {"role": "user", "content": "Again."}]},
     "messages[1].audio", "unsupported_parameter"),
    ("unknown audio format", {"messages": SAY, "modalities": ["audio"], "audio": {"voice": "alloy", "format": "mp3"}},
     "audio.format", "unsupported_value"),
    ("wav streamed", {"messages": SAY, "modalities": ["audio"], "stream": True,
                      "audio": {"voice": "alloy", "format": "wav"}}, "audio.format", "unsupported_value"),
    ("voice a number", {"messages": SAY, "modalities": ["audio"], "audio": {"voice": 3, "format": "wav"}},
     "audio.voice", "invalid_type"),
    ("audio a string", {"messages": SAY, "modalities": ["audio"], "audio": "wav"}, "audio", "invalid_type"),
    ("audio without the audio modality", {"messages": SAY, "modalities": ["text"],
                                          "audio": {"voice": "alloy", "format": "wav"}}, "audio", None),
    ("unknown modality", {"messages": SAY, "modalities": ["audio", "smell"]}, "modalities", None),
    ("speech_top_p zero", {"messages": SAY, "modalities": ["audio"], "speech_top_p": 0.0}, "speech_top_p", None),
    ("an utterance past max_tokens", {"messages": SAY, "modalities": ["audio"], "max_tokens": 4}, "max_tokens", None),
]
MUTE_BAD = [
    ("input_audio", _with_audio(WAV), "messages[0].content[0]", "unsupported_value"),
    ("audio modality", {"messages": SAY, "modalities": ["audio"]}, "modalities", "unsupported_value"),
    ("text and audio", {"messages": SAY, "modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ("audio parameter", {"messages": SAY, "audio": {"voice": "alloy", "format": "wav"}}, "audio",
     "unsupported_parameter"),
]


def _refusals(server, cases) -> list[str]:
    failures = []
    for name, body, param, code in cases:
        body = dict(body)
        messages = body.pop("messages")
        known = {k: body.pop(k) for k in ("modalities", "audio", "max_tokens", "stream") if k in body}
        try:
            result = chat(server, messages=messages, extra_body=body, **known)
            if known.get("stream"):
                list(result)
            failures.append(f"{name}: accepted")
        except openai.BadRequestError as e:
            if e.param != param or (code is not None and e.code != code) or not e.message:
                failures.append(f"{name}: param {e.param!r}, code {e.code!r}: {e.message}")
    return failures


def test_bad_audio_gets_a_400_naming_the_parameter(speaker, mute):
    failures = _refusals(speaker, BAD) + [f"no speech: {f}" for f in _refusals(mute, MUTE_BAD)]
    assert not failures, "\n".join(failures)
    with pytest.raises(openai.BadRequestError, match="this model cannot hear speech"):
        chat(mute, **_with_audio(WAV))
    with pytest.raises(openai.BadRequestError, match="this model cannot speak"):
        chat(mute, messages=SAY, modalities=["audio"])
    for server in (speaker, mute):  # no bad request reached an engine step
        assert "tokenloom_engine_errors_total 0" in httpx.get(server.url + "/metrics").text.splitlines()
