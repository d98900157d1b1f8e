"""Loss terms of the trainer on hand-made tensors, against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from tdnet_ros.training.losses import (
    LossWeights,
    cross_entropy,
    distillation_kl,
    lovasz_softmax,
    ohem_cross_entropy,
    student_loss,
)


def _logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """(1, K, 1, P) logits whose softmax over K gives the listed per-pixel probabilities."""
    p = torch.tensor(probabilities, dtype=torch.float64).T  # (K, P)
    return p.log()[None, :, None, :].float()


def test_ohem_keeps_hard_pixels_only():
    # Four pixels, two classes. True-class probabilities: 0.9, 0.6, 0.2, 0.95; one ignored pixel.
    logits = _logits_for([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.05, 0.95], [0.5, 0.5]])
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    # Hard (p < 0.7): pixels 2 and 3 -> mean of -log 0.6 and -log 0.2.
    expected = (-math.log(0.6) - math.log(0.2)) / 2
    value = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=1)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_min_kept_hardest_when_few_are_hard():
    logits = _logits_for([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.05, 0.95]])
    target = torch.tensor([[[0, 0, 1, 1]]])
    # Only two hard pixels but three must be kept: add the next hardest (p = 0.9).
    expected = (-math.log(0.6) - math.log(0.2) - math.log(0.9)) / 3
    assert ohem_cross_entropy(logits, target, threshold=0.7, min_kept=3).item() == pytest.approx(expected, rel=1e-5)
    # min_kept above the labelled count keeps them all: the plain mean.
    everything = (-math.log(0.9) - math.log(0.6) - math.log(0.2) - math.log(0.95)) / 4
    assert ohem_cross_entropy(logits, target, min_kept=100).item() == pytest.approx(everything, rel=1e-5)


def test_ohem_upsamples_logits_to_the_label_size():
    logits = torch.zeros(1, 3, 2, 2)  # uniform: every pixel has CE log 3
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    assert ohem_cross_entropy(logits, target).item() == pytest.approx(math.log(3), rel=1e-6)


def test_all_ignored_gives_zero_with_a_graph():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for loss in (ohem_cross_entropy(logits, target), cross_entropy(logits, target)):
        assert loss.item() == 0.0
        loss.backward()


def test_kl_by_hand():
    # One pixel, teacher p = (0.5, 0.5), student q = (0.8, 0.2):
    # KL(p || q) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
    teacher = _logits_for([[0.5, 0.5]])
    student = _logits_for([[0.8, 0.2]])
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert distillation_kl(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_temperature_scaling():
    # Logits (ln 4, 0) at T = 2 become (ln 2, 0): p = (2/3, 1/3). Teacher uniform.
    student = torch.tensor([math.log(4.0), 0.0]).view(1, 2, 1, 1)
    teacher = torch.zeros(1, 2, 1, 1)
    kl = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert distillation_kl(student, teacher, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-5)


def test_kl_does_not_train_the_teacher():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 3, 2, 2, requires_grad=True)
    distillation_kl(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_student_loss_combines_and_switches_terms():
    target = torch.tensor([[[0, 1]]])
    final = _logits_for([[0.5, 0.5], [0.5, 0.5]])  # CE = ln 2 on both pixels
    teacher = _logits_for([[0.8, 0.2], [0.8, 0.2]])
    sub = _logits_for([[0.8, 0.2], [0.8, 0.2]])  # agrees with its group head: KL 0
    group = _logits_for([[0.8, 0.2], [0.8, 0.2]])
    kl_full = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    weights = LossWeights(ohem=1.0, auxiliary=0.4, auxiliary_pixel_step=1, kd_full=1.0, kd_group=0.5, ohem_min_kept=10)
    total, terms = student_loss(
        final, target, weights,
        auxiliary_logits=[final], auxiliary_targets=[target],
        teacher_full=teacher, sub_logits=[sub], teacher_groups=[group],
    )
    assert terms["ohem"] == pytest.approx(math.log(2), rel=1e-5)
    assert terms["auxiliary"] == pytest.approx(0.4 * math.log(2), rel=1e-5)
    assert terms["kd_full"] == pytest.approx(kl_full, rel=1e-5)
    assert terms["kd_group"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(sum(terms.values()), rel=1e-6)

    no_kd = LossWeights(kd_full=0.0, kd_group=0.0, auxiliary=0.0, ohem_min_kept=10)
    _, terms = student_loss(final, target, no_kd, teacher_full=teacher, sub_logits=[sub], teacher_groups=[group])
    assert set(terms) == {"ohem"}
    with pytest.raises(ValueError, match="switched off"):
        student_loss(final, target, LossWeights(ohem=0.0, auxiliary=0.0, kd_full=0.0, kd_group=0.0))


@pytest.mark.parametrize("align_corners", [False, True])
def test_auxiliary_term_scores_the_centre_pixel_of_each_block(align_corners):
    """auxiliary_pixel_step 2 upsamples the logits to the sampled pixels only; the reference
    upsamples to every pixel with F.interpolate, then keeps rows and columns 1, 3, 5, ..."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(3)
    aux = torch.randn(2, 5, 6, 10, generator=generator)
    target = torch.randint(0, 5, (2, 48, 80), generator=generator)
    target[0, :8] = 255  # ignored rows
    final = torch.zeros(2, 5, 6, 10)
    weights = LossWeights(ohem=0.0, auxiliary=1.0, auxiliary_pixel_step=2, kd_full=0.0, kd_group=0.0)
    _, terms = student_loss(final, target, weights, auxiliary_logits=[aux], auxiliary_targets=[target],
                            align_corners=align_corners)
    full = F.interpolate(aux, (48, 80), mode="bilinear", align_corners=align_corners)
    expected = F.cross_entropy(full[..., 1::2, 1::2], target[..., 1::2, 1::2], ignore_index=255)
    assert terms["auxiliary"] == pytest.approx(float(expected), rel=1e-5)
    every_pixel = F.cross_entropy(full, target, ignore_index=255)
    assert terms["auxiliary"] != pytest.approx(float(every_pixel), rel=1e-5)  # a sample, not the full mean
    with pytest.raises(ValueError, match="auxiliary_pixel_step"):
        LossWeights(auxiliary_pixel_step=0)


def test_balanced_class_weights_follow_inverse_frequency_and_stay_bounded() -> None:
    from tdnet_ros.training.losses import balanced_class_weights

    counts = np.array([1_000_000, 10_000, 100, 0, 10_000])
    weights = balanced_class_weights(counts, 0.5)
    # median frequency is class 1's (and 4's): weight 1; 100x rarer: 10x (clipped at 10); absent: 1
    assert weights[1] == pytest.approx(1.0) and weights[4] == pytest.approx(1.0)
    assert weights[0] == pytest.approx(0.1) and weights[2] == pytest.approx(10.0) and weights[3] == 1.0
    assert torch.equal(balanced_class_weights(counts, 0.0), torch.ones(5))


def test_class_weights_make_a_rare_class_count_more_in_ohem() -> None:
    from tdnet_ros.training.losses import ohem_cross_entropy

    logits = torch.zeros(1, 3, 4, 4)  # every pixel equally unsure
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 2  # one pixel of a rare class
    plain = ohem_cross_entropy(logits, target, min_kept=16)
    weights = torch.tensor([1.0, 1.0, 10.0])
    weighted = ohem_cross_entropy(logits, target, min_kept=16, class_weights=weights)
    # pixel losses are scaled by their class weight: mean of 15 x log3 and 1 x 10 log3
    assert float(plain) == pytest.approx(np.log(3))
    assert float(weighted) == pytest.approx(np.log(3) * (15 + 10) / 16)


def test_the_losses_upsample_as_the_model_does_at_inference():
    """With align_corners as the model's config says, the OHEM and auxiliary losses score
    the same upsampled logits the segmenter turns into labels."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 4, 8, generator=generator)
    target = torch.randint(0, 5, (1, 32, 64), generator=generator)
    for align_corners in (False, True):
        upsampled = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=align_corners)
        expected = F.cross_entropy(upsampled, target)
        torch.testing.assert_close(cross_entropy(logits, target, align_corners=align_corners), expected)
        kept_all = ohem_cross_entropy(logits, target, threshold=1.0, min_kept=32 * 64, align_corners=align_corners)
        torch.testing.assert_close(kept_all, expected)
        total, _ = student_loss(logits, target, LossWeights(ohem=0, auxiliary=1.0, auxiliary_pixel_step=1, kd_full=0, kd_group=0),
                                auxiliary_logits=[logits], auxiliary_targets=[target], align_corners=align_corners)
        torch.testing.assert_close(total, expected)
    assert not torch.isclose(cross_entropy(logits, target, align_corners=True), cross_entropy(logits, target))


def _one_minus_iou_by_hand(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images and over the classes in each image's labels of 1 - IoU (255 ignored)."""
    values = []
    for image_predicted, image_labels in zip(predicted, labels):
        valid = image_labels != 255
        for k in np.unique(image_labels[valid]):
            inter = np.logical_and(image_predicted == k, image_labels == k)[valid].sum()
            union = np.logical_or(image_predicted == k, image_labels == k)[valid].sum()
            values.append(1.0 - inter / union)
    return float(np.mean(values))


def test_lovasz_softmax_on_hard_predictions_is_one_minus_iou():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 6, 8))
    labels[0, 0] = 255  # ignored row
    predicted = np.where(rng.random(labels.shape) < 0.7, labels % 255, rng.integers(0, 5, labels.shape))
    predicted[predicted == 255] = 0
    logits = 60.0 * torch.nn.functional.one_hot(torch.from_numpy(predicted), 5).permute(0, 3, 1, 2).float()
    loss = lovasz_softmax(logits, torch.from_numpy(labels))
    assert float(loss) == pytest.approx(_one_minus_iou_by_hand(predicted, labels), abs=1e-5)
    on_grid = lovasz_softmax(logits, torch.from_numpy(labels), pixel_step=2)
    assert float(on_grid) == pytest.approx(_one_minus_iou_by_hand(predicted[:, 1::2, 1::2], labels[:, 1::2, 1::2]),
                                           abs=1e-5)
    perfect = 60.0 * torch.nn.functional.one_hot(torch.from_numpy(labels % 255), 5).permute(0, 3, 1, 2).float()
    assert float(lovasz_softmax(perfect, torch.from_numpy(labels))) == pytest.approx(0.0, abs=1e-6)


def test_lovasz_softmax_descent_raises_the_iou_of_a_small_class():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 6:9, 6:9] = 1  # 9 pixels of a small class among 247 of a large one
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 0] = 1.0  # everything predicted large: the small class has IoU 0
    logits.requires_grad_(True)
    before = float(lovasz_softmax(logits, labels).detach())
    optimizer = torch.optim.SGD([logits], lr=50.0)
    for _ in range(20):
        optimizer.zero_grad()
        lovasz_softmax(logits, labels).backward()
        optimizer.step()
    predicted = logits.detach().argmax(1)
    assert float(lovasz_softmax(logits, labels).detach()) < before
    assert bool((predicted[labels == 1] == 1).all()) and bool((predicted[labels == 0] == 0).all())


def test_the_lovasz_term_joins_the_student_loss_when_weighted():
    target = torch.tensor([[[0, 1]]])
    final = _logits_for([[0.9, 0.1], [0.2, 0.8]])
    weights = LossWeights(lovasz=0.5, lovasz_pixel_step=1, auxiliary=0.0, kd_full=0.0, kd_group=0.0)
    _, terms = student_loss(final, target, weights)
    assert set(terms) == {"ohem", "lovasz"}
    # By hand. Class 0: errors (0.1 on its pixel, 0.2 on the other), sorted 0.2, 0.1, Jaccard
    # loss after each 0.5, 1: gradient (0.5, 0.5), loss 0.15. Class 1: errors (0.1 off it, 0.2
    # on it), sorted 0.2 (its pixel), 0.1: Jaccard 1, 1: gradient (1, 0), loss 0.2.
    assert terms["lovasz"] == pytest.approx(0.5 * (0.15 + 0.2) / 2, rel=1e-5)
    _, terms = student_loss(final, target, LossWeights(auxiliary=0.0, kd_full=0.0, kd_group=0.0))
    assert "lovasz" not in terms


def test_boundary_weights_cover_pixels_within_the_radius_of_another_label() -> None:
    from tdnet_ros.training.losses import boundary_weights

    target = torch.zeros(1, 6, 9, dtype=torch.long)
    target[0, :, 4] = 5  # a pole one pixel wide
    target[0, 0, 0] = 255  # an ignored pixel counts as a label of its own
    for radius, near_columns in ((1, [3, 4, 5]), (2, [2, 3, 4, 5, 6])):
        weights = boundary_weights(target, radius, 3.0)
        expected = torch.ones(1, 6, 9)
        expected[0, :, near_columns] = 3.0
        expected[0, :radius + 1, :radius + 1] = 3.0  # the ignored corner and its neighbours
        assert torch.equal(weights, expected)
    # one label everywhere: no boundary
    assert torch.equal(boundary_weights(torch.ones(2, 4, 4, dtype=torch.long), 2, 3.0), torch.ones(2, 4, 4))


def test_boundary_weight_scales_the_ohem_loss_of_pixels_near_a_boundary() -> None:
    logits = torch.zeros(1, 3, 4, 4)  # every pixel's loss is log 3
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :, 3] = 1  # the last column: 8 of 16 pixels are within one pixel of it
    plain = LossWeights(auxiliary=0.0, kd_full=0.0, kd_group=0.0, ohem_min_kept=16)
    _, unweighted = student_loss(logits, target, plain)
    weighted_weights = LossWeights(auxiliary=0.0, kd_full=0.0, kd_group=0.0, ohem_min_kept=16,
                                   boundary_weight=4.0, boundary_radius=1)
    _, weighted = student_loss(logits, target, weighted_weights)
    assert unweighted["ohem"] == pytest.approx(math.log(3))
    assert weighted["ohem"] == pytest.approx(math.log(3) * (8 * 4 + 8 * 1) / 16)
    # a configuration file's bad value is refused in one line naming the key
    from tdnet_ros.training.config import ConfigError, from_dict

    for bad, line in (({"boundary_weight": 0.5}, "loss.boundary_weight must be within 1..100 .1: off., got 0.5"),
                      ({"boundary_radius": 0}, "loss.boundary_radius must be at least 1, got 0")):
        with pytest.raises(ConfigError, match=line):
            from_dict({"loss": bad})
