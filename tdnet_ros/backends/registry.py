"""The backends by name: what each needs here, and how its step runner is made.

`make_runner` looks a backend up, asks whether it can run here (each check raises
BackendUnavailable, the one exception type for "not here"), and wraps it in a
FallbackRunner over the fallback backend, so that an input size it cannot serve later
(missing prebuilt files) runs on the fallback too. Every "cannot" costs one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model import TDNet
from ..runtime import BACKENDS, FALLBACKS
from .artifacts import ArtifactKey, BackendUnavailable, checkpoint_hash, find_artifacts
from .runners import CompiledRunner, CudaGraphRunner, FallbackRunner, ModuleRunner, StepFn, StepRunner
from .step import step_keys, step_name

log = logging.getLogger(__name__)


def library_versions(backend: str) -> dict[str, str]:
    """Versions an artefact depends on: torch always; onnx opset / torch_tensorrt, TensorRT, GPU."""
    versions = {"torch": torch.__version__}
    if backend == "onnx":
        from .onnx_export import OPSET

        versions["onnx_opset"] = str(OPSET)
    elif backend == "tensorrt":
        from .tensorrt import tensorrt_versions

        versions.update(tensorrt_versions())
    return versions


@dataclass
class BackendContext:
    """What a backend's check and factory may use: the segmenter's model and settings."""

    model: TDNet  # folded, placed and precision-set
    device: torch.device
    precision: str = "float32"
    checkpoint: str | Path | None = None  # its hash keys prebuilt artefacts
    engine_dir: str | Path | None = None  # prebuilt ONNX files / TensorRT engines
    compile_options: dict[str, Any] | None = None
    _sha: list[str] = field(default_factory=list)  # the checkpoint's hash, computed on first use

    def artifact_key(self, backend: str, input_size: tuple[int, int]) -> ArtifactKey:
        if not self._sha:
            self._sha.append(checkpoint_hash(self.checkpoint, self.model))
        return ArtifactKey(backend, self.model.config.name, tuple(input_size), self.precision, self._sha[0],
                           library_versions(backend))


@dataclass(frozen=True)
class Backend:
    name: str
    check: Callable[[BackendContext], None]  # raises BackendUnavailable when it cannot run here
    factory: Callable[[BackendContext], StepRunner]


def _always(context: BackendContext) -> None:
    """The eager reference runs wherever torch does."""


def _check_compile(context: BackendContext) -> None:
    import torch._dynamo

    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise BackendUnavailable("torch.compile is not supported by this Python/torch build")


def _check_cuda(context: BackendContext) -> None:
    if context.device.type != "cuda":
        raise BackendUnavailable(f"it needs a CUDA device (the segmenter runs on {context.device})")


def _check_onnx(context: BackendContext) -> None:
    if context.precision == "bfloat16":
        raise BackendUnavailable("in bfloat16: steps are exported in float32 or float16")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise BackendUnavailable("it needs onnxruntime (pip install onnxruntime)") from None


def _check_tensorrt(context: BackendContext) -> None:
    from .tensorrt import import_torch_tensorrt

    import_torch_tensorrt()  # raises BackendUnavailable, saying what is missing


def _onnx_runner(context: BackendContext) -> StepRunner:
    from .onnx_export import load_onnx_step

    def steps(input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
        files = find_artifacts(context.engine_dir, context.artifact_key("onnx", input_size))
        return {k: load_onnx_step(files[step_name(*k)], context.device) for k in step_keys(context.model)}

    return ModuleRunner(context.model, "onnx", steps, batched=False)


def _tensorrt_runner(context: BackendContext) -> StepRunner:
    from .tensorrt import load_engine

    def steps(input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
        files = find_artifacts(context.engine_dir, context.artifact_key("tensorrt", input_size))
        return {k: load_engine(files[step_name(*k)], context.device) for k in step_keys(context.model)}

    return ModuleRunner(context.model, "tensorrt", steps, batched=False)


REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("eager", _always, lambda context: StepRunner(context.model)),
        Backend("compile", _check_compile, lambda context: CompiledRunner(context.model, context.compile_options)),
        Backend("cuda-graph", _check_cuda, lambda context: CudaGraphRunner(context.model)),
        Backend("onnx", _check_onnx, _onnx_runner),
        Backend("tensorrt", _check_tensorrt, _tensorrt_runner),
    )
}
if tuple(REGISTRY) != BACKENDS:  # the runtime configuration offers exactly these
    raise ImportError(f"backend registry {tuple(REGISTRY)} differs from tdnet_ros.runtime.BACKENDS {BACKENDS}")


def _available(name: str, context: BackendContext, instead: StepRunner | None) -> StepRunner:
    """Backend `name`'s runner; when it cannot run here, `instead` (or eager) after one log line."""
    backend = REGISTRY[name]
    try:
        backend.check(context)
        return backend.factory(context)
    except BackendUnavailable as error:
        instead = instead or StepRunner(context.model)
        log.warning("%s backend unavailable, running %s: %s", name, instead.name, error)
        return instead


def make_runner(
    backend: str,
    model: TDNet,
    *,
    device: torch.device,
    precision: str = "float32",
    checkpoint: str | Path | None = None,
    engine_dir: str | Path | None = None,
    compile_options: dict[str, Any] | None = None,
    fallback: str = "eager",
) -> StepRunner:
    """The step runner for `backend`, falling back to `fallback` where it cannot run.

    Args:
        backend: one of BACKENDS.
        model: the segmenter's (folded, placed, precision-set) model.
        device: the model's device.
        precision: the segmenter's precision name (part of the artefact key).
        checkpoint: the checkpoint file (its hash keys the artefacts; the weights' hash without one).
        engine_dir: cache directory of prebuilt ONNX files / TensorRT engines.
        compile_options: keyword arguments of torch.compile (e.g. {"mode": "max-autotune"}).
        fallback: one of FALLBACKS: what runs where `backend` cannot (itself falling back to eager).
    """
    if backend not in REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; use {' or '.join(repr(f) for f in FALLBACKS)}")
    context = BackendContext(model, torch.device(device), precision, checkpoint, engine_dir, compile_options)
    if backend == "eager":
        return StepRunner(model)
    if backend == fallback:
        return _available(backend, context, None)
    fallback_runner = _available(fallback, context, None) if fallback != "eager" else StepRunner(model)
    primary = _available(backend, context, fallback_runner)
    if primary is fallback_runner:
        return fallback_runner
    return FallbackRunner(primary, fallback_runner)
