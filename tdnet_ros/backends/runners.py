"""Step runners: how a segmenter runs one frame's step against a stream's feature cache.

Every runner does read cache -> step -> write cache and returns (logits, warm), where warm
says whether the attention term over the cached frames was used. A call carries a batch:
one frame of each of B streams whose caches are at the same step (same path, warm state
and input size), row i of x belonging to caches[i] and streams[i]. The eager runner is the
reference; the others run the same `StepModule` (see step.py) through a compiler, a
captured CUDA graph or prebuilt files. A runner that cannot serve an input size raises
`BackendUnavailable`; `FallbackRunner` then runs that size on its fallback, after one log
line. Which step runs and which cache slots it reads is the cache's to say (cache.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import FeatureCache, gather_batch, read_batch, read_index, store_batch, write_batch
from ..model import TDNet
from .artifacts import BackendUnavailable
from .step import StepModule, example_inputs, step_keys

log = logging.getLogger(__name__)

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
        cached = read_batch(caches, path)
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
    BackendUnavailable (a FallbackRunner around this one then runs that size elsewhere).
    Callables of a fixed batch of one (ONNX files, TensorRT engines) have `batched=False`:
    a batch then runs through them row by row.
    """

    def __init__(
        self,
        model: TDNet,
        name: str,
        steps_for: Callable[[tuple[int, int]], dict[tuple[int, bool], StepFn]],
        batched: bool = True,
    ) -> None:
        super().__init__(model)
        self.name = name
        self._steps_for = steps_for
        self._batched = batched
        self._by_size: dict[tuple[int, int], dict[tuple[int, bool], StepFn]] = {}

    def steps(self, input_size: tuple[int, int]) -> dict[tuple[int, bool], StepFn]:
        if input_size not in self._by_size:
            self._by_size[input_size] = self._steps_for(input_size)
        return self._by_size[input_size]

    def run(self, x, path, caches, streams, timer=_no_timer):
        steps = self.steps(tuple(x.shape[-2:]))
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

    @staticmethod
    def _run_step(step: StepFn, x: torch.Tensor, path: int, caches: list[FeatureCache], warm: bool):
        inputs = (x, *gather_batch(caches, path)) if warm else (x,)
        logits, query, key, value = step(*inputs)
        write_batch(caches, path, (query, key, value))
        return logits

    def prepare(self, x, caches, streams):
        """Loads (or compiles) every step for this input size and runs each once."""
        size = tuple(x.shape[-2:])
        steps = self.steps(size)
        if not self._batched:
            x = x[:1]  # the artefacts take one frame; a batch runs them row by row
        for (path, warm), step in steps.items():
            cached = example_inputs(self.model, size, warm, batch=x.shape[0], device=x.device)[1:]
            step(x, *cached)  # x as the frames will come (dtype, memory format)


class FallbackRunner(StepRunner):
    """`primary` where it can run, `fallback` for every input size where it cannot.

    The primary says it cannot by raising BackendUnavailable (missing artefacts for a size,
    a compiler failing at its first call) before it touches the caches; that size then runs
    on the fallback for good, after one log line naming both and the reason.
    """

    def __init__(self, primary: StepRunner, fallback: StepRunner) -> None:
        super().__init__(primary.model)
        self.primary = primary
        self.fallback = fallback
        self._fallen: set[tuple[int, int]] = set()
        self._served: set[tuple[int, int]] = set()

    @property
    def name(self) -> str:
        """The primary's name, or the fallback's once every input size seen fell back."""
        if self._fallen and not self._served:
            return self.fallback.name
        return self.primary.name

    def _attempt(self, size: tuple[int, int], work: Callable[[StepRunner], Any]) -> Any:
        if size not in self._fallen:
            try:
                result = work(self.primary)
                self._served.add(size)
                return result
            except BackendUnavailable as error:
                self._fallen.add(size)
                log.warning("%s backend unavailable at input %dx%d, running %s instead: %s",
                            self.primary.name, *size, self.fallback.name, error)
        return work(self.fallback)

    def run(self, x, path, caches, streams, timer=_no_timer):
        return self._attempt(tuple(x.shape[-2:]), lambda runner: runner.run(x, path, caches, streams, timer))

    def prepare(self, x, caches, streams):
        self._attempt(tuple(x.shape[-2:]), lambda runner: runner.prepare(x, caches, streams))

    def forget(self, stream: str | None = None) -> None:
        self.primary.forget(stream)
        self.fallback.forget(stream)


class CompiledRunner(ModuleRunner):
    """torch.compile of each step. A compilation that fails, at once or at a step's first
    call (where inductor and dynamo failures surface), raises BackendUnavailable."""

    def __init__(self, model: TDNet, compile_options: dict[str, Any] | None = None) -> None:
        self._options = dict(compile_options or {})
        self._options.setdefault("dynamic", False)
        super().__init__(model, "compile", self._compile_all)

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
                raise BackendUnavailable(f"torch.compile failed: {type(error).__name__}: {_first_line(error)}") from None
            steps[(path, warm)] = self._guarded(compiled)
        return steps

    @staticmethod
    def _guarded(compiled: StepFn) -> StepFn:
        def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            try:
                return compiled(*inputs)
            except Exception as error:  # inductor/dynamo failures surface at the first call
                raise BackendUnavailable(f"torch.compile failed: {type(error).__name__}: {_first_line(error)}") from None

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
        inputs = (graphs.static_x, *gather_batch(caches, index)) if warm else (graphs.static_x,)
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
            index = read_index(caches, path) if warm else None
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
            saved = [cache.snapshot() for cache in caches]
            self.prepare(x, caches, streams)
            for cache, snapshot in zip(caches, saved):
                cache.restore(snapshot)
            graphs = self._batches[tuple(streams)]
        warm = caches[0].warm
        with timer("network"):
            capture = graphs.captures[(path, warm)]
            graphs.static_x.copy_(x)
            capture.graph.replay()
            for cache in caches:
                cache.advance()  # the graph stored the entries; the count is the host's
            logits = capture.logits.clone()  # the static output is overwritten by the next replay
        return logits, warm

    def forget(self, stream: str | None = None) -> None:
        """Drops the graphs of every batch `stream` belongs to (all graphs when None)."""
        for streams in list(self._batches):
            if stream is None or stream in streams:
                del self._batches[streams]
