"""The runtime configuration and its "auto" rules, the backend registry and its fallback
wrapper, and the feature cache's schedule, without ROS."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tdnet_ros import ModelConfig, Segmenter, build_model
from tdnet_ros.backends import REGISTRY, BackendUnavailable, FallbackRunner, StepRunner, make_runner
from tdnet_ros.cache import FeatureCache, gather_batch, read_batch, read_order, write_batch
from tdnet_ros.runtime import (
    BACKENDS,
    DeviceError,
    RuntimeConfig,
    add_runtime_arguments,
    cpu_computes_bfloat16,
    parse_input_size,
    parse_scales,
    runtime_from_arguments,
)
from tdnet_ros.segmenter import LIBRARY_DEFAULTS, LoadError, load_segmenter


def tiny_model(num_paths: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("td4-tiny", num_paths=num_paths)).eval()


# -- runtime configuration ---------------------------------------------------------------------


def test_auto_rules_on_a_machine_with_and_without_cuda(caplog) -> None:
    auto = RuntimeConfig()
    with caplog.at_level(logging.WARNING, logger="tdnet_ros"):
        cpu = auto.resolve(cuda_available=False)
    assert (cpu.device, cpu.backend, cpu.fallback, cpu.preprocess) == ("cpu", "eager", "eager", "cv2")
    assert [r.getMessage() for r in caplog.records] == ["device 'auto': CUDA is not available: running on the CPU"]
    gpu = auto.resolve(cuda_available=True)
    assert (gpu.device, gpu.backend, gpu.fallback, gpu.preprocess) == ("cuda", "cuda-graph", "cuda-graph", "device")
    # What is given stays as given; resolving twice changes nothing.
    given = RuntimeConfig(device="cuda:1", backend="tensorrt", preprocess="cv2").resolve(cuda_available=True)
    assert (given.device, given.backend, given.fallback, given.preprocess) == ("cuda:1", "tensorrt", "cuda-graph", "cv2")
    assert given.resolve(cuda_available=True) == given and given.resolved and not auto.resolved


def test_cuda_without_cuda_and_bad_values_are_refused_naming_the_setting() -> None:
    with pytest.raises(DeviceError, match="device 'cuda' was requested but CUDA is not available"):
        RuntimeConfig(device="cuda").resolve(cuda_available=False)
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        RuntimeConfig(device="gpu0")
    for field, value, message in (("backend", "trt", "unknown backend 'trt'"),
                                  ("precision", "int8", "unknown precision 'int8'"),
                                  ("fallback", "onnx", "unknown fallback 'onnx'"),
                                  ("preprocess", "gpu", "unknown preprocess 'gpu'"),
                                  ("input_size", (8, 8), "input_size")):
        with pytest.raises(ValueError, match=message):
            RuntimeConfig(**{field: value})


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def test_native_bfloat16_agrees_with_the_cpu_flags() -> None:
    """oneDNN computes bfloat16 natively with AVX-512 (BW, VL, DQ); an AVX2-only x86 CPU emulates it."""
    flags = _cpu_flags()
    if not flags or "avx2" not in flags:
        pytest.skip("not an x86 CPU whose /proc/cpuinfo flags can be read")
    if {"avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert cpu_computes_bfloat16()
    elif not any(flag.startswith(("avx512", "amx", "avx_ne_convert")) for flag in flags):
        assert not cpu_computes_bfloat16()
    else:
        pytest.skip("a partial AVX-512 or AVX-NE-CONVERT CPU: oneDNN's choice is not predicted here")


def test_input_size_text() -> None:
    assert parse_input_size("") is None and parse_input_size("frame") == "frame"
    assert parse_input_size("544x960") == (544, 960)
    for bad in ("720p", "0x5", "99999x10"):
        with pytest.raises(ValueError):
            parse_input_size(bad)


def test_scales_are_refused_naming_what_is_wrong() -> None:
    assert parse_scales("") == (1.0,) and parse_scales("1 1.5") == parse_scales("1,1.5") == (1.0, 1.5)
    for text, message in (("1 big", "not a list of numbers"), ("1.5", "must start with 1.0"),
                          ("1 1.5 1.5", "repeats a scale"), ("1 8", "within 0.25..4.0")):
        with pytest.raises(ValueError, match=message):
            parse_scales(text)
    with pytest.raises(ValueError, match="need the eager, compile or cuda-graph backend: prebuilt tensorrt"):
        RuntimeConfig(backend="tensorrt", scales=(1.0, 1.5))
    with pytest.raises(ValueError, match="non-empty list of numbers"):
        RuntimeConfig(scales=())
    assert RuntimeConfig(scales=[1.0, 0.5]).scales == (1.0, 0.5)  # a list (from YAML) becomes a tuple


def test_command_line_flags_build_the_same_configuration() -> None:
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser, RuntimeConfig(device="cpu"))
    args = parser.parse_args(["--backend", "compile", "--input-size", "128x256", "--precision", "bfloat16"])
    assert runtime_from_arguments(args) == RuntimeConfig(device="cpu", backend="compile", input_size=(128, 256),
                                                         precision="bfloat16")
    with pytest.raises(ValueError, match="--input-size"):
        runtime_from_arguments(parser.parse_args(["--input-size", "big"]))
    args = parser.parse_args(["--scales", "1 1.25"])
    assert runtime_from_arguments(args) == RuntimeConfig(device="cpu", scales=(1.0, 1.25))
    with pytest.raises(ValueError, match="--scales: scales \\[1.0, 1.25\\] need the eager"):
        runtime_from_arguments(parser.parse_args(["--scales", "1 1.25", "--backend", "onnx"]))


def test_segmenter_takes_a_runtime_configuration_or_its_documented_keywords() -> None:
    model = tiny_model()
    from_keywords = Segmenter(model, device="cpu", precision="bfloat16", input_size=(96, 192))
    from_config = Segmenter(model, RuntimeConfig(device="cpu", precision="bfloat16", input_size=(96, 192)))
    assert from_keywords.runtime == from_config.runtime.replace(backend="eager", fallback="eager", preprocess="cv2")
    assert Segmenter(model).runtime == LIBRARY_DEFAULTS.resolve()
    frame = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    np.testing.assert_array_equal(from_keywords.segment(frame).labels, from_config.segment(frame).labels)
    with pytest.raises(TypeError, match="unknown segmenter option"):
        Segmenter(model, devcie="cpu")


def test_load_segmenter_names_what_is_at_fault(tmp_path) -> None:
    for (checkpoint, model, runtime), (setting, fragment) in {
        ("", "td4-psp18", RuntimeConfig(device="cpu")): ("model", "'checkpoint' is empty"),
        (str(tmp_path / "x.pt"), "td9-nothing", RuntimeConfig(device="cpu")): ("model", "td9-nothing"),
        (str(tmp_path / "missing.pt"), "", RuntimeConfig(device="cpu")): ("checkpoint", "missing.pt"),
    }.items():
        with pytest.raises(LoadError, match=fragment) as caught:
            load_segmenter(runtime, checkpoint, model)
        assert caught.value.setting == setting
    if not torch.cuda.is_available():
        with pytest.raises(LoadError) as caught:
            load_segmenter(RuntimeConfig(device="cuda"))
        assert caught.value.named("parameter 'device'").startswith("parameter 'device' is 'cuda': ")
    segmenter = load_segmenter(RuntimeConfig(device="cpu"))  # the bundled model
    assert segmenter.checkpoint is not None and segmenter.checkpoint.name == "default.pt"


# -- backend registry ---------------------------------------------------------------------------


def test_the_registry_offers_exactly_the_runtime_backends() -> None:
    assert tuple(REGISTRY) == BACKENDS
    assert all(REGISTRY[name].name == name for name in BACKENDS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what is unavailable on a CPU machine")
def test_availability_checks_raise_one_exception_type() -> None:
    from tdnet_ros.backends.registry import BackendContext

    context = BackendContext(tiny_model(), torch.device("cpu"), precision="bfloat16")
    for name in ("cuda-graph", "tensorrt", "onnx"):
        with pytest.raises(BackendUnavailable):
            REGISTRY[name].check(context)
    REGISTRY["eager"].check(context)


class UnavailableAt(StepRunner):
    """A primary that cannot serve one input size (as missing prebuilt files would)."""

    name = "partial"

    def __init__(self, model, size) -> None:
        super().__init__(model)
        self.size = size

    def run(self, x, path, caches, streams, timer=None):
        if tuple(x.shape[-2:]) == self.size:
            raise BackendUnavailable("no artefacts at this size")
        return super().run(x, path, caches, streams)


def test_fallback_wrapper_falls_back_per_input_size_with_one_line(caplog) -> None:
    model = tiny_model()
    runner = FallbackRunner(UnavailableAt(model, (64, 128)), StepRunner(model))
    caches = [FeatureCache.for_model(model.config, (64, 128))]
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        for _ in range(3):
            runner.run(torch.zeros(1, 3, 64, 128), caches[0].next_path, caches, ["s"])
    assert caches[0].frames_written == 3  # the fallback ran each frame once
    assert [r.getMessage() for r in caplog.records] == [
        "partial backend unavailable at input 64x128, running eager instead: no artefacts at this size"]
    assert runner.name == "eager"  # every size seen fell back
    other = [FeatureCache.for_model(model.config, (96, 128))]
    runner.run(torch.zeros(1, 3, 96, 128), 0, other, ["t"])
    assert runner.name == "partial"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_make_runner_falls_back_to_the_fallback_backend() -> None:
    model = tiny_model()
    assert type(make_runner("eager", model, device=torch.device("cpu"))) is StepRunner
    runner = make_runner("tensorrt", model, device=torch.device("cpu"), fallback="cuda-graph")
    assert runner.name == "eager"  # neither runs on the CPU: eager, after one line each


# -- the cache's schedule -----------------------------------------------------------------------


def test_cache_schedule_next_path_read_order_and_warmth() -> None:
    cache = FeatureCache(4, 5, 2, 3)
    seen = []
    for _ in range(6):
        seen.append((cache.next_path, cache.warm, cache.read_order()))
        cache.write(cache.next_path, (torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), torch.zeros(1, 5, 3)))
    assert [s[0] for s in seen] == [0, 1, 2, 3, 0, 1]
    assert [s[1] for s in seen] == [False, False, False, True, True, True]
    # The frame running path p reads the previous three frames, oldest first.
    assert seen[3][2] == [0, 1, 2] and seen[4][2] == [1, 2, 3] == read_order(4, 0)
    cache.reset()
    assert (cache.next_path, cache.warm) == (0, False)


def test_cache_snapshot_restore_and_batched_gather() -> None:
    config = ModelConfig.from_name("td4-tiny")
    caches = [FeatureCache.for_model(config, (64, 128)) for _ in range(2)]
    tokens = caches[0].query.shape[2]
    for t in range(3):
        entry = tuple(torch.full((2, tokens, d), float(t)) for d in (config.key_channels, config.key_channels,
                                                                     config.value_channels))  # (B=2, L, d)
        write_batch(caches, t, entry)
    assert all(c.warm and c.next_path == 3 for c in caches)
    snapshot = caches[0].snapshot()
    stacked = gather_batch(caches, 3)  # (N-1, B, L, d) each
    assert stacked[0].shape == (3, 2, tokens, config.key_channels)
    assert [float(stacked[2][j, 1, 0, 0]) for j in range(3)] == [0.0, 1.0, 2.0]
    listed = read_batch(caches, 3)
    assert torch.equal(listed[1][2], stacked[2][1])
    caches[0].value.fill_(9.0)
    caches[0].reset()
    caches[0].restore(snapshot)
    assert caches[0].frames_written == 3 and float(caches[0].value[2, 0, 0, 0]) == 2.0


def test_forward_clip_takes_one_path_models() -> None:
    model = tiny_model(num_paths=1)
    outputs = model.forward_clip([torch.zeros(1, 3, 64, 128)], 0)
    assert len(outputs) == 1 and outputs[0].logits.shape[1] == model.config.num_classes
