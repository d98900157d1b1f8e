"""`tdnet-bench`: per-frame latency of the segmenter (see tdnet_ros.benchmark for what it
measures and how to read it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..benchmark import __doc__ as BENCH_DOC
from ..benchmark import measure, print_table
from ..checkpoint import load_model
from ..config import VARIANTS
from ..runtime import AUTO, BACKENDS, PRECISIONS, PREPROCESS, fixed_size_argument, resolve_device


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (its examples), every option with its default."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tdnet-bench", description=BENCH_DOC, formatter_class=_HelpFormatter)
    parser.add_argument("--model", nargs="+", default=["td4-psp18"], choices=sorted(VARIANTS), metavar="MODEL",
                        help=f"model names: {', '.join(sorted(VARIANTS))}")
    parser.add_argument("--checkpoint", type=Path, help="weights (default: random; speed does not depend on them)")
    parser.add_argument("--size", nargs="+", type=fixed_size_argument, default=[(769, 1537)], help="model input HxW")
    parser.add_argument("--frame-size", type=fixed_size_argument, help="camera frame HxW (default: the input size)")
    parser.add_argument("--device", nargs="+", default=["cpu"], help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=PRECISIONS, metavar="PRECISION",
                        help=f"one or more of {', '.join(PRECISIONS)}")
    parser.add_argument(
        "--backend", nargs="+", default=["eager"], choices=BACKENDS, metavar="BACKEND",
        help=f"step backends: {', '.join(BACKENDS)} (onnx/tensorrt need --engine-dir)",
    )
    parser.add_argument("--engine-dir", type=Path, help="prebuilt ONNX files / TensorRT engines (tdnet-build-engines)")
    parser.add_argument("--preprocess", default="cv2", choices=(*PREPROCESS, AUTO),
                        help="resize/normalize on the host (cv2, as the published code) or on the device")
    parser.add_argument("--cameras", type=int, default=1,
                        help="streams given the frame together (one batch per step); frame_ms is the whole call")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per configuration")
    parser.add_argument("--warmup", type=int, default=4, help="untimed frames first, per configuration")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="per-frame time: wall clock, or this process's CPU time (steadier on a shared "
        "machine; with --threads 1 it is the single-core cost). Stage times are always wall.",
    )
    parser.add_argument("--published-code", type=Path, help="local checkout of the published TDNet Testing/ folder")
    parser.add_argument("--json", type=Path, help="also write the measured rows here, as JSON")
    args = parser.parse_args(argv)
    try:
        for device in args.device:
            resolve_device(device)
        if args.checkpoint is not None:
            load_model(args.checkpoint, args.model[0])  # fails here, in one line, if unusable
        if min(args.frames, args.cameras) < 1 or args.warmup < 0:
            raise ValueError("--frames and --cameras must be >= 1 and --warmup >= 0")
    except (ValueError, FileNotFoundError) as error:  # DeviceError, CheckpointError
        print(f"tdnet-bench: error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
