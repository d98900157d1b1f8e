"""Per-stream feature cache: the subsampled (q, k, v) of the last N-1 frames."""

from __future__ import annotations

import torch

from .model import CachedFrame


class FeatureCache:
    """Preallocated, fixed-shape storage of the cached frames' query, key and value.

    Frame t runs sub-network t mod N and is stored in slot t mod N (a ring of N slots):
    the slot it overwrites held frame t-N, the one that just fell out of the window, so
    the N-1 other slots always hold the previous N-1 frames. Shapes never change after
    allocation, so a captured CUDA graph or a compiled step can read and write it.
    """

    def __init__(
        self,
        num_paths: int,
        cached_tokens: int,
        key_channels: int,
        value_channels: int,
        *,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_paths = num_paths
        shape = (num_paths, batch, cached_tokens)
        self.query = torch.zeros(*shape, key_channels, device=device, dtype=dtype)  # (N, B, L, d_k)
        self.key = torch.zeros(*shape, key_channels, device=device, dtype=dtype)  # (N, B, L, d_k)
        self.value = torch.zeros(*shape, value_channels, device=device, dtype=dtype)  # (N, B, L, d_v)
        self.frames_written = 0

    @property
    def warm(self) -> bool:
        """True once it holds N-1 frames, so that the next frame gets the attention term."""
        return self.frames_written >= self.num_paths - 1 and self.num_paths > 1

    def store(self, slot: int, entry: CachedFrame) -> None:
        """Copies one frame's (q, k, v) into a slot, without counting it as a frame."""
        query, key, value = entry
        self.query[slot].copy_(query)  # (B, L, d_k)
        self.key[slot].copy_(key)
        self.value[slot].copy_(value)  # (B, L, d_v)

    def write(self, slot: int, entry: CachedFrame) -> None:
        """Stores this frame's (q, k, v) and counts it (the count decides the schedule)."""
        self.store(slot, entry)
        self.frames_written += 1

    def read(self, slots: list[int]) -> list[CachedFrame] | None:
        """The cached frames in `slots` order (oldest first), or None while not warm."""
        if not self.warm:
            return None
        return [(self.query[s], self.key[s], self.value[s]) for s in slots]

    def reset(self) -> None:
        self.frames_written = 0


# Several streams at the same sub-network step run as one batch: their caches are read
# as one (B, L, d) batch per cached frame and this frame's entry is split back by row.


def read_batch(caches: list[FeatureCache], slots: list[int]) -> list[CachedFrame] | None:
    """The cached frames of several streams in `slots` order, concatenated along the batch
    (row i = caches[i]), or None while they are not warm (they are warm or cold together)."""
    if len(caches) == 1:
        return caches[0].read(slots)
    per_cache = [cache.read(slots) for cache in caches]
    if any(frames is None for frames in per_cache):
        return None
    return [
        tuple(torch.cat([frames[j][part] for frames in per_cache]) for part in range(3))  # (B, L, d) each
        for j in range(len(slots))
    ]


def store_batch(caches: list[FeatureCache], slot: int, entry: CachedFrame) -> None:
    """Stores row i of a batched entry into caches[i] (without counting the frame)."""
    for row, cache in enumerate(caches):
        cache.store(slot, tuple(part[row : row + 1] for part in entry))  # (1, L, d) each


def write_batch(caches: list[FeatureCache], slot: int, entry: CachedFrame) -> None:
    """Stores row i of a batched entry into caches[i] and counts the frame in each."""
    for row, cache in enumerate(caches):
        cache.write(slot, tuple(part[row : row + 1] for part in entry))  # (1, L, d) each
