"""Held-out accuracy on generated street videos: mIoU, per-class IoU and CPU latency.

    python -m tdnet_ros.training.heldout --checkpoint tdnet_ros/models/default.pt --seeds 2001 2002 2003
    python -m tdnet_ros.training.heldout --checkpoint tdnet_ros/models/default.pt --seeds 2001 --width 1024 --height 512
    python -m tdnet_ros.training.heldout --teacher outputs/train_teacher/model.pt --seeds 2001 2002 2003
    python -m tdnet_ros.training.heldout --ceiling 512x1024 --seeds 2001 2002 2003

A student runs through `Segmenter` (the inference path of the node), frame by frame with its
feature cache, reset at the start of each sequence; every frame is scored with
`tdnet_ros.metrics`. A teacher checkpoint runs single-frame. Use seeds never used in training.

`--ceiling HxW` scores no model but the best that any stride-8 output (`--ceiling-stride 4`:
stride 4) at input size HxW can do: each output cell's logits are the true shares of the
classes in the part of the input it covers, and go through the segmenter's own
post-processing (bilinear upsampling, argmax, resize to the frame; align_corners=False, as
this project's trainer trains, or True with `--ceiling-align-corners`). Thin objects
narrower than a cell are lost there whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from tdnet_ros.classes import CLASS_NAMES
from tdnet_ros.config import feature_size_for
from tdnet_ros.metrics import SegmentationScores, top_confusions
from tdnet_ros.preprocess import labels_from_logits
from tdnet_ros.runtime import InputSize, fixed_size_argument, input_size_argument, scales_argument, scales_text

from .augment import to_tensor
from .teacher import load_teacher


def ideal_logits(labels: np.ndarray, input_size: tuple[int, int], num_classes: int, stride: int = 8) -> torch.Tensor:
    """(1, K, h, w) stride-`stride` logits that hold, per output cell, the share of each class in
    the part of the input the cell covers (`labels`, (H, W) train ids at the frame's size, enlarged
    to `input_size` as the segmenter enlarges the frame; ignored pixels count for no class)."""
    target = torch.from_numpy(labels.astype(np.int64))[None, None].float()  # (1, 1, H, W)
    target = F.interpolate(target, input_size, mode="nearest").long()[0, 0]  # (h_in, w_in)
    one_hot = F.one_hot(target.clamp(max=num_classes), num_classes + 1)[..., :num_classes]  # ignore -> none
    one_hot = one_hot.permute(2, 0, 1)[None].float()  # (1, K, h_in, w_in)
    return F.adaptive_avg_pool2d(one_hot, feature_size_for(input_size, stride))


def evaluate(
    seeds: Sequence[int], frames: int, *, checkpoint: str | None = None, teacher: str | None = None,
    ceiling: tuple[int, int] | None = None, ceiling_align_corners: bool = False, ceiling_stride: int = 8,
    width: int = 512, height: int = 256, input_size: InputSize = None, repeat: int = 1,
    scales: tuple[float, ...] = (1.0,),
) -> dict:
    """Scores a student checkpoint (or a teacher, or the ideal output of stride `ceiling_stride`
    at input size `ceiling`, its logits upsampled with `ceiling_align_corners`) on the
    generated sequences of `seeds`.

    `width` x `height` is the render size; a student runs at `input_size` (None: its
    checkpoint's own input size, as the node does) and is scored at the render size; with
    `scales` it runs at each of those multiples of it (multi-scale inference, Segmenter's
    `scales`).

    `repeat` > 1 (students only) gives the student each frame that many times in a row and
    scores its last output. From as many repeats as it has sub-networks on, every cached
    frame is the current one: what the model scores on a still scene, so the difference to
    `repeat=1` is what motion between the cached frames costs. The latency counts all the
    runs of a frame.
    """
    from tdnet_ros.data import generate_sequence
    from tdnet_ros.segmenter import Segmenter

    if sum(x is not None for x in (checkpoint, teacher, ceiling)) != 1:
        raise ValueError("give exactly one of checkpoint, teacher and ceiling")
    if repeat < 1 or (repeat > 1 and checkpoint is None):
        raise ValueError("repeat must be at least 1, and above 1 only for a student checkpoint")
    if tuple(scales) != (1.0,) and checkpoint is None:
        raise ValueError("scales apply only to a student checkpoint")
    if checkpoint is not None:
        segmenter = Segmenter.from_checkpoint(checkpoint, input_size=input_size, scales=tuple(scales))
        num_classes = segmenter.num_classes

        def run(frame) -> np.ndarray:
            for _ in range(repeat - 1):
                segmenter.segment(frame.rgb)
            return segmenter.segment(frame.rgb).labels
    elif teacher is not None:
        net = load_teacher(teacher)
        num_classes = net.config.num_classes

        @torch.no_grad()
        def run(frame) -> np.ndarray:
            logits = net(to_tensor(cv2.resize(frame.rgb, (width, height)))[None])["out"]
            # upsampled as the teacher trains
            return labels_from_logits(logits, frame.rgb.shape[:2], align_corners=False).numpy()
    else:
        num_classes = len(CLASS_NAMES)

        def run(frame) -> np.ndarray:
            logits = ideal_logits(frame.labels, ceiling, num_classes, ceiling_stride)
            return labels_from_logits(logits, ceiling, frame.labels.shape, align_corners=ceiling_align_corners).numpy()

    scores = SegmentationScores(num_classes)
    seconds = []
    for seed in seeds:
        if checkpoint is not None:
            segmenter.reset()
        for frame in generate_sequence(seed, frames, width=width, height=height):
            began = time.perf_counter()
            labels = run(frame)
            seconds.append(time.perf_counter() - began)
            scores.update(labels.astype(np.int64), frame.labels.astype(np.int64))
    names = list(CLASS_NAMES)[:num_classes]
    labelled = int(scores.matrix.sum())
    return {
        "model": checkpoint or teacher or (f"ideal stride-{ceiling_stride} output at input {ceiling[0]}x{ceiling[1]}, "
                                           f"align_corners={ceiling_align_corners}"),
        "seeds": list(seeds),
        "render_size": [height, width],
        "input_size": (list(segmenter.model_input_size((height, width))) if checkpoint is not None
                       else list(ceiling or (height, width))),
        "frames": scores.frames,
        "repeat": repeat,
        "scales": list(scales),
        "miou": scores.mean_iou,
        "pixel_accuracy": scores.pixel_accuracy,
        "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, scores.iou)},
        # per ground-truth class: its share of the labelled pixels, and what its pixels are
        # mistaken for (where a weak class's pixels go)
        "pixel_share": {name: float(n / max(labelled, 1)) for name, n in zip(names, scores.matrix.sum(axis=1))},
        "confused_with": {name: {names[k]: fraction for k, fraction in pairs}
                          for name, pairs in zip(names, top_confusions(scores.matrix))},
        "latency_ms_median": 1000 * float(np.median(seconds[1:] or seconds)),
        "threads": torch.get_num_threads(),
    }


def precision_agreement(checkpoint: str, precision: str, seed: int, frames: int,
                        width: int = 512, height: int = 256, input_size: InputSize = None) -> dict:
    """Labels of `precision` against float32 on one generated sequence, frame by frame, and
    both median latencies (the frames run interleaved, so both see the same machine load)."""
    from tdnet_ros.data import generate_sequence
    from tdnet_ros.segmenter import Segmenter

    reference = Segmenter.from_checkpoint(checkpoint, input_size=input_size)
    reduced = Segmenter.from_checkpoint(checkpoint, precision=precision, input_size=input_size)
    agreement, seconds = [], {"float32": [], precision: []}
    for frame in generate_sequence(seed, frames, width=width, height=height):
        began = time.perf_counter()
        a = reference.segment(frame.rgb).labels
        middle = time.perf_counter()
        b = reduced.segment(frame.rgb).labels
        seconds["float32"].append(middle - began)
        seconds[precision].append(time.perf_counter() - middle)
        agreement.append(float((a == b).mean()))
    return {"agreement_mean": float(np.mean(agreement)), "agreement_min": float(np.min(agreement)),
            **{f"{name}_ms_median": 1000 * float(np.median(v[1:] or v)) for name, v in seconds.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="held-out mIoU on generated street videos")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="student checkpoint (project format)")
    which.add_argument("--teacher", help="teacher checkpoint written by tdnet-train (stage: teacher)")
    which.add_argument("--ceiling", type=fixed_size_argument, metavar="HxW",
                       help="no model: the ideal stride-8 output at this input size (what any model can reach)")
    parser.add_argument("--ceiling-stride", type=int, choices=(4, 8), default=8,
                        help="with --ceiling: the output's stride (4: as with the detail refinement; default 8)")
    parser.add_argument("--ceiling-align-corners", action="store_true",
                        help="with --ceiling: upsample as the published checkpoints do (align_corners=True) "
                             "instead of as this project's trainer does")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="held-out sequence seeds")
    parser.add_argument("--frames", type=int, default=60, help="frames per sequence")
    parser.add_argument("--width", type=int, default=512, help="render width of the held-out frames (default 512)")
    parser.add_argument("--height", type=int, default=256, help="render height (default 256)")
    parser.add_argument("--input-size", type=input_size_argument, default=None, metavar="HxW|frame",
                        help="student's input size (default: its checkpoint's training size, as in the node)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="with --checkpoint: give each frame N times in a row and score the last output "
                             "(N >= the sub-networks: the model on a still scene; default 1)")
    parser.add_argument("--scales", type=scales_argument, default=(1.0,), metavar="'1 S2 ...'",
                        help="with --checkpoint: multi-scale inference, each frame also run at these multiples "
                             "of the input size, probabilities averaged, e.g. '1 1.5' (default: 1, one scale)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--compare-precision", choices=("bfloat16", "float16"),
                        help="instead: this precision's labels against float32 on the first seed, and both latencies")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.repeat < 1 or (args.repeat > 1 and not args.checkpoint):
        parser.error("--repeat must be at least 1, and above 1 only with --checkpoint")
    if args.scales != (1.0,) and not args.checkpoint:
        parser.error("--scales applies only with --checkpoint")
    if args.compare_precision:
        if not args.checkpoint:
            parser.error("--compare-precision needs --checkpoint")
        if args.repeat > 1 or args.scales != (1.0,):
            # the comparison runs each frame once, at one scale: these would be silently ignored
            parser.error("--repeat and --scales do not apply to --compare-precision (one run of each frame)")
        result = precision_agreement(args.checkpoint, args.compare_precision, args.seeds[0], args.frames,
                                     args.width, args.height, args.input_size)
        print(json.dumps(result))
        return 0
    result = evaluate(args.seeds, args.frames, checkpoint=args.checkpoint, teacher=args.teacher,
                      ceiling=args.ceiling, ceiling_align_corners=args.ceiling_align_corners,
                      ceiling_stride=args.ceiling_stride,
                      width=args.width, height=args.height, input_size=args.input_size, repeat=args.repeat,
                      scales=args.scales)
    if args.json:  # before printing: a reader that stops early (`| head`) still gets the file
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    try:
        _print_result(result, args)
    except BrokenPipeError:
        # The reader closed the pipe (`| head`): not an error of the scoring. Python would
        # flush stdout again at exit and fail; point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_result(result: dict, args: argparse.Namespace) -> None:
    input_height, input_width = result["input_size"]
    print(f"{result['model']}: mIoU {100 * result['miou']:.1f} over {result['frames']} frames "
          f"(seeds {result['seeds']}, {args.width}x{args.height} renders, input {input_height}x{input_width}), "
          f"pixel accuracy {100 * result['pixel_accuracy']:.1f}"
          + (f", each frame given {result['repeat']} times" if result["repeat"] > 1 else "")
          + (f", scales {scales_text(result['scales'])}" if len(result["scales"]) > 1 else "")
          + ("" if args.ceiling else
             f", median latency {result['latency_ms_median']:.1f} ms/frame ({result['threads']} thread)"))
    print(f"  {'class':14s} {'IoU':>5s} {'pixels':>7s}  ground-truth pixels mostly predicted as")
    for name, value in result["iou"].items():
        confused = ", ".join(f"{other} {100 * fraction:.0f} %"
                             for other, fraction in result["confused_with"][name].items())
        print(f"  {name:14s} {'    -' if value is None else f'{100 * value:5.1f}'} "
              f"{100 * result['pixel_share'][name]:6.2f}%  {confused}".rstrip())
    sys.stdout.flush()  # a closed pipe fails here, inside main's try, not at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
