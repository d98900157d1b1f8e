"""Inference-time folding of BatchNorm layers into the convolutions before them."""

from __future__ import annotations

import torch
from torch import nn

# Attribute pairs (convolution, its BatchNorm) in the ResNet blocks and stems.
_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Makes `conv` compute bn(conv(x)) in inference mode; `bn` can then be dropped."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Conv2d):
        return module[-1]
    return None


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Folds every BatchNorm2d that directly follows a Conv2d into it (in place, eval only)."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    fold_conv_bn(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
        for conv_name, bn_name in _NAMED_PAIRS:
            conv = _last_conv(getattr(module, conv_name, None))
            bn = getattr(module, bn_name, None)
            if conv is not None and isinstance(bn, nn.BatchNorm2d):
                fold_conv_bn(conv, bn)
                setattr(module, bn_name, nn.Identity())
    return model
