"""Training speed, side by side: the previous default settings against the current ones.

    python -m tdnet_ros.training.speed config/train_default.yaml --steps 30 --rounds 2

Both run the same configuration file (model, crop, batch) for `--steps` iterations, in
alternating rounds in one process so that both see the same machine load:

- before: float32, contiguous (NCHW) tensors, 1 thread, data prepared in the training loop
  (the settings of the bundled model's first training);
- now: the file's own run settings (bfloat16 autocast on a CPU that computes it natively,
  channels-last, its threads) and its prefetching data workers.

Prints the training images (clip frames) per second of each and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from tdnet_ros.runtime import resolve_device

from .config import load_config
from .trainer import autocast_enabled, train

BEFORE = {"run": {"amp": False, "channels_last": False, "threads": 1}, "data": {"num_workers": 0}}


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
    for round_index in range(args.rounds):
        for name, config in settings.items():
            with tempfile.TemporaryDirectory() as out:
                result = train(config.replace(run={"out_dir": out}))
            rates[name].append(result.images_per_second)
            print(f"round {round_index + 1} {name}: {result.images_per_second:.2f} images/s", flush=True)
    before, now = (float(np.median(rates[n])) for n in ("before", "now"))
    r = settings["now"].run
    print(f"before (float32, NCHW, 1 thread, no prefetch): {before:.2f} images/s")
    autocast = autocast_enabled(r.amp, resolve_device(r.device), report=False)
    print(f"now (amp={r.amp}: {'on' if autocast else 'off'}, channels_last={r.channels_last}, threads={r.threads}, "
          f"workers={settings['now'].data.num_workers}): {now:.2f} images/s")
    print(f"speed-up: {now / before:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
