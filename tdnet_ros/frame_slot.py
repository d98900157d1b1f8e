"""The newest-frame slot of a camera: the receiving thread puts, the worker takes.

A frame that arrives while the previous one still waits replaces it and is counted as
dropped: a segmentation node must answer the newest image, never work through a queue.
"""

from __future__ import annotations

import threading
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class FrameSlot(Generic[T]):
    """One waiting item at most; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Optional[T] = None
        self.offered = 0  # items put
        self.dropped = 0  # items replaced before they were taken

    def put(self, item: T) -> bool:
        """Makes `item` the waiting one; True when it replaced (dropped) an item not yet taken."""
        with self._lock:
            self.offered += 1
            replaced = self._pending is not None
            if replaced:
                self.dropped += 1
            self._pending = item
            return replaced

    def take(self) -> Optional[T]:
        """The waiting item (None when there is none); the slot is empty afterwards."""
        with self._lock:
            item, self._pending = self._pending, None
            return item

    def clear(self) -> None:
        with self._lock:
            self._pending = None
