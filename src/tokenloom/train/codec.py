"""Train the spectral speech codec (`tokenloom.speech_codec`) on a rendered speech corpus.

The data are manifest.jsonl files (one `{"audio": "rel/path.wav", "text", "phonemes", "voice"}`
per line, audio paths relative to the manifest's folder, as `world.speech.render_corpus` writes
them). Utterances are used whole, never cropped, because the content head's CTC target is the
utterance's entire phoneme string; a batch pads them with zeros to its longest and masks the
padding out of every loss and codebook statistic. Utterances longer than `data.max_seconds` are
left out of training (counted in summary.json). The loss:

    spec_weight * L1(log|STFT|)               reconstruction, natural-log magnitudes
  + mel_weight * L1(log-mel)                  the same on 80 mel bands: weighs the low frequencies
                                              where speech lives the way hearing does
  + ctc_weight * CTC(content head(level 0))   codebook 0 carries the phonemes
  + commitment_weight * commitment            each level's residual stays near its code
  + voice + pitch + voice_weight * confusion  with model.voice_labels: a voice head learns to tell the
                                              training voice (cross-entropy) and the pitch (squared
                                              error) from codebook 0, per utterance, while the encoder
                                              is pushed to leave it unsure (confusion, ramped up over
                                              the first tenth of the steps): codebook 0 keeps the
                                              phonemes and loses the voice, which the timbre codebooks
                                              must then carry

The codebooks are not trained by gradient: each code moves to the (decayed) mean of the residuals
it was picked for (EMA, `codebook_ema`), and codes no frame picked during a window of steps are
restarted to random residuals of the batch (dead-code restarts). Quantizer dropout decodes a
random part of each batch from its first 1..K-1 levels only, so that fewer levels (content-only
decoding, K'=1) decode to something and the levels are ordered coarse to fine.

Every batch (utterances, quantizer dropout) is a pure function of (seed, step) and every restart
draws from a generator seeded by (seed, step, level), so a resumed run repeats an uninterrupted
one exactly. The plumbing is `train.vq`'s: the config file (errors name file:line), the warmup +
cosine schedule, metrics.jsonl, checkpoint directories (safetensors + JSON, atomic, verified on
resume), best/ and summary.json; what the two share is in `train.tokenizer_trainer`. Output
directory::

    config.json                 the model, data and training configs of the run
    metrics.jsonl               {"kind": "train", "step", "loss", "spec", "mel", "ctc", "usage", ...} per logged
                                step and {"kind": "eval", "step", "mel_db", "per", ...} per evaluation
    loss.png                    the training loss against the step
    checkpoints/step-00000250/  model.safetensors, optimizer.safetensors + .json, rng.safetensors,
                                trainer.safetensors (usage window and EMA state), best.safetensors, state.json
    best/                       SpeechTokenizer.save_pretrained of the best evaluated weights (lowest mel_db)
    summary.json                where the last call stopped, the best evaluation, bits per second
    final_eval.json             the CLI's final evaluation of best/ on the whole eval manifest

    tokenloom train-codec recipes/speech/codec.yaml --out runs/speech/codec [--export DIR] [--threads 2]
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..audio_io import read_audio
from ..speech_codec import DB, SpeechCodec, SpeechCodecConfig, SpeechTokenizer, log_mel, mel_distance
from .common import check_max_steps, check_resumable
from .config import ConfigError, ConfigParser, build_config, config_folder, read_config, resolve_path
from .tokenizer_trainer import TokenizerTrainer, check_finite_fields, check_ranges, fit

__all__ = ["CodecDataConfig", "CodecTrainConfig", "CodecRunConfig", "CodecTrainer", "Utterance", "Batch",
           "load_codec_config", "read_manifest", "content_alphabet", "content_ids", "collate",
           "training_batch", "evaluate_codec", "edit_distance", "train_codec"]

# Seed-stream tags: batches and restarts draw from different SeedSequence entropy lists.
TRAIN_STREAM, RESTART_STREAM = 0x5C01, 0x5C02

# training keys a resumed run may change: they do not change the trajectory (threads changes the
# order of float reductions, hence the last bits; it is the CLI's call)
RESUMABLE_CHANGES = {"log_every", "eval_every", "eval_utterances", "eval_audio", "checkpoint_every",
                     "keep_checkpoints", "max_minutes", "progress", "threads"}
EVAL_BATCH = 16


@dataclass
class CodecDataConfig:
    """The `data:` section: manifests (relative to the config file's folder)."""

    train: list[str] = field(default_factory=list)  # manifest.jsonl files, read together
    eval: str | None = None  # held-out manifest.jsonl (needed when train.eval_every > 0)
    max_seconds: float = 6.0  # longer utterances are left out of training (whole utterances only: CTC)

    def __post_init__(self):
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"max_seconds must be a positive number, got {self.max_seconds!r}")


@dataclass
class CodecTrainConfig:
    """Everything about a training run except the model and the data (the `train:` section)."""

    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    spec_weight: float = 1.0
    mel_weight: float = 1.0
    ctc_weight: float = 0.1
    commitment_weight: float = 0.25
    voice_weight: float = 0.0  # how hard the encoder is pushed to leave the voice head unsure; 0: no adversary
    codebook_ema: float = 0.95  # decay of the codebooks' running means
    restart_every: int = 25  # steps per usage window; 0 disables restarts
    restart_until: float = 0.85  # fraction of steps after which codes stop being restarted
    quantizer_dropout: float = 0.5  # fraction of utterances decoded from a random 1..K-1 levels
    threads: int | None = None  # torch.set_num_threads (None: torch's default; --threads overrides)
    log_every: int = 10
    eval_every: int = 250  # 0: never evaluate (best/ holds the last weights)
    eval_utterances: int = 64  # of the eval manifest, from its start (0: all of them)
    eval_audio: int = 4  # of those, round-tripped through Griffin-Lim (waveform mel distance)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    max_minutes: float | None = None  # wall-clock budget: stop early, evaluate and keep the best
    progress: bool = True

    def __post_init__(self):
        # messages start with the field's name: the config parser turns that into file:line
        self.betas = tuple(float(b) for b in self.betas)
        check_finite_fields(self)
        check_ranges(self,
                     positive=("batch_size", "lr", "log_every", "checkpoint_every", "keep_checkpoints"),
                     non_negative=("steps", "warmup_steps", "weight_decay", "grad_clip", "spec_weight", "mel_weight",
                                   "ctc_weight", "commitment_weight", "voice_weight", "restart_every", "eval_every",
                                   "eval_utterances", "eval_audio"),
                     unit=("min_lr_ratio", "restart_until", "quantizer_dropout"))
        if not 0 <= self.codebook_ema < 1:
            raise ValueError(f"codebook_ema must be in [0, 1), got {self.codebook_ema!r}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive or null, got {self.threads!r}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 or null, got {self.max_minutes!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class CodecRunConfig:
    """A codec training config file: `model:` (SpeechCodecConfig fields), `data:`, `train:` and an
    optional `out_dir` (relative to the file's folder)."""

    model: SpeechCodecConfig = field(default_factory=SpeechCodecConfig)
    data: CodecDataConfig = field(default_factory=CodecDataConfig)
    train: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    out_dir: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it was read from (not a key)


def _check_run(p: ConfigParser, c: CodecRunConfig) -> None:
    if not c.data.train:
        raise p.error("data.train", "'data.train' needs at least one manifest.jsonl")
    if c.train.eval_every and c.data.eval is None:
        raise p.error("train.eval_every", "'train.eval_every' needs 'data.eval' (a held-out manifest.jsonl); "
                                          "set eval_every: 0 to train without evaluations")
    base = config_folder(p.source)
    c.data.train = [resolve_path(x, base) for x in c.data.train]
    if c.data.eval is not None:
        c.data.eval = resolve_path(c.data.eval, base)
    if c.out_dir is not None:
        c.out_dir = resolve_path(c.out_dir, base)


def load_codec_config(path: str | Path) -> CodecRunConfig:
    """Read a .yaml/.yml/.toml codec training config; errors are `ConfigError` naming file:line."""
    data, lines = read_config(path)
    if isinstance(data, dict) and "data" not in data:
        raise ConfigError(f"{path}: a 'data:' section (train: [manifest.jsonl, ...]) is required")
    return build_config(CodecRunConfig, data, str(path), lines, check=_check_run)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Utterance:
    audio: Path
    phonemes: str
    text: str
    voice: str
    seconds: float
    where: str  # "manifest.jsonl:LINE", for errors
    pitch: float | None = None  # the speaker's pitch, where the manifest gives it (espeak-ng's 0-99)


def read_manifest(path: str | Path) -> list[Utterance]:
    """The lines of a manifest.jsonl; errors name the file and line. Durations come from the audio
    files' headers (nothing is decoded here)."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"speech manifest not found: {path}")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("audio"), str) \
                or not isinstance(record.get("phonemes"), str):
            raise ValueError(f"{where}: expected an object with string 'audio' and 'phonemes'")
        audio = (path.parent / record["audio"]).resolve()
        try:
            info = soundfile.info(str(audio))
        except (RuntimeError, OSError) as e:  # soundfile raises LibsndfileError (a RuntimeError)
            raise ValueError(f"{where}: cannot read the audio file {audio} ({e})") from None
        pitch = record.get("pitch")
        if pitch is not None and (isinstance(pitch, bool) or not isinstance(pitch, (int, float))
                                  or not math.isfinite(pitch)):
            raise ValueError(f"{where}: 'pitch' must be a number, got {pitch!r}")
        out.append(Utterance(audio, record["phonemes"], str(record.get("text", "")), str(record.get("voice", "")),
                             info.frames / info.samplerate, where, None if pitch is None else float(pitch)))
    if not out:
        raise ValueError(f"{path}: the manifest lists no utterances")
    return out


def content_alphabet(utterances: Sequence[Utterance]) -> list[str]:
    """The content head's symbols: every non-whitespace character of the phoneme strings, sorted."""
    return sorted({ch for u in utterances for ch in u.phonemes if not ch.isspace()})


def content_ids(phonemes: str, symbols: Sequence[str]) -> tuple[list[int], int]:
    """A phoneme string -> (CTC target ids, symbol i is i + 1; how many characters were not in
    `symbols`, left out). Whitespace (word boundaries, not a sound) is no target."""
    index = {s: i + 1 for i, s in enumerate(symbols)}
    ids = [index.get(ch, -1) for ch in phonemes if not ch.isspace()]
    return [i for i in ids if i > 0], sum(i < 0 for i in ids)


def _ctc_steps_needed(ids: Sequence[int]) -> int:
    """CTC needs a step per target plus a blank between equal neighbours."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


@dataclass
class Batch:
    samples: torch.Tensor  # [B, T_max * samples_per_frame], zero padded
    frames: torch.Tensor  # [B] code frames of each utterance
    targets: torch.Tensor  # concatenated CTC targets
    target_lengths: torch.Tensor  # [B]
    levels: torch.Tensor  # [B] RVQ levels the decoder sees (quantizer dropout)
    voices: torch.Tensor | None = None  # [B] index in config.voice_labels (-1: unknown)
    pitches: torch.Tensor | None = None  # [B] standardised pitch (nan: unknown)


def collate(waves: Sequence[np.ndarray], targets: Sequence[Sequence[int]], config: SpeechCodecConfig,
            levels: Sequence[int] | None = None, voices: Sequence[int] | None = None,
            pitches: Sequence[float] | None = None) -> Batch:
    frames = [max(1, config.frames_for(len(w))) for w in waves]
    samples = torch.zeros(len(waves), max(frames) * config.samples_per_frame)
    for i, w in enumerate(waves):
        samples[i, : len(w)] = torch.from_numpy(w)
    flat = [t for ids in targets for t in ids]
    return Batch(samples, torch.tensor(frames), torch.tensor(flat, dtype=torch.long),
                 torch.tensor([len(ids) for ids in targets]),
                 torch.tensor(levels if levels is not None else [config.codebooks] * len(waves)),
                 None if voices is None else torch.tensor(voices, dtype=torch.long),
                 None if pitches is None else torch.tensor(pitches, dtype=torch.float32))


def training_batch(seed: int, step: int, n: int, batch_size: int, codebooks: int,
                   dropout: float) -> tuple[np.ndarray, np.ndarray]:
    """(utterance indices, decoder levels) of a step: a pure function of its arguments, which is
    what makes resume exact. Dropped utterances see a random 1..K-1 levels."""
    rng = np.random.default_rng([TRAIN_STREAM, seed, step])
    picks = rng.choice(n, size=batch_size, replace=n < batch_size)
    drop = rng.random(batch_size) < dropout
    levels = np.where(drop & (codebooks > 1), rng.integers(1, max(2, codebooks), batch_size), codebooks)
    return picks, levels


# ----------------------------------------------------------------------------- evaluation


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def _greedy_ctc(log_probs: torch.Tensor) -> list[int]:
    """[steps, symbols + 1] -> the argmax path with repeats merged and blanks (0) dropped."""
    path = log_probs.argmax(dim=-1).tolist()
    return [s for i, s in enumerate(path) if s != 0 and (i == 0 or s != path[i - 1])]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B,C,N] over the positions where mask [B,N] is true."""
    return (x * mask[:, None]).sum() / (mask.sum() * x.shape[1]).clamp_min(1)


def _frame_mask(frames: torch.Tensor, length: int, repeat: int = 1) -> torch.Tensor:
    """[B] code frames -> [B, length] bool, true on the utterance's own (code or STFT) frames."""
    return torch.arange(length)[None] < (frames * repeat)[:, None]


@torch.no_grad()
def evaluate_codec(codec: SpeechCodec, utterances: Sequence[Utterance], audio: int = 4) -> dict[str, Any]:
    """Score `codec` on held-out utterances:

    mel_db          mean |log-mel| difference (dB) between the original spectrum and decode_magnitude
                    of its codes, over every frame of every utterance
    mel_db_content  the same decoding level 0 only (content-only)
    audio_mel_db    mel distance (dB) between the first `audio` waveforms and their round trip through
                    SpeechTokenizer.encode / .decode (Griffin-Lim), the path a user takes
    per             content head's greedy CTC decode of level 0 vs the phoneme string: edits / length
    usage           per level, the fraction of the codebook the utterances' codes use
    perplexity      per level, exp(entropy) of the code histogram
    bits_per_second the codec's bitrate"""
    c = codec.config
    codec.eval()
    f = c.downsample
    sums = {"mel": 0.0, "content": 0.0, "frames": 0}
    edits = length = unknown = 0
    counts = torch.zeros(c.codebooks, c.codebook_size)
    for s in range(0, len(utterances), EVAL_BATCH):
        chunk = utterances[s:s + EVAL_BATCH]
        waves = [read_audio(u.audio, c.sample_rate) for u in chunk]
        targets = []
        for u in chunk:
            ids, missing = content_ids(u.phonemes, c.content_symbols)
            targets.append(ids)
            unknown += missing
        batch = collate(waves, targets, c)
        log_mag = codec.features(batch.samples)
        codes = codec.quantize(codec.latents(log_mag))[0]
        mask = _frame_mask(batch.frames, log_mag.shape[-1], f)
        target = log_mel(log_mag, codec.filterbank)
        for key, levels in (("mel", c.codebooks), ("content", 1)):
            pred = log_mel(codec.decode_magnitude(codes[:, :levels]), codec.filterbank)
            sums[key] += float(((pred - target).abs() * mask[:, None]).sum()) / c.n_mels
        sums["frames"] += int(mask.sum())
        log_probs = codec.content_logits(codec.embed(codes[:, :1])).log_softmax(-1)
        for i, ids in enumerate(targets):
            hyp = _greedy_ctc(log_probs[i, : int(batch.frames[i]) * c.content_steps])
            edits += edit_distance(hyp, ids)
            length += len(ids)
        valid = _frame_mask(batch.frames, codes.shape[-1])
        for k in range(c.codebooks):
            counts[k] += torch.bincount(codes[:, k][valid], minlength=c.codebook_size).float()
    tok = SpeechTokenizer(codec)
    round_trips = []
    for u in utterances[:audio]:
        wave = read_audio(u.audio, c.sample_rate)
        round_trips.append(mel_distance(wave, tok.decode(tok.encode(wave)), c))
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    frames = max(1, sums["frames"])
    return {
        "mel_db": sums["mel"] / frames * DB, "mel_db_content": sums["content"] / frames * DB,
        "audio_mel_db": float(np.mean(round_trips)) if round_trips else None,
        "per": edits / max(1, length), "usage": [float((n > 0).float().mean()) for n in counts],
        "perplexity": [float(e.exp()) for e in entropy], "bits_per_second": c.bits_per_second,
        "n": len(utterances), "unknown_symbols": unknown,
    }


# ----------------------------------------------------------------------------- trainer


class CodecTrainer(TokenizerTrainer):
    """One codec training run: `step()` trains on one batch; `save_checkpoint()` /
    `load_checkpoint()` write and read a checkpoint directory.

    Holds only what a resumed run needs beyond (seed, step): weights (the codebooks among them),
    optimizer state, the usage counts of the current restart window, the EMA state and the best
    evaluation so far. Audio is read from disk per batch; the targets are computed once."""

    MODEL, TOKENIZER = SpeechCodec, SpeechTokenizer
    BEST_BY, HIGHER_IS_BETTER = ("mel_db", "per"), False  # reconstruct better; PER breaks ties
    SECTION = "train"
    RESUMABLE_CHANGES = RESUMABLE_CHANGES
    NAME = "speech codec"

    def __init__(self, config: SpeechCodecConfig, train: CodecTrainConfig, train_set: Sequence[Utterance],
                 eval_set: Sequence[Utterance] = (), out_dir: str | Path | None = None,
                 data: CodecDataConfig | None = None):
        if not train_set:
            raise ValueError("the training set is empty")
        if not config.content_symbols and train.ctc_weight > 0:
            raise ValueError("model content_symbols is empty: the content head has nothing to learn (train_codec "
                             "builds the alphabet from the training manifest)")
        self.train_set, self.eval_set = list(train_set), list(eval_set)
        # the data section, when the run has one: a resumed run must read the same manifests
        self.data = None if data is None else dataclasses.asdict(data)
        self.targets = []
        for u in self.train_set:
            ids, missing = content_ids(u.phonemes, config.content_symbols)
            if missing:
                bad = sorted({ch for ch in u.phonemes if not ch.isspace() and ch not in config.content_symbols})
                raise ValueError(f"{u.where}: phonemes hold {bad!r}, which are not in model.content_symbols (leave "
                                 "content_symbols empty to build the alphabet from the training manifest)")
            self.targets.append(ids)
        self.voices, self.pitches = self._voice_targets(config, train)
        super().__init__(config, train, out_dir)
        k, n = config.codebooks, config.codebook_size
        # EMA state: how many residuals each code was picked for, and their sum (both decayed)
        self.ema_count = torch.ones(k, n)
        self.ema_sum = self.model.codebooks.detach().clone()
        # no weight decay on biases
        params = list(self.model.parameters())
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        self.optimizer = self.adamw(decay, rest)
        self.usage = torch.zeros(k, n, dtype=torch.long)  # codes picked this window, per level

    def _voice_targets(self, config: SpeechCodecConfig, train: CodecTrainConfig) -> tuple[list[int], list[float]]:
        """Each training utterance's index in config.voice_labels (-1: not one of them) and its pitch,
        standardised over the training set (nan where the manifest gives none)."""
        if train.voice_weight > 0 and not config.voice_labels:
            raise ValueError("train.voice_weight > 0 needs model.voice_labels (train_codec fills them from the "
                             "training manifest's voices)")
        index = {v: i for i, v in enumerate(config.voice_labels)}
        voices = [index.get(u.voice, -1) for u in self.train_set]
        if train.voice_weight > 0:
            missing = next((u for u, v in zip(self.train_set, voices) if v < 0), None)
            if missing is not None:
                raise ValueError(f"{missing.where}: voice {missing.voice!r} is not in model.voice_labels (leave "
                                 "voice_labels empty to take them from the training manifest)")
        known = np.array([u.pitch for u in self.train_set if u.pitch is not None], dtype=np.float64)
        mean, std = (float(known.mean()), float(known.std()) or 1.0) if len(known) else (0.0, 1.0)
        return voices, [math.nan if u.pitch is None else (u.pitch - mean) / std for u in self.train_set]

    # -- one step

    def batch(self, step: int) -> Batch:
        t, c = self.train, self.config
        picks, levels = training_batch(t.seed, step, len(self.train_set), t.batch_size, c.codebooks,
                                       t.quantizer_dropout)
        waves = [read_audio(self.train_set[i].audio, c.sample_rate) for i in picks]
        return collate(waves, [self.targets[i] for i in picks], c, levels.tolist(),
                       [self.voices[i] for i in picks], [self.pitches[i] for i in picks])

    def voice_weight_at(self, step: int | None) -> float:
        """The adversary's strength at `step`: voice_weight, ramped up linearly over the first tenth of
        the steps (the content and the reconstruction find their footing first)."""
        ramp = max(1, self.train.steps // 10)
        return self.train.voice_weight * (1.0 if step is None else min(1.0, (step + 1) / ramp))

    def losses(self, batch: Batch, step: int | None = None
               ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Forward pass -> (named losses incl. "loss", each level's residuals, codes [B,K,T], code-frame mask).
        `step` sets the voice adversary's ramp (None: its full strength)."""
        t, m, c = self.train, self.model, self.config
        log_mag = m.features(batch.samples)
        z = m.latents(log_mag)
        codes, vectors, residuals = m.quantize(z)
        mask = _frame_mask(batch.frames, z.shape[-1])  # [B,T]
        spec_mask = _frame_mask(batch.frames, log_mag.shape[-1], c.downsample)  # [B,T*f]
        keep = (torch.arange(c.codebooks)[None] < batch.levels[:, None]).to(z.dtype)  # [B,K]
        z_q = sum(v * keep[:, k, None, None] for k, v in enumerate(vectors))
        # straight-through: the decoder's gradient reaches the encoder as if z_q were z
        pred = m.decode_latents(z + (z_q - z).detach())
        out = {"spec": _masked_mean((pred - log_mag).abs(), spec_mask),
               "mel": _masked_mean((log_mel(pred, m.filterbank) - log_mel(log_mag, m.filterbank)).abs(), spec_mask),
               "commitment": sum(_masked_mean((r - v.detach()).pow(2), mask) for r, v in zip(residuals, vectors))
               / c.codebooks}
        if t.ctc_weight > 0:
            logits = m.content_logits(z + (vectors[0] - z).detach())  # level 0 only, straight-through
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [steps, B, symbols + 1]
            # zero_infinity: an utterance too fast for its steps adds nothing rather than inf
            out["ctc"] = F.ctc_loss(log_probs, batch.targets, batch.frames * c.content_steps, batch.target_lengths,
                                    blank=0, reduction="mean", zero_infinity=True)
        else:
            out["ctc"] = torch.zeros(())
        out["loss"] = (t.spec_weight * out["spec"] + t.mel_weight * out["mel"] + t.ctc_weight * out["ctc"]
                       + t.commitment_weight * out["commitment"])
        if t.voice_weight > 0 and batch.voices is not None:
            out.update(self._voice_losses(z + (vectors[0] - z).detach(), batch, mask, self.voice_weight_at(step)))
            out["loss"] = out["loss"] + out["voice"] + out["pitch"] + out.pop("adversary")
        return out, [r.detach() for r in residuals], codes, mask

    def _voice_losses(self, level0: torch.Tensor, batch: Batch, mask: torch.Tensor,
                      weight: float) -> dict[str, torch.Tensor]:
        """The voice adversary on codebook 0, per utterance (a voice is a property of the utterance: a
        few frames of content codes say little, their distribution says who speaks): the head's
        per-frame predictions averaged over the utterance's frames.

        Two players, one backward pass. The head learns from level 0 detached: cross-entropy against the
        true voice, squared error against the pitch ("voice", "pitch"). The encoder sees the head with
        its weights detached and is pushed, times `weight`, to make it unsure: cross-entropy against the
        uniform distribution over voices and the predicted pitch toward the mean ("confusion"). Unlike a
        reversed gradient, which rewards confidently wrong answers and grows without bound, confusion is
        least when codebook 0 tells nothing of the voice."""
        head = self.model.voice_head
        m = mask[..., None].float()

        def utterances(frames: torch.Tensor) -> torch.Tensor:  # [B,V+1,T] -> [B,V+1], over real frames
            frames = frames.float().transpose(1, 2)
            return (frames * m).sum(1) / m.sum(1).clamp_min(1)

        pred = utterances(head(level0.detach()))
        known, has_pitch = batch.voices >= 0, ~batch.pitches.isnan()
        zero = pred.sum() * 0
        ce = F.cross_entropy(pred[known, :-1], batch.voices[known]) if known.any() else zero
        mse = F.mse_loss(pred[has_pitch, -1], batch.pitches[has_pitch]) if has_pitch.any() else zero
        frozen = {name: p.detach() for name, p in head.named_parameters()}
        fooled = utterances(torch.func.functional_call(head, frozen, (level0,)))
        confusion = -fooled[:, :-1].log_softmax(-1).mean() + fooled[:, -1].pow(2).mean()
        accuracy = (pred[known, :-1].argmax(-1) == batch.voices[known]).float().mean() if known.any() else zero
        return {"voice": ce, "pitch": mse, "confusion": confusion, "voice_accuracy": accuracy.detach(),
                "adversary": weight * confusion}

    def step(self) -> dict[str, Any]:
        """Train on the batch of the current step; returns its losses (before the update).

        A NaN or inf loss or gradient norm raises TrainError (naming the step) before the update."""
        step = self.step_count
        batch = self.batch(step)
        self.model.train()
        lr = self.set_lr(step)
        out, residuals, codes, mask = self.losses(batch, step)
        norm = self.update(out["loss"], step)
        counts = self._counts(codes, mask)
        self.usage += counts.long()
        self._ema_update(residuals, codes, mask, counts)
        restarted = self.restart_dead_codes(residuals, mask, step) if self.restart_due(step) else 0
        self.step_count += 1
        metrics: dict[str, Any] = {k: float(v.detach()) for k, v in out.items()}
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        metrics.update(step=self.step_count, lr=lr, grad_norm=norm, restarted=restarted,
                       usage=[round(float((n > 0).float().mean()), 4) for n in counts],
                       perplexity=[round(float(e), 2) for e in (-(p * p.clamp_min(1e-12).log()).sum(1)).exp()])
        return metrics

    def _counts(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[K, N] how many of the batch's (unpadded) frames picked each code, per level."""
        return torch.stack([torch.bincount(codes[:, k][mask], minlength=self.config.codebook_size)
                            for k in range(self.config.codebooks)]).float()

    @torch.no_grad()
    def _ema_update(self, residuals: list[torch.Tensor], codes: torch.Tensor, mask: torch.Tensor,
                    counts: torch.Tensor) -> None:
        """Move each code toward the (decayed) mean of the residuals that picked it."""
        decay = self.train.codebook_ema
        for k, r in enumerate(residuals):
            flat = r.float().transpose(1, 2)[mask]  # [frames, dim]
            sums = torch.zeros_like(self.ema_sum[k]).index_add_(0, codes[:, k][mask], flat)
            self.ema_count[k].mul_(decay).add_(counts[k], alpha=1 - decay)
            self.ema_sum[k].mul_(decay).add_(sums, alpha=1 - decay)
        # codes nobody picked keep their vector (count and sum decay together); the epsilon only
        # guards the division
        self.model.codebooks.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[..., None])

    @torch.no_grad()
    def restart_dead_codes(self, residuals: list[torch.Tensor], mask: torch.Tensor, step: int) -> int:
        """Re-initialise the codes no frame picked in this window to random residuals of their level
        in this batch (plus a little noise, so two restarts from one residual split apart); returns
        how many. On small data most of a codebook otherwise dies early and stays dead."""
        dead_total = 0
        for k, r in enumerate(residuals):
            dead = torch.nonzero(self.usage[k] == 0).flatten()
            if len(dead) == 0:
                continue
            flat = r.float().transpose(1, 2)[mask]
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [RESTART_STREAM, self.train.seed, step, k]).generate_state(1)[0]))
            pick = torch.randint(len(flat), (len(dead),), generator=gen)
            noise = torch.randn(len(dead), flat.shape[1], generator=gen) * (0.01 * flat.std() + 1e-6)
            self.model.codebooks[k, dead] = flat[pick] + noise
            # EMA state of a restarted code: as if one residual had picked it
            self.ema_count[k, dead] = 1.0
            self.ema_sum[k, dead] = self.model.codebooks[k, dead]
            dead_total += len(dead)
        self.usage.zero_()
        self.restarted_total += dead_total
        return dead_total

    # -- evaluation

    def evaluate(self, n: int | None = None, audio: int | None = None) -> dict[str, Any]:
        n = self.train.eval_utterances if n is None else n
        utterances = self.eval_set[:n] if n else self.eval_set
        if not utterances:
            raise ValueError("no eval utterances: the trainer was given no eval set")
        return evaluate_codec(self.model, utterances, self.train.eval_audio if audio is None else audio)

    # -- progress

    def progress_postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{metrics['loss']:.3f}", "mel": f"{metrics['mel'] * 20 / math.log(10):.2f}dB",
                   "ctc": f"{metrics['ctc']:.3f}"}
        if "voice_accuracy" in metrics:  # the voice head's hit rate on the batch's utterances
            postfix["voice"] = f"{metrics['voice_accuracy']:.2f}"
        return postfix

    def eval_message(self, metrics: dict[str, Any]) -> str:
        return (f"mel {metrics['mel_db']:.2f} dB (content only {metrics['mel_db_content']:.2f}) "
                f"per {metrics['per']:.3f} usage {[round(u, 2) for u in metrics['usage']]}")

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "data_config": self.data}

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        super().check_resumable(path, state)
        # checkpoints without a data section (or a trainer without one) cannot tell: not checked
        if state.get("data_config") is not None and self.data is not None:
            check_resumable(f"from {path}", state["data_config"], self.data, label="data ")


# ----------------------------------------------------------------------------- the loop


def train_codec(config: SpeechCodecConfig, data: CodecDataConfig, out_dir: str | Path,
                train: CodecTrainConfig | None = None, *, resume: bool = True, max_steps: int | None = None,
                **options: Any) -> SpeechTokenizer:
    """Train a speech codec on the manifests of `data`; returns the tokenizer with the best
    evaluated weights (lowest mel_db).

    `train` (or CodecTrainConfig's defaults) with `options` replacing its fields. An empty
    config.content_symbols is filled with the training manifests' phoneme characters. Writes the
    output directory of the module docstring. resume: continue from the newest intact checkpoint
    there (False refuses a directory that holds checkpoints). max_steps: stop (checkpointed) at this
    step without changing the schedule, which spans `train.steps`; a later call resumes. A NaN or
    inf loss raises TrainError and leaves the checkpoints as they were."""
    train = dataclasses.replace(train, **options) if train is not None else CodecTrainConfig(**options)
    check_max_steps(max_steps)
    if train.threads:
        torch.set_num_threads(train.threads)
    if not data.train:
        raise ValueError("data.train names no manifest")
    if train.eval_every and data.eval is None:
        raise ValueError("train.eval_every needs data.eval (a held-out manifest); set eval_every=0 to train "
                         "without evaluations")
    everything = [u for path in data.train for u in read_manifest(path)]
    train_set = [u for u in everything if u.seconds <= data.max_seconds]
    skipped = len(everything) - len(train_set)
    if not train_set:
        raise ValueError(f"every training utterance is longer than data.max_seconds = {data.max_seconds}")
    eval_set = read_manifest(data.eval) if data.eval is not None else []
    if not config.content_symbols:
        config = dataclasses.replace(config, content_symbols=content_alphabet(train_set))
    if train.voice_weight > 0 and not config.voice_labels:
        unvoiced = next((u for u in train_set if not u.voice), None)
        if unvoiced is not None:
            raise ValueError(f"{unvoiced.where}: train.voice_weight > 0 needs a 'voice' on every training utterance")
        config = dataclasses.replace(config, voice_labels=sorted({u.voice for u in train_set}))
    trainer = CodecTrainer(config, train, train_set, eval_set, out_dir, data)
    steps_per_frame = config.content_steps * config.frame_rate
    too_fast = sum(_ctc_steps_needed(ids) > max(1, math.ceil(u.seconds * config.frame_rate)) * config.content_steps
                   for u, ids in zip(train_set, trainer.targets))
    if too_fast:
        warnings.warn(f"{too_fast} of {len(train_set)} training utterances have more phoneme symbols than the "
                      f"content head's {steps_per_frame} CTC steps per second can emit; they add no CTC loss "
                      "(raise model.content_steps)", UserWarning, stacklevel=2)
    config_record = {"model": config.to_dict(), "data": dataclasses.asdict(data), "train": train.to_dict()}
    return fit(trainer, out_dir, resume=resume, max_steps=max_steps, config=config_record, summary={
        "bits_per_second": config.bits_per_second, "parameters": trainer.model.num_parameters(),
        "train_utterances": len(train_set), "skipped_long": skipped, "ctc_too_fast": too_fast,
        "content_symbols": "".join(config.content_symbols)})
