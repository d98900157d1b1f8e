"""``tdnet-generate``: render a labelled street sequence to Cityscapes folders or a rosbag2.

Examples::

    tdnet-generate --seed 7 --frames 100 --out data/synth --format cityscapes
    tdnet-generate --seed 7 --frames 100 --out data/synth_7.mcap --format mcap
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tdnet_ros.data import MAX_RARE_OBJECT_RATE, rare_object_rate_problem
from tdnet_ros.data.writers import STORAGES, DatasetWriteError, check_folder_name

FORMATS = ("cityscapes", *STORAGES)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


def _pixels(text: str) -> int:
    value = _positive_int(text)
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be within 16..4096 pixels, got {value}")
    return value


#: Bounds of --fps and --frames: stamps and motion stay meaningful, a run stays finite.
FPS_RANGE = (0.1, 1000.0)
MAX_FRAMES = 100_000


def _frame_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"must be within 1..{MAX_FRAMES}, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _fps(text: str) -> float:
    value = _number(text)
    low, high = FPS_RANGE
    if not low <= value <= high:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be within {low:g}..{high:g} frames per second, got {text}")
    return value


def _rare_object_rate(text: str) -> float:
    value = _number(text)
    if problem := rare_object_rate_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdnet-generate",
        description="Render a labelled street video (Cityscapes train ids) with pybullet and write it "
        "as Cityscapes-style folders or as a rosbag2 (MCAP or sqlite3).",
    )
    parser.add_argument("--seed", type=_non_negative_int, required=True, help="sequence seed (same seed, same video)")
    parser.add_argument("--frames", type=_frame_count, required=True, help=f"number of frames (1..{MAX_FRAMES})")
    parser.add_argument("--out", type=Path, required=True,
                        help="dataset root (cityscapes) or bag folder to create (mcap, sqlite3)")
    parser.add_argument("--format", choices=FORMATS, default="cityscapes", help="output form (default: cityscapes)")
    parser.add_argument("--width", type=_pixels, default=512, help="image width in pixels (default 512)")
    parser.add_argument("--height", type=_pixels, default=256, help="image height in pixels (default 256)")
    parser.add_argument("--fps", type=_fps, default=10.0,
                        help=f"frame rate of stamps and motion, {FPS_RANGE[0]:g}..{FPS_RANGE[1]:g} (default 10)")
    parser.add_argument("--rare-object-rate", type=_rare_object_rate, default=1.0,
                        help="times the usual buses, trucks, two-wheelers, cyclists and parks, "
                        f"1..{MAX_RARE_OBJECT_RATE:g}, as training's data.rare_object_rate (default 1)")
    parser.add_argument("--split", default="train", help="cityscapes split folder (default train)")
    parser.add_argument("--city", default="synth", help="cityscapes city folder and file prefix (default synth)")
    parser.add_argument("--sequence", type=_non_negative_int, default=None,
                        help="cityscapes sequence number in file names (default: the seed)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tdnet-generate``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sequence = args.seed if args.sequence is None else args.sequence
    if args.format == "cityscapes" and sequence > 999_999:
        parser.error(f"--sequence {sequence} does not fit the 6-digit Cityscapes name; pass --sequence")
    if args.format != "cityscapes" and args.out.exists():
        parser.error(f"--out {args.out} exists already; a rosbag2 is written to a new folder")
    for option, value in (("split", args.split), ("city", args.city)):
        try:
            check_folder_name(f"--{option}", value)
        except DatasetWriteError as error:
            parser.error(str(error))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")

    from dataclasses import replace

    from tdnet_ros.data.street import StreetConfig, generate_sequence
    from tdnet_ros.data.writers import write_cityscapes, write_rosbag

    config = replace(StreetConfig(), fps=args.fps, rare_object_rate=args.rare_object_rate)
    frames = generate_sequence(args.seed, args.frames, args.width, args.height, config=config)
    start = time.perf_counter()
    try:
        if args.format == "cityscapes":
            count = write_cityscapes(frames, args.out, split=args.split, city=args.city, sequence=sequence)
        else:
            count = write_rosbag(frames, args.out, storage=args.format)
    except (DatasetWriteError, ValueError, OSError) as error:
        print(f"tdnet-generate: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(f"wrote {count} frames ({args.width}x{args.height}, seed {args.seed}) as {args.format} to {args.out} "
              f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
