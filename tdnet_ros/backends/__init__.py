"""Deployment backends: torch.compile, CUDA graphs, ONNX (onnxruntime / trtexec) and TensorRT.

All of them run the same exportable step (`StepModule`): one sub-network, cold or warm,
with the feature cache as explicit tensors. `make_runner` picks a backend for a segmenter
and falls back, with one log line, when it cannot run here.
"""

from .artifacts import ArtifactKey, BackendUnavailable, artifact_dir, checkpoint_hash, find_artifacts, library_versions
from .gpu_preprocess import DevicePreprocessor
from .runners import BACKENDS, CompiledRunner, CudaGraphRunner, ModuleRunner, StepRunner, make_runner
from .step import StepModule, example_inputs, gather_cache, step_keys, step_name

__all__ = [
    "BACKENDS",
    "ArtifactKey",
    "BackendUnavailable",
    "CompiledRunner",
    "CudaGraphRunner",
    "DevicePreprocessor",
    "ModuleRunner",
    "StepModule",
    "StepRunner",
    "artifact_dir",
    "checkpoint_hash",
    "example_inputs",
    "find_artifacts",
    "gather_cache",
    "library_versions",
    "make_runner",
    "step_keys",
    "step_name",
]
