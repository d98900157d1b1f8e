"""Per-class logit offsets chosen on validation sequences and folded into the model's heads.

    python -m tdnet_ros.training.calibrate tdnet_ros/models/default.pt outputs/calibrated.pt --seeds 1001 1002 1003 1004

A model trained on imbalanced classes leans towards the frequent ones where it is unsure: a
bus becomes car, a pole or a wall becomes building. Adding a constant offset b_k to class
k's logits moves those decisions without retraining. The offsets are chosen by coordinate
ascent on the mean IoU of generated validation sequences (use seeds never used for
training, and never the held-out ones), then added to the bias of every sub-network's last
head convolution: the calibrated checkpoint computes logits + b at no cost at run time.

A constant offset commutes with bilinear upsampling (its weights sum to one), so the search
scores exactly the labels the segmenter will produce with the calibrated checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tdnet_ros.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from tdnet_ros.metrics import confusion_matrix, iou_per_class, mean_iou
from tdnet_ros.model import TDNet
from tdnet_ros.preprocess import upsample_logits

from .export import KEEP

STEPS = (1.0, 0.5, 0.25)  # coordinate ascent: the offsets move by these, coarse to fine
LIMIT = 3.0  # no offset beyond +-LIMIT: a few validation frames must not decide more than that
CHUNK = 8  # frames scored at once (bounds the memory of logits + offsets)


def collect_validation_logits(
    checkpoint: str | Path, seeds: Sequence[int], frames: int, width: int, height: int,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Runs the checkpoint through `Segmenter` over the generated sequences of `seeds`.

    Returns the logits as the segmenter resamples them to each frame, (F, K, height, width)
    float32 (bilinear to the model input, then the pixels the nearest resize to the frame
    keeps), the ground truth (F, height, width) uint8 and the model's class names.
    """
    from tdnet_ros.data import generate_sequence
    from tdnet_ros.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(checkpoint)
    align_corners = segmenter.config.upsample_align_corners
    logits, labels = [], []
    for seed in seeds:
        segmenter.reset()
        for frame in generate_sequence(seed, frames, width=width, height=height):
            result = segmenter.segment(frame.rgb)
            input_size = segmenter.model_input_size(frame.rgb.shape[:2])
            upsampled = upsample_logits(result.logits[None].float(), input_size, align_corners=align_corners)
            logits.append(F.interpolate(upsampled, (height, width), mode="nearest")[0])  # (K, height, width)
            labels.append(frame.labels)
    return torch.stack(logits), np.stack(labels), segmenter.class_names


def _confusion(predicted: torch.Tensor | np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) confusion matrix of predicted classes (F, H, W) against `labels` over all frames."""
    width = labels.shape[-1]
    predicted = np.asarray(predicted).reshape(-1, width)  # (F, H, W) -> (F*H, W)
    return confusion_matrix(predicted, labels.reshape(-1, width), num_classes)


def _top_two(logits: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest of logits + offsets at every pixel: values (F, 2, H, W), classes (F, 2, H, W)."""
    shift = offsets.view(1, -1, 1, 1).to(logits.dtype)  # (1, K, 1, 1)
    values, classes = [], []
    for start in range(0, logits.shape[0], CHUNK):
        top = (logits[start:start + CHUNK] + shift).topk(2, dim=1)
        values.append(top.values)
        classes.append(top.indices.to(torch.int16))
    return torch.cat(values), torch.cat(classes)


def _labels_moving_one_offset(logits: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor], k: int,
                              offset: float) -> np.ndarray:
    """argmax of logits + offsets with class k's offset set to `offset`, from the top two
    classes under the current offsets: k wins where it beats the best other class."""
    values, classes = top
    first_is_k = classes[:, 0] == k  # (F, H, W)
    best_other = torch.where(first_is_k, values[:, 1], values[:, 0])
    best_other_class = torch.where(first_is_k, classes[:, 1], classes[:, 0])
    return torch.where(logits[:, k] + offset > best_other, k, best_other_class).numpy()


def search_offsets(
    logits: torch.Tensor, labels: np.ndarray, steps: Sequence[float] = STEPS, limit: float = LIMIT,
    log=None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Coordinate ascent on mean IoU over per-class offsets, starting from zero.

    Only classes present in `labels` move: an offset for a class the validation frames do
    not show could only be judged by its false positives. Returns (offsets (K,), the (K, K)
    confusion matrix with no offsets, the one with them); the second's mean IoU is never
    below the first's.
    """
    num_classes = logits.shape[1]
    present = [k for k in range(num_classes) if (labels == k).any()]
    offsets = torch.zeros(num_classes)
    # Trying one class's offset needs only the two best classes under the others' offsets
    # (computed again after each accepted move), not an argmax over all K; the best of
    # them is the argmax under the current offsets.
    top = _top_two(logits, offsets)
    before = _confusion(top[1][:, 0], labels, num_classes)
    best = mean_iou(before)
    for step in steps:
        improved = True
        while improved:
            improved = False
            for k in present:
                for delta in (step, -step):
                    value = float(offsets[k]) + delta
                    if abs(value) > limit:
                        continue
                    predicted = _labels_moving_one_offset(logits, top, k, value)
                    score = mean_iou(_confusion(predicted, labels, num_classes))
                    if score > best + 1e-6:
                        offsets[k], best, improved = value, score, True
                        top = _top_two(logits, offsets)
                        if log is not None:
                            log(f"offset {k} -> {value:+.2f}: mIoU {100 * score:.2f}")
                        break
    return offsets, before, _confusion(top[1][:, 0], labels, num_classes)


def fold_offsets(model: TDNet, offsets: torch.Tensor) -> TDNet:
    """Adds `offsets` (K,) to the bias of every sub-network's last head convolution, in place."""
    with torch.no_grad():
        for path in model.paths:
            classifier = path.head[-1]
            classifier.bias.add_(offsets.to(classifier.bias))
    return model


def calibrate_checkpoint(
    source: str | Path, target: str | Path, seeds: Sequence[int], *, frames: int = 40, width: int = 512,
    height: int = 256, limit: float = LIMIT, log=print,
) -> dict[str, Any]:
    """Chooses offsets for `source` on the generated sequences of `seeds`, writes `target`
    with them folded in, and returns its `calibration` record. A source calibrated before
    keeps its offsets; the new ones add to them."""
    content = read_checkpoint(source)
    model = load_model(source)
    logits, labels, names = collect_validation_logits(source, seeds, frames, width, height)
    offsets, before, after = search_offsets(logits, labels, limit=limit, log=log)
    miou_before, miou_after = mean_iou(before), mean_iou(after)
    log(f"validation mIoU {100 * miou_before:.1f} -> {100 * miou_after:.1f} over {labels.shape[0]} frames "
        f"(seeds {list(seeds)}, {width}x{height})")
    for name, offset, low, high in zip(names, offsets.tolist(), iou_per_class(before), iou_per_class(after)):
        if offset:
            log(f"  {name:14s} offset {offset:+.2f}  IoU {100 * low:5.1f} -> {100 * high:5.1f}")
    kept = {k: content[k] for k in KEEP if k != "calibration" and k in content}
    earlier = content.get("calibration")
    total = offsets + (torch.tensor(earlier["offsets"]) if earlier else 0.0)
    if earlier:
        log(f"{source} was calibrated before: the offsets add to its earlier ones")
    calibration = {"offsets": total.tolist(), "seeds": list(seeds), "frames": frames,
                   "render_size": [height, width], "val_miou_before": miou_before, "val_miou_after": miou_after}
    save_checkpoint(fold_offsets(model, offsets), target, **kept, calibration=calibration)
    log(f"wrote {target}")
    return calibration


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="project checkpoint (e.g. tdnet_ros/models/default.pt)")
    parser.add_argument("target", help="calibrated checkpoint to write")
    parser.add_argument("--seeds", type=int, nargs="+", required=True,
                        help="validation sequence seeds (not training, not held-out)")
    parser.add_argument("--frames", type=int, default=40, help="frames per sequence")
    parser.add_argument("--width", type=int, default=512, help="render width (default 512, as tdnet-generate)")
    parser.add_argument("--height", type=int, default=256, help="render height (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=float, default=LIMIT, help="largest offset magnitude")
    args = parser.parse_args(argv)
    sizes_fit = all(16 <= side <= 4096 for side in (args.width, args.height))  # the generator's range
    if args.frames < 1 or min(args.seeds) < 0 or not sizes_fit:
        parser.error("--frames must be at least 1, --seeds non-negative, --width and --height 16 to 4096")
    torch.set_num_threads(args.threads)
    try:
        calibrate_checkpoint(args.source, args.target, args.seeds, frames=args.frames, width=args.width,
                             height=args.height, limit=args.limit)
    except CheckpointError as error:
        print(f"tdnet calibrate: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
