"""One utterance's waveform, chunk by chunk, as its codes arrive (streamed speech).

Decoding each chunk alone leaves seams: the codec's convolutions see no context past the chunk's
edges, and Griffin-Lim starts every chunk from a fresh random phase, so the waves do not line up
where two chunks meet (clicks). `StreamDecoder` decodes each chunk with `context` frames before it,
starts Griffin-Lim from the phase the previous chunk found for those frames, and holds back the last
`overlap` frames of each chunk's audio to crossfade them with the next chunk's decode of the same
frames. The chunks' audio, concatenated, is the utterance's length; a single push of every frame
with `final=True` is exactly `SpeechTokenizer.decode`. Measured: benchmarks/bench_speech_stream.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .speech_codec import SpeechTokenizer, griffin_lim


class StreamDecoder:
    """`push(codes, final)` -> the next stretch of one utterance's waveform (float32 numpy)."""

    def __init__(self, tokenizer: SpeechTokenizer, context: int = 8, overlap: int = 2):
        if context < 0 or overlap < 0:
            raise ValueError(f"context and overlap must be >= 0 frames, got {context} and {overlap}")
        self.tokenizer, self.context, self.overlap = tokenizer, context, overlap
        self.codes = np.zeros((0, 0), np.int64)  # [levels, frames] so far
        self.emitted = 0  # frames whose audio is out (the held-back tail starts there)
        self.tail = np.zeros(0, np.float32)  # the last decode's audio of frames [emitted, emitted + held)
        self.angles: tuple[int, torch.Tensor] | None = None  # (first frame, angles) of the last decode
        self.done = False

    def push(self, codes, final: bool = False) -> np.ndarray:
        """Append `codes` [levels, n] (n >= 0) and return the audio now settled: every frame not held
        back for the crossfade; with `final`, the rest of the utterance too."""
        if self.done:
            raise ValueError("the utterance is finished: a StreamDecoder takes no codes after final=True")
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or (self.codes.size and codes.shape[0] != self.codes.shape[0]):
            raise ValueError(f"expected codes [levels, frames] like the earlier ones, got shape {codes.shape}")
        self.codes = codes if not self.codes.size else np.concatenate([self.codes, codes], axis=1)
        self.done = final
        total = self.codes.shape[1]
        if total == self.emitted:  # nothing new: only the tail, if this is the end
            out, self.tail = (self.tail, np.zeros(0, np.float32)) if final else (np.zeros(0, np.float32), self.tail)
            return out
        config = self.tokenizer.config
        spf, f = config.samples_per_frame, config.downsample
        start = max(0, self.emitted - self.context)
        codec = self.tokenizer.codec
        window = torch.as_tensor(self.codes[:, start:])[None].to(next(codec.parameters()).device)
        mag = codec.decode_magnitude(window)
        initial = None
        if self.angles is not None:  # the previous decode's phase for the frames both decodes cover
            first, angles = self.angles
            initial = angles[..., (start - first) * f:angles.shape[-1] - 1]
        wave, angles = griffin_lim(mag, config, initial_angles=initial, return_angles=True)
        self.angles = (start, angles)
        new = wave[0].cpu().numpy().astype(np.float32)[(self.emitted - start) * spf:]  # frames [emitted, total)
        if self.tail.size:
            ramp = np.linspace(0.0, 1.0, self.tail.size + 2, dtype=np.float32)[1:-1]
            new[:self.tail.size] = self.tail * (1 - ramp) + new[:self.tail.size] * ramp
        held = 0 if final else min(self.overlap, total - self.emitted)
        cut = new.size - held * spf
        out, self.tail = new[:cut], new[cut:]
        self.emitted = total - held
        return out
