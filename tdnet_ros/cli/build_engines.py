"""Builds ONNX files or TensorRT engines ahead of time, so that a node never blocks at start.

    tdnet-build-engines --backend onnx --checkpoint td4-psp18.pkl --model td4-psp18 \\
        --size 769x1537 --precision fp16 --out engines/
    tdnet-build-engines --backend tensorrt --checkpoint td4-psp18.pkl --size 769x1537 \\
        --precision fp16 --device cuda --out engines/

Writes one file per sub-network step and a manifest.json into
`<out>/<backend>-<model>-<H>x<W>-<precision>-<checkpoint sha>-<versions hash>/` and prints
that folder. A segmenter given the same `engine_dir` (backend_options) finds them by the same key.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..backends.artifacts import ArtifactKey, BackendUnavailable, artifact_dir, checkpoint_hash
from ..backends.registry import library_versions
from ..checkpoint import CheckpointError, load_model
from ..runtime import PRECISIONS, RuntimeConfig, fixed_size_argument
from ..segmenter import Segmenter

ONNX_BFLOAT16 = "ONNX steps are exported in float32 or float16 only (onnxruntime has few bfloat16 kernels)"
PRECISION_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **{p: p for p in PRECISIONS}}


def build(
    backend: str,
    checkpoint: Path,
    model_name: str | None,
    sizes: list[tuple[int, int]],
    precision: str,
    out: Path,
    device: str = "cpu",
) -> list[Path]:
    """Builds the artefacts of every size; returns their folders.

    The model is prepared exactly as a Segmenter prepares it (BatchNorm folded, device,
    channels-last, precision), so that the exported steps compute what the segmenter does.
    """
    precision = PRECISION_ALIASES[precision]
    if backend == "onnx" and precision == "bfloat16":
        raise ValueError(ONNX_BFLOAT16)
    model = load_model(checkpoint, model_name)
    # exactly the runtime the node runs the artefacts with, but eager: nothing to fall back from
    runtime = RuntimeConfig(device=device, precision=precision, backend="eager", fallback="eager", preprocess="cv2")
    segmenter = Segmenter(model, runtime, checkpoint=checkpoint)
    sha = checkpoint_hash(checkpoint, segmenter.model)
    versions = library_versions(backend)
    folders = []
    for size in sizes:
        key = ArtifactKey(backend, model.config.name, tuple(size), precision, sha, versions)
        directory = artifact_dir(out, key)
        if backend == "onnx":
            from ..backends.onnx_export import export_onnx

            export_onnx(segmenter.model, tuple(size), directory, key)
        else:
            from ..backends.tensorrt import build_engines

            build_engines(segmenter.model, tuple(size), directory, key)
        folders.append(directory)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("onnx", "tensorrt"), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="published .pkl or project checkpoint")
    parser.add_argument("--model", help="model name for published checkpoints (inferred from the keys if omitted)")
    parser.add_argument(
        "--size", nargs="+", type=fixed_size_argument, required=True, help="model input HxW (one artefact set each)"
    )
    parser.add_argument("--precision", choices=sorted(PRECISION_ALIASES), default="float32")
    parser.add_argument("--device", default=None, help="device to export on (default: cpu for onnx, cuda for tensorrt)")
    parser.add_argument("--out", type=Path, required=True, help="engine cache directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tdnet_ros").setLevel(logging.INFO)  # ours only: the exporters' INFO logs are noise
    device = args.device or ("cuda" if args.backend == "tensorrt" else "cpu")
    try:
        folders = build(args.backend, args.checkpoint, args.model, args.size, args.precision, args.out, device)
    except (BackendUnavailable, CheckpointError, RuntimeError, ValueError) as error:
        print(f"tdnet-build-engines: {error}", file=sys.stderr)
        return 1
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
