"""The one-command demo: a generated street sequence played live into the node.

    tdnet-demo [--out DIR] [--frames N] [--seed S] [--rate R] [--checkpoint P] [--input-size HxW] [--scales '1 S2']

1. generates a short street video with ground truth (fixed seed, never used in training)
   and writes it as an MCAP rosbag2;
2. plays it at its recorded rate into `segmenter_node` running as its own process
   (the bundled default model unless --checkpoint is given), and evaluates the node's
   label outputs against the ground truth as they arrive over DDS;
3. writes report.md, results.json, the plots and the overlay video into one folder, and
   prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..data import generate_sequence, write_rosbag
from ..data.writers import IMAGE_TOPIC, LABEL_TOPIC
from ..runtime import RuntimeConfig, input_size_argument, input_size_text, scales_argument, scales_text
from ..segmenter import DEFAULT_MODEL_PATH, LoadError, load_segmenter
from . import evaluate as evaluation_cli

# Held out: the default model's training and validation seeds never include it.
DEMO_SEED = 90210


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tdnet-demo", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (none given: outputs/demo-<time>)")
    parser.add_argument("--frames", type=int, default=100, help="frames to generate (10 per second of video)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="scene seed (never used in training)")
    parser.add_argument("--width", type=int, default=512, help="frame width in pixels")
    parser.add_argument("--height", type=int, default=256, help="frame height in pixels")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed, a multiple of the recorded rate")
    parser.add_argument("--checkpoint", default="", help="checkpoint for the node (empty: the bundled model)")
    parser.add_argument("--device", default="cpu", help="the node's device: cpu, cuda, cuda:N or auto")
    parser.add_argument("--input-size", type=input_size_argument, default=None, metavar="HxW|frame",
                        help="the node's network input size (default: the model's own input size; "
                             "'frame' or a smaller HxW drops fewer frames on a CPU, at some accuracy)")
    parser.add_argument("--scales", type=scales_argument, default=(1.0,), metavar="'1 S2 ...'",
                        help="the node's multi-scale inference, e.g. '1 1.5' (default: 1, one scale; more "
                             "scales are more accurate and drop more frames on a CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error("--frames must be at least 2")
    if not (16 <= args.width <= 4096 and 16 <= args.height <= 4096):
        parser.error("--width and --height must be within 16..4096 pixels")
    if not 0 < args.rate <= 100:
        parser.error("--rate must be within (0, 100]")
    return args


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every option with its default."""


def check_model(checkpoint: str, runtime: RuntimeConfig) -> None:
    """Fails before anything is rendered when the node could not load the model: the
    node's own loading (`load_segmenter`), with the node's runtime configuration.

    Raises:
        LoadError: unusable device or checkpoint; `setting` names which.
    """
    load_segmenter(runtime, checkpoint)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.checkpoint and not DEFAULT_MODEL_PATH.is_file():
        print(f"tdnet-demo: error: no bundled default model at {DEFAULT_MODEL_PATH}; pass --checkpoint", file=sys.stderr)
        return 2
    try:
        check_model(args.checkpoint, RuntimeConfig(device=args.device, input_size=args.input_size, scales=args.scales))
    except LoadError as error:
        print(f"tdnet-demo: error: {error.named('--' + error.setting)}", file=sys.stderr)
        return 2
    except ValueError as error:  # DeviceError: not a device name at all
        print(f"tdnet-demo: error: --device: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    bag = out / "street"
    if bag.exists():
        print(f"tdnet-demo: error: {bag} exists; choose another --out", file=sys.stderr)
        return 2

    started = time.monotonic()
    print(f"tdnet-demo: generating {args.frames} frames (seed {args.seed}) into {bag}", file=sys.stderr)
    frames = generate_sequence(args.seed, args.frames, args.width, args.height)
    write_rosbag(frames, bag, storage="mcap")

    report_dir = out / "report"
    evaluation_args = [
        str(bag), "--image-topic", IMAGE_TOPIC, "--label-topic", LABEL_TOPIC, "--label-match", "stamp",
        "--live", "--rate", str(args.rate), "--device", args.device, "--out", str(report_dir),
    ]
    if args.checkpoint:
        evaluation_args += ["--checkpoint", args.checkpoint]
    if args.input_size:
        evaluation_args += ["--input-size", input_size_text(args.input_size)]
    if args.scales != (1.0,):
        evaluation_args += ["--scales", scales_text(args.scales)]
    if args.no_progress:
        evaluation_args.append("--no-progress")
    status = evaluation_cli.main(evaluation_args)
    if status != 0:
        return status

    results = json.loads((report_dir / "results.json").read_text())
    print(summary(results, report_dir, time.monotonic() - started))
    return 0


def summary(results: dict, report_dir: Path, seconds: float) -> str:
    def number(value, unit="") -> str:
        return "n/a" if value is None else f"{value:.1f}{unit}"

    latency = results.get("end_to_end_latency_ms") or {}
    return "\n".join(
        [
            "",
            f"tdnet-demo: {results.get('frames')} frames evaluated live in {seconds:.0f} s",
            f"  model                {results.get('model')} ({results.get('device')}, {results.get('precision')})",
            f"  mIoU                 {number(results.get('miou'), ' %')}",
            f"  temporal consistency {number(results.get('temporal_consistency'), ' %')}",
            f"  latency stamp->labels p50 {number(latency.get('p50'), ' ms')}, p95 {number(latency.get('p95'), ' ms')}",
            f"  dropped frames       {results.get('dropped_frames')} of {results.get('published_frames')}",
            f"  cache resets         {results.get('node_cache_resets')} in the node (warm-up included)",
            f"  report               {report_dir / 'report.md'}",
            f"  output folder        {report_dir.parent.resolve()}",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
