"""Stage timing: wall-clock milliseconds per named stage, GPU work included."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from .stream_stats import percentiles  # noqa: F401 (one implementation, used from here too)


class StageTimes:
    """Collects milliseconds per stage for one frame.

    On CUDA each stage ends with a synchronize, so that a stage's time is the GPU work it
    queued, not just the launch; pass `synchronize=False` to time launches only.
    """

    def __init__(self, device: torch.device, synchronize: bool = True) -> None:
        self._sync = synchronize and device.type == "cuda"
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1e3
