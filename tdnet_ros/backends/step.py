"""One exportable sub-network step: `TDNet.step` with the feature cache as explicit tensors.

Every backend (torch.compile, CUDA graphs, ONNX, TensorRT) runs this one module, built
per (path, warm/cold). Shapes are static:

    cold: forward(x)                 -> logits, q, k, v
    warm: forward(x, cq, ck, cv)     -> logits, q, k, v
    x  (B, 3, H, W)                    normalized frame, in the model's conv precision
    cq (N-1, B, L, d_k), ck (N-1, B, L, d_k), cv (N-1, B, L, d_v)
                                       cached frames stacked oldest -> newest (float32)
    logits (B, K, H/8, W/8); q (B, L, d_k), k (B, L, d_k), v (B, L, d_v): this frame's
                                       entry for the cache (float32)
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import cached_tokens
from ..model import TDNet


class StepModule(nn.Module):
    """Sub-network `path` of `model`, cold (no attention term) or warm (N-1 cached frames).

    Only sub-network `path` is registered as a child, so that an export carries its weights
    only; the model itself is kept as a plain attribute and its `step` does the work.
    """

    def __init__(self, model: TDNet, path: int, warm: bool) -> None:
        super().__init__()
        if warm and model.num_paths < 2:
            raise ValueError("a model with one sub-network has no warm step")
        self.net = model.paths[path]  # registered: its parameters are this module's
        object.__setattr__(self, "_model", model)  # not registered: no duplicate parameters
        self.path = path
        self.warm = warm

    def forward(
        self,
        x: torch.Tensor,
        cached_query: torch.Tensor | None = None,
        cached_key: torch.Tensor | None = None,
        cached_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cached = None
        if self.warm:
            if cached_query is None or cached_key is None or cached_value is None:
                raise ValueError("the warm step needs the cached query, key and value")
            # (N-1, B, L, d) -> N-1 frames of (B, L, d), oldest first
            cached = [(cached_query[j], cached_key[j], cached_value[j]) for j in range(cached_query.shape[0])]
        out = self._model.step(x, self.path, cached)
        query, key, value = out.cache_entry
        return out.logits, query, key, value


def step_name(path: int, warm: bool) -> str:
    """File stem of a step's exported artefact: `path0_cold`, `path2_warm`, ..."""
    return f"path{path}_{'warm' if warm else 'cold'}"


def step_keys(model: TDNet) -> list[tuple[int, bool]]:
    """All (path, warm) steps a stream runs: every path cold, and warm when N > 1."""
    warm_options = (False, True) if model.num_paths > 1 else (False,)
    return [(path, warm) for warm in warm_options for path in range(model.num_paths)]


def example_inputs(
    model: TDNet,
    input_size: tuple[int, int],
    warm: bool,
    *,
    batch: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the step's static shapes (for export, compilation and tests)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *input_size, generator=generator).to(device, model.conv_dtype)  # (B, 3, H, W)
    if not warm:
        return (x,)
    c = model.config
    shape = (model.num_paths - 1, batch, cached_tokens(model.config, input_size))
    dtype = model.attention_dtype
    query = torch.randn(*shape, c.key_channels, generator=generator).to(device, dtype)  # (N-1, B, L, d_k)
    key = torch.randn(*shape, c.key_channels, generator=generator).to(device, dtype)  # (N-1, B, L, d_k)
    value = torch.randn(*shape, c.value_channels, generator=generator).to(device, dtype)  # (N-1, B, L, d_v)
    return x, query, key, value
