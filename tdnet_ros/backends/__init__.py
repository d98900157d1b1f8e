"""Deployment backends: torch.compile, CUDA graphs, ONNX (onnxruntime / trtexec) and TensorRT.

All of them run the same exportable step (`StepModule`): one sub-network, cold or warm,
with the feature cache as explicit tensors. `make_runner` looks a backend up in the
registry and wraps it in a fallback (one log line) where it cannot run here. The build
command (`tdnet-build-engines`) is in `tdnet_ros.cli.build_engines`.
"""

from .artifacts import ArtifactKey, BackendUnavailable, artifact_dir, checkpoint_hash, find_artifacts
from .registry import BACKENDS, FALLBACKS, REGISTRY, Backend, BackendContext, library_versions, make_runner
from .runners import CompiledRunner, CudaGraphRunner, FallbackRunner, ModuleRunner, StepRunner
from .step import StepModule, example_inputs, step_keys, step_name

__all__ = [
    "BACKENDS",
    "FALLBACKS",
    "REGISTRY",
    "ArtifactKey",
    "Backend",
    "BackendContext",
    "BackendUnavailable",
    "CompiledRunner",
    "CudaGraphRunner",
    "FallbackRunner",
    "ModuleRunner",
    "StepModule",
    "StepRunner",
    "artifact_dir",
    "checkpoint_hash",
    "example_inputs",
    "find_artifacts",
    "library_versions",
    "make_runner",
    "step_keys",
    "step_name",
]
