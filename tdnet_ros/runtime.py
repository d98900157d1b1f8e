"""How a segmenter runs: device, precision, backend and its fallback, preprocessing, input
size, prebuilt engines and camera batching, in one place, with every "auto" rule.

The node (from its parameters), `tdnet-eval`, `tdnet-bench`, `tdnet-demo` and
`tdnet-build-engines` (from their flags) each build one `RuntimeConfig`; `Segmenter` takes
it and runs `resolve()`, so the node and the evaluator resolve "auto" the same way and
evaluate the same backend. No torch import at module level: the node's `--help` and its
parameter descriptors read the choices from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "bfloat16")
#: Every backend of tdnet_ros.backends.registry, in the order they are documented.
BACKENDS = ("eager", "compile", "cuda-graph", "onnx", "tensorrt")
#: Backends that may run where another cannot (they need no prebuilt files).
FALLBACKS = ("eager", "cuda-graph")
PREPROCESS = ("cv2", "device")
AUTO = "auto"
#: Range of each side of a fixed input size (the model configuration's own limits).
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 8192
#: Range of a multi-scale inference scale (RuntimeConfig.scales).
MIN_SCALE, MAX_SCALE = 0.25, 4.0

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SIZE_PATTERN = re.compile(r"^([1-9]\d*)x([1-9]\d*)$")

InputSize = tuple[int, int] | str | None  # (height, width), "frame", or None: the model's own


class DeviceError(ValueError):
    """The device asked for cannot be used here (unknown, or CUDA without CUDA)."""


def parse_input_size(text: str) -> InputSize:
    """"" -> None (the model's own input size), "frame", or "HEIGHTxWIDTH" -> (h, w).

    Raises:
        ValueError: anything else, or a side outside MIN_INPUT_SIDE..MAX_INPUT_SIDE.
    """
    if text in ("", "frame"):
        return text or None
    match = _SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"'{text}' is not empty, HEIGHTxWIDTH (e.g. 544x960) or frame")
    height, width = (int(side) for side in match.groups())
    if not all(MIN_INPUT_SIDE <= side <= MAX_INPUT_SIDE for side in (height, width)):
        raise ValueError(f"'{text}': each side must be within {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} pixels")
    return height, width


def scales_problem(scales: Any, backend: str = AUTO) -> str | None:
    """What is wrong with multi-scale `scales` (run with `backend`), in one sentence, or None."""
    if (not isinstance(scales, tuple) or not scales
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in scales)):
        return f"scales must be a non-empty list of numbers, got {scales!r}"
    if scales[0] != 1.0:
        return f"scales must start with 1.0 (the input size itself), got {list(scales)}"
    spread = scales_spread_problem(scales)
    if spread:
        return spread
    if len(scales) > 1 and backend in ("onnx", "tensorrt"):
        return (f"scales {list(scales)} need the eager, compile or cuda-graph backend: prebuilt {backend} "
                "steps are built for one input size")
    return None


def scales_spread_problem(scales: tuple[float, ...]) -> str | None:
    """A scale outside MIN_SCALE..MAX_SCALE or a repeated one, in one sentence, or None (the
    part of scales_problem that the trainer's teacher_scales share)."""
    if any(not MIN_SCALE <= s <= MAX_SCALE for s in scales):
        return f"scales {list(scales)}: each must be within {MIN_SCALE}..{MAX_SCALE}"
    if len(set(scales)) != len(scales):
        return f"scales {list(scales)} repeats a scale"
    return None


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The input size (height, width) at `scale` times `size`, each side rounded."""
    height, width = (min(MAX_INPUT_SIDE, max(MIN_INPUT_SIDE, round(side * scale))) for side in size)
    return height, width


def parse_scales(text: str) -> tuple[float, ...]:
    """"1.0 1.5" or "1.0,1.5" -> (1.0, 1.5); "" -> (1.0,).

    Raises:
        ValueError: not numbers, or not acceptable scales (see scales_problem).
    """
    try:
        scales = tuple(float(part) for part in text.replace(",", " ").split()) or (1.0,)
    except ValueError:
        raise ValueError(f"'{text}' is not a list of numbers (e.g. 1.0 1.5)") from None
    problem = scales_problem(scales)
    if problem:
        raise ValueError(problem)
    return scales


def scales_text(scales: tuple[float, ...]) -> str:
    """(1.0, 1.5) -> "1 1.5": what parse_scales and the --scales flags read."""
    return " ".join(f"{scale:g}" for scale in scales)


def input_size_text(size: InputSize) -> str:
    if size is None:
        return ""
    return size if isinstance(size, str) else f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings of a segmenter's run (not of its model). "auto" values resolve in `resolve()`."""

    device: str = AUTO  # auto (CUDA when available, else the CPU with a warning) | cpu | cuda | cuda:N
    precision: str = "float32"  # of weights and activations; attention stays float32
    backend: str = AUTO  # auto (cuda-graph on CUDA, eager on the CPU) | one of BACKENDS
    fallback: str = AUTO  # where the backend cannot run: auto (cuda-graph on CUDA, else eager) | FALLBACKS
    preprocess: str = AUTO  # auto (device on CUDA, cv2 on the CPU) | cv2 | device
    input_size: InputSize = None  # None: the model's own input size | (height, width) | "frame"
    # Multi-scale inference: each frame also runs at these multiples of the input size (one
    # feature cache each), and the labels are the argmax of the scales' mean probabilities.
    # (1.0,): one scale, the TDNet of the paper.
    scales: tuple[float, ...] = (1.0,)
    engine_dir: str = ""  # prebuilt ONNX files / TensorRT engines (tdnet-build-engines)
    batch_cameras: bool = True  # streams at the same sub-network step run as one batch
    channels_last: bool = True  # memory format of the convolutions
    fold_batch_norm: bool = True  # fold BatchNorm into the convolutions (on a copy of the model)
    compile_options: dict[str, Any] | None = field(default=None, compare=False)  # torch.compile kwargs

    def __post_init__(self) -> None:
        if isinstance(self.input_size, list):
            object.__setattr__(self, "input_size", tuple(self.input_size))
        if isinstance(self.scales, list):
            object.__setattr__(self, "scales", tuple(self.scales))
        problem = self.problem()
        if problem:
            raise (DeviceError if problem.startswith("unknown device") else ValueError)(problem)

    def problem(self) -> str | None:
        """What is wrong with a setting, in one sentence naming it, or None."""
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            return f"unknown device {self.device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        if self.precision not in PRECISIONS:
            return f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}"
        if self.backend not in (AUTO, *BACKENDS):
            return f"unknown backend {self.backend!r}; use one of {AUTO}, {', '.join(BACKENDS)}"
        if self.fallback not in (AUTO, *FALLBACKS):
            return f"unknown fallback {self.fallback!r}; use {AUTO}, {' or '.join(repr(f) for f in FALLBACKS)}"
        if self.preprocess not in (AUTO, *PREPROCESS):
            return f"unknown preprocess {self.preprocess!r}; use 'cv2', 'device' or 'auto'"
        size = self.input_size
        if isinstance(size, str) and size != "frame":
            return f"input_size must be (height, width), None or 'frame', got {size!r}"
        if isinstance(size, tuple) and not (
                len(size) == 2 and all(isinstance(s, int) and MIN_INPUT_SIDE <= s <= MAX_INPUT_SIDE for s in size)):
            return f"input_size {size!r}: (height, width) with sides within {MIN_INPUT_SIDE}..{MAX_INPUT_SIDE}"
        return scales_problem(self.scales, self.backend)

    def replace(self, **changes: Any) -> "RuntimeConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved(self) -> bool:
        return AUTO not in (self.device, self.backend, self.fallback, self.preprocess)

    def resolve(self, cuda_available: bool | None = None) -> "RuntimeConfig":
        """The same settings with every "auto" decided for this machine.

        device auto: CUDA when available, else the CPU (with one warning: never a silent
        CPU fallback). On CUDA, backend auto is cuda-graph, fallback auto is cuda-graph
        (a missing engine runs CUDA graphs rather than eager launches) and preprocess auto
        is device; on the CPU they are eager, eager and cv2.

        Raises:
            DeviceError: CUDA asked for where it is not available.
        """
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = self.device
        if device == AUTO:
            device = "cuda" if cuda_available else "cpu"
            if not cuda_available:
                log.warning("device 'auto': CUDA is not available: running on the CPU")
        elif device.startswith("cuda") and not cuda_available:
            import torch

            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"device {device!r} was requested but CUDA is not available (torch "
                              f"{torch.__version__}, {build}); use device 'cpu' or 'auto'")
        on_cuda = device.startswith("cuda")
        return self.replace(
            device=device,
            backend=self.backend if self.backend != AUTO else ("cuda-graph" if on_cuda else "eager"),
            fallback=self.fallback if self.fallback != AUTO else ("cuda-graph" if on_cuda else "eager"),
            preprocess=self.preprocess if self.preprocess != AUTO else ("device" if on_cuda else "cv2"),
        )


def resolve_device(device: Any) -> "torch.device":  # noqa: F821 (torch is imported lazily)
    """"cpu", "cuda[:n]" or "auto" as a torch.device (see RuntimeConfig.resolve).

    Raises:
        DeviceError: unknown, or CUDA without CUDA.
    """
    import torch

    name = str(device)
    if not _DEVICE_PATTERN.match(name):
        raise DeviceError(f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return torch.device(RuntimeConfig(device=name).resolve().device)


def cpu_computes_bfloat16() -> bool:
    """Whether PyTorch's CPU kernels compute bfloat16 natively here.

    This is oneDNN's own test (AVX-512 on x86, the BF16 extension on Arm). Without it,
    bfloat16 convolutions take a slow reference path (on an AVX2-only AMD EPYC, training
    ran about 7x and inference about 6x slower than in float32: README, `run.amp`).
    """
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.backends.mkldnn.is_available() and (check is None or bool(check()))


def usable_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- command-line flags ----------------------------------------------------------------------


def input_size_argument(text: str) -> InputSize:
    """argparse type of an input size: HEIGHTxWIDTH, frame, or empty for the model's own."""
    try:
        return parse_input_size(text.lower())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def scales_argument(text: str) -> tuple[float, ...]:
    """argparse type of multi-scale inference scales: '1 1.5' or '1,1.5'."""
    try:
        return parse_scales(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def fixed_size_argument(text: str) -> tuple[int, int]:
    """argparse type of a fixed HEIGHTxWIDTH size (e.g. --size 769x1537)."""
    size = input_size_argument(text)
    if not isinstance(size, tuple):
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, got {text!r}")
    return size


def add_runtime_arguments(parser: argparse.ArgumentParser, defaults: RuntimeConfig = RuntimeConfig()) -> None:
    """--device, --precision, --backend, --fallback, --preprocess, --input-size, --scales, --engine-dir."""
    group = parser.add_argument_group("runtime (as the node's parameters of the same names)")
    group.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    group.add_argument("--precision", default=defaults.precision, choices=PRECISIONS)
    group.add_argument("--backend", default=defaults.backend, choices=(AUTO, *BACKENDS),
                       help="how each step runs (default: %(default)s: cuda-graph on CUDA, eager on the CPU)")
    group.add_argument("--fallback", default=defaults.fallback, choices=(AUTO, *FALLBACKS),
                       help="what runs where the backend cannot (default: %(default)s)")
    group.add_argument("--preprocess", default=defaults.preprocess, choices=(AUTO, *PREPROCESS),
                       help="where frames are resized and normalized (default: %(default)s)")
    group.add_argument("--input-size", default=input_size_text(defaults.input_size), metavar="HxW|frame",
                       help="network input size (default: the model's own input size)")
    group.add_argument("--scales", type=scales_argument, default=defaults.scales, metavar="'1 S2 ...'",
                       help="multi-scale inference: also run each frame at these multiples of the input size "
                            "and average the probabilities, e.g. '1 1.5' (default: 1, one scale)")
    group.add_argument("--engine-dir", default=defaults.engine_dir,
                       help="prebuilt ONNX files / TensorRT engines (tdnet-build-engines)")


def runtime_from_arguments(args: argparse.Namespace, **changes: Any) -> RuntimeConfig:
    """The RuntimeConfig of flags added by `add_runtime_arguments`.

    Raises:
        ValueError: a value is not acceptable (the message names the flag).
    """
    try:
        input_size = parse_input_size(args.input_size or "")
    except ValueError as error:
        raise ValueError(f"--input-size: {error}") from None
    scales = tuple(args.scales)
    problem = scales_problem(scales, args.backend)  # with --backend onnx or tensorrt
    if problem:
        raise ValueError(f"--scales: {problem}")
    return RuntimeConfig(device=args.device, precision=args.precision, backend=args.backend,
                         fallback=args.fallback, preprocess=args.preprocess, input_size=input_size,
                         scales=scales, engine_dir=str(args.engine_dir or ""), **changes)
