"""Training speed, side by side: the previous default settings against the current ones.

    python -m tdnet_ros.training.speed config/train_default.yaml --steps 30 --rounds 2

Both run the same configuration file (model, crop, batch) for `--steps` iterations, in
alternating rounds so that both see the same machine load, each round in a fresh process
(the C library's memory settings are per process):

- before: float32, contiguous (NCHW) tensors, 1 thread, data prepared in the training loop,
  glibc's default memory handling, the auxiliary loss on every pixel (the settings of the
  bundled model's first training);
- now: the file's own settings (bfloat16 autocast on a CPU that computes it natively,
  channels-last, its threads, freed memory kept for reuse, its data workers, the auxiliary
  loss on one pixel in each 2x2 block).

Prints the training images (clip frames) per second of each and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from tdnet_ros.runtime import resolve_device

from .config import TrainConfig, load_config
from .trainer import autocast_enabled, data_workers, train

BEFORE = {
    "run": {"amp": False, "channels_last": False, "threads": 1, "reuse_freed_memory": False},
    "data": {"num_workers": 0},
    "loss": {"auxiliary_pixel_step": 1},
}


def _images_per_second(config: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        return train(config.replace(run={"out_dir": out})).images_per_second


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("config", help="training configuration (the student's or the teacher's)")
    parser.add_argument("--steps", type=int, default=30, help="iterations per round and setting")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="training sequences to use")
    args = parser.parse_args(argv)
    base = load_config(args.config)
    common = {
        "optim": {"iterations": args.steps, "warmup_iterations": 1},
        "data": {"train_seeds": args.seeds, "val_frames": 8},
        "run": {"val_interval": 0, "val_max_clips": 1, "progress": False, "checkpoint_interval": 10**9},
    }
    settings = {"before": base.replace(**common).replace(**BEFORE), "now": base.replace(**common)}
    rates: dict[str, list[float]] = {name: [] for name in settings}
    spawn = multiprocessing.get_context("spawn")
    for round_index in range(args.rounds):
        for name, config in settings.items():
            # not a multiprocessing.Pool: its daemonic workers cannot start data workers
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                rate = pool.submit(_images_per_second, config).result()
            rates[name].append(rate)
            print(f"round {round_index + 1} {name}: {rate:.2f} images/s", flush=True)
    before, now = (float(np.median(rates[n])) for n in ("before", "now"))
    r = settings["now"].run
    print(f"before (float32, NCHW, 1 thread, no prefetch, default malloc, auxiliary loss on every pixel): "
          f"{before:.2f} images/s")
    device = resolve_device(r.device)
    autocast = autocast_enabled(r.amp, device, report=False)
    print(f"now (amp={r.amp}: {'on' if autocast else 'off'}, channels_last={r.channels_last}, threads={r.threads}, "
          f"workers={data_workers(settings['now'], device)}, reuse_freed_memory={r.reuse_freed_memory}): "
          f"{now:.2f} images/s")
    print(f"speed-up: {now / before:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
