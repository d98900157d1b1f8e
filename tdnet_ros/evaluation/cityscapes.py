"""The published Cityscapes protocol on ``leftImg8bit_sequence``.

Each annotated val image ``gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` is
the 20th frame of a 30-frame snippet in ``leftImg8bit_sequence/val/<city>/``. For each
snippet the segmenter's stream is reset, warmed on the frames before the annotated one
(19 by default; the annotated frame then runs on sub-network ``19 mod N``, as in the
published evaluation) and scored on the annotated frame. Accuracy counts annotated frames
only; temporal consistency and latency cover every frame that was run.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tdnet_ros.evaluation.bag import BagError
from tdnet_ros.evaluation.labels import cityscapes_label_id_to_train_id_lut
from tdnet_ros.evaluation.offline import OfflineResult, SegmenterLike
from tdnet_ros.evaluation.recorder import EvaluationRecorder
from tdnet_ros.evaluation.video import EvaluationVideoWriter, video_caption

_GROUND_TRUTH = re.compile(
    r"^(?P<city>.+)_(?P<sequence>\d{6})_(?P<frame>\d{6})_gtFine_(?P<kind>labelTrainIds|labelIds)$"
)


@dataclass(frozen=True)
class Snippet:
    """One annotated frame and the sequence frames that lead up to it."""

    name: str  # <city>_<seq>_<frame> of the annotated frame
    frames: tuple[Path, ...]  # warm-up frames, then the annotated frame (last)
    ground_truth: Path
    train_ids: bool  # the ground truth holds train ids (else Cityscapes label ids)


def find_snippets(root: Path, split: str = "val", warmup_frames: int = 19
                  ) -> tuple[list[Snippet], list[tuple[str, str]]]:
    """The snippets of a Cityscapes tree, and (item, reason) for annotations without frames.

    Raises:
        BagError: the tree lacks ``gtFine/<split>`` or ``leftImg8bit_sequence/<split>``.
    """
    truth_root = root / "gtFine" / split
    sequence_root = root / "leftImg8bit_sequence" / split
    for folder in (truth_root, sequence_root):
        if not folder.is_dir():
            raise BagError(f"Cityscapes folder {folder} is missing (expected the layout "
                           f"<root>/gtFine/{split}/<city>/ and "
                           f"<root>/leftImg8bit_sequence/{split}/<city>/)")
    chosen: dict[str, tuple[Path, bool]] = {}
    for path in sorted(truth_root.rglob("*_gtFine_label*Ids.png")):
        parsed = _GROUND_TRUTH.match(path.stem)
        if parsed is None:
            continue
        name = f"{parsed['city']}_{parsed['sequence']}_{parsed['frame']}"
        is_train = parsed["kind"] == "labelTrainIds"
        if name not in chosen or is_train:  # train ids win over label ids
            chosen[name] = (path, is_train)
    snippets: list[Snippet] = []
    problems: list[tuple[str, str]] = []
    for name, (truth, is_train) in sorted(chosen.items()):
        city, sequence, frame = name.rsplit("_", 2)
        annotated = int(frame)
        numbers = range(annotated - warmup_frames, annotated + 1)
        frames = tuple(sequence_root / city / f"{city}_{sequence}_{n:06d}_leftImg8bit.png"
                       for n in numbers if n >= 0)
        missing = [p for p in frames if not p.is_file()]
        if missing:
            problems.append((name, f"{len(missing)} sequence frame(s) missing, first "
                                   f"{missing[0]}"))
            continue
        snippets.append(Snippet(name, frames, truth, is_train))
    if not snippets and not problems:
        raise BagError(f"no *_gtFine_labelIds.png / *_gtFine_labelTrainIds.png under {truth_root}")
    return snippets, problems


def evaluate_cityscapes(root: str | Path, segmenter: SegmenterLike, split: str = "val",
                        warmup_frames: int = 19, max_snippets: int | None = None,
                        flow_max_side: int | None = 640, video_path: Path | None = None,
                        progress: bool = True) -> OfflineResult:
    """Runs the published protocol over a Cityscapes tree (see the module docstring)."""
    from tqdm import tqdm

    root = Path(root)
    started = time.perf_counter()
    snippets, problems = find_snippets(root, split, warmup_frames)
    if max_snippets is not None:
        snippets = snippets[:max_snippets]
    recorder = EvaluationRecorder(int(segmenter.num_classes), tuple(segmenter.class_names),
                                  flow_max_side=flow_max_side)
    for name, reason in problems:
        recorder.skip(str(root / "leftImg8bit_sequence" / split), name, None, "missing_frames",
                      reason)
    video = (EvaluationVideoWriter(video_path, np.asarray(segmenter.class_colors), tuple(segmenter.class_names),
                                   fps=17.0)
             if video_path is not None else None)
    label_id_lut = cityscapes_label_id_to_train_id_lut()
    stream = "cityscapes"
    index = 0
    for snippet in tqdm(snippets, desc="Cityscapes snippets", unit="snippet",
                        disable=not progress, file=sys.stderr):
        segmenter.reset(stream)
        recorder.break_sequence()
        truth = cv2.imread(str(snippet.ground_truth), cv2.IMREAD_UNCHANGED)
        if truth is None or truth.ndim != 2:
            recorder.skip(str(snippet.ground_truth), snippet.name, None, "label",
                          "cannot read a single-channel label PNG")
            continue
        if not snippet.train_ids:
            truth = label_id_lut[truth]
        for position, frame_path in enumerate(snippet.frames):
            bgr = cv2.imread(str(frame_path), cv2.IMREAD_COLOR)
            if bgr is None:
                recorder.skip(str(frame_path), snippet.name, None, "decode",
                              "cannot read the frame")
                recorder.break_sequence()
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            annotated = position == len(snippet.frames) - 1
            frame_truth = truth if annotated else None
            if annotated and truth.shape != rgb.shape[:2]:
                recorder.skip(str(snippet.ground_truth), snippet.name, None,
                              "label_size_mismatch",
                              f"label map is {truth.shape[1]}x{truth.shape[0]}, the frame "
                              f"{rgb.shape[1]}x{rgb.shape[0]}")
                frame_truth = None
            tick = time.perf_counter()
            output = segmenter.segment(rgb, stream=stream)
            latency_ms = (time.perf_counter() - tick) * 1000.0
            recorder.add_frame(
                index, None, rgb, np.asarray(output.labels), frame_truth, latency_ms,
                timings_ms=dict(output.timings), path=output.path,
                cache_warm=getattr(output, "cache_warm", None))
            index += 1
            if video is not None and annotated:
                video.add(rgb, np.asarray(output.labels), frame_truth, video_caption(recorder, index, snippet.name))
    result = OfflineResult(
        recorder=recorder, recording=root, image_topic=f"leftImg8bit_sequence/{split}",
        ground_truth=f"gtFine/{split} (annotated 20th frame of each snippet, "
                     f"{warmup_frames} warm-up frames)",
        wall_time_s=0.0, mode="cityscapes",
    )
    if video is not None:
        result.video_path = video.close()
    result.wall_time_s = time.perf_counter() - started
    return result
