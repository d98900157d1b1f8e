"""TDNet: N shallow sub-networks taking turns over frames, recomposed by attention.

One time step (frame t, sub-network i = t mod N):
    features = backbone_i(frame)                         # (B, C, h, w), stride 8
    z = pyramid_i(features)                              # (B, C, h, w), channel group i mod P
    q, v = encoding_i(z) at full resolution              # (B, h*w, d_k), (B, d_v, h, w)
    the cached frames' (q, k, v), oldest to newest, are propagated onto this frame by
    N-1 attention steps; the head sees layer_norm(propagated + v).
    With `detail_channels`, the head's stride-8 logits are refined at stride 4 from layer1.
The cached q, k, v are taken on z subsampled every `cache_stride` rows and columns.

The model holds no state: `step` takes the cache tensors and returns what to cache, so
the caller (the segmenter, the trainer) owns temporal state per stream.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import DilatedResNet
from .cache import CachedFrame
from .config import ModelConfig

PYRAMID_BINS = (1, 2, 3, 6)

StageTimer = Callable[[str], ContextManager]


def _no_timer(_: str) -> ContextManager:
    return nullcontext()


class PyramidPooling(nn.Module):
    """PSP module that keeps one channel group of the features and of each pooled branch."""

    def __init__(self, channels: int, groups: int, group_index: int) -> None:
        super().__init__()
        branch_channels = channels // 4
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, branch_channels, 1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
            for _ in PYRAMID_BINS
        )
        group = channels // groups
        self.feature_slice = slice(group_index * group, (group_index + 1) * group)
        branch_group = branch_channels // groups
        self.branch_slice = slice(group_index * branch_group, (group_index + 1) * branch_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        parts = [x[:, self.feature_slice]]  # (B, C/P, h, w)
        for bins, branch in zip(PYRAMID_BINS, self.branches):
            pooled = branch(F.adaptive_avg_pool2d(x, bins))[:, self.branch_slice]  # (B, C/4P, bins, bins)
            parts.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        return torch.cat(parts, dim=1)  # (B, C, h, w)


def _query_or_key(in_channels: int, key_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, key_channels, 1),
        nn.BatchNorm2d(key_channels),
        nn.LeakyReLU(0.01),
        nn.Conv2d(key_channels, key_channels, 1),
    )


class Encoding(nn.Module):
    """Query, key and value projections (1x1 convs) of a sub-network's PSP output."""

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, cache_stride: int) -> None:
        super().__init__()
        self.query = _query_or_key(in_channels, key_channels)
        self.key = _query_or_key(in_channels, key_channels)
        self.value = nn.Conv2d(in_channels, value_channels, 1)
        self.cache_stride = cache_stride

    def forward(self, z: torch.Tensor):
        """Returns the current frame's full-resolution q and v, and the (q, k, v) to cache.

        All projections are pointwise, so the subsampled q and v are slices of the
        full-resolution ones; only the key needs its own (small) pass.
        """
        s = self.cache_stride
        q_map = self.query(z)  # (B, d_k, h, w)
        v_map = self.value(z)  # (B, d_v, h, w)
        k_small = self.key(z[:, :, ::s, ::s])  # (B, d_k, h', w')
        q = _to_tokens(q_map)  # (B, h*w, d_k)
        cached = (
            _to_tokens(q_map[:, :, ::s, ::s]),  # (B, h'*w', d_k)
            _to_tokens(k_small),  # (B, h'*w', d_k)
            _to_tokens(v_map[:, :, ::s, ::s]),  # (B, h'*w', d_v)
        )
        return q, v_map, cached


#: Most attention scores held at once on the CPU (elements; 256 MB in float32). The
#: published td4-psp18 at 769x1537 needs 6.9e7 (two chunks); a 4096x4096 frame with
#: input_size "frame" would need 1.3e10 (51 GB) in one piece.
MAX_SCORE_ELEMENTS = 1 << 26


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class AttentionStep(nn.Module):
    """softmax(q k^T / sqrt(d_k)) v, then a 1x1 projection of the values.

    The projection is linear and each attention row sums to one, so it is applied to the
    (few) cached values before the attention instead of to the (many) outputs after it.
    """

    def __init__(self, value_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(value_channels, value_channels, 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # query (B, Lq, d_k), key (B, Lk, d_k), value (B, Lk, d_v) -> (B, Lq, d_v)
        projected = F.linear(value, self.proj.weight.flatten(1), self.proj.bias)  # (B, Lk, d_v)
        if query.is_cuda:
            return F.scaled_dot_product_attention(query, key, projected)
        # On CPUs two batched matmuls beat the fused kernel for these shapes (Lq ~ 2e4,
        # Lk ~ 1e3, d_v = 512: 0.25 s against 0.32 s per frame on one core, measured).
        # Queries go in chunks, so that the (B, rows, Lk) scores stay within
        # MAX_SCORE_ELEMENTS whatever the input size.
        batch, length = query.shape[:2]
        rows = max(1, MAX_SCORE_ELEMENTS // (batch * key.shape[1]))
        if rows >= length:
            return self._attend(query, key, projected)
        out = query.new_empty(batch, length, projected.shape[-1])  # (B, Lq, d_v)
        for start in range(0, length, rows):
            out[:, start:start + rows] = self._attend(query[:, start:start + rows], key, projected)
        return out

    @staticmethod
    def _attend(query: torch.Tensor, key: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(query, key.transpose(1, 2)).mul_(query.shape[-1] ** -0.5)  # (B, Lq, Lk)
        return torch.bmm(scores.softmax(dim=-1), projected)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over (h, w) whose affine parameters are resized to other feature sizes.

    The published checkpoints' parameters are (97, 193), which pins them to a 769x1537
    input; for other sizes the parameters are bilinearly resized to the feature map.
    """

    def __init__(self, feature_size: tuple[int, int]) -> None:
        super().__init__(list(feature_size))

    @staticmethod
    def resize_affine(weight: torch.Tensor, bias: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The (h0, w0) weight and bias bilinearly resized to `size`: (2, h, w)."""
        params = torch.stack([weight, bias])[None]  # (1, 2, h0, w0)
        return F.interpolate(params, size, mode="bilinear", align_corners=True)[0]

    def window_affine(self, window: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The weight and bias under each sample's window of the frame, sampled at `size`.

        window: (B, 4) (top, left, bottom, right) in grid_sample's align_corners=True
        coordinates of the whole frame (training.augment.crop_window); (-1, -1, 1, 1) gives
        exactly `resize_affine`. Returns (B, 2, h, w).
        """
        h, w = size
        steps_y = torch.linspace(0, 1, h, device=window.device, dtype=window.dtype)
        steps_x = torch.linspace(0, 1, w, device=window.device, dtype=window.dtype)
        top, left, bottom, right = window.unbind(1)  # (B,) each
        ys = top[:, None] + (bottom - top)[:, None] * steps_y  # (B, h)
        xs = left[:, None] + (right - left)[:, None] * steps_x  # (B, w)
        b = len(window)
        grid = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], -1)  # (B, h, w, 2): x, y
        params = torch.stack([self.weight, self.bias])[None].expand(b, -1, -1, -1)  # (B, 2, h0, w0)
        return F.grid_sample(params, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def forward(self, x: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, h, w). window: (B, 4), where each sample lies in its frame (training on
        crops, see `window_affine`); None for whole frames."""
        size = tuple(x.shape[-2:])
        if window is not None:
            affine = self.window_affine(window.to(self.weight.dtype), size)  # (B, 2, h, w)
            weight, bias = affine[:, :1], affine[:, 1:]  # (B, 1, h, w) each, broadcast over C
        elif size != tuple(self.normalized_shape):
            weight, bias = self.resize_affine(self.weight, self.bias, size)
        else:
            weight, bias = self.weight, self.bias
        if x.is_contiguous() and window is None:
            return F.layer_norm(x, size, weight, bias, eps=self.eps)
        # Channels-last input (normalized without a copy to NCHW) or per-sample parameters.
        var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)  # (B, C, 1, 1)
        return (x - mean).mul_(torch.rsqrt(var + self.eps)).mul_(weight).add_(bias)


def fit_layer_norms(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with every LayerNorm2d's affine parameters resized to `model`'s feature size.

    A checkpoint trained at another input size then starts from exactly what it computes
    when run at this size (its forward resizes the parameters the same way). Used to
    continue training at a new size; every other tensor must still match.
    """
    fitted = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LayerNorm2d):
            continue
        weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        size = tuple(module.normalized_shape)
        if weight is None or bias is None or tuple(weight.shape) == size:
            continue
        fitted[f"{name}.weight"], fitted[f"{name}.bias"] = LayerNorm2d.resize_affine(weight, bias, size)
    return fitted


class Head(nn.Sequential):
    """3x3 conv + BN + ReLU + dropout + 1x1 conv to class logits."""

    def __init__(self, in_channels: int, reduction: int, num_classes: int) -> None:
        hidden = in_channels // reduction
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def hidden_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features before the last 1x1 conv, and the logits."""
        hidden = x
        for layer in list(self)[:-1]:
            hidden = layer(hidden)
        return hidden, self[-1](hidden)


class DetailRefinement(nn.Module):
    """Stride-4 logits: the head's stride-8 logits upsampled 2x plus a correction computed from
    them and layer1's stride-4 features (3x3 conv + BN + ReLU, `depth - 1` residual blocks,
    1x1 conv). With `guide_channels`, the correction also reads the head's hidden features,
    projected to that many channels at stride 8 (1x1 conv) and upsampled: they say more about
    what is near a cell than its 19 logits do.

    Thin classes (poles, people, fences, riders) are narrower than a stride-8 cell, so no
    stride-8 output can draw them (`heldout --ceiling`); layer1 still resolves them. The
    correction's last conv starts at zero, so a refinement added to a trained model leaves
    what it computes unchanged until training moves it; likewise each residual block starts
    as the identity, so blocks added to a trained refinement leave it unchanged.
    """

    def __init__(self, low_channels: int, hidden: int, num_classes: int, depth: int = 1,
                 head_channels: int = 0, guide_channels: int = 0) -> None:
        super().__init__()
        self.guide = nn.Conv2d(head_channels, guide_channels, 1, bias=False) if guide_channels else None
        self.fuse = nn.Sequential(
            nn.Conv2d(low_channels + num_classes + guide_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*(DetailBlock(hidden) for _ in range(depth - 1)))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def start_at_zero(self) -> None:
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, logits: torch.Tensor, layer1: torch.Tensor, align_corners: bool,
                head_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """`head_hidden`: the head's (B, C_h, h, w) features before its last conv (read with a guide)."""
        coarse = F.interpolate(logits, size=layer1.shape[-2:], mode="bilinear",
                               align_corners=align_corners)  # (B, K, h, w) -> (B, K, 2h, 2w)
        low = [layer1, coarse]
        if self.guide is not None:
            low.append(F.interpolate(self.guide(head_hidden), size=layer1.shape[-2:], mode="bilinear",
                                     align_corners=align_corners))  # (B, G, h, w) -> (B, G, 2h, 2w)
        return coarse + self.classifier(self.blocks(self.fuse(torch.cat(low, dim=1))))


class DetailBlock(nn.Module):
    """x -> relu(x + BN(3x3 conv at dilation 2 of x)): widens the refinement's view by 4 cells
    (16 input pixels) a block. The BN scale starts at zero, so a new block is the identity on
    the (non-negative) features it follows."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm(self.conv(x)))


class SubNetwork(nn.Module):
    """Sub-network i: its backbone, pyramid, encoding, its N-1 attention steps and its head."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        c = config.feature_channels
        self.backbone = DilatedResNet(config.block, config.layers, config.base_width, config.deep_stem)
        self.pyramid = PyramidPooling(c, config.pyramid_groups, index % config.pyramid_groups)
        self.encoding = Encoding(c, config.key_channels, config.value_channels, config.cache_stride)
        self.propagation = nn.ModuleList(
            AttentionStep(config.value_channels) for _ in range(config.num_paths - 1)
        )
        self.layer_norm = LayerNorm2d(config.feature_size)
        self.head = Head(config.value_channels, config.head_reduction, config.num_classes)
        self.detail = (
            DetailRefinement(config.base_width * config.expansion, config.detail_channels, config.num_classes,
                             config.detail_depth, config.value_channels // config.head_reduction,
                             config.detail_guide_channels)
            if config.detail_channels else None
        )

    @property
    def classifier(self) -> nn.Conv2d:
        """The last convolution before the output logits (where class offsets are folded)."""
        return self.detail.classifier if self.detail is not None else self.head[-1]



@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, K, h, w): output at stride 8, or 4 with the detail refinement
    cache_entry: CachedFrame  # this frame's subsampled (q, k, v), to cache
    layer3: torch.Tensor | None  # (B, C3, h, w) when asked for (auxiliary loss)


class TDNet(nn.Module):
    """The TDNet model: `num_paths` sub-networks and the attention propagation between them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.paths = nn.ModuleList(SubNetwork(config, i) for i in range(config.num_paths))

    @property
    def num_paths(self) -> int:
        return self.config.num_paths

    @property
    def conv_dtype(self) -> torch.dtype:
        """Precision of the backbones, pyramids, heads and detail refinements."""
        return self.paths[0].head[0].weight.dtype

    @property
    def attention_dtype(self) -> torch.dtype:
        """Precision of the encodings, attention and LayerNorms (and so of the cache)."""
        return self.paths[0].encoding.value.weight.dtype

    def set_precision(self, dtype: torch.dtype) -> "TDNet":
        """Runs the convolutional parts in `dtype`; attention stays in float32.

        Attention logits q.k reach ~1e5-1e6 with real and random weights alike: in float16
        they overflow, in bfloat16 their rounding (~0.4 %) swamps the gaps the softmax
        decides on, so the encodings, attention and LayerNorms keep float32.
        """
        for net in self.paths:
            for part in (net.backbone, net.pyramid, net.head, net.detail):
                if part is not None:
                    part.to(dtype)
        return self

    def step(
        self,
        x: torch.Tensor,
        path: int,
        cached: Sequence[CachedFrame] | None,
        *,
        timer: StageTimer = _no_timer,
        with_layer3: bool = False,
        window: torch.Tensor | None = None,
    ) -> StepOutput:
        """Runs one frame through sub-network `path`.

        Args:
            x: (B, 3, H, W) normalized frames.
            path: which sub-network runs (0..N-1).
            cached: the last N-1 frames' (q, k, v), oldest first, or None while the cache
                is not yet full (then the attention term is left out, as in the published model).
            timer: called with a stage name, returns a context manager timing that stage.
            with_layer3: also return layer3's features, for training's auxiliary head.
            window: (B, 4) where each frame, a training crop, lies in its whole frame
                (LayerNorm2d.window_affine); None for whole frames.
        """
        net = self.paths[path]
        with timer("backbone"):
            layer1, layer3, features = net.backbone.stages(x.to(self.conv_dtype))
            z = net.pyramid(features)  # (B, C, h, w)
        with timer("encoding"):
            query, value, cache_entry = net.encoding(z.to(self.attention_dtype))
        with timer("attention"):
            combined = value
            if cached is not None and len(cached) == self.num_paths - 1:
                combined = value + self.propagate(path, cached, query, value.shape)
            head_input = net.layer_norm(combined, window)
        with timer("head"):
            if net.detail is None:
                logits = net.head(head_input.to(self.conv_dtype))
            else:
                hidden, logits = net.head.hidden_and_logits(head_input.to(self.conv_dtype))
                logits = net.detail(logits, layer1, self.config.upsample_align_corners, hidden)
        return StepOutput(logits, cache_entry, layer3 if with_layer3 else None)

    def propagate(
        self, path: int, cached: Sequence[CachedFrame], query: torch.Tensor, value_shape: torch.Size
    ) -> torch.Tensor:
        """Attention propagation of the cached frames onto the current one.

        u_{j+1} = A_j(key=k_j, value=w_j, query=q_{j+1}), w_1 = v_1, w_j = u_j + v_j; the last
        step's query is the current frame's full-resolution query.
        """
        steps = self.paths[path].propagation
        carried = cached[0][2]  # (B, L, d_v)
        for j, step in enumerate(steps):
            key = cached[j][1]
            target_query = cached[j + 1][0] if j + 1 < len(cached) else query
            carried = step(target_query, key, carried)  # (B, Lq, d_v)
            if j + 1 < len(cached):
                carried = carried + cached[j + 1][2]
        b, d_v, h, w = value_shape
        return carried.view(b, h, w, d_v).permute(0, 3, 1, 2)  # (B, h*w, d_v) -> (B, d_v, h, w), channels-last

    def forward_clip(
        self, clip: Sequence[torch.Tensor], first_path: int, *, with_layer3: bool = False,
        window: torch.Tensor | None = None,
    ):
        """Training forward over a clip of N frames: frame j runs path (first_path + j) mod N.

        Returns the StepOutput of every frame; the last one carries the attention-composed
        logits, the others their single-frame logits. A one-path model (N = 1) takes a clip
        of one frame, which runs without attention. `window`: (B, 4), where the clip's crop
        lies in its frames (the same for every frame of a clip), or None.
        """
        if len(clip) != self.num_paths:
            raise ValueError(f"a clip must have {self.num_paths} frames, got {len(clip)}")
        outputs: list[StepOutput] = []
        for j, frame in enumerate(clip):
            path = (first_path + j) % self.num_paths
            cached = [o.cache_entry for o in outputs] if 0 < j == len(clip) - 1 else None
            outputs.append(self.step(frame, path, cached, with_layer3=with_layer3, window=window))
        return outputs


def build_model(config: ModelConfig) -> TDNet:
    """Builds a randomly initialized TDNet (He-initialized convs, unit BatchNorm)."""
    model = TDNet(config)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for path in model.paths:
        if path.detail is not None:
            path.detail.start_at_zero()
    return model.eval()

