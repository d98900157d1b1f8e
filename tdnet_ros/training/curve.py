"""Training curves: validation mIoU (held-out sequences) against iterations and time,
drawn from the CSV logs that `tdnet-train` writes; or, with --shipped, the held-out mIoU of
each shipped model against the training time behind it, drawn from the training log's
table of the shipped line.

    python -m tdnet_ros.training.curve outputs/recipe_default/student/log.csv \\
        --label "TD4 student" --out docs/training_curve.png
    python -m tdnet_ros.training.curve --shipped docs/training-log.md --out docs/heldout_over_training.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tdnet_ros.evaluation.plots import headless_pyplot

# The header row that starts the training log's table of the shipped line.
SHIPPED_TABLE_HEADER = "| sitting | training minutes | `$H` |"


class ShippedModel(NamedTuple):
    sitting: str
    minutes: float  # training behind this model that the previous one did not have
    heldout: float  # mIoU (%) on the held-out seeds when it shipped
    change: str



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


def read_shipped(markdown: Path) -> list[ShippedModel]:
    """The rows of the table that starts with SHIPPED_TABLE_HEADER in `markdown`, in order.
    "≈" before a number of minutes (an estimate) is dropped.

    Raises:
        ValueError: no such table, or a row whose minutes or mIoU is not a number.
    """
    lines = markdown.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(SHIPPED_TABLE_HEADER)]
    if not starts:
        raise ValueError(f"{markdown} has no table starting with {SHIPPED_TABLE_HEADER!r}")
    models = []
    for line in lines[starts[0] + 2:]:  # past the header and its --- row
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        try:
            models.append(ShippedModel(cells[0], float(cells[1].lstrip("≈")), float(cells[2]), cells[3]))
        except (IndexError, ValueError):
            raise ValueError(f"{markdown}: a row of the shipped line's table is not "
                             f"'| sitting | minutes | mIoU | change |': {line!r}") from None
    if not models:
        raise ValueError(f"{markdown}: the shipped line's table has no rows")
    return models


def draw_shipped(models: Sequence[ShippedModel], out: Path) -> None:
    """Held-out mIoU of each shipped model against the training hours behind it; the models
    that took no training (calibration, averaging, a fix, another input size) hollow."""
    plt = headless_pyplot()
    hours, total = [], 0.0
    for model in models:
        total += model.minutes
        hours.append(total / 60)
    figure, axes = plt.subplots(figsize=(9, 4.5))
    axes.plot(hours, [m.heldout for m in models], "-", color="tab:blue", alpha=0.5)
    previous_x = float("-inf")
    for index, (x, model) in enumerate(zip(hours, models)):
        trained = model.minutes > 0
        axes.plot(x, model.heldout, "o", color="tab:blue", markerfacecolor="tab:blue" if trained else "white")
        # sitting numbers: above a point; right of one that took no training; below one
        # close to the point before it, else left of one that such a point follows (same x)
        offset, align = ((0, 6), "center") if trained else ((6, -3), "left")
        if trained and x - previous_x < 0.03 * hours[-1]:
            offset = (0, -12)
        elif trained and index + 1 < len(models) and models[index + 1].minutes == 0:
            offset, align = (-6, -3), "right"
        name = "start" if model.sitting.startswith("before") else model.sitting
        axes.annotate(name, (x, model.heldout), textcoords="offset points", xytext=offset, ha=align, fontsize=7)
        previous_x = x
    axes.axhline(70, color="tab:red", linestyle="--", linewidth=1, label="goal of issue #13: 70")
    axes.plot([], [], "o", color="tab:blue", label="trained in that sitting")
    axes.plot([], [], "o", color="tab:blue", markerfacecolor="white", label="no training (calibration, mean, fix, input size)")
    axes.set_xlabel("training time behind the model (hours, 2 CPU cores)")
    axes.set_ylabel("held-out mIoU (%), seeds 2001-2003")
    axes.set_title("the shipped default model, sitting by sitting")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("logs", nargs="*", type=Path, help="log.csv files of training runs")
    parser.add_argument("--label", action="append", help="legend entry per log (default: the folder name)")
    parser.add_argument("--shipped", type=Path, metavar="MARKDOWN",
                        help="draw the shipped line's table of this training log instead of logs")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if bool(args.shipped) == bool(args.logs):
        parser.error("give log.csv files or --shipped, not both")
    if args.shipped:
        try:
            draw_shipped(read_shipped(args.shipped), args.out)
        except (OSError, ValueError) as error:
            parser.error(str(error))
        print(f"wrote {args.out}")
        return 0
    plt = headless_pyplot()
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
