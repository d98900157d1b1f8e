"""Class pixel shares and thin-object widths in generated labels (is a class wide enough
to learn at a render size?).

    python -m tdnet_ros.data.label_stats --width 512 --height 256 --seeds 2001 2002

Widths are the lengths of horizontal runs of a class along every 4th row, on every 5th of
the first 20 frames of each seed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from tdnet_ros.classes import CLASS_NAMES, TrainId

THIN = (TrainId.POLE, TrainId.TRAFFIC_LIGHT, TrainId.TRAFFIC_SIGN, TrainId.PERSON, TrainId.RIDER,
        TrainId.MOTORCYCLE, TrainId.BICYCLE)


def run_widths(mask: np.ndarray, row_step: int = 4) -> list[int]:
    """Lengths of the runs of True along every `row_step`-th row of an (H, W) mask."""
    widths: list[int] = []
    for row in mask[::row_step]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        widths += (edges[1::2] - edges[::2]).tolist()  # run ends minus run starts
    return widths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=512, help="render width (as tdnet-generate's)")
    parser.add_argument("--height", type=int, default=256, help="render height")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2001, 2002])
    args = parser.parse_args(argv)
    from tdnet_ros.data import generate_sequence  # pybullet

    width, height = args.width, args.height
    counts = np.zeros(256, np.int64)
    widths: dict[int, list[int]] = {int(c): [] for c in THIN}
    for seed in args.seeds:
        for index, frame in enumerate(generate_sequence(seed, 20, width, height)):
            if index % 5:
                continue
            counts += np.bincount(frame.labels.ravel(), minlength=256)
            for class_id in widths:
                widths[class_id] += run_widths(frame.labels == class_id)
    total = counts[: len(CLASS_NAMES)].sum()
    print(f"render {width}x{height}, seeds {args.seeds}")
    for class_id, name in enumerate(CLASS_NAMES):
        line = f"  {name:<14} {100 * counts[class_id] / total:6.2f} %"
        if widths.get(class_id):
            runs = np.asarray(widths[class_id])
            line += f"  width px: median {np.median(runs):.0f}, p90 {np.percentile(runs, 90):.0f} ({runs.size} runs)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
