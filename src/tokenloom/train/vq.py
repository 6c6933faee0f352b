"""Train a VQGAN image tokenizer on shapes-world renders, and measure it by parsing its reconstructions.

Images are rendered on the fly from random scenes (shapes-world.md), so there is no dataset to
build and no epoch to overfit. The loss is taming's VQ objective without the GAN and LPIPS parts
(costly on a CPU, and of no use on flat-colored shapes):

    L1 + MSE                        reconstruction
  + parse term                      per-pixel hinge that keeps every pixel on the same side of the
                                    parser's color threshold as in the original (see `parse_loss`)
  + codebook + beta * commitment    VQ-VAE losses, from `VectorQuantizer`

Codes that no latent picked during a window of steps are re-initialised to random encoder outputs
(dead-code restarts). Every batch is a pure function of (seed, step) and every restart draws from a
generator seeded by (seed, step), so a resumed run repeats an uninterrupted one exactly.

The score that matters is `parse_exact`: the fraction of held-out renders whose reconstruction
(encode -> decode -> uint8) parses back to exactly the rendered scene.

The run shares the transformer trainer's plumbing (`train.common`, `train.config`): a YAML/TOML
config whose errors name file:line, the warmup + cosine schedule, metrics.jsonl, and checkpoint
directories (safetensors + JSON, atomic, verified on resume); and with the speech codec's trainer
(`train.tokenizer_trainer`) the loop, the best weights and the checkpoints' extra files. Output
directory::

    config.json                 the model and training configs of the run
    metrics.jsonl               {"kind": "train", "step", "loss", ...} per logged step and
                                {"kind": "eval", "step", "parse_exact", ...} per evaluation
    loss.png                    the training loss against the step
    checkpoints/step-00000250/  model.safetensors, optimizer.safetensors + .json, rng.safetensors,
                                trainer.safetensors (codebook usage and EMA state), best.safetensors
                                (the best evaluated weights), state.json (written last)
    best/                       ImageTokenizer.save_pretrained of the best evaluated weights
    summary.json                where the last call stopped, and the best evaluation
    final_eval.json             the CLI's final evaluation (--eval-images per size, --eval-sizes)

    tokenloom train-vq recipes/shapes-tiny/vq.yaml --out runs/shapes-vq [--export runs/shapes-vq/export]

--export saves a copy of best/ elsewhere; to build shapes-tiny on the new tokenizer, pass it (or
best/) to `recipes/shapes-tiny/build.py --vq`, never export into the shipped model's directory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..image_processing import ImageTokenizer
from ..precision import PRECISIONS, resolve_precision
from ..vqgan import VQGAN, VQGANConfig
from ..world import parse, random_scene, render
from ..world.parse import MAX_DISTANCE, PALETTE
from .common import CHECKPOINTS, TrainError, check_max_steps, checkpoint_dirs
from .config import ConfigError, ConfigParser, build_config, config_folder, read_config, resolve_path
from .tokenizer_trainer import TokenizerTrainer, check_finite_fields, check_ranges, fit

__all__ = ["VQTrainConfig", "VQRunConfig", "VQTrainer", "load_vq_config", "train_vqgan", "evaluate_vq",
           "parse_loss", "parse_labels", "psnr", "render_batch", "to_pixels", "training_batch",
           "eval_set"]

# Seed-stream tags: training batches, restarts and evaluation draw from different SeedSequence
# entropy lists, so no evaluation render comes from the training stream (equal scenes can still
# recur: the scene space is finite).
TRAIN_STREAM, RESTART_STREAM, EVAL_STREAM = 0x7A11, 0x7A12, 0x7A13

PARSE_THRESHOLD = float(MAX_DISTANCE)  # the parser's color distance, on the 0-255 scale
_PALETTE = torch.tensor(PALETTE, dtype=torch.float32)  # (6, 3), 0-255: the parser's palette

LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickled checkpoint of earlier versions (not read)
# training keys a resumed run may change: they do not change the trajectory
RESUMABLE_CHANGES = {"log_every", "eval_every", "eval_images", "eval_sizes", "checkpoint_every", "keep_checkpoints",
                     "max_minutes", "progress"}

Size = tuple[int, int]  # (width, height)


@dataclass
class VQTrainConfig:
    """Everything about a training run except the model (the `training:` section of a config)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    sizes: tuple[Size, ...] = ((64, 64), (96, 64), (64, 96))  # (width, height); one size per batch
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    parse_weight: float = 1.0
    parse_margin: float = 16.0  # 0-255 scale: object pixels aim within 80 - m of their color, background beyond 80 + m
    # codebook update: EMA of the latents each code is picked for (k-means style; converges in far
    # fewer steps than the codebook loss's gradient), or None to train it with the codebook loss
    codebook_ema: float | None = 0.95
    restart_every: int = 25  # steps per usage window; 0 disables restarts
    restart_until: float = 0.85  # fraction of steps after which codes stop being restarted
    # "fp32", "bf16" (CPU autocast; pays only with native bf16 units) or "auto" (bf16 only where
    # native); see tokenloom.precision
    precision: str = "fp32"
    log_every: int = 10
    eval_every: int = 250  # 0: never evaluate (best/ holds the last weights)
    eval_images: int = 100  # per eval size
    eval_sizes: tuple[Size, ...] = ((64, 64), (96, 64), (64, 96))
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    max_minutes: float | None = None  # wall-clock budget: stop early, evaluate and keep the best
    progress: bool = True

    def __post_init__(self):
        # messages start with the field's name: the config parser turns that into file:line
        self.sizes = tuple((int(w), int(h)) for w, h in self.sizes)
        self.eval_sizes = tuple((int(w), int(h)) for w, h in self.eval_sizes)
        self.betas = tuple(float(b) for b in self.betas)
        check_finite_fields(self)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_ranges(self,
                     positive=("batch_size", "lr", "log_every", "eval_images", "checkpoint_every", "keep_checkpoints"),
                     non_negative=("steps", "warmup_steps", "weight_decay", "grad_clip", "l1_weight", "mse_weight",
                                   "parse_weight", "parse_margin", "restart_every", "eval_every"),
                     unit=("min_lr_ratio", "restart_until"))
        if self.codebook_ema is not None and not 0 <= self.codebook_ema < 1:
            raise ValueError(f"codebook_ema must be in [0, 1) or null, got {self.codebook_ema!r}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 or null, got {self.max_minutes!r}")
        for name in ("sizes", "eval_sizes"):
            sizes = getattr(self, name)
            if not sizes and name == "sizes":
                raise ValueError("sizes must name at least one [width, height]")
            if any(w <= 0 or h <= 0 for w, h in sizes):
                raise ValueError(f"{name} must be positive [width, height] pairs, got {[list(s) for s in sizes]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("sizes", "eval_sizes"):
            d[k] = [list(s) for s in d[k]]
        d["betas"] = list(d["betas"])
        return d


@dataclass
class VQRunConfig:
    """A VQGAN training config file: `model:` (VQGANConfig fields), `training:` (VQTrainConfig
    fields) and an optional `out_dir` (relative to the file's folder)."""

    model: VQGANConfig = field(default_factory=VQGANConfig)
    training: VQTrainConfig = field(default_factory=VQTrainConfig)
    out_dir: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it was read from (not a key)


HINTS = {"training.bf16": "bf16: true is now precision: bf16, or auto"}


def misaligned_sizes(train: VQTrainConfig, factor: int) -> tuple[str, list] | None:
    """(field, its (width, height) sizes that are not multiples of `factor`) for the first such field."""
    for name in ("sizes", "eval_sizes"):
        bad = [s for s in getattr(train, name) if s[0] % factor or s[1] % factor]
        if bad:
            return name, bad
    return None


def _check_run(p: ConfigParser, c: VQRunConfig) -> None:
    factor = c.model.downsample_factor
    if (bad := misaligned_sizes(c.training, factor)) is not None:
        name, sizes = bad
        sizes = [list(s) for s in sizes]
        raise p.error(f"training.{name}", f"'training.{name}': {sizes} are not multiples of the model's "
                                          f"downsampling factor {factor}")
    if c.out_dir is not None:
        c.out_dir = resolve_path(c.out_dir, config_folder(p.source))


def load_vq_config(path: str | Path) -> VQRunConfig:
    """Read a .yaml/.yml/.toml VQGAN training config; errors are `ConfigError` naming file:line."""
    data, lines = read_config(path)
    if isinstance(data, dict) and "model" not in data:
        raise ConfigError(f"{path}: a 'model:' section (VQGANConfig fields) is required")
    return build_config(VQRunConfig, data, str(path), lines, check=_check_run, hints=HINTS)


# ----------------------------------------------------------------------------- data


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(list(entropy))


def render_batch(rng: np.random.Generator, n: int, width: int, height: int):
    """n random scenes rendered with jitter -> (scenes, uint8 array [n, H, W, 3])."""
    scenes = [random_scene(rng) for _ in range(n)]
    arr = np.stack([np.asarray(render(s, width, height, rng=rng)) for s in scenes])
    return scenes, arr


def to_pixels(arr: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], exactly as `preprocess` maps pixels."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def training_batch(seed: int, step: int, batch_size: int, sizes: Sequence[Size]) -> torch.Tensor:
    """The batch of a step: a pure function of (seed, step), which is what makes resume exact."""
    rng = _rng(TRAIN_STREAM, seed, step)
    width, height = sizes[int(rng.integers(len(sizes)))]
    return to_pixels(render_batch(rng, batch_size, width, height)[1])


# ----------------------------------------------------------------------------- losses


def _palette_distances(pixels: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] on the 0-255 scale -> squared distances to each palette color [B,6,H,W]."""
    p = _PALETTE.to(pixels.device)[None, :, :, None, None]
    return (pixels[:, None] - p).pow(2).sum(dim=2)


def parse_labels(target: torch.Tensor) -> torch.Tensor:
    """The parser's per-pixel classification of [-1,1] images: palette index, or -1 for background.
    Same rule as `world.parse.classify_pixels`; squared distances of whole 0-255 values are exact
    integers in float32, so the two agree pixel for pixel."""
    d2 = _palette_distances(torch.round((target.float() + 1.0) * 127.5))
    best, label = d2.min(dim=1)
    return torch.where(best <= PARSE_THRESHOLD ** 2, label, torch.full_like(label, -1))


def parse_loss(reconstruction: torch.Tensor, target: torch.Tensor, margin: float = 16.0,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge that pays exactly for what the parser sees: a pixel of palette color k in the target
    should stay within 80 - margin of color k, a background pixel farther than 80 + margin from
    every palette color. If every pixel keeps its label, the parsed scene is the target's.

    L1/MSE alone under-weight the few pixels that decide a parse (a square's corners, the rim of a
    small object); this term is zero almost everywhere and only pushes pixels that would flip.
    Mean over pixels, in [-1,1] units like the L1 term."""
    if labels is None:
        labels = parse_labels(target)
    rec = (reconstruction.float().clamp(-1.0, 1.0) + 1.0) * 127.5  # what postprocess keeps
    dist = _palette_distances(rec).clamp_min(1e-6).sqrt()  # [B,6,H,W]
    is_obj = labels >= 0
    own = dist.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    inside = F.relu(own - (PARSE_THRESHOLD - margin))
    outside = F.relu((PARSE_THRESHOLD + margin) - dist.min(dim=1).values)
    return torch.where(is_obj, inside, outside).mean() / 127.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 images; capped at 100 dB for identical ones."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else float(min(100.0, 10 * math.log10(255.0 ** 2 / mse)))


# ----------------------------------------------------------------------------- evaluation


def eval_set(n: int, seed: int, size: Size):
    """Held-out renders: the EVAL stream, one generator per size so sizes do not shift each other."""
    width, height = size
    return render_batch(_rng(EVAL_STREAM, seed, width, height), n, width, height)


def evaluate_vq(image_tokenizer, n: int = 200, seed: int = 0,
                sizes: Sequence[Size] = ((64, 64),)) -> dict[str, Any]:
    """Round-trip n held-out renders per size through `image_tokenizer.encode` / `.decode` (the
    public path the pipeline uses) and score the results:

    psnr            mean per-image PSNR (dB) of the uint8 reconstruction
    parse_exact     fraction of reconstructions whose parse equals the rendered scene
    codebook_usage  fraction of the codebook used by the images' codes

    Overall numbers average over all images; `sizes` holds the same per "WxH"."""
    per_size: dict[str, dict[str, float]] = {}
    used: set[int] = set()
    all_psnr, all_exact = [], []
    for width, height in sizes:
        scenes, arr = eval_set(n, seed, (width, height))
        images = [_to_image(a) for a in arr]
        codes = image_tokenizer.encode(images, width=width, height=height)
        recon = image_tokenizer.decode(codes)
        size_used: set[int] = set()
        for c in codes:
            size_used.update(np.unique(np.asarray(c)).tolist())
        used |= size_used
        p = [psnr(np.asarray(r.convert("RGB")), a) for r, a in zip(recon, arr)]
        exact = [parse(r) == s for r, s in zip(recon, scenes)]
        all_psnr += p
        all_exact += exact
        per_size[f"{width}x{height}"] = {
            "psnr": float(np.mean(p)), "parse_exact": float(np.mean(exact)),
            "codebook_usage": len(size_used) / image_tokenizer.config.codebook_size, "n": n,
        }
    return {
        "psnr": float(np.mean(all_psnr)), "parse_exact": float(np.mean(all_exact)),
        "codebook_usage": len(used) / image_tokenizer.config.codebook_size, "n": len(all_exact), "sizes": per_size,
    }


def _to_image(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------- trainer


class VQTrainer(TokenizerTrainer):
    """One VQGAN training run: `step()` trains on one batch; `save_checkpoint()` /
    `load_checkpoint()` write and read a checkpoint directory.

    Holds only what a resumed run needs beyond (seed, step): weights, optimizer state, the usage
    counts of the current restart window, the codebook EMA, and the best evaluation so far."""

    MODEL, TOKENIZER = VQGAN, ImageTokenizer
    BEST_BY, HIGHER_IS_BETTER = ("parse_exact", "psnr"), True  # parse better; PSNR breaks ties
    SECTION = "training"
    RESUMABLE_CHANGES = RESUMABLE_CHANGES
    NAME = "vqgan"

    def __init__(self, config: VQGANConfig, train: VQTrainConfig, out_dir: str | Path | None = None):
        factor = config.downsample_factor
        if (bad := misaligned_sizes(train, factor)) is not None:
            raise ValueError(f"{bad[0]} {bad[1]} are not multiples of the model's downsampling factor {factor}")
        self.bf16 = resolve_precision(train.precision, torch.device("cpu")) == "bf16"  # trains on the CPU
        super().__init__(config, train, out_dir)
        codebook = self.model.quantize.embedding.weight
        if train.codebook_ema is not None:
            codebook.requires_grad_(False)  # moved by `_ema_update`, not by the optimizer
        # EMA state: how many latents each code was picked for, and their sum (both decayed)
        self.ema_count = torch.ones(config.codebook_size)
        self.ema_sum = codebook.detach().clone()
        # no weight decay on the codebook (it would pull unused codes to 0), norms and biases
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        self.optimizer = self.adamw(decay, rest)
        self.usage = torch.zeros(config.codebook_size, dtype=torch.long)  # codes picked this window

    # -- one step

    def losses(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Forward pass -> (named losses incl. "loss", latents before quantization, codes)."""
        t, m = self.train, self.model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            z = m.quant_conv(m.encoder(pixels))
            # the quantizer's distances and losses in float32: bf16 near-ties would flip codes
            z_q, codes, codebook_loss, commitment_loss = m.quantize(z.float(), m.config.commitment_beta)
            rec = m.decode_latents(z_q).float()
        out = {
            "l1": (rec - pixels).abs().mean(),
            "mse": (rec - pixels).pow(2).mean(),
            "parse": parse_loss(rec, pixels, t.parse_margin),
            "codebook": codebook_loss,
            "commitment": commitment_loss,
        }
        out["loss"] = (t.l1_weight * out["l1"] + t.mse_weight * out["mse"] + t.parse_weight * out["parse"]
                       + codebook_loss + commitment_loss)
        return out, z.detach().float(), codes

    def step(self) -> dict[str, float]:
        """Train on the batch of the current step; returns its losses (before the update).

        A NaN or inf loss or gradient norm raises TrainError (naming the step) before the update."""
        t = self.train
        step = self.step_count
        pixels = training_batch(t.seed, step, t.batch_size, t.sizes)
        self.model.train()
        lr = self.set_lr(step)
        out, z, codes = self.losses(pixels)
        norm = self.update(out["loss"], step)
        self.usage += torch.bincount(codes.reshape(-1), minlength=self.config.codebook_size)
        if t.codebook_ema is not None:
            self._ema_update(z, codes)
        restarted = self.restart_dead_codes(z, step) if self.restart_due(step) else 0
        self.step_count += 1
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics.update(step=self.step_count, lr=lr, grad_norm=norm, restarted=restarted)
        return metrics

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Move each code toward the (decayed) mean of the latents that picked it."""
        decay = self.train.codebook_ema
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = codes.reshape(-1)
        counts = torch.bincount(idx, minlength=self.config.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # codes nobody picked keep their vector (count and sum decay together); the epsilon only
        # guards the division
        self.model.quantize.embedding.weight.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, step: int) -> int:
        """Re-initialise the codes no latent picked in this window to random latents of this batch
        (plus a little noise, so two restarts from one latent split apart); returns how many.

        On small data most of a codebook otherwise dies early and stays dead: an unused code gets no
        gradient. Restarted rows also get fresh Adam moments."""
        dead = torch.nonzero(self.usage == 0).flatten()
        self.usage.zero_()
        if len(dead) == 0:
            return 0
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [RESTART_STREAM, self.train.seed, step]).generate_state(1)[0]))
        pick = torch.randint(len(flat), (len(dead),), generator=gen)
        noise = torch.randn(len(dead), flat.shape[1], generator=gen) * (0.01 * flat.std() + 1e-6)
        weight = self.model.quantize.embedding.weight
        weight[dead] = (flat[pick] + noise).to(weight.dtype)
        # EMA state of a restarted code: as if one latent had picked it
        self.ema_count[dead] = 1.0
        self.ema_sum[dead] = weight[dead].float()
        state = self.optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
        self.restarted_total += len(dead)
        return len(dead)

    # -- evaluation

    def evaluate(self, n: int | None = None, sizes: Sequence[Size] | None = None) -> dict[str, Any]:
        self.model.eval()
        tok = ImageTokenizer(self.model)
        return evaluate_vq(tok, n or self.train.eval_images, self.train.seed, sizes or self.train.eval_sizes)

    # -- progress

    def progress_postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "parse": f"{metrics['parse']:.4f}"}

    def eval_message(self, metrics: dict[str, Any]) -> str:
        return (f"psnr {metrics['psnr']:.2f} parse_exact {metrics['parse_exact']:.4f} "
                f"usage {metrics['codebook_usage']:.3f}")


# ----------------------------------------------------------------------------- the loop


def train_vqgan(config: VQGANConfig, out_dir: str | Path, train: VQTrainConfig | None = None, *,
                resume: bool = True, max_steps: int | None = None, **options: Any) -> ImageTokenizer:
    """Train a VQGAN on shapes-world renders; returns the tokenizer with the best evaluated weights.

    `train` (or VQTrainConfig's defaults) with `options` replacing its fields. Writes the output
    directory of the module docstring. resume: continue from the newest intact checkpoint there
    (False refuses a directory that holds checkpoints). max_steps: stop (checkpointed) at this step
    without changing the schedule, which spans `train.steps`; a later call resumes. A NaN or inf
    loss raises TrainError and leaves the checkpoints as they were."""
    train = dataclasses.replace(train, **options) if train is not None else VQTrainConfig(**options)
    check_max_steps(max_steps)
    out = Path(out_dir)
    root = out / CHECKPOINTS
    if (out / LEGACY_CHECKPOINT).exists() and not checkpoint_dirs(root):
        raise TrainError(f"{out / LEGACY_CHECKPOINT} was written by an older tokenloom (a pickled checkpoint), which "
                         "is not read any more; start a new output directory")
    trainer = VQTrainer(config, train, out)
    return fit(trainer, out, resume=resume, max_steps=max_steps,
               config={"model": config.to_dict(), "training": train.to_dict()})
