"""The streaming segmenter and checkpoint loading on a tiny model (no shared vectors needed)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdnet_ros import CheckpointError, ModelConfig, Segmenter, build_model, load_model, save_checkpoint
from tdnet_ros.checkpoint import published_to_internal, read_checkpoint
from tdnet_ros.runtime import cpu_computes_bfloat16
from tdnet_ros.segmenter import DeviceError


def tiny_segmenter(**options) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(build_model(ModelConfig.from_name("td4-tiny")), device="cpu", **options)


def random_frames(count: int, height: int = 96, width: int = 160, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize(
    "frame, message",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 4), np.uint8), "(H, W, 3)"),
        (np.zeros((8, 8), np.uint8), "(H, W, 3)"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.zeros((8, 16, 3), np.uint8)[:, ::2], "C-contiguous"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_bad_frames_raise_value_error(frame, message):
    with pytest.raises(ValueError, match=message):
        tiny_segmenter().segment(frame)


def test_bad_normalized_input_raises_value_error():
    seg = tiny_segmenter()
    with pytest.raises(ValueError, match="float32"):
        seg.segment_normalized(torch.zeros(1, 3, 128, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match="model input size"):
        seg.segment_normalized(torch.zeros(1, 3, 64, 64))


def test_schedule_cache_and_output_sizes():
    seg = tiny_segmenter()
    results = [seg.segment(f, stream="cam") for f in random_frames(6)]
    assert [r.path for r in results] == [0, 1, 2, 3, 0, 1]
    assert [r.cache_warm for r in results] == [False, False, False, True, True, True]
    assert [r.cache_reset for r in results] == [True] + [False] * 5
    for r in results:
        assert r.labels.shape == (96, 160) and r.labels.dtype == np.uint8
        assert r.logits.shape == (19, 16, 32)  # stride 8 of the 128x256 model input
        assert {"preprocess", "backbone", "attention", "head", "postprocess", "total"} <= set(r.timings)


def test_cache_is_preallocated_and_reused():
    seg = tiny_segmenter()
    frames = random_frames(8)
    seg.segment(frames[0], stream="cam")
    cache = seg._streams["cam"].cache
    pointers = (cache.query.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr())
    for frame in frames[1:]:
        seg.segment(frame, stream="cam")
    assert seg._streams["cam"].cache is cache
    assert (cache.query.data_ptr(), cache.key.data_ptr(), cache.value.data_ptr()) == pointers


def test_streams_are_independent():
    frames_a, frames_b = random_frames(6, seed=1), random_frames(6, seed=2)
    seg = tiny_segmenter()
    interleaved = []
    for a, b in zip(frames_a, frames_b):
        interleaved.append((seg.segment(a, stream="a").labels, seg.segment(b, stream="b").labels))
    alone_a = [r.labels for r in map(lambda f: seg.segment(f, stream="c"), frames_a)]
    assert all(np.array_equal(x[0], y) for x, y in zip(interleaved, alone_a))


def test_reset_restarts_the_schedule():
    seg = tiny_segmenter()
    frames = random_frames(5)
    first = [seg.segment(f, stream="cam") for f in frames]
    seg.reset(stream="cam")
    again = [seg.segment(f, stream="cam") for f in frames]
    assert [r.path for r in again] == [0, 1, 2, 3, 0]
    assert again[0].cache_reset
    for x, y in zip(first, again):
        assert torch.equal(x.logits, y.logits)


def test_size_change_resets_the_cache_and_keeps_frame_size():
    seg = tiny_segmenter(input_size="frame")
    for f in random_frames(4, 96, 160):
        seg.segment(f, stream="cam")
    result = seg.segment(random_frames(1, 64, 200)[0], stream="cam")
    assert result.cache_reset and result.path == 0 and not result.cache_warm
    assert result.labels.shape == (64, 200)
    assert result.logits.shape == (19, 8, 25)


def test_resized_layer_norm_matches_at_trained_size():
    """At the trained size the resized-LayerNorm path is the identity on the parameters."""
    seg = tiny_segmenter()
    norm = seg.model.paths[0].layer_norm
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(1, 32, 16, 32)
    params = torch.stack([norm.weight, norm.bias])[None]
    resized = torch.nn.functional.interpolate(params, (16, 32), mode="bilinear", align_corners=True)[0]
    assert torch.allclose(resized[0], norm.weight)
    doubled = norm(torch.randn(1, 32, 32, 64))
    assert doubled.shape == (1, 32, 32, 64)
    assert torch.allclose(norm(x), torch.nn.functional.layer_norm(x, (16, 32), norm.weight, norm.bias), atol=1e-6)


def test_layer_norm_on_a_crop_takes_the_parameters_under_its_window():
    # Training on crops (augment.align_layer_norm): each sample's parameters are the part of
    # the whole frame's resized parameters that lies under its crop, flipped with it; the
    # whole frame's window gives exactly the resize used at inference.
    norm = tiny_segmenter().model.paths[0].layer_norm
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    frame_size, crop, corner = (40, 72), (16, 32), (10, 30)  # feature sizes; crop's top-left
    whole = norm.resize_affine(norm.weight, norm.bias, frame_size)  # (2, 40, 72), F.interpolate

    def grid(first: int, count: int, extent: int) -> list[float]:
        return [2 * first / (extent - 1) - 1, 2 * (first + count - 1) / (extent - 1) - 1]

    (top, bottom), (left, right) = grid(corner[0], crop[0], frame_size[0]), grid(corner[1], crop[1], frame_size[1])
    windows = torch.tensor([[top, left, bottom, right], [top, right, bottom, left], [-1.0, -1.0, 1.0, 1.0]])
    rows, cols = slice(corner[0], corner[0] + crop[0]), slice(corner[1], corner[1] + crop[1])
    under = whole[:, rows, cols]
    expected = torch.stack([under, under.flip(-1), norm.resize_affine(norm.weight, norm.bias, crop)])
    with torch.no_grad():
        torch.testing.assert_close(norm.window_affine(windows, crop), expected, rtol=0, atol=1e-5)
        x = torch.randn(3, 32, *crop)
        reference = torch.stack([
            torch.nn.functional.layer_norm(x[i], crop, expected[i, 0], expected[i, 1], eps=norm.eps) for i in range(3)
        ])
        torch.testing.assert_close(norm(x, windows), reference, rtol=0, atol=1e-4)
        torch.testing.assert_close(norm(x, windows[2:].expand(3, 4)), norm(x), rtol=0, atol=1e-4)


def test_a_failed_save_leaves_the_earlier_checkpoint_whole(tmp_path):
    from tdnet_ros.checkpoint import load_file, save_file

    path = save_file({"iteration": torch.tensor(1)}, tmp_path / "last.pt")
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local function cannot be pickled: the save fails part-way
        save_file({"iteration": torch.tensor(2), "hook": lambda: None}, path)
    assert int(load_file(path)["iteration"]) == 1
    save_file({"iteration": torch.tensor(3)}, path)
    assert int(load_file(path)["iteration"]) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_project_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))
    path = save_checkpoint(model, tmp_path / "tiny.pt", iteration=7)
    loaded = load_model(path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    frame = random_frames(1)[0]
    a = Segmenter(model).segment(frame).labels
    b = Segmenter.from_checkpoint(path).segment(frame).labels
    assert np.array_equal(a, b)


@pytest.mark.parametrize("guide", [0, 4])
def test_detail_refinement_starts_at_the_upsampled_logits_and_then_refines_them(guide):
    """A model with the stride-4 refinement (reading the logits alone, or the head's hidden
    features too) computes, before training, the same weights' stride-8 logits upsampled 2x
    (F.interpolate as the reference); once its correction is not zero, its logits differ, at
    stride 4."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_name("td4-tiny"))
    refined = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8, detail_guide_channels=guide))
    assert (refined.paths[1].detail.guide is not None) == bool(guide)
    refined.load_state_dict({**refined.state_dict(), **plain.state_dict()})
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        coarse = plain.step(x, 1, None).logits  # (1, K, 16, 32)
        fine = refined.step(x, 1, None).logits  # (1, K, 32, 64)
        expected = F.interpolate(coarse, size=(32, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(fine, expected, rtol=0, atol=1e-6)
        torch.nn.init.normal_(refined.paths[1].detail.classifier.weight, std=0.1)
        assert (refined.step(x, 1, None).logits - expected).abs().max() > 1e-2
        if guide:  # the head's hidden features reach the correction through the guide
            before = refined.step(x, 1, None).logits
            torch.nn.init.normal_(refined.paths[1].detail.guide.weight, std=1.0)
            assert (refined.step(x, 1, None).logits - before).abs().max() > 1e-2


def test_deeper_refinement_starts_as_the_shallower_one_and_round_trips(tmp_path):
    """Residual blocks added to a refinement (detail_depth) start as the identity: with the
    shallower model's weights the deeper one computes the same logits. Once a block's scale is
    trained away from zero they differ, and such a model survives a checkpoint unchanged."""
    torch.manual_seed(0)
    shallow = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8))
    for path in shallow.paths:
        torch.nn.init.normal_(path.detail.classifier.weight, std=0.1)
    deep = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8, detail_depth=3))
    deep.load_state_dict({**deep.state_dict(), **shallow.state_dict()})
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        expected = shallow.step(x, 2, None).logits
        torch.testing.assert_close(deep.step(x, 2, None).logits, expected, rtol=0, atol=1e-6)
        torch.nn.init.normal_(deep.paths[2].detail.blocks[1].norm.weight, std=1.0)
        assert (deep.step(x, 2, None).logits - expected).abs().max() > 1e-2
    path = save_checkpoint(deep, tmp_path / "deep.pt")
    frame = random_frames(1)[0]
    segmenter = Segmenter.from_checkpoint(path)
    assert segmenter.config.detail_depth == 3
    assert np.array_equal(segmenter.segment(frame).labels, Segmenter(deep).segment(frame).labels)


def test_class_offsets_fold_into_the_detail_refinement(tmp_path):
    """Calibration's offsets shift a refined model's output logits by exactly the offsets, and
    such a checkpoint segments frames at their own size through the segmenter."""
    from tdnet_ros.training.calibrate import fold_offsets

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8))
    for path in model.paths:
        torch.nn.init.normal_(path.detail.classifier.weight, std=0.1)
    x = torch.randn(1, 3, 128, 256)
    offsets = torch.linspace(-2.0, 2.0, model.config.num_classes)
    with torch.no_grad():
        before = model.step(x, 0, None).logits
        after = fold_offsets(model, offsets).step(x, 0, None).logits
    torch.testing.assert_close(after - before, offsets[None, :, None, None].expand_as(before), rtol=0, atol=1e-5)
    path = save_checkpoint(model, tmp_path / "refined.pt")
    frame = random_frames(1, height=90, width=170)[0]
    result = Segmenter.from_checkpoint(path).segment(frame)
    assert result.labels.shape == (90, 170) and result.logits.shape[-2:] == (32, 64)


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model_state"])
def test_published_layout_wrappers_load(tmp_path, wrap):
    from published_vectors import filled_state_dict

    state = filled_state_dict("td4-psp18", seed=3)
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    content = {wrap: state} if wrap in ("state_dict", "model_state") else state
    path = tmp_path / "td4.pkl"
    torch.save(content, path)
    model = load_model(path)  # model name inferred from the keys
    assert model.config.name == "td4-psp18"
    expected = published_to_internal(filled_state_dict("td4-psp18", seed=3), 4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])


def test_checkpoint_errors_name_the_file_and_the_problem(tmp_path):
    from published_vectors import filled_state_dict

    with pytest.raises(CheckpointError, match="not found: .*nothing.pkl"):
        Segmenter.from_checkpoint(tmp_path / "nothing.pkl", model="td4-psp18")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt.pkl is not a checkpoint \(not a PyTorch file"):
        Segmenter.from_checkpoint(corrupt, model="td4-psp18")
    td2 = tmp_path / "td2.pkl"
    torch.save(filled_state_dict("td2-psp50", seed=1), td2)
    with pytest.raises(CheckpointError, match=r"td2.pkl does not fit model 'td4-psp18': missing keys: .*unexpected keys"):
        Segmenter.from_checkpoint(td2, model="td4-psp18")
    wrong_shape = filled_state_dict("td4-psp18", seed=1)
    wrong_shape["head1.conv5.4.weight"] = torch.zeros(21, 128, 1, 1)
    torch.save(wrong_shape, tmp_path / "td4_21.pkl")
    with pytest.raises(CheckpointError, match=r"mismatched shapes: paths.0.head.4.weight: checkpoint \(21, 128, 1, 1\)"):
        Segmenter.from_checkpoint(tmp_path / "td4_21.pkl", model="td4-psp18")


class _RunsCode:
    def __reduce__(self):
        return (print, ("checkpoint code ran",))


def test_loading_never_runs_code(tmp_path, capsys):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="evil.pkl is not a checkpoint "):
        read_checkpoint(path)
    assert "checkpoint code ran" not in capsys.readouterr().out


def test_unknown_model_and_device_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'td9-psp1'"):
        ModelConfig.from_name("td9-psp1")
    with pytest.raises(ValueError, match="unknown precision"):
        tiny_segmenter(precision="int4")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device 'cuda' was requested but CUDA is not available"):
            Segmenter(build_model(ModelConfig.from_name("td4-tiny")), device="cuda")
        assert Segmenter(build_model(ModelConfig.from_name("td4-tiny")), device="auto").device.type == "cpu"


def test_bfloat16_agrees_with_float32():
    frames = random_frames(6, 128, 256, seed=5)
    full = tiny_segmenter()
    reduced = tiny_segmenter(precision="bfloat16")
    for frame in frames:
        a = full.segment(frame, stream="s").labels
        b = reduced.segment(frame, stream="s").labels
        assert (a == b).mean() >= 0.9  # random tiny weights: near-flat logits, so a loose bound


def test_emulated_bfloat16_on_the_cpu_gets_one_warning(caplog):
    with caplog.at_level("WARNING", logger="tdnet_ros.segmenter"):
        tiny_segmenter(precision="bfloat16")
        tiny_segmenter(precision="float32")
    warnings = [r.getMessage() for r in caplog.records if "bfloat16 on this CPU is emulated" in r.getMessage()]
    assert len(warnings) == (0 if cpu_computes_bfloat16() else 1)


# --- several streams at once ------------------------------------------------------------------


def run_alone(frames_by_stream: dict[str, list[np.ndarray]], **options) -> dict[str, list]:
    """Each stream's frames through `segment`, one stream after the other (the reference)."""
    seg = tiny_segmenter(**options)
    return {name: [seg.segment(f, stream=name) for f in frames] for name, frames in frames_by_stream.items()}


def test_batch_equals_each_stream_alone():
    # "late" starts one frame after the others: it is one step behind, so the streams run
    # as a batch of two and a batch of one, and "late" joins nobody's step.
    frames = {name: random_frames(7, seed=seed) for seed, name in enumerate(("front", "left", "late"))}
    reference = run_alone({"front": frames["front"], "left": frames["left"], "late": frames["late"][:6]})
    seg = tiny_segmenter()
    got: dict[str, list] = {name: [] for name in frames}
    for t in range(7):
        batch = {name: frames[name][t] for name in ("front", "left")}
        if t >= 1:
            batch["late"] = frames["late"][t - 1]
        results = seg.segment_batch(batch)
        assert list(results) == list(batch)  # in the order given
        for name, result in results.items():
            got[name].append(result)
    assert [r.path for r in got["late"]] == [0, 1, 2, 3, 0, 1]
    assert [r.batch_size for r in got["front"]] == [2] * 7 and {r.batch_size for r in got["late"]} == {1}
    for name in frames:
        assert len(got[name]) == len(reference[name])
        for t, (want, have) in enumerate(zip(reference[name], got[name])):
            assert (want.path, want.cache_warm, want.cache_reset) == (have.path, have.cache_warm, have.cache_reset)
            # a batch of B convolves the same numbers in another order: logits differ by rounding
            torch.testing.assert_close(have.logits, want.logits, atol=1e-4, rtol=1e-4, msg=f"{name} frame {t}")
            assert (have.labels == want.labels).mean() >= 0.999, f"{name} frame {t}"


def test_batch_of_different_frame_sizes_keeps_each_frame_size():
    seg = tiny_segmenter(input_size="frame")
    frames = {"wide": random_frames(1, 96, 160)[0], "small": random_frames(1, 64, 64, seed=3)[0]}
    results = seg.segment_batch(frames)
    assert results["wide"].labels.shape == (96, 160) and results["small"].labels.shape == (64, 64)
    assert results["wide"].logits.shape[-2:] != results["small"].logits.shape[-2:]


def test_bad_frame_in_a_batch_names_its_stream_and_nothing_runs():
    seg = tiny_segmenter()
    good = random_frames(1)[0]
    with pytest.raises(ValueError, match="stream 'rear': frame must be uint8"):
        seg.segment_batch({"front": good, "rear": good.astype(np.float32)})
    assert seg.streams() == []  # the good frame did not advance its stream either
    assert seg.segment_batch({}) == {}


def test_warm_up_allocates_every_stream_cold():
    seg = tiny_segmenter()
    seg.warm_up(streams=("a", "b", "c"))
    assert seg.streams() == ["a", "b", "c"]
    results = seg.segment_batch({name: frame for name, frame in zip("abc", random_frames(3))})
    assert all(r.path == 0 and r.cache_reset and not r.cache_warm for r in results.values())


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("source, size", [((8, 16), (64, 128)), ((13, 25), (97, 193)), ((12, 9), (5, 40)), ((1, 4), (3, 1))])
def test_logit_upsampling_matches_f_interpolate_in_values_and_gradients(source, size, align_corners):
    """upsample_logits computes bilinear interpolation as two matrix products (a faster
    backward in training); F.interpolate is the reference, channels-last inputs and
    autocast included (the matrix products must not run in bfloat16)."""
    from tdnet_ros.preprocess import upsample_logits

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, *source, generator=generator).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 5, *size, generator=generator)  # a gradient arriving from the loss
    with torch.inference_mode():  # as the segmenter does first in a process that then trains
        upsample_logits(logits, size, align_corners=align_corners)
    results = []
    for upsample in (upsample_logits, lambda x, s, align_corners: F.interpolate(x, s, mode="bilinear",
                                                                                 align_corners=align_corners)):
        x = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = upsample(x, size, align_corners=align_corners)
        (out * upstream).sum().backward()
        results.append((out, x.grad))
    (ours, our_grad), (reference, reference_grad) = results
    assert ours.dtype == torch.float32 and ours.shape == (2, 5, *size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_grad, reference_grad, rtol=1e-5, atol=1e-4)


def test_labels_are_the_argmax_of_the_upsampled_logits_first_class_on_ties():
    from tdnet_ros.preprocess import labels_from_logits, upsample_logits

    logits = torch.randn(1, 19, 12, 20, generator=torch.Generator().manual_seed(2))
    logits[:, 9] = logits[:, 4] = logits.max(dim=1).values + 1  # classes 4 and 9 tie everywhere
    logits[:, 2, :6] = logits[:, 4, :6] + 1  # class 2 wins the top half outright
    labels = labels_from_logits(logits, (96, 160), align_corners=False)
    expected = upsample_logits(logits, (96, 160), align_corners=False).argmax(dim=1)[0]
    assert torch.equal(labels.long(), expected)
    assert set(labels.unique().tolist()) == {2, 4}


@pytest.mark.parametrize(
    "size, out_size", [((96, 192), (1080, 1920)), ((193, 385), (720, 1280)), ((100, 50), (33, 77))]
)
@pytest.mark.parametrize("num_classes", [19, 300])
def test_labels_resize_on_device_matches_cv2_nearest(size, out_size, num_classes):
    import cv2

    from tdnet_ros.preprocess import labels_from_logits, labels_to_numpy

    logits = torch.randn(1, num_classes, size[0] // 8 + 1, size[1] // 8 + 1, generator=torch.Generator().manual_seed(0))
    at_model_size = labels_to_numpy(labels_from_logits(logits, size, align_corners=True))
    resized = labels_to_numpy(labels_from_logits(logits, size, out_size, align_corners=True))
    assert resized.dtype == (np.uint8 if num_classes <= 255 else np.uint16)
    expected = cv2.resize(at_model_size, out_size[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resized, expected)


def test_a_frame_smaller_than_the_input_samples_the_logits_at_its_own_pixel_centres():
    """A 64-pixel-wide frame run at a 128-wide input (16 feature cells of 4 frame pixels).
    The class-1 margin is a ramp crossing zero at frame x = 32.4, so pixel 32 (centre 32.5)
    is class 1. Labels taken at the input size and then every second one (nearest) sample
    x = 32.25 there and call it class 0: a quarter-pixel shift."""
    from tdnet_ros.preprocess import labels_from_logits, labels_to_numpy

    centres = 4 * torch.arange(16, dtype=torch.float64) + 2  # each feature cell's centre in frame pixels
    margin = (centres - 32.4).expand(2, 16)  # (h, w): the same ramp on every row
    logits = torch.stack([torch.zeros_like(margin), margin])[None]  # (1, 2, 2, 16)
    labels = labels_to_numpy(labels_from_logits(logits, (16, 128), (8, 64), align_corners=False))
    expected = (np.arange(64) + 0.5 > 32.4).astype(np.uint8)
    np.testing.assert_array_equal(labels[:, 2:62], np.broadcast_to(expected[2:62], (8, 60)))  # the ramp is exact inside
    import cv2

    at_input = labels_to_numpy(labels_from_logits(logits, (16, 128), align_corners=False))
    assert cv2.resize(at_input, (64, 8), interpolation=cv2.INTER_NEAREST)[0, 32] == 0  # what the old order gave


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size, out_size", [((96, 192), (40, 90)), ((96, 192), (96, 192)), ((64, 128), (200, 300))])
def test_frame_logits_are_where_the_labels_are_taken(size, out_size, align_corners):
    """Calibration scores the logits at the frame's pixels (logits_at_frame); their argmax is
    the segmenter's labels, and a frame no larger than the input gets F.interpolate's
    bilinear logits at its own size."""
    from tdnet_ros.preprocess import labels_from_logits, labels_to_numpy, logits_at_frame

    logits = torch.randn(1, 19, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(1))
    at_frame = logits_at_frame(logits, size, out_size, align_corners=align_corners)
    assert at_frame.shape == (1, 19, *out_size)
    labels = labels_to_numpy(labels_from_logits(logits, size, out_size, align_corners=align_corners))
    np.testing.assert_array_equal(at_frame.argmax(1)[0].numpy(), labels)
    if out_size[0] <= size[0] and out_size[1] <= size[1]:
        direct = F.interpolate(logits, out_size, mode="bilinear", align_corners=align_corners)
        torch.testing.assert_close(at_frame, direct, rtol=1e-5, atol=1e-5)


def test_multi_scale_labels_are_the_argmax_of_the_scales_mean_probabilities():
    """scales (1, 1.5): each scale keeps its own cache and sub-network schedule, exactly as a
    segmenter run at that input size alone; the labels are the argmax of the two scales'
    softmax probabilities, each bilinear at the frame's size (F.interpolate here)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))  # input 128x256
    both = Segmenter(model, scales=(1.0, 1.5))
    alone = {1.0: Segmenter(model), 1.5: Segmenter(model, input_size=(192, 384))}
    frames = random_frames(6, 96, 200)
    differs = False
    for index, frame in enumerate(frames):
        result = both.segment(frame, "cam")
        probabilities = 0
        for scale, segmenter in alone.items():
            single = segmenter.segment(frame, "cam")
            assert single.path == result.path == index % 4
            probabilities = probabilities + torch.softmax(
                F.interpolate(single.logits[None], (96, 200), mode="bilinear", align_corners=False), dim=1)
            if scale == 1.0:
                torch.testing.assert_close(result.logits, single.logits)  # the base scale's
                differs |= bool((single.labels != result.labels).any())
        np.testing.assert_array_equal(result.labels, probabilities.argmax(1)[0].numpy().astype(np.uint8))
    assert differs  # the second scale changed some labels
    assert both.streams() == ["cam"]
    both.reset("cam")
    assert both.segment(frames[0], "cam").cache_reset and both.segment(frames[1], "cam").path == 1
    with pytest.raises(ValueError, match="segment_normalized runs one input size"):
        both.segment_normalized(torch.zeros(1, 3, 128, 256), "cam")
    batched, separate = Segmenter(model, scales=(1.0, 1.5)), Segmenter(model, scales=(1.0, 1.5))
    for first, second in zip(frames[:3], frames[3:]):
        results = batched.segment_batch({"left": first, "right": second})
        assert results["left"].batch_size == 2  # the two cameras' steps ran together
        for stream, frame in (("left", first), ("right", second)):
            np.testing.assert_array_equal(results[stream].labels, separate.segment(frame, stream).labels)


def test_multi_scale_at_each_frames_own_size_scales_that_size():
    """input_size "frame" with scales (1, 1.5): each stream's base scale runs at its frame's
    own size and the second at 1.5 times it, exactly as segmenters fixed at those two sizes
    do, for two cameras of different sizes side by side."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))
    both = Segmenter(model, input_size="frame", scales=(1.0, 1.5))
    cameras = {"small": random_frames(3, 96, 200), "large": random_frames(3, 128, 256)}
    alone = {name: (Segmenter(model, input_size=frames[0].shape[:2]),
                    Segmenter(model, input_size=(round(1.5 * frames[0].shape[0]), round(1.5 * frames[0].shape[1]))))
             for name, frames in cameras.items()}
    for index in range(3):
        results = both.segment_batch({name: frames[index] for name, frames in cameras.items()})
        for name, frames in cameras.items():
            frame = frames[index]
            base, larger = (segmenter.segment(frame, name) for segmenter in alone[name])
            assert base.logits.shape[-2:] == tuple(side // 8 for side in frame.shape[:2])
            torch.testing.assert_close(results[name].logits, base.logits)  # the base scale's
            probabilities = sum(torch.softmax(F.interpolate(single.logits[None], frame.shape[:2], mode="bilinear",
                                                            align_corners=False), dim=1) for single in (base, larger))
            np.testing.assert_array_equal(results[name].labels, probabilities.argmax(1)[0].numpy().astype(np.uint8))
    assert sorted(both.streams()) == ["large", "small"]
    with pytest.raises(ValueError, match="warm_up needs frame_size"):
        both.warm_up()


def test_labels_follow_the_upsampling_the_model_was_trained_with():
    """The published checkpoints upsample their logits with align_corners=True, this
    project's trainer with False: the segmenter takes each model's own, from its config."""
    from tdnet_ros.preprocess import labels_from_logits, labels_to_numpy

    assert ModelConfig.from_name("td4-psp18").upsample_align_corners
    assert ModelConfig.from_name("td2-psp50").upsample_align_corners
    assert not ModelConfig.from_name("td4-r18-narrow").upsample_align_corners
    # A checkpoint written before the field existed was trained with False.
    legacy = {k: v for k, v in ModelConfig.from_name("td4-tiny").to_dict().items() if k != "upsample_align_corners"}
    assert not ModelConfig.from_dict(legacy).upsample_align_corners
    frame = random_frames(1)[0]
    for align_corners in (False, True):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(ModelConfig.from_name("td4-tiny"), upsample_align_corners=align_corners))
        segmenter = Segmenter(model)
        result = segmenter.segment(frame)
        expected = labels_to_numpy(labels_from_logits(result.logits[None].float(), segmenter.model_input_size(frame.shape[:2]),
                                                      frame.shape[:2], align_corners=align_corners))
        np.testing.assert_array_equal(result.labels, expected)
        other = labels_to_numpy(labels_from_logits(result.logits[None].float(), segmenter.model_input_size(frame.shape[:2]),
                                                   frame.shape[:2], align_corners=not align_corners))
        assert (other != result.labels).any()  # the two conventions do differ on these logits
