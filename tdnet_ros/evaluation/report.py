"""The evaluation's outputs: JSON results and a Markdown report beside its figures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdnet_ros.evaluation.recorder import EvaluationRecorder


@dataclass(frozen=True)
class Provenance:
    """What produced the numbers; stated beside every figure and table."""

    model: str
    checkpoint: str  # path, or a description of the bundled model
    checkpoint_sha256: str | None
    device: str
    precision: str
    command: str
    backend: str = ""  # the step backend after any fallback ("" = not known)

    def line(self) -> str:
        digest = (self.checkpoint_sha256 or "unknown")[:16]
        backend = f" | backend {self.backend}" if self.backend else ""
        return (f"model {self.model} | checkpoint sha256 {digest} | device {self.device} | "
                f"precision {self.precision}{backend} | {self.command}")

    @classmethod
    def of(cls, segmenter: Any, checkpoint: str | None, model: str | None, command: str) -> "Provenance":
        """The provenance of a loaded segmenter (`checkpoint` None or "": the bundled model)."""
        source = getattr(segmenter, "checkpoint", None)
        if checkpoint:
            label = str(checkpoint)
        else:
            label = f"bundled default ({source})" if source else "bundled default"
        name = getattr(getattr(segmenter, "config", None), "name", None) or model or "unknown"
        return cls(model=str(name), checkpoint=label, checkpoint_sha256=getattr(segmenter, "checkpoint_sha256", None),
                   device=str(segmenter.device), precision=str(segmenter.precision), command=command,
                   backend=str(getattr(segmenter, "backend", "")))


def _json_ready(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); paths become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def build_results(recorder: EvaluationRecorder, provenance: Provenance,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document: the recorder's summary plus provenance and run details."""
    results: dict[str, Any] = {
        "model": provenance.model,
        "checkpoint": provenance.checkpoint,
        "checkpoint_sha256": provenance.checkpoint_sha256,
        "device": provenance.device,
        "precision": provenance.precision,
        "command": provenance.command,
    }
    results.update(recorder.summary())
    results["per_frame"] = [
        {"index": f.index, "stamp_ns": f.stamp_ns, "latency_ms": f.latency_ms, "path": f.path,
         "miou": f.miou, "pixel_accuracy": f.pixel_accuracy,
         "temporal_consistency": f.temporal_consistency}
        for f in recorder.frames
    ]
    if extra:
        results.update(extra)
    return _json_ready(results)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return path


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _provenance_block(provenance: Provenance) -> list[str]:
    return [
        f"*Model* `{provenance.model}` · *checkpoint* `{provenance.checkpoint}` "
        f"(sha256 `{provenance.checkpoint_sha256 or 'unknown'}`) · *device* `{provenance.device}`"
        f" · *precision* `{provenance.precision}`  ",
        f"*Command* `{provenance.command}`",
        "",
    ]


def render_markdown(results: dict[str, Any], provenance: Provenance,
                    figures: dict[str, Path], video: Path | None, report_dir: Path) -> str:
    """The Markdown report: the model and command once at the top, then the tables and
    figures (each figure also names them in its footer)."""

    def relative(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(report_dir.resolve()))
        except ValueError:
            return str(path)

    lines = ["# Segmentation evaluation", ""]
    lines += _provenance_block(provenance)
    lines += [
        f"Recording `{results.get('recording', '?')}`, camera topic "
        f"`{results.get('image_topic', '?')}`, ground truth: {results.get('ground_truth', 'none')}"
        f", mode: {results.get('mode', 'offline')}.",
        "",
        "## Summary",
        "",
        "| measure | value |",
        "|---|---|",
        f"| mIoU | {_fmt(results.get('miou'), 2, ' %')} |",
        f"| pixel accuracy | {_fmt(results.get('pixel_accuracy'), 2, ' %')} |",
        f"| temporal consistency | {_fmt(results.get('temporal_consistency'), 2, ' %')} "
        f"({results.get('temporal_pairs', 0)} frame pairs) |",
        f"| temporal consistency, IoU form | "
        f"{_fmt(results.get('temporal_consistency_miou'), 2, ' %')} |",
        f"| frames evaluated | {results.get('frames', 0)} "
        f"({results.get('frames_with_ground_truth', 0)} with ground truth) |",
        f"| frames per second | {_fmt(results.get('fps'), 1)} |",
        f"| skipped items | {results['skipped_count']} |",
        f"| temporal state resets | {results['stream_resets']['total']}"
        + (f" (the node's own count: {results['node_cache_resets']}, warm-up included)"
           if results.get("node_cache_resets") is not None else "") + " |",
    ]
    for key, label in (("published_frames", "frames played"),
                       ("dropped_frames", "dropped frames (no prediction)"),
                       ("end_to_end_latency_ms", "end-to-end latency from stamp p50 (ms)")):
        if key in results:
            value = results[key]
            if isinstance(value, dict):
                value = value.get("p50")
            lines.append(f"| {label} | {_fmt(value, 1)} |")
    lines.append("")

    lines += ["## Latency (ms)", ""]
    if results.get("mode") == "live":
        lines += ["`total`: image stamp to the labels' arrival at the evaluator (end to end, "
                  "over DDS); the other rows are the node's own stage timings.", ""]
    else:
        lines += ["`total`: the segmenter call for one frame, in this process; the other "
                  "rows are its stages.", ""]
    lines += ["| stage | p50 | p95 | p99 | mean | max |", "|---|---|---|---|---|---|"]
    for stage, summary in results.get("latency_ms", {}).items():
        if isinstance(summary, dict) and summary:  # (the top-level p50/p95/p99 repeat total)
            lines.append(
                f"| {stage} | " + " | ".join(_fmt(summary.get(k), 2)
                                             for k in ("p50", "p95", "p99", "mean", "max"))
                + " |")
    lines.append("")
    if "latency_histogram" in figures:
        lines += [f"![latency histogram]({relative(figures['latency_histogram'])})", ""]

    per_class = results.get("per_class_iou") or {}
    lines += ["## Accuracy", ""]
    if per_class:
        lines += ["| class | IoU (%) |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value, 2)} |" for name, value in per_class.items()]
        lines.append("")
        if "per_class_iou" in figures:
            lines += [f"![per-class IoU]({relative(figures['per_class_iou'])})", ""]
    else:
        lines += ["No frame had ground truth: accuracy was not measured.", ""]

    if "timeline" in figures:
        timeline = relative(figures["timeline"])
        lines += ["## Over time", "", f"![per-frame IoU and latency]({timeline})", ""]
    if video is not None:
        lines += ["## Video", "", "Camera | ground truth | prediction, H.264: "
                  f"[{relative(video)}]({relative(video)})", ""]
    if results.get("output_bag"):
        lines += [f"Prediction bag: `{results['output_bag']}`", ""]

    skipped, skipped_count = results["skipped"], results["skipped_count"]
    lines += ["## Skipped content", ""]
    if skipped_count:
        lines += ["| kind | count |", "|---|---|"]
        lines += [f"| {kind} | {count} |"
                  for kind, count in results["skipped_by_category"].items()]
        lines += ["", "| source | item | stamp (ns) | kind | reason |", "|---|---|---|---|---|"]
        for entry in skipped[:200]:
            reason = str(entry["reason"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {entry['source']} | {entry['item']} | {entry['stamp_ns'] or ''} | "
                         f"{entry['category']} | {reason} |")
        if skipped_count > 200:
            lines.append(f"\n… {skipped_count - 200} more in the JSON file.")
    else:
        lines.append("Nothing was skipped.")
    lines.append("")
    resets = results["stream_resets"]
    if resets["total"]:
        lines += ["## Temporal state resets", ""]
        lines += [f"- {reason}" for reason in resets["reasons"][:50]]
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def write_report(recorder: EvaluationRecorder, provenance: Provenance, out_dir: Path,
                 extra: dict[str, Any] | None = None, video: Path | None = None,
                 json_path: Path | None = None) -> dict[str, Any]:
    """Writes results.json, the figures and report.md into ``out_dir``.

    Returns:
        The results dict, with ``files`` naming what was written.
    """
    from tdnet_ros.evaluation.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_plots(recorder, out_dir, provenance.line())
    results = build_results(recorder, provenance, extra)
    json_path = json_path or out_dir / "results.json"
    files = {"json": json_path, "report": out_dir / "report.md", **figures}
    if video is not None:
        files["video"] = video
    results["files"] = {name: str(path) for name, path in files.items()}
    write_json(results, json_path)
    if json_path.resolve().parent != out_dir.resolve():
        write_json(results, out_dir / "results.json")
    markdown = render_markdown(results, provenance, figures, video, out_dir)
    (out_dir / "report.md").write_text(markdown)
    return results
