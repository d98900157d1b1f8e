"""Per-class logit offsets chosen on validation sequences and folded into the model's heads.

    python -m tdnet_ros.training.calibrate tdnet_ros/models/default.pt outputs/calibrated.pt --seeds 1001 1002 1003 1004

A model trained on imbalanced classes leans towards the frequent ones where it is unsure: a
bus becomes car, a pole or a wall becomes building. Adding a constant offset b_k to class
k's logits moves those decisions without retraining. The offsets are chosen by coordinate
ascent on the mean IoU of validation frames, then added to the bias of every sub-network's
last convolution (the head's, or the detail refinement's where it has one): the calibrated
checkpoint computes logits + b at no cost at run time.
The frames are generated sequences (`--seeds`: never training seeds, never held-out ones),
the labelled frames of a split of one's own Cityscapes or CamVid tree, or a recording with a
label topic (mono8 class ids, matched to camera frames by header stamp, as `tdnet-eval` reads it):

    python -m tdnet_ros.training.calibrate my_model.pt my_model_calibrated.pt --cityscapes data/cityscapes --split val
    python -m tdnet_ros.training.calibrate my_model.pt my_model_calibrated.pt --bag my_labelled_drive.mcap \
        --image-topic /camera/image_raw --label-topic /camera/labels

A constant offset commutes with bilinear upsampling (its weights sum to one), so the search
scores exactly the labels the segmenter will produce with the calibrated checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tdnet_ros.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint, save_checkpoint
from tdnet_ros.config import ModelConfig
from tdnet_ros.evaluation.bag import BagError
from tdnet_ros.metrics import ConfusionCounter, iou_per_class, mean_iou
from tdnet_ros.model import TDNet
from tdnet_ros.preprocess import logits_at_frame

from .datasets import CamVidClips, CityscapesClips, ClipDataset, DatasetError
from .export import KEEP

if TYPE_CHECKING:
    from tdnet_ros.segmenter import Segmenter

STEPS = (1.0, 0.5, 0.25)  # coordinate ascent: the offsets move by these, coarse to fine
LIMIT = 3.0  # no offset beyond +-LIMIT: a few validation frames must not decide more than that
CHUNK = 8  # frames scored at once (bounds the memory of logits + offsets)
MAX_PIXELS = 512 * 256  # larger labelled frames are scored on a regular grid of about this many pixels


FrameStream = Iterable[tuple[np.ndarray, np.ndarray | None]]  # RGB frames in order, labels where scored


def generated_sequences(seeds: Sequence[int], frames: int, width: int, height: int) -> Iterator[FrameStream]:
    """The generated sequences of `seeds`, every frame labelled."""
    from tdnet_ros.data import generate_sequence

    for seed in seeds:
        yield ((frame.rgb, frame.labels) for frame in generate_sequence(seed, frames, width=width, height=height))


def dataset_clips(clips: ClipDataset, max_frames: int) -> Iterator[FrameStream]:
    """Up to `max_frames` labelled frames of a dataset, evenly spread, each as the clip that
    ends on it (consecutive frames, as many as the model has sub-networks): its last frame is
    then segmented with a full feature cache, as in a video, and only it is scored."""
    count = min(max_frames, len(clips))
    for index in np.linspace(0, len(clips) - 1, count).round().astype(int):
        frames, labels = clips.load_clip(int(index), None)
        yield ((frame, labels[-1] if j == len(frames) - 1 else None) for j, frame in enumerate(frames))


def pixel_step(height: int, width: int, max_pixels: int = MAX_PIXELS) -> int:
    """The smallest s for which one pixel in each s x s block of the frame leaves at most `max_pixels`."""
    step = 1
    while math.ceil(height / step) * math.ceil(width / step) > max_pixels:
        step += 1
    return step


def collect_logits(
    segmenter: Segmenter, sequences: Iterable[FrameStream], max_pixels: int = MAX_PIXELS,
) -> tuple[torch.Tensor, np.ndarray, list[str], int]:
    """Runs `segmenter` over `sequences` (its cache reset at each).

    For every labelled frame keeps the logits as the segmenter resamples them to the frame
    (bilinear to the model input, then the pixels the nearest resize to the frame keeps) and
    the labels, at the centre pixel of each s x s block where a frame has more than
    `max_pixels` (s from `pixel_step`: it bounds the memory of large frames). Returns the
    logits (F, K, h, w) float32, the labels (F, h, w) uint8, the model's class names and s.
    """
    align_corners = segmenter.config.upsample_align_corners
    logits, labels, sizes = [], [], set()
    step = 1
    for sequence in sequences:
        segmenter.reset()
        for rgb, frame_labels in sequence:
            result = segmenter.segment(rgb)
            if frame_labels is None:
                continue
            height, width = frame_labels.shape
            sizes.add((height, width))
            if len(sizes) > 1:
                raise DatasetError(f"labelled frames of {len(sizes)} sizes ({sorted(sizes)}): calibration needs one")
            step = pixel_step(height, width, max_pixels)
            at_frame = logits_at_frame(result.logits[None].float(), segmenter.model_input_size((height, width)),
                                       (height, width), align_corners=align_corners)[0]  # (K, height, width)
            first = step // 2  # the centre of each step x step block
            # copies, so that the whole frame's logits and labels are not kept alive by a view
            logits.append(at_frame[:, first::step, first::step].contiguous())
            labels.append(np.ascontiguousarray(frame_labels[first::step, first::step]))
    if not labels:
        raise DatasetError("no labelled frame to calibrate on")
    return _stack_releasing(logits), np.stack(labels), segmenter.class_names, step


def _stack_releasing(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack that frees each input once copied, so that the peak memory stays about
    one copy of the logits (16 sequences of 40 frames at 512x256: 6.4 GB), not two."""
    stacked = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype)
    for index in range(len(tensors)):
        stacked[index] = tensors[index]
        tensors[index] = None  # type: ignore[call-overload]
    return stacked


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
    confusion = ConfusionCounter(labels, num_classes)  # of (F, H, W) predictions
    before = confusion(top[1][:, 0].numpy())
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
                    score = mean_iou(confusion(predicted))
                    if score > best + 1e-6:
                        offsets[k], best, improved = value, score, True
                        top = _top_two(logits, offsets)
                        if log is not None:
                            log(f"offset {k} -> {value:+.2f}: mIoU {100 * score:.2f}")
                        break
    return offsets, before, confusion(top[1][:, 0].numpy())


def fold_offsets(model: TDNet, offsets: torch.Tensor) -> TDNet:
    """Adds `offsets` (K,) to the bias of every sub-network's last convolution, in place."""
    with torch.no_grad():
        for path in model.paths:
            path.classifier.bias.add_(offsets.to(path.classifier.bias))
    return model


def without_offsets(content: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a project checkpoint (`read_checkpoint(path)`) with the class offsets
    of its calibration taken off, so that they compute the trained logits again; the
    weights themselves where it was never calibrated."""
    if "calibration" not in content:
        return content["state_dict"]
    model = model_from_checkpoint(content, path)  # its last convolutions hold the offsets
    return fold_offsets(model, -torch.tensor(content["calibration"]["offsets"])).state_dict()


def generated_data(seeds: Sequence[int], frames: int, width: int, height: int) -> tuple[Iterator[FrameStream], dict]:
    """The generated validation sequences of `seeds` and how the calibration record names them."""
    record = {"seeds": list(seeds), "frames": frames, "render_size": [height, width]}
    return generated_sequences(seeds, frames, width, height), record


def dataset_data(kind: str, root: str | Path, split: str, model: ModelConfig,
                 max_frames: int) -> tuple[Iterator[FrameStream], dict]:
    """The labelled frames of a Cityscapes or CamVid tree (the training loaders' layouts) and
    how the calibration record names them. The model must predict the dataset's classes."""
    factory = {"cityscapes": CityscapesClips, "camvid": CamVidClips}[kind]
    clips = factory(root, split, clip_length=model.num_paths, gaps=(1, 1))
    if clips.num_classes != model.num_classes:
        raise DatasetError(f"the {kind} tree {root} has {clips.num_classes} classes, the model {model.name!r} "
                           f"predicts {model.num_classes}")
    record = {"dataset": kind, "root": str(root), "split": split, "frames": min(max_frames, len(clips))}
    return dataset_clips(clips, max_frames), record


def recorded_data(path: str | Path, image_topic: str, label_topic: str, max_frames: int, max_gap_s: float = 0.5,
                  tolerance_ms: float = 1.0) -> tuple[Iterator[FrameStream], dict]:
    """The camera frames of a recording in order and how the calibration record names them.

    The frames are cut into sequences where `tdnet-eval` resets its cache (a stamp gap above
    `max_gap_s`, a new frame_id), and the frames it skips (unreadable, no stamp, a stamp that
    goes back or repeats) are left out. Frames whose label message is within `tolerance_ms`
    of their stamp carry its label map: all of them, or every k-th one where more than
    `max_frames` are labelled.

    Raises BagError (an unreadable recording, a missing topic: named with the topics there are).
    """
    from tdnet_ros.evaluation.bag import IMAGE_TYPES, DecodeFailure, Recording
    from tdnet_ros.evaluation.labels import TopicGroundTruth
    from tdnet_ros.evaluation.offline import StreamTimeline

    recording = Recording(path)
    recording.open()
    try:
        recording.check_topic(image_topic, "image", IMAGE_TYPES)
        truth = TopicGroundTruth(recording, label_topic, tolerance_ns=int(tolerance_ms * 1e6))
    except BaseException:
        recording.close()
        raise
    every = max(1, math.ceil(truth.count / max_frames))

    def numbered_frames() -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(sequence number, RGB, labels or None) for every usable frame; closes the recording."""
        timeline, sequence, matched = StreamTimeline(max_gap_s), 0, 0
        try:
            for frame in recording.images(image_topic):
                if isinstance(frame.data, DecodeFailure):
                    continue
                skipped, reset = timeline.check(frame.stamp_ns, frame.frame_id)
                if skipped:  # no stamp, or one that goes back or repeats
                    continue
                if reset:
                    sequence += 1
                labels = truth.lookup(frame.index, frame.stamp_ns).labels
                if labels is not None:
                    if labels.shape != frame.data.shape[:2]:
                        raise DatasetError(f"{path}: the label map of {image_topic} #{frame.index} is "
                                           f"{labels.shape[1]}x{labels.shape[0]}, the frame "
                                           f"{frame.data.shape[1]}x{frame.data.shape[0]}")
                    matched += 1
                    if (matched - 1) % every:
                        labels = None
                yield sequence, frame.data, labels
        finally:
            recording.close()

    sequences = (((rgb, labels) for _, rgb, labels in frames)
                 for _, frames in itertools.groupby(numbered_frames(), key=lambda item: item[0]))
    record = {"recording": str(path), "image_topic": image_topic, "label_topic": label_topic,
              "labelled_frames": truth.count}
    return sequences, record


def calibrate_checkpoint(
    source: str | Path, target: str | Path, sequences: Iterable[FrameStream], data: dict[str, Any], *,
    limit: float = LIMIT, content: dict[str, Any] | None = None, model: TDNet | None = None, log=print,
) -> dict[str, Any]:
    """Chooses offsets for `source` on the labelled frames of `sequences` (`generated_data`,
    `dataset_data`), writes `target` with them folded in, and returns its `calibration`
    record (`data`, the offsets and the mIoU before and after). A source calibrated before
    keeps its offsets; the new ones add to them. `content` is `source` already read
    (`read_checkpoint`) and `model` the model it holds, for callers that needed them first."""
    from tdnet_ros.segmenter import Segmenter

    content = read_checkpoint(source) if content is None else content
    model = model_from_checkpoint(content, source) if model is None else model
    # the segmenter runs a copy with its BatchNorms folded; the offsets go into `model`
    logits, labels, names, step = collect_logits(Segmenter(model, checkpoint=source), sequences)
    offsets, before, after = search_offsets(logits, labels, limit=limit, log=log)
    miou_before, miou_after = mean_iou(before), mean_iou(after)
    sampled = f", one pixel in each {step}x{step} block" if step > 1 else ""
    log(f"validation mIoU {100 * miou_before:.1f} -> {100 * miou_after:.1f} over {labels.shape[0]} frames "
        f"({_describe(data)}{sampled})")
    for name, offset, low, high in zip(names, offsets.tolist(), iou_per_class(before), iou_per_class(after)):
        if offset:
            log(f"  {name:14s} offset {offset:+.2f}  IoU {100 * low:5.1f} -> {100 * high:5.1f}")
    kept = {k: content[k] for k in KEEP if k != "calibration" and k in content}
    earlier = content.get("calibration")
    total = offsets + (torch.tensor(earlier["offsets"]) if earlier else 0.0)
    if earlier:
        log(f"{source} was calibrated before: the offsets add to its earlier ones")
    calibration = {"offsets": total.tolist(), **data, "pixel_step": step,
                   "val_miou_before": miou_before, "val_miou_after": miou_after}
    save_checkpoint(fold_offsets(model, offsets), target, **kept, calibration=calibration)
    log(f"wrote {target}")
    return calibration


def _describe(data: dict[str, Any]) -> str:
    if "seeds" in data:
        height, width = data["render_size"]
        return f"seeds {data['seeds']}, {width}x{height}"
    if "recording" in data:
        return f"{data['recording']}, {data['image_topic']} labelled by {data['label_topic']}"
    return f"{data['dataset']} {data['root']}, split {data['split']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="project checkpoint (e.g. tdnet_ros/models/default.pt)")
    parser.add_argument("target", help="calibrated checkpoint to write")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--seeds", type=int, nargs="+",
                      help="generated validation sequences (seeds used neither for training nor held out)")
    data.add_argument("--cityscapes", metavar="ROOT",
                      help="a Cityscapes tree (leftImg8bit_sequence/, gtFine/), as training reads it")
    data.add_argument("--camvid", metavar="ROOT", help="a CamVid tree in the SegNet layout plus sequences/")
    data.add_argument("--bag", metavar="RECORDING",
                      help="a rosbag2 (MCAP, sqlite3) or ROS 1 bag with a label topic, as tdnet-eval reads it")
    parser.add_argument("--split", default="val", help="the dataset split to calibrate on (--cityscapes, --camvid)")
    parser.add_argument("--image-topic", default="/camera/image_raw", help="camera topic (--bag)")
    parser.add_argument("--label-topic", default="/camera/labels",
                        help="label topic, mono8 class ids matched by header stamp (--bag)")
    parser.add_argument("--max-frames", type=int, default=200,
                        help="labelled frames used, evenly spread (--cityscapes, --camvid, --bag)")
    parser.add_argument("--frames", type=int, default=40, help="frames per generated sequence")
    parser.add_argument("--width", type=int, default=512, help="render width (default 512, as tdnet-generate)")
    parser.add_argument("--height", type=int, default=256, help="render height (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=float, default=LIMIT, help="largest offset magnitude")
    args = parser.parse_args(argv)
    sizes_fit = all(16 <= side <= 4096 for side in (args.width, args.height))  # the generator's range
    if args.frames < 1 or args.max_frames < 1 or min(args.seeds or [0]) < 0 or not sizes_fit:
        parser.error("--frames and --max-frames must be at least 1, --seeds non-negative, "
                     "--width and --height 16 to 4096")
    torch.set_num_threads(args.threads)
    try:
        content = read_checkpoint(args.source)
        model = model_from_checkpoint(content, args.source)
        if args.seeds:
            sequences, record = generated_data(args.seeds, args.frames, args.width, args.height)
        elif args.bag:
            sequences, record = recorded_data(args.bag, args.image_topic, args.label_topic, args.max_frames)
        else:
            kind = "cityscapes" if args.cityscapes else "camvid"
            sequences, record = dataset_data(kind, args.cityscapes or args.camvid, args.split, model.config,
                                             args.max_frames)
        calibrate_checkpoint(args.source, args.target, sequences, record, limit=args.limit, content=content,
                             model=model)
    except (CheckpointError, DatasetError, BagError) as error:
        print(f"tdnet calibrate: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
