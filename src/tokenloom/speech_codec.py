"""A small spectral speech codec: 16 kHz mono audio <-> residual-VQ codes, trainable on a CPU.

MIO's SpeechTokenizer is a waveform codec (residual VQ, 8 codebooks of 1024, 50 frames/s) whose
first codebook carries content and the rest timbre. Waveform GAN codecs cannot be trained on two
CPU cores in useful time, but espeak-ng's formant speech is reconstructed well from its magnitude
spectrum, so this codec works on log-magnitude STFTs and gets the phase back with Griffin-Lim:

    samples [B,S] -> log|STFT| [B,F,T*f]          Hann window n_fft, hop_length (100 frames/s)
      -> encoder (strided Conv1d: / f, dilated residual blocks) -> z [B,dim,T]
      -> residual VQ: level k quantises what levels < k left  -> codes [B,K,T] (frame_rate per s)
    codes -> sum of the levels' vectors -> decoder (residual blocks, ConvTranspose1d: * f)
      -> log|STFT| -> Griffin-Lim -> samples [B, T * sample_rate / frame_rate]

where f = sample_rate / hop_length / frame_rate (an integer: the config checks it). A content head
reads the level-0 vectors only and is trained with CTC against the utterance's phoneme string
(train.codec): that is what makes codebook 0 carry *what is said*. It does not keep the voice out
of codebook 0 (the first level takes the largest part of the spectrum, pitch and formants
included); the later levels refine what it leaves. Decoding fewer levels (codes [B,K',T],
K' < K) counts the missing ones as zero vectors; the trainer drops trailing levels at random
(quantizer dropout), so content-only decoding (K'=1) gives a coarser but whole spectrum
(`mel_db_content` in train.codec's evaluation) rather than noise.

Everything is local in time: STFT frames and convolutions only (no norm over time, no attention),
so a code depends only on the audio within `receptive_field_seconds` of its frame, which is what
a later streaming decoder needs. Encoding pads the waveform with zeros to a whole number of code
frames: T = ceil(S * frame_rate / sample_rate).

Units: log magnitudes are natural logs of |STFT| (a full-scale sine peaks near n_fft / 4), floored
at MAG_FLOOR; `log_mel` is the natural log of an 80-band HTK mel filterbank applied to the
magnitude; `mel_distance` reports the mean absolute log-mel difference in dB (20 log10).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_save_safetensors, atomic_write_json, check_finite, load_tensors, verify_safetensors

__all__ = ["SpeechCodecConfig", "SpeechCodec", "SpeechTokenizer", "CONFIG_NAME", "WEIGHTS_NAME", "MAG_FLOOR",
           "log_magnitude", "mel_filterbank", "log_mel", "mel_distance", "griffin_lim"]

CONFIG_NAME = "speech_codec.json"
WEIGHTS_NAME = "speech_codec.safetensors"

# |STFT| floor: above 16-bit quantisation noise (about 1e-4 per bin with this window), ~100 dB
# under a full-scale tone. Below it nothing is audible, and a lower floor would spend the loss on
# reproducing the exact depth of digital silence.
MAG_FLOOR = 1e-3
# The encoder sees (log|X| - SHIFT) / SCALE, roughly zero-mean unit-range on speech: fixed numbers,
# not a learned or per-utterance normalisation, so loudness stays in the features and codes.
LOG_MAG_SHIFT, LOG_MAG_SCALE = -3.0, 3.0
DILATIONS = (1, 2, 4)  # code-rate residual blocks cycle through these
DB = 20.0 / math.log(10.0)  # natural log of a magnitude -> dB


@dataclass
class SpeechCodecConfig:
    sample_rate: int = 16000
    n_fft: int = 512  # 32 ms Hann window
    hop_length: int = 160  # 10 ms: 100 STFT frames per second
    frame_rate: int = 25  # code frames per second; sample_rate / hop_length / frame_rate must be whole
    codebooks: int = 4  # residual VQ levels; level 0 is the content level
    codebook_size: int = 256
    dim: int = 64  # size of a code vector
    channels: int = 256  # width of the encoder and decoder
    res_blocks: int = 3  # residual blocks at the code rate, in the encoder and in the decoder each
    n_mels: int = 80  # mel bands of the loss and of mel_distance
    # the alphabet of the content head's CTC targets: single characters of the phoneme strings
    # (whitespace is not a target); index 0 of the head is the CTC blank, symbol i is index i + 1
    content_symbols: list[str] = field(default_factory=list)
    content_steps: int = 2  # CTC steps per code frame (25 fps alone is tight for fast phoneme strings)
    griffin_lim_iters: int = 48
    # the training voices a voice head tells apart from codebook 0 (with each utterance's pitch), as an
    # adversary: train.codec pushes the encoder to leave that head unsure, so codebook 0 keeps what is
    # said and loses who says it (the voice goes to the timbre codebooks). Empty: no voice head.
    # Training-only, as the content head is: encoding and decoding never use it.
    voice_labels: list[str] = field(default_factory=list)

    def __post_init__(self):
        # messages start with the field's name: the config parser turns that into file:line
        for name in ("sample_rate", "n_fft", "hop_length", "frame_rate", "codebooks", "dim", "channels",
                     "n_mels", "content_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("res_blocks", "griffin_lim_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.codebook_size, bool) or not isinstance(self.codebook_size, int) or self.codebook_size < 2:
            raise ValueError(f"codebook_size must be an integer >= 2, got {self.codebook_size!r}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} must not exceed n_fft {self.n_fft} (frames would leave gaps)")
        if self.sample_rate % self.frame_rate or (self.sample_rate // self.frame_rate) % self.hop_length:
            raise ValueError(f"frame_rate {self.frame_rate} does not divide the STFT's {self.sample_rate}/"
                             f"{self.hop_length} = {self.sample_rate / self.hop_length:g} frames per second into a "
                             f"whole number of STFT frames per code (sample_rate / hop_length / frame_rate must be an "
                             f"integer)")
        if self.n_mels > self.n_freq:
            raise ValueError(f"n_mels {self.n_mels} exceeds the STFT's {self.n_freq} frequency bins")
        self.content_symbols = list(self.content_symbols)
        bad = [s for s in self.content_symbols if not isinstance(s, str) or len(s) != 1 or s.isspace()]
        if bad:
            raise ValueError(f"content_symbols must be single non-space characters, got {bad[:5]!r}")
        if len(set(self.content_symbols)) != len(self.content_symbols):
            dup = sorted({s for s in self.content_symbols if self.content_symbols.count(s) > 1})
            raise ValueError(f"content_symbols holds duplicates: {dup!r}")
        self.voice_labels = list(self.voice_labels)
        if any(not isinstance(v, str) or not v for v in self.voice_labels) or len(set(self.voice_labels)) != len(
                self.voice_labels):
            raise ValueError(f"voice_labels must be distinct non-empty strings, got {self.voice_labels[:5]!r}")

    @property
    def n_freq(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per code frame (640 at 16 kHz, 25 fps)."""
        return self.sample_rate // self.frame_rate

    @property
    def downsample(self) -> int:
        """STFT frames per code frame."""
        return self.samples_per_frame // self.hop_length

    @property
    def bits_per_second(self) -> float:
        return self.frame_rate * self.codebooks * math.log2(self.codebook_size)

    @property
    def receptive_field_seconds(self) -> float:
        """How far (each way) from a code frame's centre audio can change its code: the strided
        input conv reaches one code frame each side, the dilated blocks sum(dilations) more, and
        the STFT window half a window beyond that."""
        reach = 1 + sum(DILATIONS[i % len(DILATIONS)] for i in range(self.res_blocks))
        return (reach * self.samples_per_frame + self.n_fft // 2) / self.sample_rate

    def frames_for(self, samples: int) -> int:
        """Code frames T of an utterance of `samples` samples: ceil(samples / samples_per_frame)."""
        return -(-int(samples) // self.samples_per_frame)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeechCodecConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SpeechCodecConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**d)


# ----------------------------------------------------------------------------- features


def _window(config: SpeechCodecConfig, like: torch.Tensor) -> torch.Tensor:
    return torch.hann_window(config.n_fft, device=like.device, dtype=like.dtype)


def pad_to_frames(samples: torch.Tensor, config: SpeechCodecConfig) -> torch.Tensor:
    """[B,S] -> [B, T * samples_per_frame], zeros on the right (at least one frame)."""
    t = max(1, config.frames_for(samples.shape[-1]))
    return F.pad(samples, (0, t * config.samples_per_frame - samples.shape[-1]))


def log_magnitude(samples: torch.Tensor, config: SpeechCodecConfig) -> torch.Tensor:
    """Waveform [B,S] (S a multiple of hop_length) -> natural-log |STFT| [B, n_freq, S / hop_length].

    Centred frames with zero padding at the edges; the frame centred on sample S (the one past the
    end) is dropped, so T code frames are exactly T * downsample STFT frames."""
    if samples.ndim != 2:
        raise ValueError(f"expected samples [B,S], got {tuple(samples.shape)}")
    spec = torch.stft(samples.float(), config.n_fft, config.hop_length, window=_window(config, samples.float()),
                      center=True, pad_mode="constant", return_complex=True)
    return spec.abs()[..., : samples.shape[-1] // config.hop_length].clamp_min(MAG_FLOOR).log()


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """HTK-style triangular mel filters [n_mels, n_fft//2 + 1]: centres equally spaced on
    mel = 2595 log10(1 + hz / 700), each rising from its left neighbour's centre to 1 at its own
    and falling to 0 at its right neighbour's (peak 1, no area normalisation)."""
    fmax = sample_rate / 2 if fmax is None else fmax

    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    hz = 700.0 * (10.0 ** (np.linspace(mel(fmin), mel(fmax), n_mels + 2) / 2595.0) - 1.0)
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lo, centre, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rise = (freqs[None] - lo) / (centre - lo)
    fall = (hi - freqs[None]) / (hi - centre)
    return torch.from_numpy(np.maximum(0.0, np.minimum(rise, fall))).float()


def log_mel(log_mag: torch.Tensor, filterbank: torch.Tensor) -> torch.Tensor:
    """Natural-log |STFT| [B,F,N] -> natural-log mel magnitude [B, n_mels, N] (floored at MAG_FLOOR)."""
    mag = log_mag.clamp_max(math.log(1e4)).exp()  # the clamp keeps an untrained decoder's exp finite
    return torch.einsum("mf,bfn->bmn", filterbank.to(mag), mag).clamp_min(MAG_FLOOR).log()


def mel_distance(a, b, config: SpeechCodecConfig | None = None) -> float:
    """Mean absolute difference of the log-mel spectra of two waveforms ([S] or [B,S], numpy or
    torch, at config.sample_rate), in dB; the longer one is cut to the shorter's length."""
    config = config or SpeechCodecConfig()
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
            for x in (a, b))
    a, b = (x[None] if x.ndim == 1 else x for x in (a, b))
    n = min(a.shape[-1], b.shape[-1]) // config.hop_length * config.hop_length
    if n == 0:
        raise ValueError("mel_distance needs at least one STFT hop of audio in both waveforms")
    fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels)
    ma, mb = (log_mel(log_magnitude(x[..., :n], config), fb) for x in (a, b))
    return float((ma - mb).abs().mean()) * DB


def griffin_lim(log_mag: torch.Tensor, config: SpeechCodecConfig, iters: int | None = None,
                momentum: float = 0.99, seed: int = 0, initial_angles: torch.Tensor | None = None,
                return_angles: bool = False):
    """Natural-log |STFT| [B,F,N] (as log_magnitude makes) -> waveform [B, N * hop_length].

    The fast Griffin-Lim of Perraudin et al.: alternate projections between the given magnitude
    and consistent spectra, with momentum on the phase estimate. Deterministic: the initial phase
    is uniform noise from a generator seeded with `seed`, not from the global RNG; `initial_angles`
    (unit complex [B,F,N0], N0 <= N) replace it on the first N0 STFT frames (a streaming decoder
    continues the phase its previous chunk found). `return_angles`: also the final angles [B,F,N+1]."""
    iters = config.griffin_lim_iters if iters is None else iters
    mag = log_mag.float().exp()
    # the frame centred one past the end, which log_magnitude drops: repeat the last one
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)
    length = (mag.shape[-1] - 1) * config.hop_length
    window = _window(config, mag)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(mag.shape, generator=gen).to(mag.device) * (2 * math.pi)
    angles = torch.polar(torch.ones_like(mag), phase)
    if initial_angles is not None:
        given = initial_angles.shape[-1]
        if given > mag.shape[-1] - 1 or initial_angles.shape[:-1] != mag.shape[:-1]:
            raise ValueError(f"initial_angles {tuple(initial_angles.shape)} do not fit magnitudes "
                             f"{tuple(log_mag.shape)}")
        angles[..., :given] = initial_angles.to(angles)

    def istft(spec):
        return torch.istft(spec, config.n_fft, config.hop_length, window=window, center=True, length=length)

    previous = torch.zeros_like(angles)
    for _ in range(iters):
        rebuilt = torch.stft(istft(mag * angles), config.n_fft, config.hop_length, window=window, center=True,
                             pad_mode="constant", return_complex=True)
        angles = rebuilt - previous * (momentum / (1 + momentum))
        angles = angles / angles.abs().clamp_min(1e-16)
        previous = rebuilt
    wave = istft(mag * angles)
    return (wave, angles) if return_angles else wave


# ----------------------------------------------------------------------------- the model


class ResBlock(nn.Module):
    """x + 1x1(gelu(dilated k=3 conv(gelu(x)))). No activation norm: a norm over time would mix in
    the whole utterance, and a per-frame LayerNorm costs two transposes per block on a CPU (a third
    of the step); the last 1x1 starts at zero, so every block starts as the identity."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.conv(F.gelu(x))))


def _blocks(c: SpeechCodecConfig) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(c.channels, DILATIONS[i % len(DILATIONS)]) for i in range(c.res_blocks)))


class Encoder(nn.Module):
    """log|STFT| [B,F,T*f] -> z [B,dim,T]: a strided conv straight from the spectrum to the code
    rate (kernel 2f, stride f), then the dilated residual blocks there. All the width works at the
    code rate, f times fewer positions than the STFT's: that is what makes a step cheap on a CPU."""

    def __init__(self, c: SpeechCodecConfig):
        super().__init__()
        f = c.downsample
        self.pad = (f // 2, f - f // 2)  # with kernel 2f and stride f: exactly T outputs for T*f inputs
        self.conv_in = nn.Conv1d(c.n_freq, c.channels, 2 * f, stride=f)
        self.blocks = _blocks(c)
        self.conv_out = nn.Conv1d(c.channels, c.dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(F.pad(features, self.pad)))
        return self.conv_out(F.gelu(h))


class Decoder(nn.Module):
    """z_q [B,dim,T] -> log|STFT| [B,F,T*f]: the mirror of the encoder, ending in a transposed conv
    (kernel 2f, stride f) that writes f spectrum frames per code frame, overlapping its neighbours'."""

    def __init__(self, c: SpeechCodecConfig):
        super().__init__()
        self.f = c.downsample
        self.conv_in = nn.Conv1d(c.dim, c.channels, 3, padding=1)
        self.blocks = _blocks(c)
        self.conv_out = nn.ConvTranspose1d(c.channels, c.n_freq, 2 * self.f, stride=self.f)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        t = z_q.shape[-1]
        h = self.conv_out(F.gelu(self.blocks(self.conv_in(z_q))))  # (T + 1) * f frames: crop the encoder's padding
        return h[..., self.f // 2: self.f // 2 + t * self.f] * LOG_MAG_SCALE + LOG_MAG_SHIFT


class SpeechCodec(nn.Module):
    """Encoder, residual VQ (codebooks [K,N,dim], a buffer moved by the trainer's EMA), decoder and
    the content head. The codebooks are not trained by gradient: train.codec moves each code to the
    running mean of the residuals it was picked for and restarts unused ones."""

    def __init__(self, config: SpeechCodecConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.register_buffer("codebooks", torch.randn(c.codebooks, c.codebook_size, c.dim))
        self.content_head = nn.Sequential(
            nn.Conv1d(c.dim, c.channels, 3, padding=1), nn.GELU(),
            nn.Conv1d(c.channels, c.content_steps * (len(c.content_symbols) + 1), 1))
        if c.voice_labels:  # per frame: a logit per training voice, then the pitch (train.codec's voice adversary)
            self.voice_head = nn.Sequential(
                nn.Conv1d(c.dim, c.channels, 3, padding=1), nn.GELU(),
                nn.Conv1d(c.channels, len(c.voice_labels) + 1, 1))
        self.register_buffer("filterbank", mel_filterbank(c.sample_rate, c.n_fft, c.n_mels), persistent=False)

    # -- pieces (the trainer runs them one by one)

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Waveform [B,S] -> log|STFT| [B,F,T*f] of the zero-padded waveform (T = ceil(S / samples_per_frame))."""
        return log_magnitude(pad_to_frames(samples, self.config), self.config)

    def latents(self, log_mag: torch.Tensor) -> torch.Tensor:
        return self.encoder((log_mag - LOG_MAG_SHIFT) / LOG_MAG_SCALE)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """z [B,dim,T] -> (codes [B,K,T], each level's code vectors [B,dim,T], each level's input
        residual [B,dim,T]). Level k picks the code nearest (L2) to what levels < k left of z."""
        b, d, t = z.shape
        residual = z
        codes, vectors, residuals = [], [], []
        for k in range(self.config.codebooks):
            book = self.codebooks[k].float()
            flat = residual.detach().float().transpose(1, 2).reshape(-1, d)
            # ||r - e||^2 = ||r||^2 + ||e||^2 - 2 r.e; ||r||^2 is the same for every code. float32:
            # near-ties in low precision would flip codes
            idx = (book.pow(2).sum(1)[None] - 2 * flat @ book.t()).argmin(dim=1)
            q = book[idx].reshape(b, t, d).transpose(1, 2).to(z.dtype)
            codes.append(idx.reshape(b, t))
            vectors.append(q)
            residuals.append(residual)
            residual = residual - q
        return torch.stack(codes, dim=1), vectors, residuals

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,K',T], K' <= codebooks -> the sum of levels 0..K'-1's vectors [B,dim,T] (the
        missing levels count as zero vectors)."""
        self._check_codes(codes)
        out = 0
        for k in range(codes.shape[1]):
            out = out + F.embedding(codes[:, k].long(), self.codebooks[k])
        return out.transpose(1, 2)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def content_logits(self, level0: torch.Tensor) -> torch.Tensor:
        """Level-0 vectors [B,dim,T] -> CTC logits [B, T * content_steps, symbols + 1] (index 0: blank)."""
        logits = self.content_head(level0)
        b, _, t = logits.shape
        return logits.transpose(1, 2).reshape(b, t * self.config.content_steps, -1)

    # -- the public path

    def _check_samples(self, samples: torch.Tensor) -> None:
        if samples.ndim != 2 or samples.shape[-1] == 0:
            raise ValueError(f"expected samples [B,S] with S > 0, got {tuple(samples.shape)}")
        if not samples.is_floating_point():
            raise ValueError(f"samples must be floating point in [-1, 1], got {samples.dtype}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        c = self.config
        if codes.ndim != 3 or not 1 <= codes.shape[1] <= c.codebooks:
            raise ValueError(f"expected codes [B,K',T] with 1 <= K' <= {c.codebooks}, got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise ValueError(f"codes must be in [0, {c.codebook_size}); got range [{int(codes.min())}, "
                             f"{int(codes.max())}]")

    @torch.no_grad()  # codes are discrete: no gradient flows, so keep no activations
    def encode(self, samples: torch.Tensor) -> torch.Tensor:
        """samples [B,S] float in [-1,1] at sample_rate -> codes int64 [B, codebooks, ceil(S / samples_per_frame)]."""
        self._check_samples(samples)
        return self.quantize(self.latents(self.features(samples)))[0]

    @torch.no_grad()
    def decode_magnitude(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,K',T] (K' <= codebooks; missing levels are zero vectors) -> log|STFT| [B,F,T*f]."""
        return self.decode_latents(self.embed(codes)).clamp(math.log(MAG_FLOOR), math.log(1e4))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,K',T] -> waveform [B, T * samples_per_frame] (Griffin-Lim, griffin_lim_iters, seed 0)."""
        return griffin_lim(self.decode_magnitude(codes), self.config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- the tokenizer


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class SpeechTokenizer:
    """A SpeechCodec with numpy in and out: one utterance at a time, like ImageTokenizer for images."""

    def __init__(self, codec: SpeechCodec):
        self.codec = codec
        self.config = codec.config

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    def encode(self, samples, sample_rate: int | None = None) -> np.ndarray:
        """Mono float samples [S] in [-1,1] -> int64 codes [codebooks, T], T = ceil(S * frame_rate / sample_rate)."""
        if sample_rate is not None and sample_rate != self.config.sample_rate:
            raise ValueError(f"audio at {sample_rate} Hz: this codec reads {self.config.sample_rate} Hz mono "
                             f"(resample it first, e.g. audio_io.read_audio(path, sample_rate={self.config.sample_rate}))")
        x = np.asarray(samples)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"expected mono samples [S] with S > 0, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"samples must be floating point in [-1, 1], got {x.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(_device(self.codec))
        return self.codec.encode(tensor)[0].cpu().numpy()

    def decode(self, codes) -> np.ndarray:
        """int codes [K',T] (K' <= codebooks: the first K' levels) -> float32 samples [T * samples_per_frame]."""
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        if c.ndim != 2:
            raise ValueError(f"expected codes [K',T], got shape {tuple(c.shape)}")
        return self.codec.decode(c[None].to(_device(self.codec)))[0].cpu().numpy().astype(np.float32)

    def save_pretrained(self, directory: str | os.PathLike, *, allow_non_finite: bool = False) -> None:
        """Write speech_codec.safetensors, then speech_codec.json, each atomically (temporary name,
        renamed); weights holding NaN or inf raise NonFiniteError before anything is written."""
        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.codec.state_dict().items()}
        check_finite(tensors, directory / WEIGHTS_NAME, allow_non_finite)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None) -> SpeechTokenizer:
        """Read what save_pretrained wrote (safetensors only); errors name the file at fault."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"speech tokenizer file not found: {directory / name}")
        try:
            config = SpeechCodecConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{directory / CONFIG_NAME}: not a speech codec config ({e})") from None
        verify_safetensors(directory / WEIGHTS_NAME)  # ValueError naming the file
        codec = SpeechCodec(config)
        tensors = load_tensors(directory / WEIGHTS_NAME)
        try:
            codec.load_state_dict(tensors)
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes
            first = str(e).strip().splitlines()
            raise ValueError(f"{directory / WEIGHTS_NAME}: does not match {directory / CONFIG_NAME} "
                             f"({'; '.join(line.strip() for line in first[:3])})") from None
        return cls(codec.to(device).eval())

    @classmethod
    def random(cls, config: SpeechCodecConfig | None = None, seed: int = 0) -> SpeechTokenizer:
        """Randomly initialised tokenizer (for tests); does not disturb the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            codec = SpeechCodec(config or SpeechCodecConfig())
        return cls(codec.eval())
