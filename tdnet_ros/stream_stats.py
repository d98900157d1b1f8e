"""Per-camera statistics of the node, without ROS: counters, rates and latency windows,
and the one implementation of latency percentiles (timing.py re-exports it)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

#: Frames kept for the latency percentiles.
LATENCY_WINDOW = 300
#: Seconds over which the input and output rates are measured.
RATE_WINDOW_S = 5.0
#: Longest problem text kept (error messages may quote what a sender sent).
MAX_PROBLEM_CHARS = 300
#: Kinds of problem whose last log time is remembered (for the throttle).
MAX_PROBLEM_KINDS = 64

COUNTERS = (
    "frames_received", "frames_processed", "frames_dropped", "frames_lost_in_transport", "frames_invalid",
    "processing_errors", "frames_non_finite_output", "frames_skipped_no_subscribers", "cache_resets",
)


def percentiles(samples_ms: Iterable[float] | np.ndarray, qs=(50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...} of milliseconds (NaN when there are none)."""
    values = np.asarray(samples_ms if isinstance(samples_ms, np.ndarray) else list(samples_ms), dtype=np.float64)
    if values.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def clip_problem(problem: str) -> str:
    """A problem text cut to MAX_PROBLEM_CHARS (the sender's strings stay out of logs and memory)."""
    if len(problem) > MAX_PROBLEM_CHARS:
        return problem[:MAX_PROBLEM_CHARS] + f"... ({len(problem)} characters)"
    return problem


@dataclass
class StatsSnapshot:
    """A consistent copy of a camera's statistics (for diagnostics)."""

    counters: dict[str, int]
    input_rate_hz: float
    output_rate_hz: float
    latency_percentiles: dict[str, dict[str, float]]  # stage -> {p50, p95, p99}
    silent_for_s: float  # since the last frame arrived (or since the start)
    last_problem: str
    rendered: dict[str, int] = field(default_factory=dict)


class StreamStatistics:
    """Counters, rates, latency windows and the error throttle of one camera; thread-safe.

    `clock` is injectable so that rates and the throttle are tested without waiting.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._received: deque[float] = deque(maxlen=1000)
        self._published: deque[float] = deque(maxlen=1000)
        self._latencies: dict[str, deque[float]] = {}
        self._last_received: Optional[float] = None
        self._last_logged: dict[str, float] = {}
        self.rendered: dict[str, int] = {}
        self.last_problem = ""

    def count(self, counter: str, amount: int = 1) -> int:
        """Adds to a counter (one of COUNTERS); returns its new value."""
        with self._lock:
            self._counters[counter] += amount
            return self._counters[counter]

    def counter(self, counter: str) -> int:
        with self._lock:
            return self._counters[counter]

    def received(self) -> None:
        now = self._clock()
        with self._lock:
            self._counters["frames_received"] += 1
            self._received.append(now)
            self._last_received = now

    def published(self, stage_ms: dict[str, float], rendered: Iterable[str]) -> None:
        """A processed frame: its latency per stage, and the outputs rendered for it."""
        now = self._clock()
        with self._lock:
            self._counters["frames_processed"] += 1
            self._published.append(now)
            for stage, value in stage_ms.items():
                self._latencies.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(value)
            for name in rendered:
                self.rendered[name] = self.rendered.get(name, 0) + 1

    def problem(self, kind: str, text: str, period_s: float, counter: str | None = None) -> Optional[str]:
        """Records a problem (counting it in `counter`, if given); returns the clipped text
        when it should be logged now (at most once per `period_s` per `kind`), else None."""
        text = clip_problem(text)
        now = self._clock()
        with self._lock:
            if counter is not None:
                self._counters[counter] += 1
            self.last_problem = text
            last = self._last_logged.get(kind)
            if last is not None and now - last < period_s:
                return None
            if len(self._last_logged) >= MAX_PROBLEM_KINDS:  # bounded, whatever arrives
                self._last_logged.clear()
            self._last_logged[kind] = now
        return text

    def snapshot(self) -> StatsSnapshot:
        now = self._clock()
        with self._lock:
            span = min(RATE_WINDOW_S, max(now - self._started, 1e-3))
            input_rate = sum(1 for t in self._received if now - t <= RATE_WINDOW_S) / span
            output_rate = sum(1 for t in self._published if now - t <= RATE_WINDOW_S) / span
            latencies = {stage: percentiles(list(values)) for stage, values in self._latencies.items()}
            silent = now - (self._last_received if self._last_received is not None else self._started)
            return StatsSnapshot(dict(self._counters), input_rate, output_rate, latencies, silent,
                                 self.last_problem, dict(self.rendered))

    def running_for_s(self) -> float:
        return self._clock() - self._started


def silence_message(topic: str, *, silent_for: float, received: int, lost: int, publishers: int,
                    publisher_kinds: list[str], subscribed: str, incompatible_policy: str,
                    transports: str) -> str:
    """Why a camera's diagnostics say no images arrive: the cause as exactly as it is known.

    Tells apart a camera that stopped sending (images arrived before) from one whose images
    never arrived (no publisher seen, incompatible QoS, lost in transport, or nothing at all).
    """
    if received:
        text = f"camera stopped sending: no images on {topic} for {silent_for:.1f} s after {received} received"
        return text + ("; its publisher is gone" if not publishers else "")
    if not publishers:
        return (
            f"no images received on {topic} yet, and no publisher seen: check the topic name, "
            f"ROS_DOMAIN_ID, and that the camera uses the same Fast DDS transports as this node "
            f"(FASTDDS_BUILTIN_TRANSPORTS={transports or 'unset'} here): participants with "
            "different transport settings may not discover each other"
        )
    who = f"{publishers} publisher(s) ({', '.join(publisher_kinds) or 'QoS unknown'})"
    if incompatible_policy:
        return (f"no images received on {topic} yet: {who} offer QoS incompatible with this node's "
                f"{subscribed} subscription (policy {incompatible_policy}); set qos_reliability auto "
                "or match the publisher")
    if lost:
        return f"no images received on {topic} yet: {who}, {lost} image(s) lost in transport: {LOST_HINT}"
    return (f"no images received on {topic} yet although {who} exist and match this node's {subscribed} "
            "subscription: the camera may not be publishing, or its images may not fit its transport "
            f"({LOST_HINT})")


LOST_HINT = (
    "best-effort subscriptions lose camera-sized images whose fragments do not all arrive "
    "(Fast DDS's default transports): publish the camera reliable (qos_reliability auto follows "
    "it), or start the camera and this node with FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA "
    "(launch argument large_data:=true)"
)
