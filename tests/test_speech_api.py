"""Speech through the pipeline, a model directory, the command line, the report, add-modality and
pre-tokenization, on the small random speech pipeline (`speech_pipe`: 4 codebooks of 32)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tokenloom.audio_io import Audio, read_audio, write_audio
from tokenloom.cli import main
from tokenloom.data import DataError
from tokenloom.data.pretokenize import pretokenize
from tokenloom.document import Document, SpeechPart, TextPart, Turn
from tokenloom.modalities import add_modality
from tokenloom.pipeline import Pipeline, random_pipeline
from tokenloom.report import save_document


def _tone(seconds=1.0, freq=220.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(speech_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("speech-model")
    speech_pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    write_audio(path, _tone())
    return path


def test_a_model_directory_keeps_its_codec(speech_pipe, model_dir) -> None:
    loaded = Pipeline.from_pretrained(model_dir)
    assert loaded.vocab == speech_pipe.vocab and loaded.speech_tokenizer is not None
    assert (model_dir / "speech_codec.json").exists() and (model_dir / "speech_codec.safetensors").exists()
    a, b = speech_pipe.encode_speech(Audio(_tone()), "all"), loaded.encode_speech(Audio(_tone()), "all")
    assert a == b and a.levels == 4 and a.num_frames == 25  # 1 s at 25 frames a second


def test_speech_is_heard_content_only_unless_asked(speech_pipe, wav) -> None:
    heard = speech_pipe.encode_speech(wav)
    assert heard.levels == 1 and heard.audio is not None
    full = speech_pipe.encode_speech(wav, levels="all")
    assert full.levels == 4 and heard == full.content
    # another sample rate is resampled to the codec's: the same utterance, nearly the same codes
    at_8k = Audio(_tone(rate=8000), 8000)
    assert speech_pipe.encode_speech(at_8k).num_frames == heard.num_frames
    assert speech_pipe.is_speech(wav) and speech_pipe.is_speech(Audio(_tone())) and not speech_pipe.is_speech("x.png")
    doc = speech_pipe.user_document("Transcribe the speech.", [Audio(_tone())])
    assert isinstance(doc.parts[0], SpeechPart) and doc.parts[0].levels == 1 and doc.parts[1].text
    with pytest.raises(ValueError, match="levels must be one of"):
        speech_pipe.encode_speech(wav, levels="timbre")


def test_speak_is_seeded_and_decodes_to_audio(speech_pipe) -> None:
    a = speech_pipe.speak(["a red circle", "a blue square"], seed=3, max_seconds=1.0)
    b = speech_pipe.speak(["a red circle", "a blue square"], seed=3, max_seconds=1.0)
    assert len(a) == 2 and all(isinstance(x, Audio) and x.sample_rate == 16000 for x in a)
    assert all(np.array_equal(x.samples, y.samples) for x, y in zip(a, b))
    one = speech_pipe.speak("a blue square", seed=4, max_seconds=1.0)
    assert np.array_equal(one.samples, a[1].samples)  # text k uses seed + k
    # the utterance is drawn at every level, within max_seconds
    result = speech_pipe.engine.generate([speech_pipe.speech_request("a red circle", seed=3, max_seconds=1.0)])[0]
    part = result.document.speech[0]
    assert part.levels == 4 and part.num_frames <= 25
    assert len(a[0].samples) == part.num_frames * 16000 // 25


def test_speak_refuses_what_it_cannot_say(speech_pipe) -> None:
    with pytest.raises(ValueError, match="empty"):
        speech_pipe.speak("  ")
    with pytest.raises(ValueError, match="too long to speak"):
        speech_pipe.speak("a red circle " * 1500)
    with pytest.raises(ValueError, match="max_seconds"):
        speech_pipe.speak("a red circle", max_seconds=0)


def test_transcribe_answers_in_text(speech_pipe, wav) -> None:
    text = speech_pipe.transcribe(wav, max_new_tokens=4, seed=0)
    assert isinstance(text, str)
    assert len(speech_pipe.transcribe([wav, Audio(_tone(0.5))], max_new_tokens=4, seed=0)) == 2


def test_a_model_without_speech_says_how_to_get_it(pipe, wav) -> None:
    for call in (lambda: pipe.speak("a red circle"), lambda: pipe.transcribe(wav), lambda: pipe.encode_speech(wav)):
        with pytest.raises(ValueError, match="add-modality"):
            call()


def test_the_report_plays_speech(speech_pipe, tmp_path) -> None:
    heard = speech_pipe.encode_speech(Audio(_tone()))
    said = SpeechPart(np.zeros((4, 5), np.int64))  # never decoded: noted as such
    doc = Document([Turn("user", [heard, TextPart("Transcribe the speech.")]), Turn("assistant", [said])])
    paths = save_document(doc, tmp_path)
    page = paths["html"].read_text()
    assert '<audio controls src="speech_000.wav"' in page and "not decoded" in page
    assert len(read_audio(tmp_path / "speech_000.wav")) == 16000


def test_speech_verbs(model_dir, wav, tmp_path, capsys) -> None:
    model = ["--model", str(model_dir)]
    out = tmp_path / "said.wav"
    assert main(["speak", "a red circle", "--out", str(out), "--max-seconds", "1", "--seed", "1", *model]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    assert main(["transcribe", str(wav), "--seed", "1", *model]) == 0
    capsys.readouterr()
    page = tmp_path / "chat"
    assert main(["chat", "Transcribe the speech.", "--audio", str(wav), "--out", str(page), "--max-new-tokens", "3",
                 *model]) == 0
    assert "<audio" in (page / "index.html").read_text()
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a sound")
    for argv, message in ((["speak", "x", "--out", str(tmp_path / "x.mp3"), *model], "WAV"),
                          (["transcribe", str(tmp_path / "missing.wav"), *model], "missing.wav"),
                          (["transcribe", str(not_audio), *model], "notes.wav"),
                          (["speak", "x", "--out", str(out), "--max-seconds", "-1", *model], "--max-seconds")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, (argv, err)


def test_transcribe_on_a_model_without_speech_exits_2(pipe, wav, tmp_path, capsys) -> None:
    path = tmp_path / "plain"
    pipe.save_pretrained(path)
    assert main(["transcribe", str(wav), "--model", str(path)]) == 2
    assert "add-modality" in capsys.readouterr().err


def test_add_modality_gives_a_model_speech(pipe, speech_pipe, tmp_path) -> None:
    codec = speech_pipe.speech_tokenizer
    grown = add_modality(pipe, "speech", codec)
    v = grown.vocab
    assert v.has_speech and v.size == pipe.vocab.size + 4 * 32  # the markers are in the tokenizer already
    assert grown.model.config.vocab_size == v.size and grown.speech_tokenizer is codec
    old = pipe.model.tok_embeddings.weight
    assert torch_equal(grown.model.tok_embeddings.weight[: old.shape[0]], old)
    with pytest.raises(ValueError, match="needs its codec"):
        add_modality(pipe, "speech")
    with pytest.raises(ValueError, match="already has"):
        add_modality(grown, "speech", codec)
    codec_dir = tmp_path / "codec"
    codec.save_pretrained(codec_dir)
    base = tmp_path / "base"
    pipe.save_pretrained(base)
    assert main(["add-modality", str(base), str(tmp_path / "out"), "--modality", "speech", "--codec",
                 str(codec_dir)]) == 0
    assert Pipeline.from_pretrained(tmp_path / "out").vocab.has_speech


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_pretokenize_hears_content_and_learns_every_level(speech_pipe, pipe, wav, tmp_path) -> None:
    data = tmp_path / "speech.jsonl"
    rel = wav.name
    (tmp_path / rel).write_bytes(wav.read_bytes())
    lines = [{"messages": [{"role": "user", "content": [{"type": "speech", "path": rel},
                                                        {"type": "text", "text": "Transcribe the speech."}]},
                           {"role": "assistant", "content": "a red circle"}]},
             {"messages": [{"role": "user", "content": "Say: a red circle"},
                           {"role": "assistant", "content": [{"type": "speech", "path": rel}]}]}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = pretokenize(data, speech_pipe, tmp_path / "shards", progress=False)
    assert summary["documents"] == 2 and summary["speech_seconds"] == pytest.approx(2.0)
    ids = pq.read_table(tmp_path / "shards" / "shard-00000.parquet").column("ids").to_pylist()
    heard, said = (speech_pipe.format.decode(x).speech[0] for x in ids)
    assert heard.levels == 1 and said.levels == 4 and heard == said.content
    both = pretokenize(data, speech_pipe, tmp_path / "all", progress=False, speech_inputs="all")
    assert both["documents"] == 2
    ids = pq.read_table(tmp_path / "all" / "shard-00000.parquet").column("ids").to_pylist()
    assert speech_pipe.format.decode(ids[0]).speech[0].levels == 4
    with pytest.raises(DataError, match="speech.jsonl:1: a speech part"):
        pretokenize(data, pipe, tmp_path / "refused", progress=False, on_error="skip")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"parts": [{"type": "speech", "path": "nowhere.wav"}]}) + "\n")
    with pytest.raises(DataError, match="nowhere.wav does not exist"):
        pretokenize(bad, speech_pipe, tmp_path / "bad", progress=False)


def test_random_pipelines_can_have_either_speech_layout() -> None:
    p = random_pipeline(seed=3, hidden_size=32, num_layers=1, codebook_size=16, image_size=32, speech=(2, 8),
                        speech_layout="interleaved")
    assert p.format.speech_layout == "interleaved" and p.engine.generate([p.speech_request("x", seed=0,
                                                                                           max_seconds=0.4)])


def test_the_demo_speaks_and_hears_for_a_model_that_has_speech(model_dir, tmp_path) -> None:
    from tokenloom.world.speech import espeak_available

    assert main(["demo", "--model", str(model_dir), "--out", str(tmp_path), "--max-new-tokens", "20"]) == 0
    page = (tmp_path / "index.md").read_text()
    assert "Say: a small red circle at the top left" in page
    said = read_audio(tmp_path / "speech_000.wav", 16000)
    assert said.size > 0  # the model's own utterance, decoded by its codec
    if espeak_available():  # the utterance it heard, and what it wrote down
        assert "Transcribe the speech." in page and (tmp_path / "speech_001.wav").exists()
