"""Per-stream feature cache and its schedule: which sub-network runs next, which cached
frames it reads in which order, and where its own frame goes.

Frame t of a stream runs sub-network t mod N and is stored in slot t mod N (a ring of N
slots): the slot it overwrites held frame t-N, the one that just fell out of the window,
so the N-1 other slots always hold the previous N-1 frames. Every runner (eager, compiled,
CUDA graphs, ONNX, TensorRT) asks the cache for this; none computes it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig, feature_size_for

#: One frame's subsampled (query, key, value): (B, L, d_k), (B, L, d_k), (B, L, d_v).
CachedFrame = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def read_order(num_paths: int, path: int) -> list[int]:
    """Slots of the cached frames, oldest first, when a frame runs sub-network `path`.

    Frame t runs path t mod N, so the previous N-1 frames ran paths t+1 ... t+N-1 (mod N).
    """
    return [(path + j) % num_paths for j in range(1, num_paths)]


def cached_tokens(config: ModelConfig, input_size: tuple[int, int]) -> int:
    """L: tokens of one cached frame at this input size (features subsampled by cache_stride)."""
    h, w = feature_size_for(input_size)
    s = config.cache_stride
    return ((h - 1) // s + 1) * ((w - 1) // s + 1)


@dataclass(frozen=True)
class CacheSnapshot:
    """A copy of a cache's contents and count (see FeatureCache.snapshot)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    frames_written: int


class FeatureCache:
    """Preallocated, fixed-shape storage of the cached frames' query, key and value.

    Shapes never change after allocation, so a captured CUDA graph or a compiled step can
    read and write it in place.
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

    @classmethod
    def for_model(
        cls, config: ModelConfig, input_size: tuple[int, int], *, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "FeatureCache":
        """A cache sized for `config`'s model at `input_size` (one stream)."""
        return cls(config.num_paths, cached_tokens(config, input_size), config.key_channels,
                   config.value_channels, device=device, dtype=dtype)

    # -- the schedule ---------------------------------------------------------------------

    @property
    def next_path(self) -> int:
        """The sub-network the next frame runs (and the slot it is stored in)."""
        return self.frames_written % self.num_paths

    @property
    def warm(self) -> bool:
        """True once it holds N-1 frames, so that the next frame gets the attention term."""
        return self.frames_written >= self.num_paths - 1 and self.num_paths > 1

    def read_order(self, path: int | None = None) -> list[int]:
        """Slots the frame running `path` (default: the next one) reads, oldest first."""
        return read_order(self.num_paths, self.next_path if path is None else path)

    def advance(self) -> None:
        """Counts one frame as written (its entry stored by the caller, or by a graph replay)."""
        self.frames_written += 1

    # -- contents -------------------------------------------------------------------------

    def store(self, slot: int, entry: CachedFrame) -> None:
        """Copies one frame's (q, k, v) into a slot, without counting it as a frame."""
        query, key, value = entry
        self.query[slot].copy_(query)  # (B, L, d_k)
        self.key[slot].copy_(key)
        self.value[slot].copy_(value)  # (B, L, d_v)

    def write(self, slot: int, entry: CachedFrame) -> None:
        """Stores this frame's (q, k, v) and counts it (the count decides the schedule)."""
        self.store(slot, entry)
        self.advance()

    def read(self, slots: list[int]) -> list[CachedFrame] | None:
        """The cached frames in `slots` order (oldest first), or None while not warm."""
        if not self.warm:
            return None
        return [(self.query[s], self.key[s], self.value[s]) for s in slots]

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(self.query.clone(), self.key.clone(), self.value.clone(), self.frames_written)

    def restore(self, snapshot: CacheSnapshot) -> None:
        self.query.copy_(snapshot.query)
        self.key.copy_(snapshot.key)
        self.value.copy_(snapshot.value)
        self.frames_written = snapshot.frames_written

    def reset(self) -> None:
        self.frames_written = 0


# Several streams at the same sub-network step run as one batch: their caches are read
# as one (B, L, d) batch per cached frame and this frame's entry is split back by row.


def read_batch(caches: list[FeatureCache], path: int) -> list[CachedFrame] | None:
    """The cached frames the step `path` reads, of several streams, concatenated along the
    batch (row i = caches[i]); None while they are not warm (they are warm or cold together)."""
    slots = caches[0].read_order(path)
    if len(caches) == 1:
        return caches[0].read(slots)
    per_cache = [cache.read(slots) for cache in caches]
    if any(frames is None for frames in per_cache):
        return None
    return [
        tuple(torch.cat([frames[j][part] for frames in per_cache]) for part in range(3))  # (B, L, d) each
        for j in range(len(slots))
    ]


def read_index(caches: list[FeatureCache], path: int) -> torch.Tensor:
    """The read order of step `path` as an index tensor on the caches' device (built
    before a CUDA graph capture, in which no host-to-device copy may happen)."""
    return torch.tensor(caches[0].read_order(path), device=caches[0].query.device)


def gather_batch(
    caches: list[FeatureCache], path_or_index: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several streams' cached frames for step `path` (or a prebuilt `read_index`), oldest
    first, stacked and batched: (N-1, B, L, d) each, row i of the batch from caches[i]."""
    index = path_or_index if isinstance(path_or_index, torch.Tensor) else read_index(caches, path_or_index)
    parts = [(c.query.index_select(0, index), c.key.index_select(0, index), c.value.index_select(0, index))
             for c in caches]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # (N-1, B, L, d)


def store_batch(caches: list[FeatureCache], slot: int, entry: CachedFrame) -> None:
    """Stores row i of a batched entry into caches[i] (without counting the frame)."""
    for row, cache in enumerate(caches):
        cache.store(slot, tuple(part[row : row + 1] for part in entry))  # (1, L, d) each


def write_batch(caches: list[FeatureCache], slot: int, entry: CachedFrame) -> None:
    """Stores row i of a batched entry into caches[i] and counts the frame in each."""
    store_batch(caches, slot, entry)
    for cache in caches:
        cache.advance()
