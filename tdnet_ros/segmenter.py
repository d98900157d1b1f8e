"""Streaming segmentation: one model, any number of streams, a feature cache per stream."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backends.registry import make_runner
from .cache import FeatureCache
from .checkpoint import CheckpointError, file_sha256, load_model
from .classes import CLASS_COLORS, CLASS_NAMES
from .config import ModelConfig
from .fusion import fold_batch_norms
from .model import TDNet
from .preprocess import (
    DevicePreprocessor,
    Normalizer,
    check_frame,
    check_normalized,
    labels_from_scales,
    labels_to_numpy,
    resize_frame,
)
from . import runtime
from .runtime import DeviceError, RuntimeConfig, resolve_device  # noqa: F401 (resolve_device: re-exported)
from .runtime import cpu_computes_bfloat16, scaled_size
from .timing import StageTimes

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).parent / "models" / "default.pt"
#: torch dtype of each precision name of the runtime configuration.
PRECISIONS = dict(zip(runtime.PRECISIONS, (torch.float32, torch.float16, torch.bfloat16)))


@dataclass
class SegmentResult:
    labels: np.ndarray  # (H, W) uint8 class ids (uint16 above 255 classes)
    logits: torch.Tensor  # (K, h, w): head output at 1/8 of the model input, before upsampling
    path: int  # which sub-network ran (0..N-1)
    timings: dict[str, float]  # stage -> milliseconds
    cache_warm: bool  # whether the attention term over the cached frames was used
    cache_reset: bool  # whether this frame started a new temporal sequence
    batch_size: int = 1  # frames of streams at the same step that ran with this one, itself included
    finite: bool = True  # False when the logits hold NaN or infinity: the labels mean nothing


@dataclass
class _Stream:
    cache: FeatureCache  # its frames_written (since the last reset) decides the sub-network
    input_size: tuple[int, int]
    preprocessor: DevicePreprocessor | None  # device preprocessing: its own pinned staging buffer
    cuda_stream: torch.cuda.Stream | None  # CUDA: its uploads, preprocessing and downloads
    scale: float = 1.0  # multi-scale inference: the multiple of the stream's input size this state runs


#: What `Segmenter(model)` runs with when no RuntimeConfig is given (its documented
#: keyword defaults): the CPU, eager steps, cv2 preprocessing.
LIBRARY_DEFAULTS = RuntimeConfig(device="cpu", backend="eager", fallback="eager", preprocess="cv2")


def runtime_with(runtime: RuntimeConfig | None = None, **options: Any) -> RuntimeConfig:
    """`runtime` (default LIBRARY_DEFAULTS) with Segmenter's keyword options applied:
    device, precision, backend, preprocess, input_size, scales, channels_last, fold_batch_norm and
    backend_options ({engine_dir, compile_options, fallback})."""
    base = runtime or LIBRARY_DEFAULTS
    backend_options = dict(options.pop("backend_options", None) or {})
    unknown = set(options) - {"device", "precision", "backend", "preprocess", "input_size", "scales",
                              "channels_last", "fold_batch_norm"}
    unknown |= set(backend_options) - {"engine_dir", "compile_options", "fallback"}
    if unknown:
        raise TypeError(f"unknown segmenter option(s): {', '.join(sorted(unknown))}")
    changes = {name: value for name, value in options.items() if value is not None or name == "input_size"}
    if "device" in changes:
        changes["device"] = str(changes["device"])
    if backend_options.get("engine_dir") is not None:
        changes["engine_dir"] = str(backend_options["engine_dir"])
    for name in ("compile_options", "fallback"):
        if backend_options.get(name) is not None:
            changes[name] = backend_options[name]
    return base.replace(**changes) if changes else base


class LoadError(ValueError):
    """The segmenter cannot be built: `setting` names what is at fault (checkpoint, model or
    device), the message says why, in one sentence; `named(...)` puts the caller's name for
    the setting in front (a node parameter, a command-line flag)."""

    def __init__(self, setting: str, message: str, separator: str = ": ") -> None:
        super().__init__(message)
        self.setting = setting
        self.separator = separator

    def named(self, name: str) -> str:
        return f"{name}{self.separator}{self}"


def load_segmenter(runtime: RuntimeConfig, checkpoint: str = "", model: str = "") -> "Segmenter":
    """The one way every entry point (node, tdnet-eval, tdnet-bench, tdnet-demo) builds its
    segmenter: `checkpoint` ("" = the bundled default model) with `model` (a variant name,
    for published .pkl files; "" = from the checkpoint), run as `runtime` says.

    Raises:
        LoadError: unknown model, missing/incompatible checkpoint, unusable device.
    """
    if model:
        try:
            ModelConfig.from_name(model)
        except ValueError as error:
            raise LoadError("model", str(error)) from None
        if not checkpoint:
            raise LoadError("model", f"is '{model}' but 'checkpoint' is empty: set 'checkpoint' to a file of "
                                     "that model, or leave 'model' empty to use the bundled default model", " ")
    try:
        resolved = runtime.resolve()
    except DeviceError as error:
        raise LoadError("device", f"is '{runtime.device}': {error}", " ") from None
    runtime = resolved
    try:
        if checkpoint:
            return Segmenter.from_checkpoint(checkpoint, model=model or None, runtime=runtime)
        return Segmenter.default(runtime=runtime)
    except (CheckpointError, FileNotFoundError, ValueError) as error:  # CheckpointError: a ValueError
        raise LoadError("checkpoint", str(error)) from None
    except RuntimeError as error:  # e.g. CUDA out of memory while placing the weights
        raise LoadError("device", f"is '{runtime.device}': {error}", " ") from None


class Segmenter:
    """Runs TDNet over frame streams.

    Args:
        model: a loaded TDNet.
        runtime: how it runs (tdnet_ros.runtime.RuntimeConfig: device, precision, backend
            and fallback, preprocessing, input size, engine folder); "auto" values are
            resolved here. Without one, LIBRARY_DEFAULTS with the keyword options below.
        checkpoint: path the weights came from (for reports, and the key of prebuilt engines).
        device: "cpu" (default), "cuda", "cuda:N" or "auto".
        precision: "float32" (default), "bfloat16" or "float16": weights and activations of
            the convolutional parts; attention always runs in float32 (see TDNet.set_precision).
        input_size: size frames are resized to before the network: None for the model's
            own training size (exact for published checkpoints), (height, width) for another
            fixed size, or "frame" to run at each frame's own size. Sizes other than the
            training size resize the LayerNorm's affine parameters to the feature map.
        scales: multi-scale inference, e.g. (1.0, 1.5): each frame also runs at these
            multiples of the input size, each scale with its own feature cache, and the
            labels are the argmax of the scales' mean softmax probabilities (more accurate,
            at the sum of the scales' costs). Default (1.0,): one scale.
        channels_last: use the channels-last memory format (faster convolutions on CPU and GPU).
        fold_batch_norm: fold BatchNorm layers into the convolutions (on a copy of the model).
        backend: how each step runs: "eager" (default), "compile" (torch.compile),
            "cuda-graph", "onnx" (onnxruntime, prebuilt files) or "tensorrt" (prebuilt
            engines); one that cannot run here falls back with one log line (see
            tdnet_ros.backends). `self.backend` names the one in use.
        backend_options: `engine_dir` (prebuilt ONNX files / TensorRT engines),
            `compile_options` (torch.compile keyword arguments), `fallback` ("eager" or
            "cuda-graph").
        preprocess: "cv2" (default: resize on the host, as the published pipeline),
            "device" (upload uint8 once, resize and normalize on the model's device) or
            "auto" (device on CUDA, cv2 on the CPU).

    Several streams' frames given together (`segment_batch`) run as one batch where their
    caches are at the same step; on CUDA each stream has its own CUDA stream for its
    upload, preprocessing and download, so that those overlap with the others' compute.
    """

    def __init__(
        self,
        model: TDNet,
        runtime: RuntimeConfig | None = None,
        *,
        checkpoint: str | Path | None = None,
        **options: Any,
    ) -> None:
        self.runtime = runtime_with(runtime, **options).resolve()
        self.device = torch.device(self.runtime.device)
        self.precision = self.runtime.precision
        self.dtype = PRECISIONS[self.precision]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            log.warning("float16 on the CPU is slow; bfloat16 is the CPU's reduced precision")
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_computes_bfloat16():
            log.warning("bfloat16 on this CPU is emulated (no AVX-512 or Arm BF16) and slower than float32; "
                        "use precision float32")
        channels_last = self.runtime.channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if self.runtime.fold_batch_norm:
            model = fold_batch_norms(copy.deepcopy(model).eval())
        self.model = model.eval().to(self.device, memory_format=memory_format).set_precision(self.dtype)
        self.config: ModelConfig = model.config
        self.input_size = self.runtime.input_size
        self.scales = self.runtime.scales
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self._normalize = Normalizer(self.device, self.dtype, channels_last)
        self.preprocess = self.runtime.preprocess
        self._runner = make_runner(
            self.runtime.backend, self.model, device=self.device, precision=self.precision, checkpoint=checkpoint,
            engine_dir=self.runtime.engine_dir or None, compile_options=self.runtime.compile_options,
            fallback=self.runtime.fallback,
        )
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # streams may be served from several threads

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, model: str | None = None, runtime: RuntimeConfig | None = None, **options: Any
    ) -> "Segmenter":
        """Loads a published `.pkl` (model name given or inferred) or a project checkpoint."""
        runtime = runtime_with(runtime, **options).resolve()  # fail on the device before reading weights
        return cls(load_model(path, model), runtime, checkpoint=path)

    @classmethod
    def default(cls, runtime: RuntimeConfig | None = None, **options: Any) -> "Segmenter":
        """The bundled default model (a small TD4 trained by this project)."""
        if not DEFAULT_MODEL_PATH.is_file():
            raise FileNotFoundError(
                f"no bundled default model at {DEFAULT_MODEL_PATH}; "
                "give a checkpoint explicitly (Segmenter.from_checkpoint)"
            )
        return cls.from_checkpoint(DEFAULT_MODEL_PATH, runtime=runtime, **options)

    # -- properties -------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend the steps run on (after any fallback)."""
        return self._runner.name

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> list[str]:
        if self.config.class_names:
            return list(self.config.class_names)
        if self.num_classes == len(CLASS_NAMES):
            return list(CLASS_NAMES)
        return [f"class {i}" for i in range(self.num_classes)]

    @property
    def class_colors(self) -> np.ndarray:
        """(K, 3) uint8 RGB colours."""
        if self.config.class_colors:
            return np.asarray(self.config.class_colors, dtype=np.uint8)
        if self.num_classes == len(CLASS_COLORS):
            return np.asarray(CLASS_COLORS, dtype=np.uint8)
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (self.num_classes, 3), dtype=np.uint8)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the model's parameters and buffers, as placed on the device."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def checkpoint_sha256(self) -> str | None:
        return file_sha256(self.checkpoint) if self.checkpoint else None

    def model_input_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        if self.input_size == "frame":
            return tuple(frame_size)  # type: ignore[return-value]
        return tuple(self.input_size or self.config.input_size)  # type: ignore[return-value]

    # -- streaming --------------------------------------------------------------------

    def reset(self, stream: str | None = None) -> None:
        """Forgets the temporal state of one stream, or of all streams."""
        with self._lock:
            names = self._streams if stream is None else self._scale_keys(stream)
            for name in names:
                if name in self._streams:
                    self._streams[name].cache.reset()

    def warm_up(
        self, frame_size: tuple[int, int] | None = None, streams: tuple[str, ...] = ("default",), batched: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Allocates the streams' caches and does the backend's one-off work (CUDA graph
        captures, compilation, engine loads) for frames of `frame_size` (default: the model
        input size), so that the first real frame runs at full speed: for each stream alone,
        and, when `batched`, for all of them as one batch (cameras triggered together reach
        each step together). The streams start cold afterwards. `should_stop` is asked
        between the streams' steps: when it says True, warm-up ends there."""
        if frame_size is None and self.input_size == "frame":
            raise ValueError("warm_up needs frame_size when the segmenter runs at each frame's own size")
        base = self.model_input_size(frame_size or (0, 0))
        stopped = should_stop or (lambda: False)
        with self._lock, torch.inference_mode():
            for scale_index, scale in enumerate(self.scales):
                size = scaled_size(base, scale)
                x = torch.zeros(1, 3, *size, device=self.device, dtype=self.dtype)  # (1, 3, H, W)
                x = x.contiguous(memory_format=self._normalize.memory_format)
                keys = [self._scale_keys(stream)[scale_index] for stream in streams]
                states = [self._stream_state(key, size, scale) for key in keys]
                for key, state in zip(keys, states):
                    if stopped():
                        break
                    self._runner.prepare(x, [state.cache], [key])
                if batched and len(keys) > 1 and not stopped():
                    batch = x.expand(len(keys), -1, -1, -1).contiguous(memory_format=self._normalize.memory_format)
                    self._runner.prepare(batch, [state.cache for state in states], keys)  # (B, 3, H, W)
                for state in states:
                    state.cache.reset()

    def segment(self, frame: np.ndarray, stream: str = "default") -> SegmentResult:
        """Segments one HxWx3 uint8 RGB frame; labels come back at the frame's resolution."""
        return self.segment_batch({stream: frame})[stream]

    def segment_batch(self, frames: Mapping[str, np.ndarray]) -> dict[str, SegmentResult]:
        """Segments one HxWx3 uint8 RGB frame of each of several streams (e.g. a camera rig).

        Streams whose caches are at the same step (same sub-network, warm state and input
        size) run as one batch, in the order given. Results equal `segment` on each frame in
        turn. Stage times: with one frame, each stage's own (CUDA: synchronized); with
        several, the batch's stages, where on CUDA "postprocess" also waits for the GPU.

        Raises:
            ValueError: a frame is not HxWx3 uint8 C-contiguous (the message names its
                stream); no frame is processed then.
        """
        start = time.perf_counter()
        checked = {}
        for stream, frame in frames.items():
            try:
                checked[stream] = check_frame(frame)
            except ValueError as error:
                raise ValueError(f"stream {stream!r}: {error}") from None
        times = StageTimes(self.device, synchronize=len(checked) == 1)
        with self._lock, torch.inference_mode():
            inputs = {}
            with times("preprocess"):
                for stream, frame in checked.items():
                    base = self.model_input_size(frame.shape[:2])
                    for key, scale in zip(self._scale_keys(stream), self.scales):
                        size = scaled_size(base, scale)
                        state = self._stream_state(key, size, scale)
                        with self._on_stream(state):
                            if state.preprocessor is not None:
                                inputs[key] = state.preprocessor(frame, size)
                            else:
                                inputs[key] = self._normalize(resize_frame(frame, size))
            out_sizes = {stream: frame.shape[:2] for stream, frame in checked.items()}
            return self._run(inputs, out_sizes, times, start)

    def segment_normalized(self, x: torch.Tensor, stream: str = "default") -> SegmentResult:
        """Segments a (1, 3, H, W) float32 tensor already normalized at the model input size."""
        start = time.perf_counter()
        if len(self.scales) > 1:
            raise ValueError(f"segment_normalized runs one input size; this segmenter runs scales {list(self.scales)}: "
                             "give it frames (segment)")
        size = None if self.input_size == "frame" else self.model_input_size((0, 0))
        x = check_normalized(x, size)
        times = StageTimes(self.device)
        memory_format = self._normalize.memory_format
        x = x.to(self.device, self.dtype, memory_format=memory_format)
        with self._lock, torch.inference_mode():
            self._stream_state(stream, tuple(x.shape[-2:]))
            return self._run({stream: x}, {stream: tuple(x.shape[-2:])}, times, start)[stream]

    def _run(
        self,
        inputs: dict[str, torch.Tensor],
        out_sizes: dict[str, tuple[int, int]],
        times: StageTimes,
        start: float,
    ) -> dict[str, SegmentResult]:
        """Runs the preprocessed (1, 3, H, W) inputs, batching those at the same step.

        `inputs` holds each stream's input at every scale, under `_scale_keys(stream)`;
        `out_sizes` each stream's frame size. Called with the lock held, after
        `_stream_state` for each key at its input's size.
        """
        groups: dict[tuple[tuple[int, int], int, bool], list[str]] = {}
        for key, x in inputs.items():
            cache = self._streams[key].cache
            step = (tuple(x.shape[-2:]), cache.next_path, cache.warm)
            groups.setdefault(step, []).append(key)
        compute = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        scale_outputs: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}  # key -> (logits (1, K, h, w), input size)
        outputs: dict[str, tuple[torch.Tensor, int, bool, bool, int]] = {}
        finite: dict[str, torch.Tensor] = {}
        for (size, path, _), members in groups.items():
            states = [self._streams[key] for key in members]
            for key, state in zip(members, states):
                self._hand_over(inputs[key], state.cuda_stream, compute)
            x = inputs[members[0]] if len(members) == 1 else torch.cat([inputs[k] for k in members])  # (B, 3, H, W)
            resets = [state.cache.frames_written == 0 for state in states]
            logits, warm = self._runner.run(x, path, [state.cache for state in states], members, times)
            logits = logits.float()  # (B, K, h, w)
            finite_rows = torch.isfinite(logits).flatten(1).all(1)  # (B,)
            for row, key in enumerate(members):
                scale_outputs[key] = (logits[row : row + 1], size)
                outputs[key] = (logits[row], path, warm, resets[row], len(members))
                finite[key] = finite_rows[row]
        labels: dict[str, torch.Tensor] = {}
        keys_of = {stream: self._scale_keys(stream) for stream in out_sizes}
        with times("postprocess"):
            for stream, out_size in out_sizes.items():
                keys = keys_of[stream]
                state = self._streams[stream]
                for key in keys:
                    self._hand_over(scale_outputs[key][0], compute, state.cuda_stream)
                with self._on_stream(state):
                    labels[stream] = labels_from_scales([scale_outputs[key] for key in keys], out_size,
                                                        align_corners=self.config.upsample_align_corners)
        on_host = {}
        with times("postprocess"):  # downloads: the other streams' work goes on meanwhile
            for stream in out_sizes:
                with self._on_stream(self._streams[stream]):
                    on_host[stream] = labels_to_numpy(labels[stream])
        timings = dict(times.ms, total=(time.perf_counter() - start) * 1e3)
        results = {}
        for stream in out_sizes:  # in the order given
            logits, path, warm, reset, batch_size = outputs[stream]
            all_finite = all(bool(finite[key]) for key in keys_of[stream])  # read last: a CUDA sync
            results[stream] = SegmentResult(on_host[stream], logits, path, dict(timings), warm, reset, batch_size,
                                            all_finite)
        return results

    @staticmethod
    def _hand_over(
        tensor: torch.Tensor, producer: torch.cuda.Stream | None, consumer: torch.cuda.Stream | None
    ) -> None:
        """Makes `consumer` wait for the work `producer` queued so far, and keeps the tensor's
        memory from being reused before `consumer` is done with it (no-op on the CPU)."""
        if producer is None or consumer is None or producer == consumer:
            return
        consumer.wait_stream(producer)
        tensor.record_stream(consumer)

    @staticmethod
    def _on_stream(state: _Stream) -> AbstractContextManager:
        return torch.cuda.stream(state.cuda_stream) if state.cuda_stream is not None else nullcontext()

    def _scale_keys(self, stream: str) -> list[str]:
        """Names of the stream's states, one per scale: the stream's own name at scale 1."""
        return [stream] + [f"{stream} ×{scale:g}" for scale in self.scales[1:]]

    def _stream_state(self, stream: str, input_size: tuple[int, int], scale: float = 1.0) -> _Stream:
        """The stream's state, (re)allocated on its first frame and when its input size changes."""
        state = self._streams.get(stream)
        if state is not None and state.input_size == input_size:
            return state
        if state is not None:
            log.info("stream %r changed input size %s -> %s: cache reset", stream, state.input_size, input_size)
            self._runner.forget(stream)  # graphs over the old cache
        cache = FeatureCache.for_model(self.config, input_size, device=self.device, dtype=self.model.attention_dtype)
        cuda = self.device.type == "cuda"
        channels_last = self._normalize.memory_format == torch.channels_last
        state = self._streams[stream] = _Stream(
            cache,
            input_size,
            DevicePreprocessor(self.device, self.dtype, channels_last) if self.preprocess == "device" else None,
            (state.cuda_stream if state is not None else torch.cuda.Stream(self.device)) if cuda else None,
            scale,
        )
        return state

    def streams(self) -> list[str]:
        return [name for name, state in self._streams.items() if state.scale == 1.0]
