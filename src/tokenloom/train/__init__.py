"""Training and fine-tuning: `train(config)` / `tokenloom train CONFIG`."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import Trainer, TrainError, lr_at, main, param_groups, train, train_image_head_only

__all__ = ["ConfigError", "TrainConfig", "load_config", "Trainer", "TrainError", "lr_at", "main", "param_groups",
           "train", "train_image_head_only"]
