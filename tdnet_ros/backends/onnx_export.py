"""ONNX export of every sub-network step, and an onnxruntime runner for them.

The files are what `trtexec` takes on a Jetson (see the README). Export uses the
`torch.export`-based exporter (`dynamo=True`): the TorchScript exporter cannot express the
pyramid's adaptive pooling to sizes that do not divide the feature map.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..model import TDNet
from .artifacts import ArtifactKey, BackendUnavailable, write_manifest
from .step import StepModule, example_inputs, step_keys, step_name

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAMES = ("x", "cached_query", "cached_key", "cached_value")
OUTPUT_NAMES = ("logits", "query", "key", "value")


def export_step(model: TDNet, path: int, warm: bool, input_size: tuple[int, int], file: Path) -> Path:
    """Exports one step (static shapes, batch 1, the model's precision) to a self-contained .onnx file."""
    try:
        import onnxscript  # noqa: F401  (the exporter's dependency)
    except ImportError:
        raise BackendUnavailable(
            "ONNX export needs the `onnx` and `onnxscript` packages: pip install onnx onnxscript"
        ) from None
    module = StepModule(model, path, warm).eval()
    device = next(model.parameters()).device
    inputs = example_inputs(model, input_size, warm, device=device)
    # The exporter reports its progress on stdout and warns about unrelated registries.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=OPSET,
                input_names=list(INPUT_NAMES[: len(inputs)]),
                output_names=list(OUTPUT_NAMES),
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    program.save(str(file), external_data=False)
    return file


def export_onnx(model: TDNet, input_size: tuple[int, int], directory: Path, key: ArtifactKey) -> Path:
    """Exports all steps of `model` at `input_size` into `directory` and writes the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for path, warm in step_keys(model):
        name = step_name(path, warm)
        export_step(model, path, warm, input_size, directory / f"{name}.onnx")
        files[name] = f"{name}.onnx"
    write_manifest(directory, key, files, inputs=list(INPUT_NAMES), outputs=list(OUTPUT_NAMES))
    return directory


def _providers(device: torch.device) -> list:
    """CPU; on CUDA, onnxruntime-gpu's CUDA provider without TF32 (the float32 attention's
    q.k logits reach ~1e5-1e6, which TF32's 10-bit mantissa rounds far too coarsely)."""
    import onnxruntime

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        log.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); ONNX steps run on the CPU")
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]


def load_onnx_step(file: Path, device: torch.device) -> Callable[..., tuple[torch.Tensor, ...]]:
    """An onnxruntime session for one step, callable like the StepModule (torch in, torch out).

    Tensors go through host memory (numpy); this backend is for checking exports and for
    CPU deployment, not for the CUDA fast path (CUDA graphs or TensorRT).
    """
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("the onnx backend needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(file), options, providers=_providers(device))
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(names, inputs)}
        return tuple(torch.from_numpy(o).to(device) for o in session.run(None, feeds))

    return run
