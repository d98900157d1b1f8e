"""Widening a trained student: the same function at a larger `base_width`.

Training a wider student from scratch costs many sittings; widening the shipped one keeps
what it has learnt and adds capacity. Every backbone channel of the wider model is a copy
of one of the narrow model's channels (Net2WiderNet, Chen et al., ICLR 2016): a conv's
output channel a takes the kernels of old channel `mapping[a]`, its BatchNorm takes that
channel's parameters and statistics, and the next conv divides each input channel's
weights by how many copies of its old channel there are. Summed over the copies, the next
layer then sees exactly what it saw before.

Copies that stayed exact would receive identical gradients and never become different
channels, so `noise` perturbs the kernels of the added copies (relative to each kernel's
spread); at 0 the wider model computes what the narrow one did, to rounding.

What widens: the stem, the four stages (the residual shortcuts force one mapping per
stage output), the pyramid branches and the encoding's inputs. Keys, values, attention,
LayerNorm and head keep their widths. The pyramid keeps channel group g of the features
(g = path mod P), so every new channel of group g copies an old channel of group g, and
the old channels keep their places.
"""

from __future__ import annotations

import dataclasses

import torch

from tdnet_ros.config import ModelConfig
from tdnet_ros.model import PYRAMID_BINS

State = dict[str, torch.Tensor]


def channel_mapping(old: int, new: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """(new,) old channel index of each new channel: group g's new channels copy group g's old
    ones, the first of them in order, the rest drawn at random (each old channel at most once
    while the group has any left)."""
    if new < old or old % groups or new % groups:
        raise ValueError(f"cannot widen {old} channels to {new} in {groups} groups")
    per_old, per_new = old // groups, new // groups
    parts = []
    for g in range(groups):
        start = g * per_old
        extra = [torch.randperm(per_old, generator=generator) for _ in range(-(-(per_new - per_old) // per_old))]
        drawn = torch.cat(extra)[: per_new - per_old] if extra else torch.empty(0, dtype=torch.long)
        parts += [torch.arange(per_old) + start, drawn + start]
    return torch.cat(parts)


def widen_state(state: State, old: ModelConfig, new: ModelConfig, *, noise: float = 0.01,
                generator: torch.Generator | None = None) -> State:
    """The state dict of `new` (old's configuration at a larger base_width) computing what
    `state` computes in `old` (exactly when noise is 0)."""
    if dataclasses.replace(old, base_width=new.base_width, name=new.name, input_size=new.input_size) != new:
        raise ValueError("widening changes only base_width (and the name and input size)")
    if old.block != "basic" or old.deep_stem or old.detail_channels:
        raise ValueError(f"widening supports the basic-block, single-conv-stem layout without the detail "
                         f"refinement, not {old.name!r}")
    generator = generator or torch.Generator().manual_seed(0)
    # Noise draws from its own generator, so the mappings do not depend on it.
    noise_generator = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=generator)))
    groups = old.pyramid_groups

    def mapping(width: int) -> torch.Tensor:
        return channel_mapping(width * old.base_width, width * new.base_width, groups, generator)

    widened = dict(state)
    for path in range(old.num_paths):
        net = _PathWidener(widened, f"paths.{path}.", noise, noise_generator)
        stage = mapping(1)  # stem output; layer1 (no downsample) shares it through its shortcut
        net.conv("backbone.conv1", out=stage, inp=None)
        net.batch_norm("backbone.bn1", stage)
        for index, (blocks, width) in enumerate(zip(old.layers, (1, 2, 4, 8)), start=1):
            previous = stage
            if f"paths.{path}.backbone.layer{index}.0.downsample.0.weight" in state:
                stage = mapping(width)
                net.conv(f"backbone.layer{index}.0.downsample.0", out=stage, inp=previous)
                net.batch_norm(f"backbone.layer{index}.0.downsample.1", stage)
            for block in range(blocks):
                prefix = f"backbone.layer{index}.{block}"
                inner = mapping(width)
                net.conv(f"{prefix}.conv1", out=inner, inp=previous if block == 0 else stage)
                net.batch_norm(f"{prefix}.bn1", inner)
                net.conv(f"{prefix}.conv2", out=stage, inp=inner)
                net.batch_norm(f"{prefix}.bn2", stage)
        branch = channel_mapping(old.feature_channels // 4, new.feature_channels // 4, groups, generator)
        for k in range(len(PYRAMID_BINS)):
            net.conv(f"pyramid.branches.{k}.0", out=branch, inp=stage)
            net.batch_norm(f"pyramid.branches.{k}.1", branch)
        encoding_input = _pyramid_output_mapping(stage, branch, old.feature_channels, path % groups, groups)
        for conv in ("encoding.query.0", "encoding.key.0", "encoding.value"):
            net.conv(conv, out=None, inp=encoding_input)
    return widened


def _pyramid_output_mapping(features: torch.Tensor, branch: torch.Tensor, channels: int, group: int,
                            groups: int) -> torch.Tensor:
    """Old pyramid-output channel of each new one: group `group` of the features, then of each
    branch, concatenated (PyramidPooling.forward)."""

    def group_of(mapping: torch.Tensor, old_width: int) -> torch.Tensor:
        per_new, per_old = len(mapping) // groups, old_width // groups
        return mapping[group * per_new:(group + 1) * per_new] - group * per_old  # old index within the group

    parts = [group_of(features, channels)]
    offset = channels // groups
    for _ in PYRAMID_BINS:
        parts.append(group_of(branch, channels // 4) + offset)
        offset += channels // 4 // groups
    return torch.cat(parts)


class _PathWidener:
    """Rewrites one sub-network's tensors in a state dict, layer by layer."""

    def __init__(self, state: State, prefix: str, noise: float, generator: torch.Generator) -> None:
        self.state, self.prefix, self.noise, self.generator = state, prefix, noise, generator

    def conv(self, name: str, *, out: torch.Tensor | None, inp: torch.Tensor | None) -> None:
        key = f"{self.prefix}{name}.weight"
        weight = self.state[key]  # (out, in, kh, kw)
        if inp is not None:
            copies = torch.bincount(inp, minlength=weight.shape[1]).to(weight.dtype)
            weight = weight[:, inp] / copies[inp].view(1, -1, 1, 1)
        if out is not None:
            weight = weight[out].clone()
            added = _added_copies(out)
            if self.noise and added.any():
                spread = weight[added].flatten(1).std(dim=1).view(-1, 1, 1, 1)
                weight[added] += self.noise * spread * torch.randn(
                    weight[added].shape, generator=self.generator, dtype=weight.dtype)
            bias_key = f"{self.prefix}{name}.bias"
            if bias_key in self.state:
                self.state[bias_key] = self.state[bias_key][out].clone()
        self.state[key] = weight

    def batch_norm(self, name: str, out: torch.Tensor) -> None:
        for field in ("weight", "bias", "running_mean", "running_var"):
            key = f"{self.prefix}{name}.{field}"
            self.state[key] = self.state[key][out].clone()


def _added_copies(mapping: torch.Tensor) -> torch.Tensor:
    """(new,) bool: the channels that repeat an old channel already seen earlier in `mapping`."""
    seen: set[int] = set()
    added = torch.zeros(len(mapping), dtype=torch.bool)
    for index, old in enumerate(mapping.tolist()):
        added[index] = old in seen
        seen.add(old)
    return added
