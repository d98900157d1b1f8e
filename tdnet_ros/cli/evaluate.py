"""``tdnet-eval``: evaluate a segmentation model on a recording.

    tdnet-eval BAG --image-topic /camera/image_raw [--label-topic /camera/labels |
               --label-dir DIR] [--out DIR] [--json FILE]
               [--checkpoint model.pt --model td4-psp18 --device cpu] [--live [--rate 2]]
    tdnet-eval CITYSCAPES_ROOT --cityscapes --checkpoint td4-psp18.pkl --model td4-psp18

Offline (default): every frame through the segmenter in this process. ``--live``: the
recording played into ROS 2 topics, ``segmenter_node`` in its own process. ``--cityscapes``:
the published protocol on ``leftImg8bit_sequence``. Writes report.md, results.json, PNG
figures and an overlay video into the output folder and prints its path and a summary.
Exit status: 0 done, 1 no frame could be evaluated, 2 the recording, a topic, the model or
an option is unusable (the message says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tdnet_ros.evaluation.bag import BagError, Recording
from tdnet_ros.evaluation.live import LiveEvaluationError  # rclpy is imported only when run
from tdnet_ros.evaluation.offline import OfflineSettings, evaluate_offline, write_offline_report
from tdnet_ros.evaluation.report import Provenance, write_report
from tdnet_ros.runtime import RuntimeConfig, add_runtime_arguments, runtime_from_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdnet-eval",
        description="Replay a recording through a TDNet segmenter and report accuracy, "
                    "temporal consistency and latency.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bag", type=Path,
                        help="rosbag2 folder (MCAP or sqlite3), .mcap/.db3 file, or ROS 1 .bag")
    parser.add_argument("--image-topic", help="camera topic (sensor_msgs/Image or "
                        "CompressedImage); omit with --list-topics")
    truth = parser.add_mutually_exclusive_group()
    truth.add_argument("--label-topic", help="ground-truth topic: mono8 class ids, matched to "
                       "frames by header stamp")
    truth.add_argument("--label-dir", type=Path, help="folder of Cityscapes-style label PNGs "
                       "(*_labelTrainIds.png, *_labelIds.png or <number>.png)")
    parser.add_argument("--label-match", choices=("index", "stamp"), default="index",
                        help="how --label-dir files match frames: the number in the file "
                             "name is the frame's position on the topic (index) or its "
                             "header stamp in ns (stamp). Messages of --label-topic always "
                             "match by header stamp (within --label-tolerance-ms), whatever "
                             "this says")
    parser.add_argument("--label-offset", type=int, default=0,
                        help="added to a frame's position before matching --label-dir files")
    parser.add_argument("--label-tolerance-ms", type=float, default=1.0,
                        help="largest stamp difference for a label message to match a frame")
    parser.add_argument("--require-labels", action="store_true",
                        help="fail when no frame finds its ground truth (a --label-topic "
                             "missing from the recording always fails)")
    parser.add_argument("--out", type=Path, help="output folder (none given: outputs/eval-<bag>-"
                        "<time>)")
    parser.add_argument("--json", type=Path, help="also write the JSON results here")
    parser.add_argument("--checkpoint", help="checkpoint file (none given: the bundled model)")
    parser.add_argument("--model", help="model name for --checkpoint, e.g. td4-psp18 "
                        "(none given: from the checkpoint); needs --checkpoint")
    # The node's runtime settings, resolved by the same rules: the backend a robot deploys.
    add_runtime_arguments(parser, RuntimeConfig(device="cpu"))
    parser.add_argument("--max-frames", type=int, help="evaluate at most this many frames")
    parser.add_argument("--max-gap", type=float, default=0.5,
                        help="a forward stamp jump above this many seconds resets the "
                             "temporal state (default 0.5)")
    parser.add_argument("--flow-max-side", type=int, default=640,
                        help="optical flow for temporal consistency runs at most at this "
                             "size (pixels, longer side; 0: full size)")
    parser.add_argument("--no-video", action="store_true", help="skip the overlay video")
    parser.add_argument("--output-bag", type=Path,
                        help="write a copy of the recording with the predicted labels topic")
    parser.add_argument("--output-bag-storage", choices=("mcap", "sqlite3"), default="mcap",
                        help="storage of --output-bag")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--live", action="store_true",
                        help="live mode: play the recording into ROS 2 topics and evaluate "
                             "segmenter_node running as its own process (default: offline)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="live mode: playback speed, a multiple of the recorded rate")
    parser.add_argument("--live-warmup", type=int, default=2,
                        help="live mode: send the first frame this many times before "
                             "playback, so the node's start-up cost is not measured "
                             "(default 2; 0: measure from a cold node)")
    parser.add_argument("--startup-timeout", type=float, default=120.0,
                        help="live mode: seconds the node may take to start")
    parser.add_argument("--cityscapes", action="store_true",
                        help="BAG is a Cityscapes root: evaluate the published protocol on "
                             "leftImg8bit_sequence (annotated 20th frame of each snippet, "
                             "the model warmed on the frames before it)")
    parser.add_argument("--split", default="val", help="Cityscapes split (default: val)")
    parser.add_argument("--warmup-frames", type=int, default=19,
                        help="Cityscapes: frames run before each annotated one (default 19)")
    parser.add_argument("--max-snippets", type=int,
                        help="Cityscapes: evaluate at most this many snippets")
    parser.add_argument("--list-topics", action="store_true",
                        help="print the recording's topics and exit")
    return parser


def open_segmenter(args: argparse.Namespace, command: str, device: str | None = None) -> tuple[Any, Provenance]:
    """The segmenter the flags describe (core `load_segmenter`) and what identifies it.

    Raises:
        ValueError: unusable model, checkpoint, device or runtime flag, named by its flag.
    """
    from tdnet_ros.segmenter import LoadError, load_segmenter

    runtime = runtime_from_arguments(args)
    if device is not None:
        runtime = runtime.replace(device=device)
    try:
        segmenter = load_segmenter(runtime, args.checkpoint or "", args.model or "")
    except LoadError as error:
        raise ValueError(error.named(f"--{error.setting}")) from None
    return segmenter, Provenance.of(segmenter, args.checkpoint, args.model, command)


def default_output_folder(bag: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("outputs") / f"eval-{bag.resolve().name}-{stamp}"


def summary_lines(results: dict[str, Any], out_dir: Path) -> list[str]:
    """The terminal summary: mIoU, temporal consistency, latency, skips, output folder."""

    def fmt(value: Any, suffix: str = "") -> str:
        return "n/a" if value is None else f"{value:.1f}{suffix}"

    total = results.get("latency_ms", {}).get("total", {})
    lines = [
        f"frames {results['frames']} ({results['frames_with_ground_truth']} with ground truth), "
        f"skipped {results['skipped_count']}",
        f"mIoU {fmt(results.get('miou'), ' %')}   pixel accuracy "
        f"{fmt(results.get('pixel_accuracy'), ' %')}   temporal consistency "
        f"{fmt(results.get('temporal_consistency'), ' %')}",
        f"latency p50 {fmt(total.get('p50'), ' ms')}  p95 {fmt(total.get('p95'), ' ms')}  "
        f"p99 {fmt(total.get('p99'), ' ms')}   {fmt(results.get('fps'))} fps",
    ]
    if "dropped_frames" in results:
        end_to_end = results.get("end_to_end_latency_ms") or {}
        lines.append(
            f"dropped frames {results['dropped_frames']} of {results['published_frames']}   "
            f"end-to-end from stamp p50 {fmt(end_to_end.get('p50'), ' ms')}  "
            f"p95 {fmt(end_to_end.get('p95'), ' ms')}")
    names = sorted(Path(path).name for path in results.get("files", {}).values()
                   if Path(path).resolve().parent == out_dir.resolve())
    lines.append(f"output folder: {out_dir.resolve()}  ({', '.join(names)})")
    return lines


def check_model_options(args: argparse.Namespace) -> None:
    """Options naming the model that cannot work, refused before anything is read."""
    from tdnet_ros.runtime import resolve_device

    if args.model and not args.checkpoint:
        raise ValueError(f"--model {args.model} needs --checkpoint (a file of that model); without "
                         "--model the bundled default model is evaluated")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    if not args.live:
        resolve_device(args.device)  # DeviceError (a ValueError): e.g. cuda without CUDA


def run(args: argparse.Namespace, command: str) -> int:
    check_model_options(args)
    if args.cityscapes:
        return run_cityscapes_mode(args, command)
    if args.list_topics:
        with Recording(args.bag) as recording:
            print(recording.describe_topics())
        return 0
    if not args.image_topic:
        with Recording(args.bag) as recording:
            topics = recording.describe_topics()
        raise BagError(f"--image-topic is required; {topics}")
    out_dir = args.out or default_output_folder(args.bag)
    if args.live and (args.label_dir or args.output_bag):
        raise ValueError("--label-dir and --output-bag are offline only; live mode takes "
                         "--label-topic")
    if args.output_bag is not None and args.output_bag.exists():
        raise ValueError(f"--output-bag {args.output_bag} exists already; choose a new path")
    # Open the recording and check the topics before loading the model: fail fast.
    with Recording(args.bag) as recording:
        recording.check_topic(args.image_topic, "image",
                              ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"))
        if args.label_topic:
            recording.check_topic(args.label_topic, "label", ("sensor_msgs/msg/Image",))
    segmenter, provenance = open_segmenter(args, command, device="cpu" if args.live else None)
    if args.live:
        # The node runs the model; this process only read its classes.
        provenance = dataclasses.replace(provenance, device=args.device, precision=args.precision,
                                         backend=args.backend)
        results = run_live_mode(args, segmenter, provenance, out_dir)
    else:
        settings = OfflineSettings(
            image_topic=args.image_topic, label_topic=args.label_topic,
            label_dir=args.label_dir, label_match=args.label_match,
            label_index_offset=args.label_offset,
            label_tolerance_ms=args.label_tolerance_ms, require_labels=args.require_labels,
            max_gap_s=args.max_gap, max_frames=args.max_frames,
            flow_max_side=args.flow_max_side or None,
            video_path=None if args.no_video else out_dir / "overlay.mp4",
            output_bag=args.output_bag, output_bag_storage=args.output_bag_storage,
            progress=not args.no_progress,
        )
        result = evaluate_offline(args.bag, segmenter, settings)
        results = write_offline_report(result, provenance, out_dir, args.json)
    for entry in results.get("skipped", []):
        if entry.get("category") == "recording_damaged":
            print(f"tdnet-eval: warning: {entry['reason']}", file=sys.stderr)
    print("\n".join(summary_lines(results, out_dir)))
    return 0 if results["frames"] > 0 else 1


def run_cityscapes_mode(args: argparse.Namespace, command: str) -> int:
    """The published Cityscapes protocol over a dataset tree (no recording involved)."""
    from tdnet_ros.evaluation.cityscapes import evaluate_cityscapes

    if args.live or args.label_topic or args.label_dir or args.image_topic:
        raise ValueError("--cityscapes takes the dataset root as BAG and no topics, "
                         "labels or --live")
    out_dir = args.out or default_output_folder(args.bag)
    segmenter, provenance = open_segmenter(args, command)
    result = evaluate_cityscapes(
        args.bag, segmenter, split=args.split, warmup_frames=args.warmup_frames,
        max_snippets=args.max_snippets, flow_max_side=args.flow_max_side or None,
        video_path=None if args.no_video else out_dir / "overlay.mp4",
        progress=not args.no_progress,
    )
    results = write_offline_report(result, provenance, out_dir, args.json)
    print("\n".join(summary_lines(results, out_dir)))
    return 0 if results["frames"] > 0 else 1


def run_live_mode(args: argparse.Namespace, segmenter: Any, provenance: Provenance,
                  out_dir: Path) -> dict[str, Any]:
    """Plays the recording into segmenter_node (own process) and reports what came back."""
    import numpy as np

    from tdnet_ros.evaluation.live import LiveSettings, measure_live, run_live
    from tdnet_ros.evaluation.video import EvaluationVideoWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = LiveSettings(
        image_topic=args.image_topic, label_topic=args.label_topic, rate=args.rate,
        checkpoint=args.checkpoint or "", model=args.model or "", runtime=runtime_from_arguments(args),
        startup_timeout_s=args.startup_timeout,
        max_frames=args.max_frames, log_path=out_dir / "node.log",
        label_tolerance_ms=args.label_tolerance_ms, warmup_frames=args.live_warmup,
        flow_max_side=args.flow_max_side or None,
    )
    if not args.no_progress:
        print(f"live: starting segmenter_node, then playing {args.bag} at x{args.rate}",
              file=sys.stderr)
    live = run_live(args.bag, settings, progress=not args.no_progress)
    video = None
    if not args.no_video:
        video = EvaluationVideoWriter(out_dir / "overlay.mp4", np.asarray(segmenter.class_colors),
                                      tuple(segmenter.class_names))
    recorder, extra = measure_live(args.bag, live, settings, int(segmenter.num_classes),
                                   tuple(segmenter.class_names), video=video)
    if args.label_topic and not live.ground_truth and not live.problems:
        recorder.note(f"no ground truth arrived on {args.label_topic}: accuracy not measured")
    extra.update({
        "recording": str(args.bag), "image_topic": args.image_topic,
        "ground_truth": f"label topic {args.label_topic}" if args.label_topic else "none",
        "node_log": str(settings.log_path),
    })
    return write_report(recorder, provenance, out_dir, extra=extra,
                        video=video.close() if video is not None else None,
                        json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = shlex.join(["tdnet-eval", *argv])
    try:
        return run(args, command)
    except (BagError, ValueError, FileNotFoundError) as error:
        # CheckpointError is a ValueError: a bad checkpoint or model name lands here too.
        print(f"tdnet-eval: error: {error}", file=sys.stderr)
        return 2
    except LiveEvaluationError as error:
        print(f"tdnet-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tdnet-eval: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
