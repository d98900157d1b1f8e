"""Averages the weights of several checkpoints of one training run (the snapshots that
`run.snapshot_interval` keeps), which smooths out the noise of the last SGD steps.

    python -m tdnet_ros.training.average outputs/run/model_avg.pt outputs/run/snapshot_it2160.pt \\
        outputs/run/snapshot_it2280.pt outputs/run/snapshot_it2400.pt outputs/run/model.pt

Floating-point tensors (weights and BatchNorm running statistics) are the plain mean;
integer buffers (BatchNorm's batch counters) come from the last checkpoint, as do the
training configuration and iteration. A calibrated source is averaged without its class
offsets, which are tuned to its own weights only (as `run.init_checkpoint` takes them off):
calibrate the averaged model afterwards.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tdnet_ros.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint, save_checkpoint, \
    stored_config

from .calibrate import without_offsets

KEEP = ("train_config", "iteration")


def average_checkpoints(target: str | Path, sources: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Writes `target`, a project checkpoint holding the mean of `sources`' weights, and
    returns its state dict. The sources must be project checkpoints of one model
    configuration; calibrated ones are averaged without their class offsets."""
    if len(sources) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints, got {len(sources)}")
    contents = [read_checkpoint(path) for path in sources]
    first_config = None
    for path, content in zip(sources, contents):
        if "config" not in content:
            raise CheckpointError(f"checkpoint {path} is not a project checkpoint (no stored model configuration)")
        config = stored_config(content, f"checkpoint {path}")
        if first_config is None:
            first_config = config
        elif config != first_config:
            raise CheckpointError(f"checkpoint {path} stores another model configuration than {sources[0]}")
        if "calibration" in content:
            print(f"{path} carries class offsets from calibration; they are taken off before averaging "
                  "(calibrate the result)")
    states = [without_offsets(content, path) for path, content in zip(sources, contents)]
    last = states[-1]
    for path, state in zip(sources, states):
        if state.keys() != last.keys():
            raise CheckpointError(f"checkpoint {path} holds other tensors than {sources[-1]}")
    averaged = {}
    for name, tensor in last.items():
        if tensor.is_floating_point():
            # the sum in float64, so that the mean of many snapshots loses nothing to rounding
            total = sum(state[name].double() for state in states)
            averaged[name] = (total / len(states)).to(tensor.dtype)
        else:
            averaged[name] = tensor.clone()
    model = model_from_checkpoint(contents[-1], sources[-1])
    model.load_state_dict(averaged)
    kept = {k: contents[-1][k] for k in KEEP if k in contents[-1]}
    save_checkpoint(model, target, **kept, averaged_from=[str(path) for path in sources])
    return averaged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="checkpoint to write")
    parser.add_argument("sources", nargs="+", help="checkpoints of one run (tdnet-train's snapshot_it<N>.pt, model.pt)")
    args = parser.parse_args(argv)
    try:
        average_checkpoints(args.target, args.sources)
    except CheckpointError as error:
        print(f"tdnet average: {error}", file=sys.stderr)
        return 2
    print(f"{args.target}: the mean of {len(args.sources)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
