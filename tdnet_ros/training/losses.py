"""Loss terms of TDNet training: OHEM cross-entropy, the Lovász-softmax IoU surrogate and the
(grouped) distillation KL.

Every function takes logits at any resolution and the target at label resolution; logits
are upsampled bilinearly to the target size first, with `align_corners` as the model's
inference upsamples them (ModelConfig.upsample_align_corners), so that training and
inference place the same logits on the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tdnet_ros.preprocess import upsample_logits

IGNORE_INDEX = 255


def upsample_to(logits: torch.Tensor, size: tuple[int, int], align_corners: bool = False,
                pixel_step: int = 1) -> torch.Tensor:
    """Bilinear upsampling of (B, K, h, w) logits to (B, K, H, W); with `pixel_step` s > 1, to
    the centre pixel of each s x s block only (see preprocess.upsample_logits)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return sample_pixels(logits, pixel_step)
    return upsample_logits(logits, size, align_corners=align_corners, pixel_step=pixel_step)


def sample_pixels(maps: torch.Tensor, pixel_step: int) -> torch.Tensor:
    """The centre pixel of each s x s block of (..., H, W) maps (all of them for s = 1): the
    pixels that upsample_to(..., pixel_step=s) computes."""
    first = pixel_step // 2
    return maps[..., first::pixel_step, first::pixel_step]


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    threshold: float = 0.7,
    min_kept: int = 10_000,
    ignore_index: int = IGNORE_INDEX,
    class_weights: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Online hard example mining cross-entropy.

    A pixel is hard when the probability of its true class is below `threshold` (its
    cross-entropy above -log(threshold)). The loss is the mean cross-entropy of the hard
    pixels, or of the `min_kept` highest-loss pixels when fewer are hard. Pixels labelled
    `ignore_index` never count.

    Args:
        logits: (B, K, h, w) class scores.
        target: (B, H, W) integer class ids.
        class_weights: (K,) weight of each pixel's loss by its true class (None: all 1), so
            that rare classes count more, and are hard more often.
        pixel_weights: (B, H, W) weight of each pixel's loss (None: all 1), applied like
            `class_weights` before the hard pixels are chosen (see boundary_weights).
    """
    logits = upsample_to(logits.float(), tuple(target.shape[-2:]), align_corners)
    losses = F.cross_entropy(logits, target.long(), weight=class_weights, ignore_index=ignore_index,
                             reduction="none")  # (B, H, W)
    if pixel_weights is not None:
        losses = losses * pixel_weights
    losses = losses[target != ignore_index]  # (valid pixels,)
    if losses.numel() == 0:
        return logits.sum() * 0.0  # keeps the graph; no labelled pixel in the batch
    hard = losses > -math.log(threshold)
    keep = max(int(hard.sum()), min(min_kept, losses.numel()))
    return torch.topk(losses, keep, sorted=False).values.mean()


def boundary_weights(target: torch.Tensor, radius: int, weight: float) -> torch.Tensor:
    """Per-pixel loss weights: `weight` within `radius` pixels (a square window) of a pixel of
    another label, 1 elsewhere.

    Thin objects (poles, people, fences) lie wholly within a few pixels of a boundary, as do
    the edges of large regions, while the interiors of road, building and sky do not. So
    unlike class weights, which raise a rare class everywhere and pull the prediction
    toward it (`class_balance` collapsed building, README), both sides of every boundary
    count alike. The ignore label counts as a label of its own here.

    Args:
        target: (B, H, W) integer labels.

    Returns:
        (B, H, W) float32 weights.
    """
    labels = target.float().unsqueeze(1)  # (B, 1, H, W)
    size = 2 * radius + 1
    highest = F.max_pool2d(labels, size, stride=1, padding=radius)
    lowest = -F.max_pool2d(-labels, size, stride=1, padding=radius)
    near_boundary = (highest != lowest).squeeze(1)  # (B, H, W)
    return torch.where(near_boundary, weight, 1.0).float()


def _jaccard_gradient(foreground_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of 1 - IoU at pixels sorted by decreasing error.

    `foreground_sorted` (C, P): per class, 1 where a pixel belongs to it. Entry i is
    J(first i+1 pixels wrong) - J(first i pixels wrong), where J is the class's Jaccard loss
    when exactly those pixels are in error.
    """
    total = foreground_sorted.sum(dim=1, keepdim=True)  # (C, 1)
    intersection = total - foreground_sorted.cumsum(dim=1)
    union = total + (1.0 - foreground_sorted).cumsum(dim=1)
    jaccard = 1.0 - intersection / union  # (C, P)
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   align_corners: bool = False, pixel_step: int = 1) -> torch.Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU.

    Per image and per class present in its labels, the pixels' errors |[y = k] - p_k| are
    sorted in decreasing order and weighted by the gradient of the Jaccard loss's Lovász
    extension; the loss is the mean over (image, class). On hard (one-hot) probabilities it
    equals the mean of 1 - IoU over those classes, so unlike cross-entropy a small class
    counts as much as a large one in every image. Pixels labelled `ignore_index` never count.

    Args:
        logits: (B, K, h, w) class scores.
        target: (B, H, W) integer class ids.
        pixel_step: s > 1 scores the centre pixel of each s x s block only: the sorts, which
            cost several times the OHEM term on a whole 512x1024 frame, shrink s^2-fold.
    """
    logits = upsample_to(logits.float(), tuple(target.shape[-2:]), align_corners, pixel_step)
    target = sample_pixels(target, pixel_step)
    probabilities = logits.softmax(dim=1).flatten(2)  # (B, K, H*W)
    labels = target.long().flatten(1)  # (B, H*W)
    losses = []
    for image_probabilities, image_labels in zip(probabilities, labels):
        valid = image_labels != ignore_index
        image_probabilities, image_labels = image_probabilities[:, valid], image_labels[valid]
        present = image_labels.unique()  # (C,)
        if present.numel() == 0:
            continue
        foreground = (image_labels[None] == present[:, None]).float()  # (C, P)
        errors = (foreground - image_probabilities[present]).abs()
        errors_sorted, order = errors.sort(dim=1, descending=True)
        gradient = _jaccard_gradient(foreground.gather(1, order))
        losses.append((errors_sorted * gradient).sum(dim=1))  # (C,)
    if not losses:
        return logits.sum() * 0.0  # keeps the graph; no labelled pixel in the batch
    return torch.cat(losses).mean()


def balanced_class_weights(pixel_counts: np.ndarray | torch.Tensor, exponent: float,
                           limits: tuple[float, float] = (0.1, 10.0)) -> torch.Tensor:
    """Per-class loss weights from class pixel frequencies: (f_k / median f)^-exponent.

    exponent 0.5 is the inverse square root of the frequency; the median is over the
    classes present, so a typical class keeps weight ~1. Absent classes get 1 (they have no
    pixels to weigh); weights are clipped to `limits`, so that a class seen in a handful of
    pixels does not dominate.

    Returns:
        (K,) float32 weights.
    """
    counts = torch.as_tensor(np.asarray(pixel_counts), dtype=torch.float64)
    present = counts > 0
    weights = torch.ones_like(counts)
    if bool(present.any()):
        frequency = counts[present] / counts[present].sum()
        weights[present] = (frequency / frequency.median()).pow(-exponent).clamp(*limits)
    return weights.float()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  align_corners: bool = False, pixel_step: int = 1) -> torch.Tensor:
    """Plain cross-entropy (mean over labelled pixels), used for the auxiliary heads.

    `pixel_step` s > 1 scores the centre pixel of each s x s block only: an even sample of
    the same per-pixel losses, s^2 times cheaper.
    """
    logits = upsample_to(logits.float(), tuple(target.shape[-2:]), align_corners, pixel_step)
    target = sample_pixels(target, pixel_step)
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    align_corners: bool = False) -> torch.Tensor:
    """Pixel-wise KL divergence of the student's class distribution from the teacher's.

    KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k), with p = softmax(logits / T), averaged
    over pixels and scaled by T^2 (so the gradient scale does not depend on T). The teacher is
    detached; both are brought to the larger of the two resolutions.
    """
    if student.shape[-2:] != teacher.shape[-2:]:
        size = max(tuple(student.shape[-2:]), tuple(teacher.shape[-2:]))
        student = upsample_to(student.float(), size, align_corners)
        teacher = upsample_to(teacher.float(), size, align_corners)
    log_s = F.log_softmax(student.float() / temperature, dim=1)  # (B, K, H, W)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # (B, H, W)
    return kl.mean() * temperature**2


@dataclass(frozen=True)
class LossWeights:
    """Weights of the student's loss terms; 0 switches a term off (for ablations)."""

    ohem: float = 1.0  # OHEM cross-entropy of the final (attention-composed) output
    lovasz: float = 0.0  # Lovász-softmax (IoU surrogate) of the final output
    lovasz_pixel_step: int = 2  # the Lovász term scores one pixel in each step x step block
    auxiliary: float = 0.4  # cross-entropy of the auxiliary heads on every frame's layer3
    # the auxiliary term scores one pixel in each step x step block (1: every pixel); at 2 it
    # costs a quarter, and the pixels it samples still span every object a few pixels wide
    auxiliary_pixel_step: int = 2
    kd_full: float = 1.0  # KL(teacher full output || student final output)
    kd_group: float = 0.5  # KL(teacher group head i || sub-network i's output), mean over frames
    temperature: float = 1.0
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 10_000
    # Class-frequency weighting of the OHEM term: weight (f_k / median f)^-class_balance,
    # from the training labels' pixel counts (0: off; 0.5: inverse square root).
    class_balance: float = 0.0
    # The OHEM term's weight of pixels within boundary_radius pixels of another label
    # (1: off); see boundary_weights.
    boundary_weight: float = 1.0
    boundary_radius: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.class_balance <= 2.0:
            raise ValueError(f"loss.class_balance must be within 0..2, got {self.class_balance}")
        if not 1.0 <= self.boundary_weight <= 100.0:
            raise ValueError(f"loss.boundary_weight must be within 1..100 (1: off), got {self.boundary_weight}")
        for name in ("lovasz_pixel_step", "auxiliary_pixel_step", "boundary_radius"):
            if getattr(self, name) < 1:
                raise ValueError(f"loss.{name} must be at least 1, got {getattr(self, name)}")


def student_loss(
    final_logits: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    *,
    auxiliary_logits: list[torch.Tensor] | None = None,
    auxiliary_targets: list[torch.Tensor] | None = None,
    teacher_full: torch.Tensor | None = None,
    sub_logits: list[torch.Tensor] | None = None,
    teacher_groups: list[torch.Tensor] | None = None,
    class_weights: torch.Tensor | None = None,
    align_corners: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total student loss and its terms (as floats, for logging).

    Args:
        final_logits: (B, K, h, w) the last frame's attention-composed output.
        target: (B, H, W) labels of the last frame.
        auxiliary_logits / auxiliary_targets: auxiliary head outputs and labels per frame.
        teacher_full: (B, K, h', w') teacher's full output on the last frame.
        sub_logits: each frame's sub-network output (the last frame's is `final_logits`).
        teacher_groups: the teacher's group head output matching each entry of `sub_logits`.
        class_weights: (K,) per-class weights of the OHEM term (see balanced_class_weights).
        align_corners: how the student's logits are upsampled (its upsample_align_corners).
    """
    terms: dict[str, torch.Tensor] = {}
    # OHEM and Lovász both read the final logits at label resolution: upsample them once.
    if weights.ohem or weights.lovasz:
        at_labels = upsample_to(final_logits.float(), tuple(target.shape[-2:]), align_corners)
    if weights.ohem:
        pixel_weights = (boundary_weights(target, weights.boundary_radius, weights.boundary_weight)
                         if weights.boundary_weight != 1.0 else None)
        terms["ohem"] = weights.ohem * ohem_cross_entropy(
            at_labels, target, threshold=weights.ohem_threshold, min_kept=weights.ohem_min_kept,
            class_weights=class_weights, pixel_weights=pixel_weights, align_corners=align_corners,
        )
    if weights.lovasz:
        terms["lovasz"] = weights.lovasz * lovasz_softmax(at_labels, target, align_corners=align_corners,
                                                          pixel_step=weights.lovasz_pixel_step)
    if weights.auxiliary and auxiliary_logits:
        assert auxiliary_targets is not None and len(auxiliary_targets) == len(auxiliary_logits)
        aux = [cross_entropy(a, t, align_corners=align_corners, pixel_step=weights.auxiliary_pixel_step)
               for a, t in zip(auxiliary_logits, auxiliary_targets)]
        terms["auxiliary"] = weights.auxiliary * torch.stack(aux).mean()
    if weights.kd_full and teacher_full is not None:
        terms["kd_full"] = weights.kd_full * distillation_kl(final_logits, teacher_full, weights.temperature,
                                                             align_corners)
    if weights.kd_group and sub_logits and teacher_groups:
        assert len(sub_logits) == len(teacher_groups)
        kls = [distillation_kl(s, t, weights.temperature, align_corners) for s, t in zip(sub_logits, teacher_groups)]
        terms["kd_group"] = weights.kd_group * torch.stack(kls).mean()
    if not terms:
        raise ValueError("every loss term is switched off; enable at least one")
    total = torch.stack(list(terms.values())).sum()
    return total, {name: float(value.detach()) for name, value in terms.items()}
