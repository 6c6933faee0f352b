"""Reading and writing audio: mono float32 samples in [-1, 1] at 16 kHz, the rate speech is tokenised at.

Files are read through soundfile (libsndfile), so any format it reads works: WAV, FLAC, OGG/Vorbis,
AIFF... Every file becomes the same thing:

- several channels (stereo, 5.1...) are mixed down to their mean;
- any sample format (8-bit unsigned, 16/24/32-bit integer, float) becomes float32 in [-1, 1]
  (soundfile scales integers by their full range; float samples beyond [-1, 1] are clipped);
- a file at another sample rate is resampled with `scipy.signal.resample_poly`, by the rational
  factor up/down that the two rates reduce to.

A file is refused (AudioLoadError, naming the file) when it is not audio, holds no samples, is
silent (peak below SILENCE_PEAK: nothing to hear, most likely a broken recording), is longer than
`max_seconds`, or has a sample rate below MIN_SAMPLE_RATE (no speech survives it).

Files are written as 16-bit PCM WAV. Samples are quantised to steps of 1/32768 (int16 / 32768, what
soundfile reads back), so samples already on those steps survive a write and read exactly.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 4000  # below this, even telephone speech (300-3400 Hz) has no band left
SILENCE_PEAK = 1e-4  # about 3 steps of 16-bit audio: a file whose peak stays below holds nothing to hear
DEFAULT_MAX_SECONDS = 60.0
MAX_CHANNELS = 64  # an in-memory array's channel axis must be at most this long
_PCM16_SCALE = 32768.0  # int16 / 32768 is how soundfile reads 16-bit PCM as float

AudioSource = str | os.PathLike | BinaryIO


class AudioLoadError(ValueError):
    """Audio that cannot be used: not audio, empty, silent, too long, too low a rate, malformed samples."""


# ----------------------------------------------------------------------------- in-memory samples


def check_samples(samples, what: str = "audio") -> np.ndarray:
    """Validate in-memory samples and return them as float32 mono in [-1, 1].

    Accepted layouts: 1-D (mono), or 2-D with channels along the shorter axis, either [channels, n]
    or [n, channels] (the channel axis must be at most MAX_CHANNELS long and strictly shorter than
    the other), mixed down to their mean. Floats are taken as they are (clipped to [-1, 1]);
    integer arrays are scaled by their type's full range (int16 / 32768; uint8 is offset by 128 as
    in 8-bit WAV). `what` names the samples in error messages."""
    array = np.asarray(samples)
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.floating)
                                       or np.issubdtype(array.dtype, np.integer)):
        raise AudioLoadError(f"{what}: samples must be numbers, got dtype {array.dtype}")
    array = _as_float(array)
    if array.ndim == 2:
        array = _mix_down(array, what)
    elif array.ndim != 1:
        raise AudioLoadError(f"{what}: samples must be 1-D or 2-D (channels x samples), got shape {array.shape}")
    if array.size == 0:
        raise AudioLoadError(f"{what}: no samples")
    if not np.isfinite(array).all():
        raise AudioLoadError(f"{what}: samples hold NaN or infinity")
    return np.clip(array, -1.0, 1.0).astype(np.float32, copy=False)


def _as_float(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    info = np.iinfo(array.dtype)
    if info.min == 0:  # unsigned: silence is the middle of the range
        middle = (info.max + 1) / 2
        return ((array.astype(np.float64) - middle) / middle).astype(np.float32)
    return (array.astype(np.float64) / -float(info.min)).astype(np.float32)


def _mix_down(array: np.ndarray, what: str) -> np.ndarray:
    """The mean of the channels of a 2-D array; the channel axis is the shorter one."""
    rows, cols = array.shape
    if rows == cols or min(rows, cols) > MAX_CHANNELS:
        raise AudioLoadError(f"{what}: cannot tell channels from samples in shape {array.shape}; pass "
                             f"[channels, n] or [n, channels] with at most {MAX_CHANNELS} channels and more samples")
    return array.mean(axis=0 if rows < cols else 1, dtype=np.float64).astype(np.float32)


def quantize_16bit(samples) -> np.ndarray:
    """Samples rounded to the 16-bit PCM grid (int16 / 32768): exactly what a written WAV reads back as."""
    return (to_pcm16(check_samples(samples)).astype(np.float32) / np.float32(_PCM16_SCALE))


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] as int16 PCM (x 32768, rounded)."""
    # +1.0 has no int16 (32768 > 32767): it is clipped to the largest step below it
    return np.clip(np.round(samples.astype(np.float64) * _PCM16_SCALE), -32768, 32767).astype(np.int16)


def _check_rates(from_rate, to_rate) -> None:
    for name, rate in (("from_rate", from_rate), ("to_rate", to_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"resample: {name} must be a positive whole number of Hz, got {rate!r}")


def resample(samples, from_rate: int, to_rate: int) -> np.ndarray:
    """Samples at `from_rate` Hz resampled to `to_rate` Hz (polyphase filter, scipy.signal.resample_poly,
    by the factor the rates reduce to, e.g. 22050 -> 16000 is up 320, down 441). The length becomes
    ceil(n * to_rate / from_rate). float32 mono."""
    _check_rates(from_rate, to_rate)
    samples = check_samples(samples)
    if from_rate == to_rate:
        return samples
    from scipy.signal import resample_poly  # here, not at the top: importing scipy.signal takes about a second

    common = math.gcd(int(from_rate), int(to_rate))
    out = resample_poly(samples.astype(np.float64), int(to_rate) // common, int(from_rate) // common)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


class StreamResampler:
    """`resample` chunk by chunk, as streamed audio arrives: the pieces, concatenated, equal `resample`
    of the whole (to float rounding). Resampling each chunk alone would zero-pad both its edges, a dip
    at every seam. Each push resamples from `MARGIN` input samples before the first output it has not
    given yet (far beyond the polyphase filter's reach of about 10 input samples) and holds back the
    outputs the next samples still change; `final=True` gives the rest."""

    MARGIN = 64

    def __init__(self, from_rate: int, to_rate: int):
        _check_rates(from_rate, to_rate)
        common = math.gcd(int(from_rate), int(to_rate))
        self.from_rate, self.to_rate = int(from_rate), int(to_rate)
        self.up, self.down = self.to_rate // common, self.from_rate // common
        self.kept = np.zeros(0, np.float32)  # input from sample `base` on
        self.base = 0
        self.given = 0  # outputs given so far

    def push(self, samples, final: bool = False) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        self.kept = np.concatenate([self.kept, samples.reshape(-1)])
        n = self.base + self.kept.size  # input samples so far
        settled = -(-n * self.up // self.down) if final else max(0, (n - self.MARGIN) * self.up // self.down)
        if settled <= self.given:
            return np.zeros(0, np.float32)
        start = max(0, self.given * self.down // self.up - self.MARGIN)
        start -= start % self.down  # an input sample on which an output falls exactly
        offset = start * self.up // self.down
        self.kept, self.base = self.kept[start - self.base:], start  # what later pushes may still need
        piece = resample(self.kept, self.from_rate, self.to_rate)[self.given - offset:settled - offset]
        self.given = settled
        return piece


# ----------------------------------------------------------------------------- reading


def read_audio(path_or_file: AudioSource, sample_rate: int = SAMPLE_RATE, *,
               max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """An audio file (a path or an open binary file) as float32 mono in [-1, 1] at `sample_rate` Hz.

    See the module docstring for the conversions and for what is refused (AudioLoadError)."""
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        if not path.exists():
            raise AudioLoadError(f"cannot read audio {path}: file not found")
        if not path.is_file():
            raise AudioLoadError(f"cannot read audio {path}: not a regular file")
        return _read(path, str(path), sample_rate, max_seconds)
    name = str(getattr(path_or_file, "name", "<audio file object>"))
    return _read(path_or_file, name, sample_rate, max_seconds)


def read_audio_bytes(data: bytes, sample_rate: int = SAMPLE_RATE, *, max_seconds: float = DEFAULT_MAX_SECONDS,
                     name: str = "<audio bytes>") -> np.ndarray:
    """`read_audio` for the bytes of an audio file (e.g. a base64-decoded upload); `name` is what
    error messages call it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioLoadError(f"cannot read audio {name}: expected bytes, got {type(data).__name__}")
    return _read(io.BytesIO(bytes(data)), name, sample_rate, max_seconds)


def _read(source, name: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    try:
        with sf.SoundFile(source) as f:
            rate = f.samplerate
            _check_header(name, rate, f.frames, max_seconds)
            # at most one frame past the limit: a header that understates the length cannot make us read more
            frames = f.read(frames=int(max_seconds * rate) + 1, dtype="float32", always_2d=True)
    except AudioLoadError:
        raise
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioLoadError(f"cannot read audio {name}: not an audio file soundfile can read ({e})") from e
    if len(frames) > max_seconds * rate:
        raise AudioLoadError(f"cannot read audio {name}: longer than the limit of {max_seconds:g} s")
    return _finish(frames, rate, name, sample_rate)


def _check_header(name: str, rate: int, n_frames: int, max_seconds: float) -> None:
    """What the header alone tells: the rate, the length, emptiness; checked before any sample is read."""
    if rate < MIN_SAMPLE_RATE:
        raise AudioLoadError(f"cannot read audio {name}: its sample rate {rate} Hz is below the minimum "
                             f"{MIN_SAMPLE_RATE} Hz")
    if n_frames <= 0:
        raise AudioLoadError(f"cannot read audio {name}: the file is empty (0 samples)")
    seconds = n_frames / rate
    if seconds > max_seconds:
        raise AudioLoadError(f"cannot read audio {name}: it is {seconds:.1f} s long, longer than the limit "
                             f"of {max_seconds:g} s")


def _finish(frames: np.ndarray, rate: int, name: str, sample_rate: int) -> np.ndarray:
    """[n, channels] float frames -> mono, checked for silence, resampled to sample_rate."""
    if len(frames) == 0:
        raise AudioLoadError(f"cannot read audio {name}: the file is empty (0 samples)")
    mono = frames.mean(axis=1, dtype=np.float64).astype(np.float32)
    if not np.isfinite(mono).all():
        raise AudioLoadError(f"cannot read audio {name}: samples hold NaN or infinity")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise AudioLoadError(f"cannot read audio {name}: it is silent (peak {peak:.2g}, below {SILENCE_PEAK:g}): "
                             "nothing to hear")
    return resample(np.clip(mono, -1.0, 1.0), rate, sample_rate)


# ----------------------------------------------------------------------------- writing


def audio_bytes(samples, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit PCM WAV file in memory (for an HTML `<audio>` data URI or an HTTP response)."""
    buffer = io.BytesIO()
    _write_wav(buffer, samples, sample_rate)
    return buffer.getvalue()


def write_audio(path: str | os.PathLike, samples, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write samples as a 16-bit PCM WAV file. Atomic: written to a temporary file in the same folder,
    then renamed over `path`, so a reader never sees half a file. Returns the path."""
    path = Path(path)
    samples = check_samples(samples, what=str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_wav(f, samples, sample_rate)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_wav(file: BinaryIO, samples, sample_rate: int) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    pcm = to_pcm16(check_samples(samples))
    sf.write(file, pcm, int(sample_rate), format="WAV", subtype="PCM_16")


@dataclass(frozen=True, eq=False)
class Audio:
    """Samples with their rate: what the pipeline speaks and hears (the PIL image of speech). `samples` is
    float32 mono in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", check_samples(self.samples) if len(np.asarray(self.samples))
                           else np.zeros(0, np.float32))
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, np.integer)) or \
                self.sample_rate < MIN_SAMPLE_RATE:
            raise ValueError(f"sample_rate must be a whole number of Hz >= {MIN_SAMPLE_RATE}, got {self.sample_rate!r}")

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    def at(self, sample_rate: int) -> np.ndarray:
        """The samples at another rate (resampled when it differs)."""
        if sample_rate == self.sample_rate or not len(self.samples):
            return self.samples
        return resample(self.samples, self.sample_rate, sample_rate)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a 16-bit PCM WAV file (atomically)."""
        return write_audio(path, self.samples, self.sample_rate)

    def to_bytes(self) -> bytes:
        return audio_bytes(self.samples, self.sample_rate)

    def __repr__(self) -> str:
        return f"Audio({self.seconds:.2f} s at {self.sample_rate} Hz)"
