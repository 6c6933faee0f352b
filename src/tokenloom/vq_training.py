"""Train a VQGAN image tokenizer on shapes-world renders, and measure it by parsing its reconstructions.

Images are rendered on the fly from random scenes (shapes-world.md), so there is no dataset to
build and no epoch to overfit. The loss is taming's VQ objective without the GAN and LPIPS parts
(which cost more than the whole model on two CPU cores and buy nothing on flat-colored shapes):

    L1 + MSE                        reconstruction
  + parse term                      per-pixel hinge that keeps every pixel on the same side of the
                                    parser's color threshold as in the original (see `parse_loss`)
  + codebook + beta * commitment    VQ-VAE losses, from `VectorQuantizer`

Codes that no latent picked during a window of steps are re-initialised to random encoder outputs
(dead-code restarts). Every batch is a pure function of (seed, step) and every restart draws from a
generator seeded by (seed, step), so a resumed run repeats an uninterrupted one exactly.

The score that matters is `parse_exact`: the fraction of held-out renders whose reconstruction
(encode -> decode -> uint8) parses back to exactly the rendered scene. For a model that edits,
`code_stability` matters too: how many codes of untouched cells an edit leaves as they were, and
`copy_ceiling`: how many edits still parse when a model copies those cells' codes from the source.

    python -m tokenloom.vq_training configs/shapes-tiny-vq.yaml --out /tmp/vq-run \
        --export src/tokenloom/assets/shapes-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_bytes
from .image_processing import ImageTokenizer
from .precision import PRECISIONS, resolve_precision
from .vqgan import VQGAN, VQGANConfig
from .world import COLORS, matches, parse, random_scene, render
from .world.tasks import edit_sample

# Seed-stream tags: training batches, restarts and evaluation draw from different SeedSequence
# entropy lists, so no evaluation render comes from the training stream (equal scenes can still
# recur: the scene space is finite).
TRAIN_STREAM, RESTART_STREAM, EVAL_STREAM = 0x7A11, 0x7A12, 0x7A13
STABILITY_TAG = 0x57AB  # with EVAL_STREAM: the edit pairs of code_stability

PARSE_THRESHOLD = 80.0  # the parser's color distance (shapes-world.md), on the 0-255 scale
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (6, 3), 0-255

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
BEST_DIR = "best"

Size = tuple[int, int]  # (width, height)


@dataclass
class VQTrainConfig:
    """Everything about a training run except the model; `train_vqgan` takes these as keywords."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    sizes: tuple[Size, ...] = ((64, 64), (96, 64), (64, 96))  # (width, height); one size per batch
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    parse_weight: float = 1.0
    parse_margin: float = 16.0  # 0-255 scale: object pixels aim within 80 - m of their color, background beyond 80 + m
    # codebook update: EMA of the latents each code is picked for (k-means style; converges in far
    # fewer steps than the codebook loss's gradient), or None to train it with the codebook loss
    codebook_ema: float | None = 0.95
    restart_every: int = 25  # steps per usage window; 0 disables restarts
    restart_until: float = 0.85  # fraction of steps after which codes stop being restarted
    # "fp32", "bf16" (CPU autocast: about 1.4x faster with bf16 units, far slower where emulated) or
    # "auto" (bf16 only where native); see tokenloom.precision
    precision: str = "fp32"
    log_every: int = 10
    eval_every: int = 250
    eval_images: int = 100  # per eval size
    eval_sizes: tuple[Size, ...] = ((64, 64), (96, 64), (64, 96))
    checkpoint_every: int = 250
    max_minutes: float | None = None  # wall-clock budget: stop early, evaluate and keep the best
    progress: bool = True

    def __post_init__(self):
        self.sizes = tuple((int(w), int(h)) for w, h in self.sizes)
        self.eval_sizes = tuple((int(w), int(h)) for w, h in self.eval_sizes)
        self.betas = tuple(float(b) for b in self.betas)
        if self.steps < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size and lr positive")
        if not self.sizes:
            raise ValueError("sizes must name at least one (width, height)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("sizes", "eval_sizes"):
            d[k] = [list(s) for s in d[k]]
        d["betas"] = list(d["betas"])
        return d


def load_config(path: str | Path) -> tuple[VQGANConfig, VQTrainConfig]:
    """Read a YAML with a `model:` section (VQGANConfig fields) and a `training:` section
    (VQTrainConfig fields) -> (VQGANConfig, VQTrainConfig)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    unknown = sorted(set(raw) - {"model", "training"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown} (expected model, training)")
    known = {f.name for f in dataclasses.fields(VQTrainConfig)}
    extra = sorted(set(raw.get("training") or {}) - known)
    if extra:
        hint = " (bf16: true is now precision: bf16, or auto)" if "bf16" in extra else ""
        raise ValueError(f"{path}: unknown training keys {extra}{hint}")
    return VQGANConfig.from_dict(raw["model"]), VQTrainConfig(**(raw.get("training") or {}))


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

    psnr          mean per-image PSNR (dB) of the uint8 reconstruction
    parse_exact   fraction of reconstructions whose parse equals the rendered scene
    codebook_usage  fraction of the codebook used by the images' codes
    code_stability  see `code_stability` (n edit pairs)
    copy_ceiling    see `copy_ceiling` (the same n edit pairs), keyed by margin as a string

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
    stability, ceiling = edit_code_scores(image_tokenizer, n, seed, sizes, margins=(0, 1, 2))
    return {
        "psnr": float(np.mean(all_psnr)), "parse_exact": float(np.mean(all_exact)),
        "codebook_usage": len(used) / image_tokenizer.config.codebook_size, "n": len(all_exact),
        "code_stability": stability, "copy_ceiling": {str(m): v for m, v in ceiling.items()}, "sizes": per_size,
    }


def code_stability(image_tokenizer, n: int = 200, seed: int = 0, sizes: Sequence[Size] = ((64, 64),)) -> float:
    """Of the code cells whose pixels an edit leaves exactly as they were, the fraction whose code
    stays the same too, over n held-out shapes-world edits (one object added, removed, moved or
    recolored; the others keep their exact pixels).

    At 1.0 a model that edits can copy untouched regions token for token. Codes that depend on the
    whole image (image-wide GroupNorm, attention, a receptive field wider than the image) score far
    lower, and the model must learn to redraw what did not change with other codes."""
    return edit_code_scores(image_tokenizer, n, seed, sizes, margins=())[0]


def edit_code_scores(image_tokenizer, n: int, seed: int, sizes: Sequence[Size],
                     margins: Sequence[int]) -> tuple[float, dict[int, float]]:
    """(code_stability, copy_ceiling at `margins`) from one pass over the same n held-out edits, so
    a caller that wants both encodes each edit once; no margins: nothing is decoded."""
    rng = _rng(EVAL_STREAM, seed, STABILITY_TAG)
    same = cells = 0
    right = dict.fromkeys(margins, 0)
    for _ in range(n):
        sample = edit_sample(rng, sizes)
        before, after = sample.images
        source, target = (np.asarray(c) for c in image_tokenizer.encode([before, after], *before.size))
        changed = changed_cells(before, after, target.shape[:2])
        equal = (source == target).reshape(*changed.shape, -1).all(-1)
        same += int((equal & ~changed).sum())
        cells += int((~changed).sum())
        if margins:
            drawn = image_tokenizer.decode([copied_target(source, target, changed, m) for m in margins])
            for m, image in zip(margins, drawn):
                right[m] += matches(parse(image), sample.scenes[1])
    return same / max(cells, 1), {m: hits / max(n, 1) for m, hits in right.items()}


def changed_cells(before, after, grid: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: the code cells of a grid over two same-size images where any pixel differs."""
    h, w = grid
    changed = (np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB"))).any(-1)
    return changed.reshape(h, changed.shape[0] // h, w, changed.shape[1] // w).any(axis=(1, 3))


def grow_cells(cells: np.ndarray, margin: int) -> np.ndarray:
    """[h, w] bool: the cells within `margin` steps (8-neighbourhood) of a True cell."""
    grown = np.asarray(cells, dtype=bool)
    for _ in range(margin):
        p = np.pad(grown, 1)
        grown = np.logical_or.reduce([p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx]
                                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return grown


def copied_target(source_codes, target_codes, changed: np.ndarray, margin: int) -> np.ndarray:
    """What a model that copies draws: the target's codes within `margin` cells of a changed cell,
    the source's everywhere else. Codes are [h, w] or [h, w, ...]; changed is [h, w]."""
    near = grow_cells(changed, margin)
    near = near.reshape(near.shape + (1,) * (np.ndim(target_codes) - 2))
    return np.where(near, target_codes, source_codes)


def copy_ceiling(image_tokenizer, n: int = 200, seed: int = 0, sizes: Sequence[Size] = ((64, 64),),
                 margins: Sequence[int] = (0, 1, 2)) -> dict[int, float]:
    """Per margin: of code_stability's n held-out edits, the fraction that still parse back to the
    edited scene when every cell farther than `margin` cells from the change keeps the source's code
    (copied_target). How far a model that copies untouched codes can get, whatever the encoder does
    to them: the decoder's reach decides it."""
    return edit_code_scores(image_tokenizer, n, seed, sizes, margins)[1]


def _to_image(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(arr, "RGB")


# ----------------------------------------------------------------------------- trainer


class VQTrainer:
    """One VQGAN training run: `step()` trains on one batch; `save()` / `load()` checkpoint the run.

    Holds only what a resumed run needs beyond (seed, step): weights, optimizer state, the usage
    counts of the current restart window, and the best evaluation so far."""

    def __init__(self, config: VQGANConfig, train: VQTrainConfig, out_dir: str | Path | None = None):
        self.config, self.train = config, train
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.bf16 = resolve_precision(train.precision, torch.device("cpu")) == "bf16"  # trains on the CPU
        with torch.random.fork_rng(devices=[]):  # init from the run's seed, not the global RNG
            torch.manual_seed(train.seed)
            self.model = VQGAN(config)
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
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=train.lr, betas=train.betas)
        self.step_count = 0
        self.usage = torch.zeros(config.codebook_size, dtype=torch.long)  # codes picked this window
        self.restarted_total = 0
        self.best: dict[str, Any] | None = None  # {"metrics": ..., "state": state_dict}

    # -- schedule

    def lr_at(self, step: int) -> float:
        t = self.train
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cos)

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
        """Train on the batch of the current step; returns its losses (before the update)."""
        t = self.train
        step = self.step_count
        pixels = training_batch(t.seed, step, t.batch_size, t.sizes)
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        out, z, codes = self.losses(pixels)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.usage += torch.bincount(codes.reshape(-1), minlength=self.config.codebook_size)
        if t.codebook_ema is not None:
            self._ema_update(z, codes)
        restarted = 0
        # first window ends after step 0, so the tiny uniform init is replaced by data at once
        if t.restart_every and step < t.restart_until * t.steps and step % t.restart_every == 0:
            restarted = self.restart_dead_codes(z, step)
        self.step_count += 1
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics.update(step=step, lr=self.lr_at(step), restarted=restarted)
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

    def consider_best(self, metrics: dict[str, Any]) -> bool:
        """Keep these weights if they parse better (PSNR breaks ties) than the best so far."""
        key = (metrics["parse_exact"], metrics["psnr"])
        if self.best is not None and key <= (self.best["metrics"]["parse_exact"], self.best["metrics"]["psnr"]):
            return False
        self.best = {"metrics": metrics, "step": self.step_count,
                     "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        return True

    def best_tokenizer(self) -> ImageTokenizer:
        """The best evaluated weights (the current ones when nothing was evaluated)."""
        model = VQGAN(self.config)
        model.load_state_dict(self.best["state"] if self.best else self.model.state_dict())
        return ImageTokenizer(model.eval())

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "model_config": self.config.to_dict(), "train_config": self.train.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step_count, "usage": self.usage, "ema_count": self.ema_count, "ema_sum": self.ema_sum,
            "restarted_total": self.restarted_total,
            "best": self.best,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the run's state atomically: an interrupted save leaves the previous checkpoint."""
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def load(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else self.out_dir / CHECKPOINT_NAME
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt["model_config"] != self.config.to_dict():
            raise ValueError(f"{path} was trained with another model config: {ckpt['model_config']}")
        # the batch stream and schedule depend on these; the rest (logging, budget) may change on resume
        for key in ("seed", "batch_size", "sizes", "steps", "lr"):
            if ckpt["train_config"][key] != self.train.to_dict()[key]:
                raise ValueError(f"{path}: training {key} was {ckpt['train_config'][key]!r}, "
                                 f"now {self.train.to_dict()[key]!r}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step_count = ckpt["step"]
        self.usage = ckpt["usage"]
        self.ema_count, self.ema_sum = ckpt["ema_count"], ckpt["ema_sum"]
        self.restarted_total = ckpt["restarted_total"]
        self.best = ckpt["best"]


# ----------------------------------------------------------------------------- the loop


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint a run resumes from: they will be logged again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) < step]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def train_vqgan(config: VQGANConfig, out_dir: str | Path, steps: int, batch_size: int, lr: float,
                seed: int = 0, *, resume: bool = True, **options: Any) -> ImageTokenizer:
    """Train a VQGAN on shapes-world renders; returns the tokenizer with the best evaluated weights.

    `options` are the other `VQTrainConfig` fields (sizes, loss weights, restarts, eval and checkpoint
    cadence, precision, max_minutes, progress). Writes to `out_dir`: metrics.jsonl (one record per logged
    step and per evaluation), checkpoint.pt (atomic; a later call with resume=True continues from it)
    and best/ (ImageTokenizer.save_pretrained of the best weights)."""
    train = VQTrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = VQTrainer(config, train, out)
    metrics_path = out / METRICS_NAME
    if resume and (out / CHECKPOINT_NAME).exists():
        trainer.load()
        _truncate_metrics(metrics_path, trainer.step_count)
    elif metrics_path.exists():
        metrics_path.unlink()

    from tqdm.auto import tqdm

    start = time.monotonic()
    bar = tqdm(total=train.steps, initial=trainer.step_count, desc="vqgan", unit="step",
               disable=not train.progress, dynamic_ncols=True)
    last_eval = -1
    stopped_early = False
    try:
        while trainer.step_count < train.steps:
            m = trainer.step()
            bar.update(1)
            done = trainer.step_count
            if done % train.log_every == 0 or done == train.steps:
                m["elapsed_s"] = round(time.monotonic() - start, 1)
                _append_jsonl(metrics_path, {"kind": "train", **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", parse=f"{m['parse']:.4f}", refresh=False)
            over_budget = train.max_minutes is not None and time.monotonic() - start > 60 * train.max_minutes
            if train.eval_every and (done % train.eval_every == 0 or done == train.steps or over_budget):
                ev = trainer.evaluate()
                trainer.consider_best(ev)
                last_eval = done
                _append_jsonl(metrics_path, {"kind": "eval", "step": done,
                                             "elapsed_s": round(time.monotonic() - start, 1), **ev})
                bar.write(f"step {done}: psnr {ev['psnr']:.2f} parse_exact {ev['parse_exact']:.4f} "
                          f"usage {ev['codebook_usage']:.3f} stability {ev['code_stability']:.3f}")
            if done % train.checkpoint_every == 0 or done == train.steps or over_budget:
                trainer.save()
            if over_budget:
                stopped_early = True
                break
    finally:
        bar.close()
    if train.eval_every and last_eval != trainer.step_count and trainer.step_count > 0:
        trainer.consider_best(trainer.evaluate())
        trainer.save()
    tok = trainer.best_tokenizer()
    tok.save_pretrained(out / BEST_DIR)
    summary = {"kind": "summary", "step": trainer.step_count, "stopped_early": stopped_early,
               "restarted_total": trainer.restarted_total,
               "best": None if trainer.best is None else {"step": trainer.best["step"], **trainer.best["metrics"]}}
    _append_jsonl(metrics_path, summary)
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenloom.vq_training", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML with model: and training: sections")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoint, best/)")
    p.add_argument("--export", default=None, help="also save the best tokenizer here (save_pretrained)")
    p.add_argument("--max-minutes", type=float, default=None, help="override training.max_minutes")
    p.add_argument("--no-resume", action="store_true", help="start over even if out has a checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--eval-images", type=int, default=500, help="final evaluation: images per size")
    p.add_argument("--eval-sizes", default="64x64,96x64,64x96,48x48,128x128",
                   help="final evaluation sizes, WxH comma-separated")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, train_cfg = load_config(args.config)
    opts = train_cfg.to_dict()
    if args.max_minutes is not None:
        opts["max_minutes"] = args.max_minutes
    core = {k: opts.pop(k) for k in ("steps", "batch_size", "lr", "seed")}
    start = time.monotonic()
    tok = train_vqgan(model_cfg, args.out, **core, resume=not args.no_resume, **opts)
    train_s = time.monotonic() - start
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.eval_sizes.split(",")]
    # a seed the run never evaluated on: the final numbers are not the ones the best was picked by
    final = evaluate_vq(tok, args.eval_images, core["seed"] + 1, sizes)
    final["train_seconds"] = round(train_s, 1)
    (Path(args.out) / "final_eval.json").write_text(json.dumps(final, indent=2) + "\n")
    print(json.dumps(final, indent=2))
    if args.export:
        tok.save_pretrained(args.export)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
