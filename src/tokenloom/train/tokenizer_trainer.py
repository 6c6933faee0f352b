"""What the two tokenizer trainers share: `train.vq` (the VQGAN image tokenizer) and `train.codec`
(the speech codec). Both train a vector-quantized model whose codebooks move by EMA and whose dead
codes are restarted, keep the best evaluated weights, and write the same run directory:

    checkpoints/step-N/   the `train.common` checkpoint files, plus trainer.safetensors (the restart
                          window's usage counts and the EMA state) and best.safetensors (the best
                          evaluated weights), with state.json (written last)
    best/                 the tokenizer's save_pretrained of the best evaluated weights
    summary.json          where the last call stopped, and the best evaluation
    metrics.jsonl, loss.png, config.json

`TokenizerTrainer` holds that state and its checkpoints, `fit` is the loop of a run, and the
config helpers check what both `training:` sections have alike. What differs (the model, the
tokenizer, the metrics that decide "best", the losses, the restarts) stays in each trainer.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_save_safetensors, atomic_write_json, load_tensors, load_weights
from .common import (CHECKPOINTS, METRICS_NAME, MetricsLog, TrainError, check_resumable, check_step, latest_checkpoint,
                     load_optimizer, load_rng, lr_at, read_state, save_training_checkpoint, start_run, stopped)
from .plot import plot_losses

__all__ = ["TokenizerTrainer", "fit", "check_finite_fields", "check_ranges", "SUMMARY_NAME", "BEST_DIR",
           "TRAINER_TENSORS", "BEST_TENSORS"]

SUMMARY_NAME = "summary.json"
BEST_DIR = "best"
TRAINER_TENSORS = "trainer.safetensors"
BEST_TENSORS = "best.safetensors"
# what trainer.safetensors holds: the trainer's attributes of these names
TRAINER_STATE = ("usage", "ema_count", "ema_sum")


# ----------------------------------------------------------------------------- config checks


def check_finite_fields(config: Any) -> None:
    """ValueError naming the first float field of a dataclass (or float in its `betas`) that is NaN
    or inf; messages start with the field's name, which the config parser turns into file:line."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values = value if f.name == "betas" else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")


def check_ranges(config: Any, positive: Iterable[str], non_negative: Iterable[str], unit: Iterable[str]) -> None:
    """ValueError naming the first field out of its range: `positive` ones > 0, `non_negative` ones
    >= 0, `unit` ones in [0, 1]; then the Adam `betas`, two numbers in [0, 1)."""
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")
    for name in non_negative:
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    for name in unit:
        if not 0 <= getattr(config, name) <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(config, name)!r}")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {config.betas}")


# ----------------------------------------------------------------------------- the trainer


class TokenizerTrainer:
    """The state of a tokenizer training run beyond (seed, step), and its checkpoints.

    A subclass sets the class attributes below, calls this __init__ (which builds `self.model`
    from the run's seed), then sets `self.optimizer` (`adamw`) and the tensors of TRAINER_STATE:
    `usage` (codes picked in the current restart window), `ema_count` and `ema_sum` (the codebook
    EMA). It writes `step()`, `evaluate()` and the two progress hooks; `restarted_total` counts
    the codes its restarts re-initialised."""

    MODEL: type  # the model class, built from `self.config`
    TOKENIZER: type  # wraps a model in eval mode: what `best_tokenizer` returns
    BEST_BY: tuple[str, str]  # the evaluation metrics that pick the best weights; the second breaks ties
    HIGHER_IS_BETTER: bool  # of the BEST_BY metrics
    SECTION: str  # the config file's section of the training settings, as messages name it
    RESUMABLE_CHANGES: Collection[str]  # training keys a resumed run may change
    NAME: str  # of the run, in the progress bar and the loss plot's title

    def __init__(self, config: Any, train: Any, out_dir: str | Path | None = None):
        self.config, self.train = config, train
        self.out_dir = Path(out_dir) if out_dir is not None else None
        with torch.random.fork_rng(devices=[]):  # init from the run's seed, not the global RNG
            torch.manual_seed(train.seed)
            self.model = self.MODEL(config)
        self.step_count = 0
        self.restarted_total = 0
        self.best: dict[str, Any] | None = None  # {"metrics": ..., "step": ..., "state": state_dict}

    def adamw(self, decay: list[torch.Tensor], rest: list[torch.Tensor]) -> torch.optim.AdamW:
        """AdamW with weight decay on `decay` only (the others: codebooks, norms, biases)."""
        t = self.train
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=t.lr, betas=t.betas)

    @property
    def restart_hint(self) -> str:
        """How to go on after a non-finite loss, when a resumed run would repeat it (see `stopped`)."""
        s = self.SECTION
        return f"{s}.lr and {s}.grad_clip cannot change on resume: train again in a new output directory"

    # -- one step

    def lr_at(self, step: int) -> float:
        t = self.train
        return lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)

    def set_lr(self, step: int) -> float:
        """Put the schedule's learning rate of `step` into the optimizer; returns it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def update(self, loss: torch.Tensor, step: int) -> float:
        """Backward and optimizer step on `loss`; returns the gradient norm (before clipping).

        A NaN or inf loss or gradient norm raises TrainError (naming the step) before the update."""
        check_step(self.optimizer, step + 1, loss=float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.train.grad_clip if self.train.grad_clip else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        check_step(self.optimizer, step + 1, gradient_norm=float(norm))
        self.optimizer.step()
        return float(norm)

    def restart_due(self, step: int) -> bool:
        """Whether `step` ends a usage window whose dead codes are restarted. The first window ends
        after step 0, so the initial codebook is replaced by data at once."""
        t = self.train
        return bool(t.restart_every and step < t.restart_until * t.steps and step % t.restart_every == 0)

    # -- progress (the subclass's)

    def progress_postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """The progress bar's numbers of a logged step."""
        raise NotImplementedError

    def eval_message(self, metrics: dict[str, Any]) -> str:
        """The line written for an evaluation (after "step N: ")."""
        raise NotImplementedError

    # -- the best weights

    def _best_key(self, metrics: dict[str, Any]) -> tuple:
        return tuple(metrics[name] for name in self.BEST_BY)

    def consider_best(self, metrics: dict[str, Any]) -> bool:
        """Keep these weights if they score better (by BEST_BY) than the best so far."""
        if self.best is not None:
            key, best = self._best_key(metrics), self._best_key(self.best["metrics"])
            # "not better" is the comparison that rejects, so a NaN metric is kept as it always was
            if (key <= best) if self.HIGHER_IS_BETTER else (key >= best):
                return False
        self.best = {"metrics": metrics, "step": self.step_count,
                     "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        return True

    def best_tokenizer(self) -> Any:
        """The best evaluated weights (the current ones when nothing was evaluated), as a TOKENIZER."""
        model = self.MODEL(self.config)
        model.load_state_dict(self.best["state"] if self.best else self.model.state_dict())
        return self.TOKENIZER(model.eval())

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """What state.json records besides its file list (a subclass may add keys)."""
        best = None if self.best is None else {"step": self.best["step"], "metrics": self.best["metrics"]}
        return {"step": self.step_count, "restarted_total": self.restarted_total, "best": best,
                "model_config": self.config.to_dict(), "train_config": self.train.to_dict()}

    def check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """TrainError if the checkpoint at `path` (its state.json: `state`) belongs to another run."""
        check_resumable(f"from {path}", state["model_config"], self.config.to_dict(), label="model ")
        check_resumable(f"from {path}", state["train_config"], self.train.to_dict(), self.RESUMABLE_CHANGES,
                        label=f"{self.SECTION} ")

    def save_checkpoint(self, root: str | Path | None = None) -> Path:
        """Write root/step-N (root: out_dir/checkpoints) atomically; returns it. Non-finite
        weights are refused with TrainError: no checkpoint holds them."""
        if root is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a directory: this trainer has no out_dir")
            root = self.out_dir / CHECKPOINTS

        def write(directory: Path) -> None:
            atomic_save_safetensors({name: getattr(self, name) for name in TRAINER_STATE},
                                    directory / TRAINER_TENSORS)
            if self.best is not None:
                atomic_save_safetensors(self.best["state"], directory / BEST_TENSORS)

        return save_training_checkpoint(Path(root), self.step_count, self.model, self.optimizer,
                                        self.checkpoint_state(), self.train.keep_checkpoints, extra=write)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint directory; TrainError if it belongs to another run."""
        path = Path(path)
        state = read_state(path)
        self.check_resumable(path, state)
        self.model.load_state_dict(load_weights(path))
        load_optimizer(self.optimizer, path)
        load_rng(path)
        tensors = load_tensors(path / TRAINER_TENSORS)
        for name in TRAINER_STATE:
            setattr(self, name, tensors[name])
        self.step_count = state["step"]
        self.restarted_total = state["restarted_total"]
        best = state.get("best")
        self.best = None if best is None else {"metrics": best["metrics"], "step": best["step"],
                                               "state": load_tensors(path / BEST_TENSORS)}


# ----------------------------------------------------------------------------- the loop


def fit(trainer: TokenizerTrainer, out_dir: str | Path, *, resume: bool, max_steps: int | None,
        config: dict[str, Any], summary: dict[str, Any] | None = None) -> Any:
    """Run `trainer` in `out_dir` up to `max_steps` (None: its train.steps); returns the tokenizer
    of the best evaluated weights, also saved to best/.

    Resumes from the newest intact checkpoint unless `resume` is False (`start_run`, which writes
    `config` to config.json); logs, evaluates and checkpoints where an uninterrupted run would;
    writes loss.png and summary.json (with the trainer's own `summary` keys last)."""
    out = Path(out_dir)
    metrics = MetricsLog(out / METRICS_NAME)

    def load(path: Path) -> int:
        trainer.load_checkpoint(path)
        return trainer.step_count

    # seeds torch (dropout, if the model has any) when there is nothing to resume
    start_run(out, resume, seed=trainer.train.seed, config=config, metrics=metrics, load=load)
    stop = trainer.train.steps if max_steps is None else min(max_steps, trainer.train.steps)
    stopped_early = _train_until(trainer, stop, out / CHECKPOINTS, metrics)
    tok = trainer.best_tokenizer()
    tok.save_pretrained(out / BEST_DIR)
    records = metrics.read()
    plot_losses(out / "loss.png", [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"],
                title=f"{trainer.NAME} loss ({out.name})")
    best = None if trainer.best is None else {"step": trainer.best["step"], **trainer.best["metrics"]}
    steps = trainer.train.steps
    atomic_write_json(out / SUMMARY_NAME, {
        "step": trainer.step_count, "steps": steps, "finished": trainer.step_count >= steps,
        "stopped_early": stopped_early, "restarted_total": trainer.restarted_total, "best": best,
        **(summary or {})})
    return tok


def _train_until(trainer: TokenizerTrainer, stop: int, root: Path, metrics: MetricsLog) -> bool:
    """Step `trainer` to step `stop`, or until train.max_minutes are spent (then True)."""
    from tqdm.auto import tqdm

    train = trainer.train
    start = time.monotonic()
    bar = tqdm(total=train.steps, initial=trainer.step_count, desc=trainer.NAME, unit="step",
               disable=not train.progress, dynamic_ncols=True)
    try:
        while trainer.step_count < stop:
            try:
                m = trainer.step()
            except TrainError as e:
                raise stopped(e, latest_checkpoint(root), trainer.restart_hint) from None
            bar.update(1)
            done = trainer.step_count
            # logged and evaluated where an uninterrupted run would be: a split run's log is the same
            if done % train.log_every == 0 or done == train.steps:
                metrics.write({"kind": "train", **m, "elapsed_s": round(time.monotonic() - start, 1)})
                bar.set_postfix(**trainer.progress_postfix(m), refresh=False)
            over_budget = train.max_minutes is not None and time.monotonic() - start > 60 * train.max_minutes
            if train.eval_every and (done % train.eval_every == 0 or done == train.steps or over_budget):
                ev = trainer.evaluate()
                trainer.consider_best(ev)
                metrics.write({"kind": "eval", "step": done, "elapsed_s": round(time.monotonic() - start, 1), **ev})
                bar.write(f"step {done}: {trainer.eval_message(ev)}", file=sys.stderr)
            if done % train.checkpoint_every == 0 or done == stop or over_budget:
                try:
                    trainer.save_checkpoint()
                except TrainError as e:
                    raise stopped(e, latest_checkpoint(root), trainer.restart_hint) from None
            if over_budget:
                return True
    finally:
        bar.close()
    return False
