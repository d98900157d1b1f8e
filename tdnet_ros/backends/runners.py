"""Step runners: how a segmenter runs one frame's step against a stream's feature cache.

Every runner does read cache -> step -> write cache and returns (logits, warm), where warm
says whether the attention term over the cached frames was used. A call carries a batch:
one frame of each of B streams whose caches are at the same step (same path, warm state
and input size), row i of x belonging to caches[i] and streams[i]. The eager runner is the
reference; the others run the same `StepModule` (see step.py) through a compiler or a
captured CUDA graph, and fall back with one log line when they cannot run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..cache import FeatureCache, read_batch, store_batch, write_batch
from ..model import TDNet
from .artifacts import ArtifactKey, BackendUnavailable, checkpoint_hash, find_artifacts, library_versions
from .step import StepModule, example_inputs, gather_cache, step_keys, step_name

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "cuda-graph", "onnx", "tensorrt")

StageTimer = Callable[[str], AbstractContextManager]
StepFn = Callable[..., tuple[torch.Tensor, ...]]


def _no_timer(_: str) -> AbstractContextManager:
    return nullcontext()


class StepRunner:
    """Runs sub-network `path` on a batch against its streams' caches, updating them (eager reference)."""

    name = "eager"

    def __init__(self, model: TDNet) -> None:
        self.model = model

    def run(
        self,
        x: torch.Tensor,
        path: int,
        caches: list[FeatureCache],
        streams: list[str],
        timer: StageTimer = _no_timer,
    ) -> tuple[torch.Tensor, bool]:
        """x: (B, 3, H, W) with B = len(caches) = len(streams); returns ((B, K, h, w) logits, warm)."""
        cached = read_batch(caches, self.model.cache_order(path))
        out = self.model.step(x, path, cached, timer=timer)
        write_batch(caches, path, out.cache_entry)
        return out.logits, cached is not None

    def prepare(self, x: torch.Tensor, caches: list[FeatureCache], streams: list[str]) -> None:
        """Does all one-off work for these streams batched at x's shape (captures, engine
        loads, compilation) before frames arrive."""

    def forget(self, stream: str | None = None) -> None:
        """Drops per-stream resources (all streams when None)."""


class ModuleRunner(StepRunner):
    """Runs one callable per (path, warm) with the caches gathered into stacked tensors.

    `steps_for(input_size)` returns the callables for a model input size, or raises
    BackendUnavailable; then this size runs on `fallback`, after one log line. Callables of
    a fixed batch of one (ONNX files, TensorRT engines) have `batched=False`: a batch then
    runs through them row by row.
    """

    def __init__(
        self,
        model: TDNet,
        name: str,
        steps_for: Callable[[tuple[int, int]], dict[tuple[int, bool], StepFn]],
        fallback: StepRunner,
        batched: bool = True,
    ) -> None:
        super().__init__(model)
        self._name = name
        self._steps_for = steps_for
        self._fallback = fallback
        self._batched = batched
        self._by_size: dict[tuple[int, int], dict[tuple[int, bool], StepFn] | None] = {}

    @property
    def name(self) -> str:
        """This backend's name, or the fallback's once every input size seen fell back."""
        if self._by_size and all(steps is None for steps in self._by_size.values()):
            return self._fallback.name
        return self._name

    def steps(self, input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn] | None:
        if input_size not in self._by_size:
            try:
                self._by_size[input_size] = self._steps_for(input_size)
            except BackendUnavailable as error:
                log.warning(
                    "%s backend unavailable at input %dx%d, running %s instead: %s",
                    self._name,
                    *input_size,
                    self._fallback.name,
                    error,
                )
                self._by_size[input_size] = None
        return self._by_size[input_size]

    def run(self, x, path, caches, streams, timer=_no_timer):
        steps = self.steps(tuple(x.shape[-2:]))
        if steps is None:
            return self._fallback.run(x, path, caches, streams, timer)
        warm = caches[0].warm
        step = steps[(path, warm)]
        with timer("network"):
            if self._batched or len(caches) == 1:
                logits = self._run_step(step, x, path, caches, warm)
            else:
                logits = torch.cat(
                    [self._run_step(step, x[i : i + 1], path, [c], warm) for i, c in enumerate(caches)]
                )  # (B, K, h, w)
        return logits, warm

    def _run_step(self, step: StepFn, x: torch.Tensor, path: int, caches: list[FeatureCache], warm: bool):
        inputs = (x, *gather_cache(caches, self.model.cache_order(path))) if warm else (x,)
        logits, query, key, value = step(*inputs)
        write_batch(caches, path, (query, key, value))
        return logits

    def prepare(self, x, caches, streams):
        """Loads (or compiles) every step for this input size and runs each once."""
        size = tuple(x.shape[-2:])
        steps = self.steps(size)
        if steps is None:
            self._fallback.prepare(x, caches, streams)
            return
        if not self._batched:
            x = x[:1]  # the artefacts take one frame; a batch runs them row by row
        for (path, warm), step in steps.items():
            cached = example_inputs(self.model, size, warm, batch=x.shape[0], device=x.device)[1:]
            step(x, *cached)  # x as the frames will come (dtype, memory format)


class CompiledRunner(ModuleRunner):
    """torch.compile of each step; a step whose compilation fails runs eagerly (one log line)."""

    def __init__(self, model: TDNet, compile_options: dict[str, Any] | None = None) -> None:
        self._options = dict(compile_options or {})
        self._options.setdefault("dynamic", False)
        self._failed = False
        eager = StepRunner(model)
        super().__init__(model, "compile", self._compile_all, eager)

    def _compile_all(self, input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
        import torch._dynamo

        # All steps share StepModule.forward's code object, whose compiled variants dynamo
        # counts against one limit (8 by default): allow every step at a few input sizes.
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 4 * len(step_keys(self.model))))
        steps = {}
        for path, warm in step_keys(self.model):
            module = StepModule(self.model, path, warm).eval()
            try:
                compiled = torch.compile(module, **self._options)
            except Exception as error:  # e.g. an unknown compiler backend
                raise BackendUnavailable(
                    f"torch.compile failed: {type(error).__name__}: {_first_line(error)}"
                ) from None
            steps[(path, warm)] = self._guarded(module, compiled)
        return steps

    def _guarded(self, module: StepModule, compiled: StepFn) -> StepFn:
        def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if not self._failed:
                try:
                    return compiled(*inputs)
                except Exception as error:  # inductor/dynamo failures surface at the first call
                    self._failed = True
                    log.warning(
                        "torch.compile failed, running eagerly: %s: %s", type(error).__name__, _first_line(error)
                    )
            return module(*inputs)

        return run


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, K, h, w) static output


@dataclass
class _BatchGraphs:
    """The graphs of one batch of streams (often a single stream) at one input shape."""

    caches: list[FeatureCache]
    shape: tuple[int, ...]
    static_x: torch.Tensor  # (B, 3, H, W) static input
    captures: dict[tuple[int, bool], _Capture] = field(default_factory=dict)

    def serves(self, x: torch.Tensor, caches: list[FeatureCache]) -> bool:
        same_caches = len(caches) == len(self.caches) and all(a is b for a, b in zip(caches, self.caches))
        return same_caches and self.shape == tuple(x.shape)


class CudaGraphRunner(StepRunner):
    """One CUDA graph per (path, warm) per batch of streams and input shape.

    Each graph reads its streams' cache slots in place (index_select on the device) and
    writes this frame's entries into their slots, so a replay is one graph launch after one
    copy of the frames into the static input. A batch of streams (cameras at the same step)
    gets graphs of its own, captured at its first frame unless `prepare` captured them. A
    new cache (first frame, size change) gets new graphs; a reset keeps them (the cold
    graphs run until the caches are warm again). All graphs of a runner share one memory
    pool: their replays must not overlap, so the segmenter runs every step on one CUDA
    stream, one at a time.
    """

    name = "cuda-graph"

    def __init__(self, model: TDNet, warmup_iterations: int = 2) -> None:
        super().__init__(model)
        self._modules = {key: StepModule(model, *key).eval() for key in step_keys(model)}
        self._batches: dict[tuple[str, ...], _BatchGraphs] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._warmup_iterations = warmup_iterations

    def _body(self, graphs: _BatchGraphs, path: int, warm: bool, index: torch.Tensor | None) -> torch.Tensor:
        caches = graphs.caches
        inputs = (graphs.static_x, *gather_cache(caches, index)) if warm else (graphs.static_x,)
        logits, query, key, value = self._modules[(path, warm)](*inputs)
        store_batch(caches, path, (query, key, value))  # captured: replays count the frame themselves
        return logits

    def prepare(self, x: torch.Tensor, caches: list[FeatureCache], streams: list[str]) -> None:
        """Captures every step's graph for these streams' caches and input shape."""
        graphs = _BatchGraphs(list(caches), tuple(x.shape), torch.empty_like(x))
        graphs.static_x.copy_(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        for path, warm in step_keys(self.model):
            index = torch.tensor(self.model.cache_order(path), device=x.device) if warm else None
            with torch.cuda.stream(side):  # warm-up outside capture: cuDNN choices, lazy inits
                for _ in range(self._warmup_iterations):
                    self._body(graphs, path, warm, index)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._body(graphs, path, warm, index)
            graphs.captures[(path, warm)] = _Capture(graph, logits)
        for cache in caches:
            cache.reset()  # the warm-up wrote into the slots: nothing in them is a real frame
        self._batches[tuple(streams)] = graphs
        log.info("streams %s: captured %d CUDA graphs for input %s", list(streams), len(graphs.captures), tuple(x.shape))

    def run(self, x, path, caches, streams, timer=_no_timer):
        graphs = self._batches.get(tuple(streams))
        if graphs is None or not graphs.serves(x, caches):
            if graphs is not None:
                self._batches.pop(tuple(streams))
            # Capturing resets the caches: keep their frames across it (a batch seen for
            # the first time is usually made of streams already running).
            saved = [(c.query.clone(), c.key.clone(), c.value.clone(), c.frames_written) for c in caches]
            self.prepare(x, caches, streams)
            for cache, (query, key, value, count) in zip(caches, saved):
                cache.query.copy_(query)
                cache.key.copy_(key)
                cache.value.copy_(value)
                cache.frames_written = count
            graphs = self._batches[tuple(streams)]
        warm = caches[0].warm
        with timer("network"):
            capture = graphs.captures[(path, warm)]
            graphs.static_x.copy_(x)
            capture.graph.replay()
            for cache in caches:
                cache.frames_written += 1
            logits = capture.logits.clone()  # the static output is overwritten by the next replay
        return logits, warm

    def forget(self, stream: str | None = None) -> None:
        """Drops the graphs of every batch `stream` belongs to (all graphs when None)."""
        for streams in list(self._batches):
            if stream is None or stream in streams:
                del self._batches[streams]


def _artifact_key(
    backend: str, model: TDNet, input_size: tuple[int, int], precision: str, checkpoint_sha256: str
) -> ArtifactKey:
    return ArtifactKey(
        backend, model.config.name, tuple(input_size), precision, checkpoint_sha256, library_versions(backend)
    )


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
    """The step runner for `backend`, or the fallback runner after one log line saying why.

    Args:
        backend: one of BACKENDS.
        model: the segmenter's (folded, placed, precision-set) model.
        device: the model's device.
        precision: the segmenter's precision name (part of the artefact key).
        checkpoint: the checkpoint file (its hash keys the artefacts; the weights' hash without one).
        engine_dir: cache directory of prebuilt ONNX files / TensorRT engines.
        compile_options: keyword arguments of torch.compile (e.g. {"mode": "max-autotune"}).
        fallback: "eager" or "cuda-graph": what runs when an onnx/tensorrt artefact is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if fallback not in ("eager", "cuda-graph"):
        raise ValueError(f"unknown fallback {fallback!r}; use 'eager' or 'cuda-graph'")
    eager = StepRunner(model)
    if backend == "eager":
        return eager
    if backend == "compile":
        import torch._dynamo

        if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
            log.warning("torch.compile is not supported by this Python/torch build; running eagerly")
            return eager
        return CompiledRunner(model, compile_options)
    if backend == "cuda-graph" or fallback == "cuda-graph":
        if device.type != "cuda":
            log.warning(
                "the %s backend needs a CUDA device (the segmenter runs on %s); running eagerly",
                backend if backend == "cuda-graph" else "cuda-graph fallback",
                device,
            )
            if backend == "cuda-graph":
                return eager
        else:
            graphs = CudaGraphRunner(model)
            if backend == "cuda-graph":
                return graphs
            eager = graphs
    sha: list[str] = []  # computed once, on first use

    def key_for(input_size: tuple[int, int]) -> ArtifactKey:
        if not sha:
            sha.append(checkpoint_hash(checkpoint, model))
        return _artifact_key(backend, model, input_size, precision, sha[0])

    if backend == "onnx":
        if precision == "bfloat16":
            log.warning(
                "onnx backend unavailable in bfloat16, running %s: steps are exported in float32 or float16", eager.name
            )
            return eager
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            log.warning("the onnx backend needs onnxruntime (pip install onnxruntime); running %s", eager.name)
            return eager
        from .onnx_export import load_onnx_step

        def onnx_steps(input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
            files = find_artifacts(engine_dir, key_for(input_size))
            return {k: load_onnx_step(files[step_name(*k)], device) for k in step_keys(model)}

        return ModuleRunner(model, "onnx", onnx_steps, eager, batched=False)
    # tensorrt
    from .tensorrt import import_torch_tensorrt, load_engine

    try:
        import_torch_tensorrt()
    except BackendUnavailable as error:
        log.warning("tensorrt backend unavailable, running %s: %s", eager.name, error)
        return eager

    def engine_steps(input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
        files = find_artifacts(engine_dir, key_for(input_size))
        return {k: load_engine(files[step_name(*k)], device) for k in step_keys(model)}

    return ModuleRunner(model, "tensorrt", engine_steps, eager, batched=False)
