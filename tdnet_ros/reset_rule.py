"""When a camera's temporal state must start afresh: the reset rule, without ROS.

TDNet's cache holds features of the last N-1 frames; after a gap in the stream, a jump back
in time, a new image size or another camera frame they describe another scene. A gap is
judged against the stream's own frame period, so that a 2 Hz topic (a throttled camera, a
low-rate recording) keeps its temporal model while a 30 Hz camera that pauses resets.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ResetSettings:
    period_factor: float = 5.0  # a forward jump above this many median frame periods resets
    min_jump_s: float = 0.5  # ... but never below this (the floor)
    max_jump_s: float = 10.0  # ... and always above this (the ceiling)
    history: int = 30  # frame periods the median is taken over


class ResetRule:
    """Decides, frame by frame, whether a stream's cache must reset, and says why."""

    #: Frame periods needed before the median is trusted; until then the floor applies (an
    #: unknown rate is treated as a fast camera's: a slow topic resets on its first frames only).
    MIN_PERIODS = 2

    def __init__(self, settings: ResetSettings = ResetSettings()) -> None:
        self.settings = settings
        self._periods: deque[float] = deque(maxlen=settings.history)
        self._last: Optional[tuple[int, tuple[int, int], str]] = None  # stamp ns, (h, w), frame_id
        self.counts = {"time_jump": 0, "backwards": 0, "size": 0, "frame_id": 0}
        self.requested = 0  # resets asked for from outside (request()), apart from the causes above
        self._requested = threading.Event()  # set from another thread (a reset service)

    def jump_limit_s(self) -> float:
        """The forward stamp jump above which the stream resets, from its frame period."""
        s = self.settings
        if len(self._periods) < self.MIN_PERIODS:
            return s.min_jump_s
        median = sorted(self._periods)[len(self._periods) // 2]
        return min(max(s.period_factor * median, s.min_jump_s), s.max_jump_s)

    def request(self) -> None:
        """Asks for a reset at the next frame (thread-safe: e.g. from a service callback)."""
        self._requested.set()

    def check(self, stamp_ns: int, size: tuple[int, int], frame_id: str) -> Optional[str]:
        """The reason this frame starts a new sequence, or None; then remembers the frame.

        The first frame gives None: a new stream starts its cache anyway.
        """
        if self._requested.is_set():
            self._requested.clear()
            self.forget()
            self.check(stamp_ns, size, frame_id)
            self.requested += 1
            return "reset requested"
        reason, kind = None, None
        if self._last is not None:
            last_stamp, last_size, last_frame_id = self._last
            jump = (stamp_ns - last_stamp) / 1e9
            limit = self.jump_limit_s()
            if size != last_size:
                reason, kind = f"image size changed from {last_size[1]}x{last_size[0]} to {size[1]}x{size[0]}", "size"
            elif frame_id != last_frame_id:
                reason, kind = f"frame_id changed from '{last_frame_id[:40]}' to '{frame_id[:40]}'", "frame_id"
            elif jump < 0:
                reason, kind = f"timestamp jumped backwards by {-jump:.3f} s", "backwards"
            elif jump > limit:
                reason, kind = (f"timestamp jumped forward by {jump:.3f} s (> {limit:.3f} s: "
                                f"{self.settings.period_factor:g} frame periods, within "
                                f"[{self.settings.min_jump_s:g}, {self.settings.max_jump_s:g}] s)"), "time_jump"
            if jump >= 0:
                self._periods.append(jump)  # a pause counts too: the median shrugs it off
            if kind is not None:
                self.counts[kind] += 1
        self._last = (stamp_ns, size, frame_id)
        return reason

    def forget(self) -> None:
        """After a reset requested from outside: the next frame starts a new sequence (the
        stream's rate stays known)."""
        self._last = None
