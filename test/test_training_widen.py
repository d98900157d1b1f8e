"""Widening a student (training.widen): the wider model computes what the narrow one did,
and its added channels can learn apart from the ones they copy."""

import dataclasses

import pytest
import torch

from tdnet_ros.config import ModelConfig
from tdnet_ros.model import build_model
from tdnet_ros.training.widen import channel_mapping, widen_state

NARROW = ModelConfig.from_name("td4-tiny")
WIDE = dataclasses.replace(NARROW, base_width=12, name="td4-tiny-wide")


def _trained_looking(config: ModelConfig, seed: int) -> torch.nn.Module:
    """A model whose BatchNorms hold non-trivial statistics and affine parameters, so that a
    wrong copy or a wrong division shows in the output."""
    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _clip_logits(model: torch.nn.Module, clip: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [out.logits for out in model.forward_clip(clip, first_path=1)]


def test_channel_mapping_keeps_the_old_channels_in_place_and_copies_within_each_group():
    mapping = channel_mapping(8, 14, 2, torch.Generator().manual_seed(0))
    assert mapping[:4].tolist() == [0, 1, 2, 3] and mapping[7:11].tolist() == [4, 5, 6, 7]
    assert all(0 <= m < 4 for m in mapping[:7]) and all(4 <= m < 8 for m in mapping[7:])
    assert len(set(mapping[4:7].tolist())) == 3  # drawn without repetition while there are enough
    with pytest.raises(ValueError, match="cannot widen 8 channels to 6"):
        channel_mapping(8, 6, 2, torch.Generator())


def test_the_widened_student_computes_what_the_narrow_one_did():
    narrow = _trained_looking(NARROW, seed=0)
    wide = build_model(WIDE)
    wide.load_state_dict(widen_state(narrow.state_dict(), NARROW, WIDE, noise=0.0))
    assert sum(p.numel() for p in wide.parameters()) > 1.5 * sum(p.numel() for p in narrow.parameters())
    torch.manual_seed(1)
    clip = [torch.randn(2, 3, *NARROW.input_size) for _ in range(NARROW.num_paths)]
    # Every frame of the clip, the last one through the attention over the other three.
    for got, expected in zip(_clip_logits(wide, clip), _clip_logits(narrow, clip)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The layer3 features (the auxiliary head's input) hold the old channels in place.
    with torch.no_grad():
        _, narrow_layer3 = narrow.paths[0].backbone(clip[0], with_layer3=True)
        _, wide_layer3 = wide.paths[0].backbone(clip[0], with_layer3=True)
    per_group = narrow_layer3.shape[1] // 2
    torch.testing.assert_close(wide_layer3[:, :per_group], narrow_layer3[:, :per_group], rtol=1e-4, atol=1e-4)


def test_noise_separates_the_copies_and_changes_the_output_only_a_little():
    narrow = _trained_looking(NARROW, seed=0)
    exact = widen_state(narrow.state_dict(), NARROW, WIDE, noise=0.0)
    noisy = widen_state(narrow.state_dict(), NARROW, WIDE, noise=0.01)
    key = "paths.0.backbone.layer2.0.conv1.weight"  # (24, 16, 3, 3): 16 -> 24 output channels
    # Group 0 is rows 0-11: the 8 old channels in place, then 4 copies of some of them.
    # Without noise a copy equals its original exactly; with it, it is close but different.
    original = [j for j in range(8) if torch.equal(exact[key][8], exact[key][j])]
    assert len(original) == 1
    assert not torch.equal(noisy[key][8], exact[key][8])
    torch.testing.assert_close(noisy[key][8], exact[key][8], rtol=0, atol=0.05 * float(exact[key][8].abs().max()))
    torch.testing.assert_close(noisy[key][:8], exact[key][:8], rtol=0, atol=0)
    wide_exact, wide_noisy = build_model(WIDE), build_model(WIDE)
    wide_exact.load_state_dict(exact)
    wide_noisy.load_state_dict(noisy)
    clip = [torch.randn(1, 3, *NARROW.input_size) for _ in range(NARROW.num_paths)]
    a, b = _clip_logits(wide_exact, clip)[-1], _clip_logits(wide_noisy, clip)[-1]
    assert 0 < float((a - b).abs().max()) < 0.05 * float(a.abs().max())


def test_widening_refuses_other_changes():
    with pytest.raises(ValueError, match="changes only base_width"):
        widen_state({}, NARROW, dataclasses.replace(WIDE, key_channels=32))
    refined = dataclasses.replace(NARROW, detail_channels=8)
    with pytest.raises(ValueError, match="without the detail refinement"):
        widen_state({}, refined, dataclasses.replace(refined, base_width=WIDE.base_width))
