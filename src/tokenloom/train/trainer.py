"""The training loop: packed batches, AdamW with warmup + cosine, z-loss, checkpoints, resume.

Output directory::

    config.json                  the resolved training config (a resumed run must match it)
    metrics.jsonl                one JSON object per logged step ({"step", "loss", "lr", ...}; with
                                 several training sources also "loss/<source>" and "tokens/<source>")
                                 and per evaluation ({"step", "eval_loss", ...})
    loss.png                     train and eval loss against the step
    checkpoints/step-00000200/   model.safetensors, optimizer.safetensors + optimizer.json,
                                 rng.safetensors, state.json (written last, listing the others; the
                                 whole directory is written under a temporary name and renamed)
    final/                       the trained pipeline (`tokenloom.load` reads it); for a LoRA run
                                 (train.trainable: lora) a peft adapter directory instead, whose
                                 tokenloom_adapter.json names the base (`tokenloom.adapters`)

A LoRA run's checkpoints hold the adapter's weights only (the base is read again from
model.pipeline, and resume checks that its weights are unchanged). Under torchrun with several
ranks the model is sharded (FSDP2), each rank trains on its rows of the global batch, checkpoints
are torch.distributed.checkpoint directories and rank 0 alone writes the files above
(`tokenloom.train.distributed`).

A run is a pure function of its config: batches come from a seeded sampler whose position is
checkpointed, the learning rate is a function of the step, and RNG states are restored, so a
run stopped and resumed (automatically, when the output directory has a checkpoint) writes the
same losses as one that was never stopped (bit for bit on the CPU). Resume skips a damaged
newest checkpoint (a file missing or truncated) for the newest intact one, with a warning. A NaN
or inf loss or gradient norm stops the run with `TrainError` before the update, so no checkpoint
ever holds non-finite weights. The keys of RESUMABLE_CHANGES may differ on resume, no other: a
run with another ``optim.lr`` or ``optim.grad_clip`` needs a new output directory, and can go on
from a checkpoint's weights through a copy of the pipeline directory holding them (see `RESTART`).

Precision: weights and optimizer states stay float32; ``precision: bf16`` runs the forward under
bf16 autocast (losses are still computed in float32). It pays where the device has native bf16
matmuls (AVX512-BF16 or AMX CPUs, recent GPUs); elsewhere bf16 is emulated and much slower than
fp32. ``precision: auto`` (the default) picks bf16 only where it is native; asking for bf16 where
it is emulated warns. Measurements: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import LoraTargetError, add_lora, base_record, is_adapter_dir, save_adapter
from ..checkpoint import load_weights
from ..data.packing import IGNORE_INDEX, BatchLoader, LengthBucketSampler, MixtureSampler, ShardDataset
from ..data.pretokenize import MANIFEST_NAME, read_manifest, vocab_fingerprint
from ..data.raw import DataError
from ..modalities import new_token_rows
from ..model import ModelConfig, Transformer
from ..pipeline import Pipeline, torch_dtype
from ..precision import resolve_precision
from .common import (CHECKPOINTS, CONFIG_NAME, METRICS_NAME, MetricsLog, TrainError, check_max_steps, check_resumable,
                     check_step, latest_checkpoint, load_optimizer, load_rng, lr_at, read_state,
                     save_training_checkpoint, start_run, stopped)
from .config import ConfigError, TrainConfig, TrainSource, config_error, load_config, train_sources
from . import distributed
from .plot import plot_losses

__all__ = ["CHECKPOINTS", "METRICS_NAME", "MetricsLog", "Trainer", "TrainError", "lr_at", "param_groups",
           "token_losses", "train", "train_experts_only", "train_image_head_only"]
# Keys that may change between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = {"out_dir", "data.eval", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.save_every", "train.keep_checkpoints", "train.progress", "train.device"}
# How to go on after a non-finite loss, when a resumed run would repeat it.
RESTART = ("optim.lr and optim.grad_clip cannot change on resume: train in a new output directory, and to keep the "
           "progress, point model.pipeline at a copy of the pipeline directory whose model weights are replaced by "
           "the checkpoint's model.safetensors, with model.weights: pretrained")


# --------------------------------------------------------------------------- pieces


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, split so that only Linear weights decay.

    Norm gains and biases set scales and offsets that decay would pull to zero; embeddings are
    rows looked up rarely for rare tokens, which decay would shrink between their uses.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _train_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Make `weight` trainable in `rows` only: a hook zeroes its gradient elsewhere; with no weight decay on
    it (the caller's job) the other rows then stay bit-identical under AdamW."""
    weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[: len(rows)] = rows.to(weight.device)
    keep = keep[:, None]
    # where(), not a product: a non-finite gradient in a frozen row must not leak as NaN.
    return weight.register_hook(lambda grad: torch.where(keep, grad, torch.zeros((), dtype=grad.dtype,
                                                                                 device=grad.device)))


def train_image_head_only(model: Transformer, code_mask: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Anole-style: freeze everything but the output rows of image codes (the output matrix keeps
    requires_grad, its other rows a zero gradient)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return _train_rows(model.output_weight, code_mask)


def train_experts_only(model: Transformer, rows: torch.Tensor) -> list[torch.utils.hooks.RemovableHandle]:
    """Freeze the model but its expert projections (and expert head: ModelConfig.expert_head) and, in the
    embedding and the output head, the rows of the experts' modality tokens (`rows`,
    tokenloom.modalities.new_token_rows): every computation on tokens outside the experts' spans then stays
    exactly the base model's. Needs no weight decay (the caller's job)."""
    if not model.config.experts:
        raise ValueError("train.trainable: experts needs a model with experts (tokenloom add-modality "
                         "--experts adds them)")
    for name, p in model.named_parameters():
        p.requires_grad_(".expert." in name or name.startswith("expert_"))
    weights = {id(w): w for w in (model.tok_embeddings.weight, model.output_weight)}.values()  # tied: once
    return [_train_rows(w, rows) for w in weights]


def token_losses(model: Transformer, batch: dict[str, Any], device: torch.device,
                 by_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and summed z-loss (logsumexp^2) over the batch's trained positions.

    The output projection runs only on positions with a target: prompts, padding and document
    ends cost no vocabulary-sized logits. by_source: where the batch has "sources" (data mixing),
    each source's summed cross-entropy is added into it (detached: logging only).
    """
    labels = batch["labels"].to(device)
    input_ids = batch["input_ids"].to(device)
    hidden = model(input_ids, document_ids=batch["document_ids"].to(device), return_hidden=True)
    keep = labels != IGNORE_INDEX
    routed = model.routed(input_ids)  # None unless the experts have their own head
    logits = model.project(hidden[keep], None if routed is None else routed[keep]).float()  # softmax in float32
    targets = labels[keep]
    lse = torch.logsumexp(logits, dim=-1)
    per_token = lse - logits.gather(1, targets[:, None]).squeeze(1)
    if by_source is not None and "sources" in batch:
        by_source.index_add_(0, batch["sources"].to(device)[keep], per_token.detach().to(by_source.dtype))
    return per_token.sum(), lse.pow(2).sum()


def check_sources(config: TrainConfig, prefix: str = "", label: str = "") -> list[TrainSource]:
    """The config's training sources, each a finished shard directory, else a ConfigError naming its
    key (with `prefix`: a schedule stage's, 'schedule[1].') and line (`label`: what to say first)."""
    sources = train_sources(config)
    for source, entry in zip(sources, config.data.train):
        key = prefix + source.key + (".path" if isinstance(entry, dict) else "")
        path = Path(source.path)
        if not path.exists():
            problem = "does not exist"
        elif not path.is_dir():
            problem = "is not a directory"
        elif not (path / MANIFEST_NAME).is_file():
            problem = f"is not a shard directory (no {MANIFEST_NAME}: pre-tokenize into it first)"
        else:
            try:
                problem = None if read_manifest(path)["complete"] else "holds an unfinished pre-tokenization (rerun it)"
            except (DataError, ValueError) as e:
                problem = f"is unreadable ({e})"
        if problem is not None:
            raise config_error(config, key, f"{label + ': ' if label else ''}'{key}': {path} {problem}")
    return sources


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_run(out_dir: Path, config: TrainConfig) -> None:
    """TrainError unless `config` may resume the run in out_dir: its config.json differs from it only
    in RESUMABLE_CHANGES."""
    saved_config = Path(out_dir) / CONFIG_NAME
    try:
        previous = json.loads(saved_config.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot resume {out_dir}: its {CONFIG_NAME}, the run's config, is unreadable "
                         f"({type(e).__name__}: {e}); use a new output directory") from None
    check_resumable(str(out_dir), _flatten(previous), _flatten(config.to_dict()), RESUMABLE_CHANGES)


# --------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = True,
                 world: distributed.World | None = None):
        if config.schedule:
            raise ValueError("a config with a schedule runs its stages one Trainer each: use train(config)")
        self.config = config
        self.world = world  # a run on several ranks (torchrun): FSDP2, see tokenloom.train.distributed
        self.main = world is None or world.main  # the process that prints and writes the run's files
        self.out_dir = Path(out_dir)
        c = config
        self.pipeline = self._build_pipeline()
        self.model = self.pipeline.model
        self.device = next(self.model.parameters()).device
        vocab = self.pipeline.vocab

        self.train_sources = check_sources(c)
        self.train_data = ShardDataset([s.path for s in self.train_sources])
        self.eval_data = ShardDataset(c.data.eval) if c.data.eval else None
        for ds in filter(None, (self.train_data, self.eval_data)):
            if ds.vocab != vocab_fingerprint(vocab):
                raise TrainError(f"shards in {ds.dirs[0]} were made with another vocabulary than "
                                 f"the pipeline {c.model.pipeline}")
        self.pad_id = next(i for i in (vocab.pad, vocab.eos, 0) if i is not None)  # any id: padding is never read
        weights = [s.weight for s in self.train_sources]
        if all(w is not None for w in weights):  # data mixing: rows from each source in proportion to its weight
            try:
                sampler = MixtureSampler(self.train_data.lengths, self.train_data.dir_starts, weights,
                                         names=[s.name for s in self.train_sources], seq_len=c.data.seq_len,
                                         batch_size=c.data.batch_size, seed=c.train.seed, window=c.data.window,
                                         packing=c.data.packing)
            except DataError as e:
                raise TrainError(f"data.train: {e}") from None
        else:  # the directories read as one set, each in proportion to its size
            sampler = LengthBucketSampler(self.train_data.lengths, seq_len=c.data.seq_len,
                                          batch_size=c.data.batch_size, seed=c.train.seed, window=c.data.window,
                                          packing=c.data.packing)
        # Several sources: batches say where each position is from, and the metrics log loss/<source>.
        self.loader = BatchLoader(self.train_data, sampler, pad_id=self.pad_id, image_begin=vocab.image_begin,
                                  uncond_prefix=self.pipeline.unconditional_prompt(),
                                  context_dropout=c.data.context_dropout,
                                  sources=self.train_data.dir_starts if len(self.train_sources) > 1 else None,
                                  video=(vocab.video_begin, vocab.video_end) if vocab.has_video else None)

        self.hook = None
        self.adapter = None  # a LoRA run's PeftModel (self.model is its Transformer, adapted in place)
        self.lora_base: dict[str, Any] | None = None  # and the base it adapts (tokenloom_adapter.json)
        weight_decay = c.optim.weight_decay
        if c.train.trainable == "image_head":
            self.hook = train_image_head_only(self.model, vocab.code_mask)
            weight_decay = 0.0  # decoupled decay would shrink the frozen rows too
        elif c.train.trainable == "experts":
            if not self.model.config.experts:
                raise config_error(c, "train.trainable", "'train.trainable: experts' needs a model with experts "
                                                         "(tokenloom add-modality --experts adds them)")
            if world is not None:
                raise config_error(c, "train.trainable", "'train.trainable: experts' runs in one process (not yet "
                                                         "under torchrun)")
            rows = new_token_rows(vocab, self.model.config.experts)
            self.hook = train_experts_only(self.model, rows)
            weight_decay = 0.0  # decoupled decay would shrink the frozen rows too
        elif c.train.trainable == "lora":
            self.adapter = self._add_lora()
        if world is not None:
            world.shard(self.model, head_only=self.hook is not None)
            self.device = world.device
        self.optimizer = torch.optim.AdamW(param_groups(self.model, weight_decay), lr=c.optim.lr,
                                           betas=tuple(c.optim.betas), eps=c.optim.eps)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.trainable_parameters = sum(p.numel() for p in self.trainable)
        if c.train.trainable == "image_head":
            self.trainable_parameters = int(vocab.code_mask.sum()) * self.model.output_weight.shape[1]
        elif c.train.trainable == "experts":  # the row-hooked matrices count by their trained rows
            hooked = {id(self.model.tok_embeddings.weight), id(self.model.output_weight)}
            self.trainable_parameters = (sum(p.numel() for p in self.trainable if id(p) not in hooked)
                                         + int(rows.sum()) * self.model.output_weight.shape[1] * len(hooked))
        total = sum(p.numel() for p in self.model.parameters())
        if c.data.seq_len > self.model.config.max_position_embeddings:
            warnings.warn(f"data.seq_len {c.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{self.model.config.max_position_embeddings}", stacklevel=2)
        self.step = 0
        self.tokens = 0  # document tokens trained on
        self.positions = 0  # row positions, padding included (tokens / positions: packing efficiency)
        self.metrics = MetricsLog(self.out_dir / METRICS_NAME)
        self.precision = resolve_precision(c.train.precision, self.device)
        self._start(resume)
        if self.main:  # once the run is sure to start: a refused one prints its error line only
            print(f"trainable {self.trainable_parameters:,} of {total:,} parameters "
                  f"({100 * self.trainable_parameters / total:.3g}%)", file=sys.stderr, flush=True)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch_dtype("bf16"))
        return nullcontext()

    # -- setup ------------------------------------------------------------------------------

    def _build_pipeline(self) -> Pipeline:
        c = self.config
        try:
            # several ranks: loaded on the CPU, and each rank's shards go to its device (World.shard)
            pipe = Pipeline.from_pretrained(c.model.pipeline, device=None if self.world else c.train.device)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{c.source or 'config'}: model.pipeline: {e}") from None
        if c.model.weights == "random":
            fields = {**pipe.model.config.to_dict(), **c.model.config}
            fields.setdefault("vocab_size", pipe.vocab.size)
            try:
                model_config = ModelConfig.from_dict(fields)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{c.source or 'config'}: model.config: {e}") from None
            model = Transformer.random(model_config, seed=c.train.seed, device=pipe.device)
            pipe = Pipeline(model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, pipe.config)
        # Master weights in float32 whatever the checkpoint's dtype: AdamW updates vanish in bf16.
        pipe.model.float().train()
        return pipe

    def _add_lora(self):
        """peft's LoRA on the Transformer, its targets checked against the built model (a ConfigError
        naming the config's line), its A matrices drawn from the run's seed."""
        c = self.config
        if is_adapter_dir(c.model.pipeline):
            raise config_error(c, "model.pipeline", f"'model.pipeline' {c.model.pipeline} is an adapter directory; "
                                                    "LoRA trains on a model directory: merge it first "
                                                    "(tokenloom merge-adapter BASE ADAPTER OUT)")
        self.lora_base = base_record(c.model.pipeline, self.model.config)
        lora = c.lora
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.train.seed)
                return add_lora(self.model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                target_modules=lora.target_modules, modules_to_save=lora.modules_to_save,
                                base=c.model.pipeline)
        except LoraTargetError as e:
            raise config_error(c, f"lora.{e.key}", str(e)) from None

    def _checkpoint_weights(self) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps of the model: a LoRA run's trainable tensors; None: everything."""
        if self.adapter is None:
            return None
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _start(self, resume: bool) -> None:
        def load(path: Path) -> int:
            check_same_run(self.out_dir, self.config)
            self.load_checkpoint(path)
            return self.step

        if self.world is not None:  # rank 0 picks the checkpoint (checking the config), every rank loads it
            self.world.start(self.out_dir, resume, seed=self.config.train.seed, config=self.config.to_dict(),
                             metrics=self.metrics, check=lambda path: check_same_run(self.out_dir, self.config),
                             load=self.load_checkpoint)
            return
        start_run(self.out_dir, resume, seed=self.config.train.seed, config=self.config.to_dict(),
                  metrics=self.metrics, load=load)

    # -- checkpoints ----------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The newest step-N checkpoint directory, unverified (a damaged one counts until a resume sets
        it aside as step-N.damaged), or None."""
        return latest_checkpoint(self.out_dir / CHECKPOINTS)

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "positions": self.positions,
                 "scheduler": {"step": self.step}, "data": self.loader.state_dict()}
        if self.lora_base is not None:
            state["lora_base"] = self.lora_base["weights_fingerprint"]
        if self.world is not None:  # sharded: torch.distributed.checkpoint
            return self.world.save_checkpoint(self.out_dir / CHECKPOINTS, self.step, self.model, self.optimizer, state,
                                              self.config.train.keep_checkpoints,
                                              trainable_only=self.adapter is not None)
        return save_training_checkpoint(self.out_dir / CHECKPOINTS, self.step, self.model, self.optimizer, state,
                                        self.config.train.keep_checkpoints, weights=self._checkpoint_weights())

    def load_checkpoint(self, path: Path) -> None:
        state = read_state(path)
        if self.world is not None or distributed.is_sharded(state):  # sharded, or a sharded checkpoint
            if self.lora_base is not None and state.get("lora_base") != self.lora_base["weights_fingerprint"]:
                raise TrainError(f"cannot resume from {path}: the base model {self.config.model.pipeline} has other "
                                 "weights than when the run started (its weights fingerprint differs)")
            distributed.load_checkpoint(path, state, self.model, self.optimizer, self.world,
                                        trainable_only=self.adapter is not None)
            self._load_position(path, state)
            return
        weights = load_weights(path, device=self.device)
        adapter = self._checkpoint_weights()
        if adapter is None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
        else:  # LoRA: the checkpoint holds the adapter; the base was loaded from model.pipeline
            if weights.keys() != adapter.keys():
                raise TrainError(f"cannot resume from {path}: its weights are not this run's LoRA adapter")
            if state.get("lora_base") != self.lora_base["weights_fingerprint"]:
                raise TrainError(f"cannot resume from {path}: the base model {self.config.model.pipeline} has other "
                                 "weights than when the run started (its weights fingerprint differs)")
            with torch.no_grad():
                for name, tensor in weights.items():
                    adapter[name].copy_(tensor)
        load_optimizer(self.optimizer, path)
        load_rng(path)
        self._load_position(path, state)

    def _load_position(self, path: Path, state: dict[str, Any]) -> None:
        try:
            self.loader.load_state_dict(state["data"])
        except DataError as e:
            raise TrainError(f"cannot resume from {path}: {e}") from None
        self.step, self.tokens, self.positions = state["step"], state["tokens"], state["positions"]

    # -- steps ----------------------------------------------------------------------------

    def train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        c = self.config
        lr = lr_at(self.step, c.optim.lr, c.optim.warmup_steps, c.train.max_steps, c.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(c.train.grad_accum)]
        # Normalise by the step's target count, so every trained token weighs the same
        # whatever micro-batch it falls in.
        targets = sum(b["num_targets"] for b in micro)
        ce_sum = z_sum = 0.0
        by_source = None  # summed cross-entropy per source (several sources only)
        if self.loader.sources is not None:
            by_source = torch.zeros(len(self.train_sources), device=self.device,
                                    dtype=torch.float32 if self.device.type == "mps" else torch.float64)
        for batch in micro:
            if batch["num_targets"] == 0:
                continue
            if self.world is not None:  # several ranks: each its rows (the loss is still over all `targets`)
                batch = self.world.local(batch)
            with self.autocast():
                if by_source is None:
                    ce, z = token_losses(self.model, batch, self.device)
                else:
                    ce, z = token_losses(self.model, batch, self.device, by_source)
            ((ce + c.train.z_loss * z) / targets).backward()
            ce_sum += ce.item()
            z_sum += z.item()
        max_norm = c.optim.grad_clip if c.optim.grad_clip > 0 else math.inf
        if self.world is not None:  # the global batch's sums, and the norm over every rank's shards
            ce_sum, z_sum = self.world.sum(ce_sum, z_sum)
            if by_source is not None:
                self.world.sum_(by_source)
            norm = self.world.clip_grad_norm_(self.trainable, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        check_step(self.optimizer, self.step + 1, loss=ce_sum, z_loss=z_sum, gradient_norm=float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(b["num_tokens"] for b in micro)
        positions = sum(b["input_ids"].numel() for b in micro)
        self.tokens += tokens
        self.positions += positions
        record = {"step": self.step, "loss": ce_sum / max(1, targets), "z_loss": z_sum / max(1, targets), "lr": lr,
                  "grad_norm": float(norm), "tokens": tokens, "targets": targets,
                  "non_pad_fraction": tokens / max(1, positions)}
        if by_source is not None:
            record.update(self._source_metrics(micro, by_source.tolist()))
        return record

    def _source_metrics(self, micro: list[dict[str, Any]], ce: list[float]) -> dict[str, Any]:
        """loss/<source> (mean cross-entropy of the step's targets from it, where it has any) and
        tokens/<source> (its document tokens in the step)."""
        k = len(self.train_sources)
        targets, tokens = np.zeros(k, np.int64), np.zeros(k, np.int64)
        for batch in micro:
            sources = batch["sources"].numpy()
            targets += np.bincount(sources[batch["labels"].numpy() != IGNORE_INDEX], minlength=k)[:k]
            tokens += np.bincount(sources[sources >= 0], minlength=k)[:k]
        out: dict[str, Any] = {f"loss/{s.name}": ce[i] / int(targets[i])
                               for i, s in enumerate(self.train_sources) if targets[i]}
        out.update({f"tokens/{s.name}": int(tokens[i]) for i, s in enumerate(self.train_sources)})
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        if self.eval_data is None:
            return None
        c = self.config
        sampler = LengthBucketSampler(self.eval_data.lengths, seq_len=c.data.seq_len, batch_size=c.data.batch_size,
                                      seed=c.train.seed, window=c.data.window, packing=c.data.packing,
                                      shuffle=False, loop=False)
        loader = BatchLoader(self.eval_data, sampler, pad_id=self.pad_id)
        self.model.eval()
        ce_sum, targets, batches = 0.0, 0, 0
        for batch in loader:
            if c.train.eval_batches is not None and batches >= c.train.eval_batches:
                break
            if batch["num_targets"]:
                with self.autocast():
                    ce, _ = token_losses(self.model, self.world.local(batch) if self.world else batch, self.device)
                ce_sum += ce.item()
                targets += batch["num_targets"]
            batches += 1
        self.model.train()
        if self.world is not None:
            ce_sum = self.world.sum(ce_sum)[0]
        return {"step": self.step, "eval_loss": ce_sum / max(1, targets), "eval_targets": targets}

    def plot(self) -> None:
        if not self.main:
            return
        records = self.metrics.read()
        plot_losses(self.out_dir / "loss.png", [(r["step"], r["loss"]) for r in records if "loss" in r],
                    [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
                    title=f"loss ({self.out_dir.name})")

    # -- the run ----------------------------------------------------------------------------

    def _restart_hint(self) -> str:
        if self.adapter is not None:  # its checkpoints hold the adapter, not a model
            return ("optim.lr and optim.grad_clip cannot change on resume: train in a new output directory (a LoRA "
                    "run's checkpoints hold its adapter only, so the new run trains a new adapter)")
        if self.config.model.config:  # the copy's config.json must describe the trained shape
            return RESTART + " (and the copy's config.json 'model' section set to the trained model's config)"
        return RESTART

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        c = self.config.train
        stop = c.max_steps if max_steps is None else min(max_steps, c.max_steps)
        start_step, started = self.step, time.perf_counter()
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(c.deterministic or previous)
        try:
            batches = iter(self.loader)
            with tqdm(total=c.max_steps, initial=self.step, desc="train",
                      disable=not (c.progress and self.main)) as bar:
                while self.step < stop:
                    t0 = time.perf_counter()
                    try:
                        record = self.train_step(batches)
                    except TrainError as e:
                        raise stopped(e, self.latest_checkpoint(), self._restart_hint()) from None
                    record["seconds"] = time.perf_counter() - t0
                    if (self.step % c.log_every == 0 or self.step == c.max_steps) and self.main:
                        self.metrics.write(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                    if (c.eval_every and self.step % c.eval_every == 0) or self.step == c.max_steps:
                        evaluation = self.evaluate()
                        if evaluation is not None and self.main:
                            self.metrics.write(evaluation)
                    if (c.save_every and self.step % c.save_every == 0) or self.step == stop:
                        try:
                            self.save_checkpoint()
                        except TrainError as e:
                            raise stopped(e, self.latest_checkpoint(), self._restart_hint()) from None
                        self.plot()
        finally:
            torch.use_deterministic_algorithms(previous)
        final_dir = None
        if self.step >= c.max_steps:
            final_dir = self.out_dir / "final"
            self.model.eval()
            extra = {"run": {"out_dir": str(self.out_dir), "step": self.step}}
            if self.world is not None:  # gathered from the shards, written by rank 0
                self.world.save_final(final_dir, self.pipeline, self.adapter, self.lora_base, extra)
            elif self.adapter is not None:
                save_adapter(self.adapter, final_dir, self.lora_base, extra)
            else:
                self.pipeline.save_pretrained(final_dir)
            self.model.train()
            self.plot()
        records = self.metrics.read()
        losses = [r["loss"] for r in records if "loss" in r]
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        latest = self.latest_checkpoint()
        return {"out_dir": str(self.out_dir), "step": self.step, "steps_this_run": self.step - start_step,
                "precision": self.precision, "trainable_parameters": self.trainable_parameters,
                "loss": losses[-1] if losses else None, "eval_loss": evals[-1] if evals else None,
                "tokens": self.tokens, "non_pad_fraction": self.tokens / max(1, self.positions),
                "seconds": time.perf_counter() - started,
                "checkpoint": str(latest) if latest else None,
                "final_dir": str(final_dir) if final_dir else None}


def train(config: str | os.PathLike | TrainConfig | dict, out_dir: str | os.PathLike | None = None,
          resume: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train from a config file (YAML/TOML), a `TrainConfig` or a dict; returns a summary.

    out_dir overrides the config's `out_dir`. resume: continue from the latest checkpoint in
    out_dir when there is one (False refuses such a directory). max_steps: stop once this step is
    reached (checkpointing there) without changing the schedule, which spans `train.max_steps`;
    a later call resumes. The trained pipeline goes to out_dir/final once train.max_steps is reached.
    A config with a `schedule` runs its stages in order (`tokenloom.train.schedule`); max_steps then
    counts the steps of all stages.
    """
    if isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config.to_dict(), source=config.source)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    else:
        config = load_config(config)
    if out_dir is not None:
        config = dataclasses.replace(config, out_dir=str(out_dir))
    if config.out_dir is None:
        raise ConfigError(f"{config.source or 'config'}: no output directory (set 'out_dir' or pass out_dir)")
    check_max_steps(max_steps)
    distributed.check_config(config)  # several ranks: a global batch that splits evenly, before connecting
    if config.schedule:  # progressive stages, each a Trainer run of its own
        from .schedule import run_schedule

        return run_schedule(config, resume=resume, max_steps=max_steps)
    with distributed.launch(config) as world:  # under torchrun with several ranks: the process group
        return Trainer(config, config.out_dir, resume=resume, world=world).run(max_steps)
