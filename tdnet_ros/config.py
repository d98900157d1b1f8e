"""Model configuration: one dataclass selects the TDNet variant, its widths and input size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a TDNet model.

    The published checkpoints are `td4-psp18` and `td2-psp50`; the other variants are
    narrower versions built by the same code (for the bundled model and small devices).
    """

    name: str = "td4-psp18"
    num_paths: int = 4  # N: sub-networks taking turns over consecutive frames
    block: str = "basic"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50)
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)  # residual blocks per stage
    deep_stem: bool = False  # three 3x3 convs (ResNet-50 "deep base") instead of one 7x7
    base_width: int = 64  # channels of the first stage; the last has 8x (times 4 for bottlenecks)
    key_channels: int = 64  # d_k of queries and keys
    value_channels: int = 512  # d_v of values and of the head input
    head_reduction: int = 4  # head's hidden channels = d_v / head_reduction
    pyramid_groups: int = 2  # P: each sub-network keeps one of P channel groups of its PSP output
    cache_stride: int = 4  # cached q, k, v are taken every cache_stride-th feature row and column
    # Hidden channels of the stride-4 detail refinement (model.DetailRefinement), which corrects
    # the head's stride-8 logits from layer1's features; 0 (the published model): none.
    detail_channels: int = 0
    # 3x3 layers of that refinement: the first fuses, the rest are residual blocks (1: none)
    detail_depth: int = 1
    # Channels of the head's hidden features the refinement also reads (projected by a 1x1
    # conv at stride 8, then upsampled beside the logits); 0: it reads the logits alone.
    detail_guide_channels: int = 0
    num_classes: int = 19
    # (height, width) the model runs at by default: the size it was trained at, unless exported
    # at another (training.export --input-size; the bundled model: trained at 512x1024, run at 640x1280)
    input_size: tuple[int, int] = (769, 1537)
    # How the stride-8 logits are upsampled to the input size: as the model was trained.
    # The published checkpoints use align_corners=True; this project's trainer trains with
    # False (the feature cells' own geometry), which a checkpoint stored without the field
    # (every one it wrote before the field existed) therefore means.
    upsample_align_corners: bool = False
    class_names: tuple[str, ...] = field(default=(), compare=False)  # empty: Cityscapes
    class_colors: tuple[tuple[int, int, int], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Ranges first: a stored configuration is checked before anything is built (a
        # checkpoint claiming 3000 sub-networks must not allocate them to find out).
        for name, (low, high) in _INT_RANGES.items():
            _check_int(name, getattr(self, name), low, high)
        if not isinstance(self.layers, tuple) or len(self.layers) != 4:
            raise ValueError(f"layers must be 4 block counts, got {self.layers!r}")
        for count in self.layers:
            _check_int("layers", count, 1, 64)
        if not isinstance(self.input_size, tuple) or len(self.input_size) != 2:
            raise ValueError(f"input_size must be (height, width), got {self.input_size!r}")
        for side in self.input_size:
            _check_int("input_size", side, 16, 8192)
        if self.value_channels % self.head_reduction:
            raise ValueError(
                f"value_channels {self.value_channels} must be a multiple of head_reduction {self.head_reduction}"
            )
        if self.class_colors and (
            len(self.class_colors) != self.num_classes
            or any(len(c) != 3 or any(not isinstance(v, int) or not 0 <= v <= 255 for v in c) for c in self.class_colors)
        ):
            raise ValueError(f"class_colors must be {self.num_classes} [r, g, b] triples in 0..255")
        if self.detail_guide_channels and not self.detail_channels:
            raise ValueError("detail_guide_channels needs a detail refinement (detail_channels above 0)")
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.feature_channels % (4 * self.pyramid_groups):
            raise ValueError("feature channels must divide into 4 pyramid branches per group")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_channels(self) -> int:
        """C: channels of the backbone output and of the pyramid pooling output."""
        return self.base_width * 8 * self.expansion

    @property
    def feature_size(self) -> tuple[int, int]:
        """Feature map size (stride 8) for the configured input size."""
        return feature_size_for(self.input_size)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The configuration of a named variant, optionally with some fields replaced."""
        if name not in VARIANTS:
            known = ", ".join(sorted(VARIANTS))
            raise ValueError(f"unknown model {name!r}; known models: {known}")
        return dataclasses.replace(VARIANTS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model configuration keys: {unknown}")
        values = dict(values)
        for key in ("layers", "input_size", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        if "class_colors" in values:
            values["class_colors"] = tuple(tuple(c) for c in values["class_colors"])
        return cls(**values)


#: Accepted ranges of the integer fields (wide enough for every real variant).
_INT_RANGES = {
    "num_paths": (1, 16),
    "base_width": (1, 1024),
    "key_channels": (1, 4096),
    "value_channels": (1, 8192),
    "head_reduction": (1, 8192),
    "pyramid_groups": (1, 64),
    "cache_stride": (1, 64),
    "detail_channels": (0, 4096),
    "detail_depth": (1, 16),
    "detail_guide_channels": (0, 4096),
    "num_classes": (1, 65535),  # label images are mono16 above 255 classes
}


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be within {low}..{high}, got {value}")


def feature_size_for(input_size: tuple[int, int], stride: int = 8) -> tuple[int, int]:
    """Size of the stride-8 feature map (stem conv /2, max-pool /2, layer2 /2, each rounding
    up), or with `stride` 4 of layer1's map, where the detail refinement's logits are."""
    if stride not in (4, 8):
        raise ValueError(f"the backbone's maps have stride 4 or 8, not {stride}")

    def down(n: int) -> int:
        return (n - 1) // 2 + 1

    halvings = 3 if stride == 8 else 2
    size = input_size
    for _ in range(halvings):
        size = tuple(down(n) for n in size)
    return size  # type: ignore[return-value]


VARIANTS: dict[str, ModelConfig] = {
    "td4-psp18": ModelConfig(upsample_align_corners=True),
    "td2-psp50": ModelConfig(
        name="td2-psp50",
        upsample_align_corners=True,
        num_paths=2,
        block="bottleneck",
        layers=(3, 4, 6, 3),
        deep_stem=True,
        value_channels=512,
        head_reduction=2,
    ),
    # Narrow TD4 (ResNet-18 layout at 1/4 width): the bundled default model's architecture,
    # at a 1024x512 input.
    "td4-r18-narrow": ModelConfig(
        name="td4-r18-narrow",
        base_width=16,
        key_channels=32,
        value_channels=128,
        head_reduction=2,
        input_size=(256, 512),
    ),
    # Tiny TD4 for tests: fast enough to run many frames on a CPU in a unit test.
    "td4-tiny": ModelConfig(
        name="td4-tiny",
        layers=(1, 1, 1, 1),
        base_width=8,
        key_channels=16,
        value_channels=32,
        head_reduction=2,
        input_size=(128, 256),
    ),
}
