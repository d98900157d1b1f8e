"""The training curve: validation mIoU (held-out sequences) against iterations and time,
drawn from the CSV logs that `tdnet-train` writes.

    python -m tdnet_ros.training.curve outputs/recipe_default/student/log.csv \\
        --label "TD4 student" --out docs/training_curve.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path


def read_validation(log: Path) -> list[tuple[int, float, float]]:
    """(iteration, seconds since the start, validation mIoU in %) of each validated row."""
    with open(log, newline="") as stream:
        rows = list(csv.DictReader(stream))
    points = []
    for row in rows:
        if row.get("val_miou"):
            seconds = float(row["seconds"]) if row.get("seconds") else float("nan")
            points.append((int(row["iteration"]), seconds, 100 * float(row["val_miou"])))
    return points


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="log.csv files of training runs")
    parser.add_argument("--label", action="append", help="legend entry per log (default: the folder name)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.label or [log.parent.name for log in args.logs]
    if len(labels) != len(args.logs):
        parser.error("give one --label per log")
    figure, (by_iteration, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for log, label in zip(args.logs, labels):
        points = read_validation(log)
        if not points:
            parser.error(f"{log} has no validation rows")
        iterations, seconds, miou = zip(*points)
        by_iteration.plot(iterations, miou, "o-", label=label)
        by_time.plot([s / 60 for s in seconds], miou, "o-", label=label)
    by_iteration.set_xlabel("iteration")
    by_time.set_xlabel("training time (minutes, 2 CPU cores)")
    for axes in (by_iteration, by_time):
        axes.set_ylabel("validation mIoU (%), held-out sequences")
        axes.grid(alpha=0.3)
    by_time.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
