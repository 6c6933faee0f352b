"""Audio in and out (tokenloom.audio_io): WAV round trips, resampling, channel and sample-format
conversions, and a clear AudioLoadError for every kind of unusable file."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from tokenloom.audio_io import (SAMPLE_RATE, AudioLoadError, audio_bytes, check_samples, quantize_16bit,
                                read_audio, read_audio_bytes, resample, write_audio)


def sine(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def wav_header(rate: int, n_samples: int, bits: int = 16) -> bytes:
    """A mono PCM WAV header announcing n_samples: lets a test make a huge file without writing its data."""
    block = bits // 8
    data_size = n_samples * block
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_size))


# ----------------------------------------------------------------------------- round trips


def test_write_read_round_trip_is_exact_on_the_16_bit_grid(tmp_path):
    rng = np.random.default_rng(0)
    samples = rng.integers(-32768, 32768, size=4000).astype(np.float32) / 32768
    path = write_audio(tmp_path / "x.wav", samples)
    assert sf.info(str(path)).subtype == "PCM_16"
    back = read_audio(path)
    assert back.dtype == np.float32 and back.shape == samples.shape
    np.testing.assert_array_equal(back, samples)
    # samples off the grid come back within half a step
    smooth = sine(300, 0.25, SAMPLE_RATE, 0.9)
    np.testing.assert_allclose(read_audio(write_audio(tmp_path / "y.wav", smooth)), smooth, atol=0.5 / 32768 + 1e-9)
    np.testing.assert_array_equal(quantize_16bit(smooth), read_audio(tmp_path / "y.wav"))


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    write_audio(tmp_path / "x.wav", sine(440, 0.1, SAMPLE_RATE))
    write_audio(tmp_path / "x.wav", sine(880, 0.1, SAMPLE_RATE))  # replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]
    assert abs(peak_frequency(read_audio(tmp_path / "x.wav"), SAMPLE_RATE) - 880) < 15


def test_audio_bytes_is_a_wav_file_that_reads_back():
    samples = quantize_16bit(sine(440, 0.2, SAMPLE_RATE))
    data = audio_bytes(samples)
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    np.testing.assert_array_equal(read_audio_bytes(data), samples)
    np.testing.assert_array_equal(read_audio(io.BytesIO(data)), samples)  # an open file works too


def test_resampling_keeps_frequency_and_length_ratio(tmp_path):
    original = sine(440, 1.0, 22050)
    out = resample(original, 22050, 16000)
    assert out.dtype == np.float32
    assert len(out) == int(np.ceil(len(original) * 16000 / 22050))
    assert abs(peak_frequency(out, 16000) - 440) < 2
    # a file at 22050 Hz is resampled on reading
    sf.write(str(tmp_path / "s.wav"), original, 22050, subtype="PCM_16")
    read = read_audio(tmp_path / "s.wav")
    assert len(read) == len(out) and abs(peak_frequency(read, 16000) - 440) < 2


def test_stereo_is_mixed_down_to_the_mean(tmp_path):
    left, right = sine(440, 0.2, SAMPLE_RATE, 0.4), sine(440, 0.2, SAMPLE_RATE, 0.2)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(read_audio(tmp_path / "st.wav"), (left + right) / 2, atol=1e-6)


def test_8_bit_and_flac_files_read_as_float(tmp_path):
    samples = sine(440, 0.2, SAMPLE_RATE, 0.5)
    sf.write(str(tmp_path / "u8.wav"), samples, SAMPLE_RATE, subtype="PCM_U8")
    np.testing.assert_allclose(read_audio(tmp_path / "u8.wav"), samples, atol=1 / 128 + 1e-6)
    sf.write(str(tmp_path / "x.flac"), samples, SAMPLE_RATE, subtype="PCM_24")
    np.testing.assert_allclose(read_audio(tmp_path / "x.flac"), samples, atol=1e-6)


def test_check_samples_layouts():
    mono = sine(440, 0.1, SAMPLE_RATE)
    np.testing.assert_allclose(check_samples(np.stack([mono, mono])), mono)  # [channels, n]
    np.testing.assert_allclose(check_samples(np.stack([mono, -mono], axis=1)), 0 * mono, atol=1e-7)  # [n, channels]
    np.testing.assert_allclose(check_samples(np.array([-32768, 0, 16384], np.int16)), [-1, 0, 0.5])
    assert check_samples(np.array([2.0, -3.0])).tolist() == [1.0, -1.0]  # clipped
    for bad, problem in ((np.zeros(0), "no samples"), (np.array([0.0, np.nan]), "NaN"),
                         (np.zeros((4, 4)), "cannot tell channels"), (np.zeros((2, 2, 2)), "1-D or 2-D"),
                         (np.array(["a"]), "numbers")):
        with pytest.raises(AudioLoadError, match=problem):
            check_samples(bad, what="upload")


# ----------------------------------------------------------------------------- bad files


def test_text_file_named_wav_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 10)
    with pytest.raises(AudioLoadError, match=r"notes\.wav.*not an audio file"):
        read_audio(path)
    with pytest.raises(AudioLoadError, match=r"upload\.wav.*not an audio file"):
        read_audio_bytes(b"hello", name="upload.wav")


def test_missing_file(tmp_path):
    with pytest.raises(AudioLoadError, match="file not found"):
        read_audio(tmp_path / "absent.wav")


def test_empty_wav(tmp_path):
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(AudioLoadError, match=r"empty\.wav.*empty \(0 samples\)"):
        read_audio(tmp_path / "empty.wav")


def test_silent_wav(tmp_path):
    sf.write(str(tmp_path / "zeros.wav"), np.zeros(8000, np.float32), SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(AudioLoadError, match=r"zeros\.wav.*silent"):
        read_audio(tmp_path / "zeros.wav")


def test_too_long_wav_is_refused_from_its_header(tmp_path):
    # an hour at 4000 Hz, announced by the header; the data is a sparse hole, never written or read
    path = tmp_path / "hour.wav"
    n = 3600 * 4000
    with open(path, "wb") as f:
        header = wav_header(4000, n)
        f.write(header)
        f.truncate(len(header) + 2 * n)
    with pytest.raises(AudioLoadError, match=r"hour\.wav.*3600\.0 s long.*limit of 60 s"):
        read_audio(path)
    with pytest.raises(AudioLoadError, match="limit of 10 s"):
        read_audio(path, max_seconds=10)


def test_too_low_sample_rate(tmp_path):
    path = tmp_path / "one_hz.wav"
    path.write_bytes(wav_header(1, 10) + np.full(10, 1000, np.int16).tobytes())
    with pytest.raises(AudioLoadError, match=r"one_hz\.wav.*sample rate 1 Hz is below the minimum 4000 Hz"):
        read_audio(path)


@pytest.mark.parametrize("rates", [(16000, 24000), (22050, 16000)])
def test_a_stream_resampler_joins_its_pieces_as_the_whole_resampled(rates) -> None:
    from tokenloom.audio_io import StreamResampler

    x = (np.random.default_rng(70).standard_normal(32000) * 0.2).astype(np.float32)
    stream, pieces, k = StreamResampler(*rates), [], 0
    for n in (1920, 3200, 17, 0, 6400, 3000):  # any sizes, an empty one too
        pieces.append(stream.push(x[k:k + n]))
        k += n
    pieces.append(stream.push(x[k:], final=True))
    whole = resample(x, *rates)
    assert np.array_equal(np.concatenate(pieces), whole)
    alone = np.concatenate([resample(x[i:i + 3200], *rates) for i in range(0, x.size, 3200)])
    assert np.abs(alone[:whole.size] - whole).max() > 0.05  # each piece alone: a dip at every seam
    with pytest.raises(ValueError, match="to_rate"):
        StreamResampler(16000, 0)
