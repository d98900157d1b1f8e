"""Dilated ResNet backbones with output stride 8, as the TDNet sub-networks use them.

Parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4), which is also
the layout of the published TDNet checkpoints, so they load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

# Dilations of layer4's blocks ("multi-grid").
MULTI_GRID_DILATIONS = (4, 8, 16)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        dilation: int,
        second_dilation: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        # The published model's second conv uses the dilation of the layer, not the block's.
        self.conv2 = nn.Conv2d(
            planes, planes, 3, 1, padding=second_dilation, dilation=second_dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        dilation: int,
        second_dilation: int,  # unused: the bottleneck has a single 3x3 conv
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut
        return self.relu(out)


class DilatedResNet(nn.Module):
    """ResNet with layer3 and layer4 dilated instead of strided: output stride 8.

    Args:
        block: "basic" or "bottleneck".
        layers: number of blocks in each of the four stages.
        base_width: channels of the first stage (64 in the standard ResNets).
        deep_stem: three 3x3 convs (the first with stride 2) instead of one 7x7 conv.
    """

    def __init__(
        self, block: str, layers: tuple[int, int, int, int], base_width: int, deep_stem: bool
    ) -> None:
        super().__init__()
        block_type = Bottleneck if block == "bottleneck" else BasicBlock
        stem_channels = 2 * base_width if deep_stem else base_width
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, base_width, 3, 2, padding=1, bias=False),
                nn.BatchNorm2d(base_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(base_width, base_width, 3, 1, padding=1, bias=False),
                nn.BatchNorm2d(base_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(base_width, stem_channels, 3, 1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)

        self._in_channels = stem_channels
        w = base_width
        self.layer1 = self._make_layer(block_type, w, layers[0], stride=1, dilations=[1] * layers[0], layer_dilation=1)
        self.layer2 = self._make_layer(block_type, 2 * w, layers[1], stride=2, dilations=[1] * layers[1], layer_dilation=1)
        # layer3: first block undilated, the rest dilation 2.
        self.layer3 = self._make_layer(
            block_type, 4 * w, layers[2], stride=1, dilations=[1] + [2] * (layers[2] - 1), layer_dilation=2
        )
        self.layer4 = self._make_layer(
            block_type, 8 * w, layers[3], stride=1, dilations=list(MULTI_GRID_DILATIONS[: layers[3]]), layer_dilation=4
        )
        self.out_channels = self._in_channels

    def _make_layer(
        self,
        block_type: type[BasicBlock] | type[Bottleneck],
        planes: int,
        num_blocks: int,
        *,
        stride: int,
        dilations: list[int],
        layer_dilation: int,
    ) -> nn.Sequential:
        out_channels = planes * block_type.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        blocks = []
        for index, dilation in enumerate(dilations):
            blocks.append(
                block_type(
                    self._in_channels,
                    planes,
                    stride=stride if index == 0 else 1,
                    dilation=dilation,
                    second_dilation=layer_dilation,
                    downsample=downsample if index == 0 else None,
                )
            )
            self._in_channels = out_channels
        return nn.Sequential(*blocks)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer1 at stride 4, layer3 at stride 8, layer4 = the stride-8 features)."""
        layer1 = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        layer3 = self.layer3(self.layer2(layer1))
        return layer1, layer3, self.layer4(layer3)

    def forward(self, x: torch.Tensor, *, with_layer3: bool = False):
        """Returns the stride-8 features, and layer3's too when asked (for auxiliary losses)."""
        _, layer3, features = self.stages(x)
        return (features, layer3) if with_layer3 else features
