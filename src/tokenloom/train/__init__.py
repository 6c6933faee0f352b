"""Training and fine-tuning: `train(config)` / `tokenloom train CONFIG` (the transformer), and in
`tokenloom.train.vq`, `train_vqgan(...)` / `tokenloom train-vq CONFIG` (a VQGAN image tokenizer).
Both share `train.config` (config files) and `train.common` (schedule, metrics, checkpoints)."""

from .common import MetricsLog, TrainError, lr_at
from .config import ConfigError, TrainConfig, load_config
from .trainer import Trainer, param_groups, train, train_image_head_only

__all__ = ["ConfigError", "TrainConfig", "load_config", "Trainer", "TrainError", "MetricsLog", "lr_at",
           "param_groups", "train", "train_image_head_only"]
