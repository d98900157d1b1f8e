"""PNG figures of an evaluation (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tdnet_ros.evaluation.recorder import EvaluationRecorder


def headless_pyplot():
    """matplotlib.pyplot on the Agg backend, which draws PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _caption(figure, provenance: str) -> None:
    """Puts the provenance line (model, checkpoint, device, precision) under a figure."""
    figure.text(0.01, 0.005, provenance, fontsize=6, color="0.35", ha="left", va="bottom",
                wrap=True)


def plot_per_class_iou(recorder: EvaluationRecorder, path: Path, provenance: str) -> Path | None:
    """Horizontal bars of per-class IoU (classes absent from ground truth and prediction
    are shown without a bar and marked "n/a")."""
    per_class = recorder.per_class_iou()
    if not per_class:
        return None
    plt = headless_pyplot()
    names = list(per_class)
    values = [per_class[n] if per_class[n] is not None else 0.0 for n in names]
    figure, axes = plt.subplots(figsize=(7, 0.28 * len(names) + 1.6))
    positions = np.arange(len(names))
    axes.barh(positions, values, color="#3a7bd5")
    for position, name in zip(positions, names):
        text = "n/a" if per_class[name] is None else f"{per_class[name]:.1f}"
        axes.text((per_class[name] or 0.0) + 1, position, text, va="center", fontsize=7)
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 110)
    axes.set_xlabel("IoU (%)")
    miou = recorder.scores.mean_iou * 100
    axes.set_title(f"Per-class IoU (mIoU {miou:.1f} %, {recorder.frames_with_ground_truth} frames)")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    _caption(figure, provenance)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_latency_histogram(recorder: EvaluationRecorder, path: Path,
                           provenance: str) -> Path | None:
    """Histogram of end-to-end latency with p50/p95/p99 marked."""
    latencies = np.array([f.latency_ms for f in recorder.frames])
    if latencies.size == 0:
        return None
    plt = headless_pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(latencies, bins=min(50, max(5, latencies.size // 2)), color="#5a9e6f")
    for percentile, style in ((50, "-"), (95, "--"), (99, ":")):
        value = np.percentile(latencies, percentile)
        axes.axvline(value, color="k", linestyle=style, linewidth=1,
                     label=f"p{percentile} {value:.1f} ms")
    axes.set_xlabel("latency per frame (ms)")
    axes.set_ylabel("frames")
    axes.set_title(f"End-to-end latency ({latencies.size} frames)")
    # Outside the axes: a legend never covers the bars or the lines.
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    _caption(figure, provenance)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_timeline(recorder: EvaluationRecorder, path: Path, provenance: str) -> Path | None:
    """Per-frame mIoU and temporal agreement (top) and latency (bottom) over the frames."""
    if not recorder.frames:
        return None
    plt = headless_pyplot()
    indices = np.array([f.index for f in recorder.frames])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    miou = np.array([np.nan if f.miou is None else f.miou for f in recorder.frames])
    agreement = np.array([np.nan if f.temporal_consistency is None else f.temporal_consistency
                          for f in recorder.frames])
    if not np.all(np.isnan(miou)):
        top.plot(indices, miou, "o-", markersize=3, linewidth=1, label="frame mIoU")
    if not np.all(np.isnan(agreement)):
        top.plot(indices, agreement, "-", linewidth=1, label="temporal agreement")
    top.set_ylabel("%")
    top.set_ylim(0, 105)
    top.set_title("Per-frame IoU and temporal agreement")
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    bottom.plot(indices, [f.latency_ms for f in recorder.frames], linewidth=1, color="#c44e52")
    bottom.set_xlabel("frame index on the camera topic")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("latency (ms)")
    bottom.set_title("Per-frame latency")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    _caption(figure, provenance)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plots(recorder: EvaluationRecorder, folder: Path, provenance: str) -> dict[str, Path]:
    """Writes every figure that has data; returns {figure name: PNG path}."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "per_class_iou": plot_per_class_iou(recorder, folder / "per_class_iou.png", provenance),
        "latency_histogram": plot_latency_histogram(
            recorder, folder / "latency_histogram.png", provenance),
        "timeline": plot_timeline(recorder, folder / "per_frame.png", provenance),
    }
    return {name: path for name, path in figures.items() if path is not None}
