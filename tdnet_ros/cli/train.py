"""`tdnet-train`: trains a teacher or a TDNet student from a YAML configuration.

    tdnet-train config/train_default.yaml
    tdnet-train config/train_default.yaml --set optim.iterations=2 --set run.out_dir=outputs/x
    torchrun --nproc_per_node 2 -m tdnet_ros.cli.train config/train_default.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from ..training.config import ConfigError, load_config
from ..training.datasets import DatasetError


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        target = overrides
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tdnet-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML training configuration (see config/train_default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value (YAML syntax), repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from <run.out_dir>/last.pt")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, parse_set(args.set))
    except ConfigError as error:
        print(f"tdnet-train: {error}", file=sys.stderr)
        return 2
    from ..checkpoint import CheckpointError  # torch imports after the configuration is known to be valid
    from ..training.trainer import train

    try:
        result = train(config, resume=args.resume)
    except (DatasetError, CheckpointError, FileNotFoundError, FloatingPointError) as error:
        print(f"tdnet-train: {error}", file=sys.stderr)
        return 1
    print(f"checkpoint: {result.checkpoint}  iterations: {result.iterations}  "
          f"validation mIoU: {100 * result.val_miou:.2f}  time: {result.seconds:.0f} s  "
          f"speed: {result.images_per_second:.2f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
