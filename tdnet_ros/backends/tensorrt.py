"""TensorRT engines through torch-tensorrt's dynamo frontend: build, save, reload.

Each step is exported (`torch.export`), compiled for one input size and precision, and
saved as an ExportedProgram (`.ep`) holding the serialized engine. Building takes minutes,
so it happens ahead of time (`tdnet-build-engines --backend tensorrt`); a segmenter only
loads engines, and falls back when none fits (see `runners.py`).

The model's dtypes are explicit (convolutions in the chosen precision, attention and
LayerNorm in float32), so the engines are compiled with `use_explicit_typing`: TensorRT
keeps the float32 attention instead of lowering it (its logits overflow float16).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import TDNet
from .artifacts import ArtifactKey, BackendUnavailable, write_manifest
from .step import StepModule, example_inputs, step_keys, step_name

log = logging.getLogger(__name__)


def import_torch_tensorrt():
    """torch_tensorrt, or BackendUnavailable saying why it cannot be used here."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and CUDA is not available")
    try:
        import torch_tensorrt
    except Exception as error:  # ImportError, or a library mismatch at import time
        raise BackendUnavailable(
            f"torch_tensorrt cannot be imported ({type(error).__name__}: {error}); "
            "install the torch-tensorrt build matching this torch"
        ) from None
    return torch_tensorrt


def tensorrt_versions() -> dict[str, str]:
    """torch_tensorrt, TensorRT and GPU identity; 'absent' for what is not installed."""
    versions = {}
    for package, distributions in (
        ("torch_tensorrt", ("torch-tensorrt", "torch_tensorrt")),
        ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
    ):
        versions[package] = "absent"
        for distribution in distributions:
            try:
                versions[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        versions["gpu"] = f"{torch.cuda.get_device_name()} sm_{major}{minor}"
        versions["cuda"] = str(torch.version.cuda)
    return versions


def _compile(torch_tensorrt, program, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype):
    """torch_tensorrt.dynamo.compile with explicit typing (newer API), else enabled precisions."""
    try:
        # TF32 would round the float32 attention's q.k (logits ~1e5-1e6) far too coarsely.
        return torch_tensorrt.dynamo.compile(
            program, arg_inputs=list(inputs), use_explicit_typing=True, disable_tf32=True
        )
    except TypeError:  # torch-tensorrt before explicit typing / arg_inputs
        return torch_tensorrt.dynamo.compile(
            program, inputs=list(inputs), enabled_precisions={dtype, torch.float32}, disable_tf32=True
        )


def build_engines(model: TDNet, input_size: tuple[int, int], directory: Path, key: ArtifactKey) -> Path:
    """Compiles and saves every step of `model` (on CUDA) at `input_size` into `directory`."""
    torch_tensorrt = import_torch_tensorrt()
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise BackendUnavailable("TensorRT engines are built from a model on CUDA; use --device cuda")
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for path, warm in step_keys(model):
        name = step_name(path, warm)
        module = StepModule(model, path, warm).eval()
        inputs = example_inputs(model, input_size, warm, device=device)
        with torch.no_grad():
            program = torch.export.export(module, inputs)
            compiled = _compile(torch_tensorrt, program, inputs, model.conv_dtype)
        file = directory / f"{name}.ep"
        try:
            torch_tensorrt.save(compiled, str(file), arg_inputs=list(inputs))
        except TypeError:
            torch_tensorrt.save(compiled, str(file), inputs=list(inputs))
        files[name] = file.name
        log.info("built TensorRT engine %s", file)
    write_manifest(directory, key, files)
    return directory


def load_engine(file: Path, device: torch.device) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A saved engine, callable like the StepModule."""
    import_torch_tensorrt()  # registers the TensorRT runtime ops the program refers to
    module = torch.export.load(str(file)).module()
    return module
