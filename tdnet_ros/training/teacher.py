"""The distillation teachers. The single-frame teacher: a dilated ResNet + pyramid pooling
whose features are split into the student's N channel groups, each with its own head
("grouped" outputs), plus a full head. Or a trained TDNet run at several scales
(ScaledTDNetTeacher), which teaches the full output only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdnet_ros.backbone import DilatedResNet
from tdnet_ros.checkpoint import FORMAT, CheckpointError, check_finite, load_file, model_from_checkpoint, save_file
from tdnet_ros.model import TDNet
from tdnet_ros.runtime import scaled_size

TEACHER_FORMAT = "tdnet_ros-teacher/1"


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture of the teacher (deeper and wider than the student's sub-networks)."""

    block: str = "basic"  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-34 layout
    base_width: int = 32
    deep_stem: bool = False
    feature_channels: int = 256  # channels after the pyramid fusion conv, split into groups
    num_groups: int = 4  # the student's N
    num_classes: int = 19

    def __post_init__(self) -> None:
        if self.feature_channels % self.num_groups:
            raise ValueError(
                f"teacher feature_channels {self.feature_channels} do not split into {self.num_groups} groups"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TeacherConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown teacher configuration keys: {unknown}")
        values = dict(values)
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _head(cin: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn_relu(cin, hidden, 3), nn.Dropout2d(0.1), nn.Conv2d(hidden, num_classes, 1))


class TeacherNet(nn.Module):
    """PSP teacher. `forward` returns {"out", "groups", "aux"} logits at stride 8."""

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DilatedResNet(config.block, config.layers, config.base_width, config.deep_stem)
        c = self.backbone.out_channels
        c3 = 4 * config.base_width * (4 if config.block == "bottleneck" else 1)
        self.bins = (1, 2, 3, 6)
        self.pool_convs = nn.ModuleList(_conv_bn_relu(c, c // 4, 1) for _ in self.bins)
        self.fuse = _conv_bn_relu(2 * c, config.feature_channels, 3)  # (B, D, h, w), D split in groups
        group = config.feature_channels // config.num_groups
        self.full_head = _head(config.feature_channels, config.feature_channels // 2, config.num_classes)
        self.group_heads = nn.ModuleList(
            _head(group, max(group // 2, 8), config.num_classes) for _ in range(config.num_groups)
        )
        self.aux_head = _head(c3, max(c3 // 2, 8), config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        features, layer3 = self.backbone(x, with_layer3=True)  # (B, C, h, w), (B, C3, h, w)
        size = features.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(features, b)), size=size, mode="bilinear", align_corners=False)
            for b, conv in zip(self.bins, self.pool_convs)
        ]
        fused = self.fuse(torch.cat([features, *pooled], dim=1))  # (B, D, h, w)
        chunks = fused.chunk(self.config.num_groups, dim=1)  # N x (B, D/N, h, w)
        return {
            "out": self.full_head(fused),
            "groups": [head(chunk) for head, chunk in zip(self.group_heads, chunks)],
            "aux": self.aux_head(layer3),
        }


def save_teacher(model: TeacherNet, path: str | Path, **extra: Any) -> Path:
    """Saves the teacher with its configuration (loads with weights_only=True; atomically)."""
    config = asdict(model.config)
    return save_file({"format": TEACHER_FORMAT, "config": config, "state_dict": model.state_dict(), **extra}, path)


def load_teacher(path: str | Path) -> TeacherNet:
    return _teacher_from_content(load_file(path, "teacher checkpoint"), path)


def _teacher_from_content(content: Any, path: str | Path) -> TeacherNet:
    """The grouped teacher in a file's `content` (as load_file read it); `path` names it in errors."""
    if not isinstance(content, dict) or content.get("format") != TEACHER_FORMAT:
        raise CheckpointError(f"{path} is not a teacher checkpoint written by tdnet-train")
    try:
        model = TeacherNet(TeacherConfig.from_dict(content["config"]))
        check_finite(content["state_dict"], str(path))
        model.load_state_dict(content["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"teacher checkpoint {path} does not fit its configuration: {str(error)[:300]}") from None
    except ValueError as error:
        raise CheckpointError(f"teacher checkpoint {path}: {error}") from None
    return model.eval()


class ScaledTDNetTeacher(nn.Module):
    """A trained TDNet as the distillation teacher of the full output (loss.kd_full), run over
    each clip at several multiples of its size: the model itself at the scales of its
    multi-scale inference (`Segmenter(scales=...)`), say, whose labels beat its one scale.

    Its output for the clip's last frame is the log of the scales' mean softmax
    probabilities at the student's logit size: as logits, their softmax is that mean.
    """

    def __init__(self, model: TDNet, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model.eval()
        self.scales = scales

    @torch.no_grad()
    def forward(self, clip: list[torch.Tensor], first_path: int, logits_size: tuple[int, int]) -> torch.Tensor:
        """clip: N x (B, 3, h, w) normalized frames; returns (B, K, *logits_size)."""
        size = tuple(clip[0].shape[-2:])
        probabilities = torch.zeros(())
        for scale in self.scales:
            scaled = scaled_size(size, scale)
            frames = clip if scaled == size else [
                F.interpolate(frame, scaled, mode="bilinear", align_corners=False) for frame in clip]
            logits = self.model.forward_clip(frames, first_path)[-1].logits.float()  # (B, K, h', w')
            logits = F.interpolate(logits, logits_size, mode="bilinear",
                                   align_corners=self.model.config.upsample_align_corners)
            probabilities = probabilities + torch.softmax(logits, dim=1)
        return torch.log(probabilities / len(self.scales)).clamp_min(-30.0)  # (B, K, *logits_size)


def load_distillation_teacher(path: str | Path, scales: tuple[float, ...]) -> TeacherNet | ScaledTDNetTeacher:
    """The teacher of `teacher_checkpoint`: a grouped teacher (`tdnet-train` stage teacher),
    or a TDNet checkpoint run at `scales`, which a grouped teacher does not take.

    Raises:
        CheckpointError: neither kind of checkpoint, or scales given with a grouped teacher.
    """
    content = load_file(path, "teacher checkpoint")
    if isinstance(content, dict) and content.get("format") == TEACHER_FORMAT:
        if tuple(scales) != (1.0,):
            raise CheckpointError(f"teacher_scales {list(scales)} apply to a TDNet teacher_checkpoint; "
                                  f"{path} is a grouped teacher, which runs at the clip's size")
        return _teacher_from_content(content, path)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"teacher_checkpoint {path} is neither a grouped teacher nor a TDNet checkpoint "
                              "written by tdnet-train")
    return ScaledTDNetTeacher(model_from_checkpoint(content, path), tuple(scales))
