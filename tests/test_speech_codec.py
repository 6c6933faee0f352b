"""The spectral speech codec: shapes, determinism, locality, content-only decoding, save/load, config
checks, and a tiny train-codec run on a synthetic manifest (tones whose "phonemes" name them)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from tokenloom.checkpoint import NonFiniteError
from tokenloom.cli import main as cli
from tokenloom.speech_codec import (CONFIG_NAME, WEIGHTS_NAME, SpeechCodecConfig, SpeechTokenizer, griffin_lim,
                                    log_magnitude, mel_distance, mel_filterbank)
from tokenloom.train import ConfigError, TrainError
from tokenloom.train.codec import (CodecDataConfig, CodecTrainConfig, CodecTrainer, content_alphabet, content_ids,
                                   edit_distance, evaluate_codec, load_codec_config, read_manifest, train_codec)

SR = 16000
# 2 levels of 16 codes, 32 channels: a training step takes milliseconds
TINY = SpeechCodecConfig(codebooks=2, codebook_size=16, dim=8, channels=32, res_blocks=1, griffin_lim_iters=8,
                         content_symbols=list("abcd"))
TONES = {"a": 300.0, "b": 700.0, "c": 1500.0, "d": 3100.0}  # one "phoneme" per tone
VOICES = {"low": (0.9, 0.3), "high": (1.15, 0.15)}  # frequency scale, amplitude


def utterance(symbols: str, voice: str, seconds_per_symbol: float = 0.12) -> np.ndarray:
    """A tone per symbol (with one overtone), short silences around: a toy 'utterance'."""
    scale, amplitude = VOICES[voice]
    n = int(seconds_per_symbol * SR)
    t = np.arange(n) / SR
    pieces = [np.zeros(800, np.float32)]
    for s in symbols:
        f = TONES[s] * scale
        pieces.append(amplitude * (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)) * np.hanning(n))
    pieces.append(np.zeros(800, np.float32))
    return np.concatenate(pieces).astype(np.float32)


def write_corpus(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "wav").mkdir(parents=True)
    lines = []
    for i in range(n):
        symbols = "".join(rng.choice(list(TONES), size=int(rng.integers(3, 6))))
        voice = ["low", "high"][i % 2]
        soundfile.write(folder / "wav" / f"{i:03d}.wav", utterance(symbols, voice), SR, subtype="PCM_16")
        # a space between "words", which is no CTC target
        lines.append({"audio": f"wav/{i:03d}.wav", "text": symbols, "voice": voice, "pitch": 35 + 30 * (i % 2) + i,
                      "phonemes": symbols[:2] + " " + symbols[2:]})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "manifest.jsonl"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    return write_corpus(root / "train", 12, 0), write_corpus(root / "eval", 4, 1)


@pytest.fixture(scope="module")
def tok():
    return SpeechTokenizer.random(TINY, seed=0)


# ----------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("seconds", [0.5, 1.0, 1.23, 1 / SR])
def test_encode_decode_shapes(tok, seconds):
    samples = np.random.default_rng(0).standard_normal(round(seconds * SR)).astype(np.float32) * 0.1
    codes = tok.encode(samples)
    t = math.ceil(round(seconds * SR) * TINY.frame_rate / SR)
    assert codes.shape == (TINY.codebooks, t) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < TINY.codebook_size
    wave = tok.decode(codes)
    assert wave.shape == (t * SR // TINY.frame_rate,) and wave.dtype == np.float32
    log_mag = tok.codec.decode_magnitude(torch.from_numpy(codes)[None])
    assert log_mag.shape == (1, TINY.n_fft // 2 + 1, t * TINY.downsample)


def test_encode_and_decode_are_deterministic(tok):
    samples = utterance("abcd", "low")
    codes = tok.encode(samples)
    assert np.array_equal(codes, tok.encode(samples.copy()))
    assert np.array_equal(tok.decode(codes), tok.decode(codes))
    # the same weights from the same seed give the same codes
    assert np.array_equal(SpeechTokenizer.random(TINY, seed=0).encode(samples), codes)
    assert not np.array_equal(SpeechTokenizer.random(TINY, seed=1).encode(samples), codes)


def test_content_only_decoding_and_bad_codes(tok):
    codes = tok.encode(utterance("abc", "high"))
    content = tok.decode(codes[:1])  # level 0 only: the others count as zero vectors
    assert content.shape == tok.decode(codes).shape and np.isfinite(content).all()
    assert not np.array_equal(content, tok.decode(codes))
    with pytest.raises(ValueError, match=r"1 <= K' <= 2"):
        tok.decode(np.zeros((3, 5), np.int64))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        tok.decode(np.full((1, 5), 16))
    with pytest.raises(ValueError, match="expected codes \\[K',T\\]"):
        tok.decode(np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="mono samples"):
        tok.encode(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="floating point"):
        tok.encode(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="8000 Hz.*16000 Hz"):
        tok.encode(np.zeros(100, np.float32), sample_rate=8000)


def test_codes_depend_on_nearby_audio_only(tok):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(3 * SR).astype(np.float32) * 0.1
    b = a.copy()
    b[2 * SR:] = rng.standard_normal(SR) * 0.3  # the last second changes
    ca, cb = tok.encode(a), tok.encode(b)
    reach = math.ceil(TINY.receptive_field_seconds * TINY.frame_rate)
    first_changed = 2 * TINY.frame_rate - reach  # frames that far before the change keep their codes
    assert np.array_equal(ca[:, :first_changed], cb[:, :first_changed])
    assert not np.array_equal(ca[:, 2 * TINY.frame_rate:], cb[:, 2 * TINY.frame_rate:])
    assert TINY.receptive_field_seconds < 0.5


def test_save_and_load_give_identical_codes(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == TINY
    samples = utterance("dcba", "low")
    assert np.array_equal(loaded.encode(samples), tok.encode(samples))
    assert np.array_equal(loaded.decode(tok.encode(samples)), tok.decode(tok.encode(samples)))
    bad = SpeechTokenizer.random(TINY, seed=2)
    with torch.no_grad():
        bad.codec.decoder.conv_in.weight[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="decoder.conv_in.weight"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_damaged_tokenizer_directory_is_a_clear_error(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    weights = tmp_path / "tok" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: not a readable safetensors file"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"speech tokenizer file not found: .*{WEIGHTS_NAME}"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: not a speech codec config"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / CONFIG_NAME).write_text(json.dumps({**TINY.to_dict(), "frame_rate": 30}))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: not a speech codec config \(frame_rate 30"):
        SpeechTokenizer.from_pretrained(tmp_path / "tok")
    # weights of another shape
    SpeechTokenizer.random(SpeechCodecConfig(**{**TINY.to_dict(), "dim": 4})).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / CONFIG_NAME).write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: does not match .*{CONFIG_NAME}"):
        SpeechTokenizer.from_pretrained(tmp_path / "other")


def test_config_checks_and_bitrate():
    assert SpeechCodecConfig().bits_per_second == 25 * 4 * 8
    assert TINY.bits_per_second == 25 * 2 * 4
    assert SpeechCodecConfig().downsample == 4 and SpeechCodecConfig().samples_per_frame == 640
    with pytest.raises(ValueError, match="frame_rate 30 does not divide"):
        SpeechCodecConfig(frame_rate=30)
    with pytest.raises(ValueError, match="frame_rate 40 does not divide"):
        SpeechCodecConfig(frame_rate=40)  # 400 samples a frame: 2.5 hops
    assert SpeechCodecConfig(frame_rate=50).downsample == 2
    with pytest.raises(ValueError, match=r"unknown SpeechCodecConfig keys: \['codebook'\]"):
        SpeechCodecConfig.from_dict({"codebook": 4})
    with pytest.raises(ValueError, match="content_symbols must be single non-space characters"):
        SpeechCodecConfig(content_symbols=["ab"])
    with pytest.raises(ValueError, match="content_symbols holds duplicates"):
        SpeechCodecConfig(content_symbols=["a", "a"])
    with pytest.raises(ValueError, match="codebook_size must be an integer >= 2"):
        SpeechCodecConfig(codebook_size=1)
    assert SpeechCodecConfig.from_dict(TINY.to_dict()) == TINY


def test_features_mel_distance_and_griffin_lim():
    fb = mel_filterbank(SR, 512, 80)
    assert fb.shape == (80, 257) and (fb.sum(dim=1) > 0).all() and fb.max() <= 1.0
    wave = utterance("abcd", "low")
    assert mel_distance(wave, wave) == 0.0
    noisy = wave + np.random.default_rng(0).standard_normal(len(wave)).astype(np.float32) * 0.05
    assert mel_distance(wave, noisy) > 1.0
    # Griffin-Lim from the true magnitude gets the sound back (phase aside): a small mel distance
    config = SpeechCodecConfig()
    x = torch.from_numpy(wave[: len(wave) // 160 * 160])[None]
    rebuilt = griffin_lim(log_magnitude(x, config), config, iters=32)
    assert rebuilt.shape == x.shape
    assert mel_distance(x, rebuilt) < 2.0 < mel_distance(x, torch.zeros_like(x) + 1e-3)
    assert torch.equal(rebuilt, griffin_lim(log_magnitude(x, config), config, iters=32))  # seeded phase


# ----------------------------------------------------------------------------- training


def test_manifest_alphabet_and_targets(corpus, tmp_path):
    utterances = read_manifest(corpus[0])
    assert len(utterances) == 12 and all(0.3 < u.seconds < 1.0 for u in utterances)
    assert content_alphabet(utterances) == ["a", "b", "c", "d"]
    assert content_ids("ab c?", ["a", "b", "c"]) == ([1, 2, 3], 1)
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], [1, 2]) == 2
    bad = tmp_path / "manifest.jsonl"
    bad.write_text('{"audio": "wav/000.wav", "phonemes": "ab"}\n{"audio": 3}\n')
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: cannot read the audio file"):
        read_manifest(bad)
    (tmp_path / "wav").mkdir()
    soundfile.write(tmp_path / "wav" / "000.wav", np.zeros(800), SR)
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: expected an object with string 'audio' and 'phonemes'"):
        read_manifest(bad)


def tiny_train(**kw):
    opts = dict(steps=30, batch_size=4, lr=3e-3, seed=0, warmup_steps=2, restart_every=5, eval_every=0,
                log_every=1, checkpoint_every=1000, progress=False, ctc_weight=0.5)
    opts.update(kw)
    return CodecTrainConfig(**opts)


def test_a_few_steps_lower_the_loss(corpus):
    utterances = read_manifest(corpus[0])
    trainer = CodecTrainer(TINY, tiny_train(), utterances, read_manifest(corpus[1]))
    fixed = trainer.batch(10_000)  # a batch of a step the run never reaches

    def loss():
        trainer.model.eval()
        with torch.no_grad():
            return trainer.losses(fixed)[0]

    before = loss()
    for _ in range(30):
        m = trainer.step()
    after = loss()
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["mel"] < before["mel"] and after["ctc"] < before["ctc"]
    assert len(m["usage"]) == TINY.codebooks and m["step"] == 30
    ev = trainer.evaluate(audio=1)
    assert {"mel_db", "mel_db_content", "audio_mel_db", "per", "usage", "perplexity"} <= set(ev)
    assert ev["bits_per_second"] == TINY.bits_per_second and ev["n"] == 4 and 0 <= ev["per"]
    assert ev == evaluate_codec(trainer.model, trainer.eval_set, audio=1)  # evaluation is deterministic


KW = dict(batch_size=4, lr=3e-3, warmup_steps=2, restart_every=3, eval_every=3, eval_utterances=2, eval_audio=1,
          log_every=1, checkpoint_every=2, progress=False)


def train_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_train_codec_resumes_exactly(corpus, tmp_path):
    data = CodecDataConfig(train=[str(corpus[0])], eval=str(corpus[1]))
    model = SpeechCodecConfig(**{**TINY.to_dict(), "content_symbols": []})  # built from the manifest
    train_codec(model, data, tmp_path / "a", steps=6, **KW)
    train_codec(model, data, tmp_path / "b", steps=6, max_steps=3, **KW)
    assert [s for s, _ in train_losses(tmp_path / "b")] == [1, 2, 3]
    tok = train_codec(model, data, tmp_path / "b", steps=6, **KW)  # resumes from step 3
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert tok.config.content_symbols == ["a", "b", "c", "d"]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["finished"] and summary["best"]["step"] in (3, 6) and summary["bits_per_second"] == 200
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "b" / "best")
    wave = utterance("abc", "low")
    assert np.array_equal(loaded.encode(wave), SpeechTokenizer.from_pretrained(tmp_path / "a" / "best").encode(wave))
    assert (tmp_path / "b" / "loss.png").exists()
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train_codec(model, data, tmp_path / "b", steps=6, resume=False, **KW)
    with pytest.raises(TrainError, match="train lr was 0.003, now 0.001"):
        train_codec(model, data, tmp_path / "b", steps=6, **{**KW, "lr": 1e-3})


def test_the_voice_adversary_learns_the_voice_and_pushes_the_encoder_to_confusion(corpus):
    """Two players in one backward pass: the voice head learns from codebook 0 detached (its gradient does
    not depend on voice_weight), the encoder only from the confusion term, times voice_weight (none at 0),
    and confusion is least when the head's answer is uniform."""
    config = SpeechCodecConfig(**{**TINY.to_dict(), "voice_labels": ["high", "low"]})
    trainer = CodecTrainer(config, tiny_train(voice_weight=0.5), read_manifest(corpus[0]))
    assert trainer.voices == [1, 0] * 6  # "low", "high", ... by index in voice_labels
    batch = trainer.batch(0)
    model = trainer.model
    z = model.latents(model.features(batch.samples))
    codes, vectors, _ = model.quantize(z)
    from tokenloom.train.codec import _frame_mask

    mask = _frame_mask(batch.frames, z.shape[-1])
    grads, outs = {}, {}
    for weight in (0.5, 0.0):
        model.zero_grad()
        out = trainer._voice_losses(z + (vectors[0] - z).detach(), batch, mask, weight)
        (out["voice"] + out["pitch"] + out["adversary"]).backward(retain_graph=True)
        grads[weight] = [torch.cat([p.grad.flatten() for p in part.parameters()])
                         for part in (model.encoder, model.voice_head)]
        outs[weight] = out
    assert grads[0.0][0].abs().max() == 0 and grads[0.5][0].abs().max() > 0
    assert torch.equal(grads[0.5][1], grads[0.0][1])  # the head learns the same either way
    # the encoder's gradient is weight times the confusion's
    model.zero_grad()
    trainer._voice_losses(z + (vectors[0] - z).detach(), batch, mask, 1.0)["confusion"].backward()
    encoder = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
    assert torch.allclose(grads[0.5][0], 0.5 * encoder, atol=1e-7, rtol=1e-4)
    # confusion: cross-entropy against uniform voices plus the squared pitch, least (log 2) at a uniform answer
    assert float(outs[0.5]["confusion"].detach()) >= math.log(2) - 1e-6
    # the ramp: a tenth of the steps to full strength
    assert trainer.voice_weight_at(0) == pytest.approx(0.5 / max(1, trainer.train.steps // 10))
    assert trainer.voice_weight_at(trainer.train.steps) == 0.5
    for _ in range(3):
        m = trainer.step()
    assert {"voice", "pitch", "confusion", "voice_accuracy"} <= set(m) and 0 <= m["voice_accuracy"] <= 1


def test_the_voice_adversary_takes_its_labels_from_the_manifest(corpus, tmp_path):
    data = CodecDataConfig(train=[str(corpus[0])], eval=str(corpus[1]))
    model = SpeechCodecConfig(**{**TINY.to_dict(), "content_symbols": []})
    tok = train_codec(model, data, tmp_path / "run", steps=2, voice_weight=0.2, **KW)
    assert tok.config.voice_labels == ["high", "low"]
    loaded = SpeechTokenizer.from_pretrained(tmp_path / "run" / "best")  # the head is saved and read back
    assert loaded.config.voice_labels == ["high", "low"] and hasattr(loaded.codec, "voice_head")
    wave = utterance("abc", "low")
    assert np.array_equal(loaded.encode(wave), tok.encode(wave))
    # a codec directory written before voice_labels existed still loads (no key, no head)
    config = json.loads((tmp_path / "run" / "best" / CONFIG_NAME).read_text())
    assert SpeechCodecConfig.from_dict({k: v for k, v in config.items() if k != "voice_labels"}).voice_labels == []
    with pytest.raises(ValueError, match="not in model.voice_labels"):
        CodecTrainer(SpeechCodecConfig(**{**TINY.to_dict(), "voice_labels": ["low"]}), tiny_train(voice_weight=0.1),
                     read_manifest(corpus[0]))
    with pytest.raises(ValueError, match="needs model.voice_labels"):
        CodecTrainer(TINY, tiny_train(voice_weight=0.1), read_manifest(corpus[0]))
    with pytest.raises(ValueError, match="voice_labels must be distinct"):
        SpeechCodecConfig(voice_labels=["a", "a"])
    unvoiced = tmp_path / "unvoiced"
    unvoiced.mkdir()
    lines = [json.loads(x) for x in corpus[0].read_text().splitlines()]
    (unvoiced / "manifest.jsonl").write_text("".join(json.dumps({**x, "audio": str(corpus[0].parent / x["audio"]),
                                                                 "voice": "" if i == 3 else x["voice"]}) + "\n"
                                                     for i, x in enumerate(lines)))
    with pytest.raises(ValueError, match=r"manifest.jsonl:4: train.voice_weight > 0 needs a 'voice'"):
        train_codec(model, CodecDataConfig(train=[str(unvoiced / "manifest.jsonl")], eval=str(corpus[1])),
                    tmp_path / "bad", steps=2, voice_weight=0.2, **KW)


def test_the_cli_trains_and_bad_configs_exit_2(corpus, tmp_path, capsys):
    config = tmp_path / "codec.yaml"
    config.write_text(f"""model:
  codebooks: 2
  codebook_size: 16
  dim: 8
  channels: 32
  res_blocks: 1
  griffin_lim_iters: 4
data:
  train: [{corpus[0]}]
  eval: {corpus[1]}
train:
  steps: 2
  batch_size: 2
  eval_every: 2
  eval_utterances: 2
  eval_audio: 1
  progress: false
""")
    assert load_codec_config(config).data.train == [str(corpus[0])]
    assert cli(["train-codec", str(config), "--out", str(tmp_path / "run"), "--eval-audio", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finished"] and result["final_eval"]["n"] == 4
    assert (tmp_path / "run" / "final_eval.json").exists() and (tmp_path / "run" / "best" / WEIGHTS_NAME).exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("  dim: 8", "  frame_rate: 30"))
    assert cli(["train-codec", str(bad), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:4: 'model.frame_rate' 30 does not divide" in err and "Traceback" not in err
    bad.write_text(config.read_text().replace("  steps: 2", "  step: 2"))
    assert cli(["train-codec", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "bad.yaml:12: unknown key 'train.step'" in capsys.readouterr().err
    bad.write_text("model: {}\ndata:\n  train: []\n")
    with pytest.raises(ConfigError, match="'data.train' needs at least one manifest"):
        load_codec_config(bad)
    bad.write_text("model: {}\ndata:\n  train: [x.jsonl]\n")
    with pytest.raises(ConfigError, match="bad.yaml: 'train.eval_every' needs 'data.eval'"):
        load_codec_config(bad)


def test_the_stream_decoder_is_the_whole_decode_in_one_push_and_keeps_length_in_chunks(speech_pipe) -> None:
    from tokenloom.speech_stream import StreamDecoder

    tok = speech_pipe.speech_tokenizer
    spf = tok.config.samples_per_frame
    codes = np.random.default_rng(70).integers(0, tok.config.codebook_size, (tok.config.codebooks, 23))
    assert np.array_equal(StreamDecoder(tok).push(codes, final=True), tok.decode(codes))
    stream = StreamDecoder(tok, context=4, overlap=2)
    pieces = [stream.push(codes[:, k:k + 5]) for k in range(0, 20, 5)] + [stream.push(codes[:, 20:], final=True)]
    assert [p.size // spf for p in pieces] == [3, 5, 5, 5, 5]  # each holds back 2 frames; the last has them
    # no context and no overlap: each chunk decoded alone
    alone = StreamDecoder(tok, context=0, overlap=0)
    assert np.array_equal(alone.push(codes[:, :5]), tok.decode(codes[:, :5]))
    assert np.array_equal(alone.push(codes[:, 5:9], final=True), tok.decode(codes[:, 5:9]))
    # a frameless final push flushes what was held back; nothing comes after the end
    held = StreamDecoder(tok, overlap=2)
    assert held.push(codes[:, :6]).size == 4 * spf and held.push(codes[:, :0], final=True).size == 2 * spf
    with pytest.raises(ValueError, match="finished"):
        held.push(codes[:, :1])
