"""Training: the grouped teacher, the TDNet student with grouped distillation, datasets."""

from .config import ConfigError, TrainConfig, load_config
from .datasets import DatasetError

__all__ = ["ConfigError", "DatasetError", "TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(name)
