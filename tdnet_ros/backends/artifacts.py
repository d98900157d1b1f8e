"""Ahead-of-time artefacts (ONNX files, TensorRT engines): their cache key and manifest.

An artefact directory holds one file per sub-network step (`path0_cold.onnx`, ...,
`path3_warm.ep`) and a `manifest.json`. Its name is the key: everything the files depend
on, so that a changed checkpoint, input size, precision or library version never loads a
stale engine:

    <cache dir>/<backend>-<model>-<H>x<W>-<precision>-<checkpoint sha256[:12]>-<versions hash[:8]>/
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import file_sha256

MANIFEST = "manifest.json"
FILE_SUFFIX = {"onnx": ".onnx", "tensorrt": ".ep"}


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (missing library, no CUDA, no prebuilt artefact)."""


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes, dtypes and values), for in-memory models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # flattened first: a channels-last (K, C, 1, 1) weight is "contiguous" with stride(-1) = C
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def checkpoint_hash(checkpoint: str | Path | None, model: torch.nn.Module) -> str:
    """The checkpoint file's SHA-256, or the weights' SHA-256 when there is no file."""
    return file_sha256(checkpoint) if checkpoint else weights_sha256(model)


@dataclass(frozen=True)
class ArtifactKey:
    """Everything a set of exported steps depends on."""

    backend: str  # "onnx" or "tensorrt"
    model: str  # model name, e.g. "td4-psp18"
    input_size: tuple[int, int]  # (height, width) of the model input
    precision: str  # "float32", "float16", "bfloat16"
    checkpoint_sha256: str
    versions: dict[str, str] = field(default_factory=dict, compare=True, hash=False)

    @property
    def dirname(self) -> str:
        versions = json.dumps(self.versions, sort_keys=True).encode()
        h, w = self.input_size
        return (
            f"{self.backend}-{self.model}-{h}x{w}-{self.precision}-"
            f"{self.checkpoint_sha256[:12]}-{hashlib.sha256(versions).hexdigest()[:8]}"
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["input_size"] = list(self.input_size)
        return values


def artifact_dir(cache_dir: str | Path, key: ArtifactKey) -> Path:
    return Path(cache_dir) / key.dirname


def write_manifest(directory: Path, key: ArtifactKey, files: dict[str, str], **extra: Any) -> Path:
    """Writes `manifest.json`: the key and the file of each step (`path0_cold` -> file name)."""
    path = directory / MANIFEST
    path.write_text(json.dumps({"key": key.to_dict(), "steps": files, **extra}, indent=2, sort_keys=True))
    return path


def find_artifacts(cache_dir: str | Path | None, key: ArtifactKey) -> dict[str, Path]:
    """The step files for `key`, or raises BackendUnavailable saying what is missing and how to build it."""
    build = (
        f"build them with: tdnet-build-engines --backend {key.backend} --checkpoint CHECKPOINT "
        f"--model {key.model} --size {key.input_size[0]}x{key.input_size[1]} --precision {key.precision} "
        f"--out {cache_dir or 'DIR'}"
    )
    if cache_dir is None:
        raise BackendUnavailable(f"no engine directory given for the {key.backend} backend; {build}")
    directory = artifact_dir(cache_dir, key)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise BackendUnavailable(
            f"no {key.backend} artefacts for this checkpoint, size, precision and versions at {directory}; {build}"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("key") != key.to_dict():
        raise BackendUnavailable(f"{manifest_path} was built for another key ({manifest.get('key')}); {build}")
    files = {name: directory / file for name, file in manifest["steps"].items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise BackendUnavailable(f"{key.backend} artefacts missing: {', '.join(missing)}; {build}")
    return files
