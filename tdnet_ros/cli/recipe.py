"""`tdnet-recipe`: the paper's two-stage recipe in one resumable command (teacher ->
student -> export -> held-out scoring; see tdnet_ros.training.recipe).

    nohup tdnet-recipe config/recipe_default.yaml > outputs/recipe_default.log 2>&1 &
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..checkpoint import CheckpointError
from ..training.config import ConfigError
from ..training.datasets import DatasetError
from ..training.recipe import load_recipe, run_recipe, stage_configs
from .train import parse_set


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tdnet-recipe", description=__doc__.splitlines()[0].strip("`"),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see config/recipe_default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (out_dir=...) or a stage's setting "
                             "(student.optim.iterations=...), YAML syntax, repeatable")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, parse_set(args.set))
        stage_configs(recipe)  # every configuration checked before anything trains
        run_recipe(recipe, log=lambda line: print(f"tdnet-recipe: {line}", flush=True))
    except (ConfigError, CheckpointError, DatasetError, FileNotFoundError, FloatingPointError) as error:
        print(f"tdnet-recipe: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
