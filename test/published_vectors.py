"""The shared checkpoint-compatibility vectors: weights by the fill recipe, frames, expected outputs.

See ../shared/vectors/README.md. The weights are rebuilt from the manifest and the seed
and saved as a published-layout `.pkl`, so tests load them through the real loader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch

VECTORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "vectors"
PUBLISHED_MODELS = ("td4-psp18", "td2-psp50")
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def vector_files(model: str) -> list[Path]:
    """All vector files for a model (the public one and any others dropped beside it)."""
    return sorted(VECTORS_DIR.glob(f"{model}_*.npz"))


def filled_state_dict(model: str, seed: int) -> dict[str, torch.Tensor]:
    """The fill recipe: a published-layout state dict drawn from the manifest and the seed."""
    manifest = json.loads((VECTORS_DIR / f"{model}.manifest.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(manifest):
        shape = manifest[key]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = 0.75 + 0.5 * torch.rand(shape, generator=generator)
        elif key.endswith("bias"):
            state[key] = 0.05 * torch.randn(shape, generator=generator)
        elif len(shape) == 1 or "layer_norm" in key:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = math.sqrt(2 / math.prod(shape[1:])) * torch.randn(shape, generator=generator)
    return state


def published_preprocess(frame: np.ndarray) -> torch.Tensor:
    """The published pipeline: cv2 bilinear resize on uint8, normalization in float64."""
    resized = cv2.resize(frame, (1537, 769))
    normalized = ((resized / 255.0 - MEAN) / STD).astype(np.float32)
    return torch.from_numpy(normalized).permute(2, 0, 1)[None].contiguous()  # (1, 3, 769, 1537)
