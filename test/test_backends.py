"""Deployment backends on the CPU: the exportable step, ONNX export + onnxruntime, torch.compile,
the artefact cache key, the fallbacks' messages, and device-side preprocessing.

Every check compares against eager outputs computed here. CUDA graphs and TensorRT run in
test_cuda.py (skipped without a GPU); here only their CPU fallbacks are provoked.
Inductor compilation of all steps takes ~30 s on a small CPU; it runs in the suite all the same,
since nothing else checks what inductor compiles.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from published_vectors import filled_state_dict
from tdnet_ros import ModelConfig, Segmenter, build_model, load_model, save_checkpoint
from tdnet_ros.backends import (
    ArtifactKey,
    BackendUnavailable,
    StepModule,
    artifact_dir,
    example_inputs,
    find_artifacts,
    step_keys,
    step_name,
)
from tdnet_ros.cli.build_engines import main as build_main
from tdnet_ros.backends.onnx_export import export_step, load_onnx_step
from tdnet_ros.benchmark import synthetic_frame
from tdnet_ros.preprocess import DevicePreprocessor
from tdnet_ros.preprocess import Normalizer, resize_frame
from tdnet_ros.runtime import cpu_computes_bfloat16

onnxruntime = pytest.importorskip("onnxruntime")

TINY_SIZE = (128, 256)


def ours(caplog) -> list[logging.LogRecord]:
    """The log records of this package (libraries may log warnings of their own)."""
    return [r for r in caplog.records if r.name.startswith("tdnet_ros")]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("td4-tiny"))


def frames(count: int, height: int = 96, width: int = 160, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def assert_same_run(
    reference: Segmenter, other: Segmenter, inputs: list[np.ndarray], stream: str = "s", atol: float = 1e-4
):
    """Both segmenters see the same frames; paths, warm flags, logits and labels must agree."""
    for t, frame in enumerate(inputs):
        a, b = reference.segment(frame, stream), other.segment(frame, stream)
        assert (a.path, a.cache_warm, a.cache_reset) == (b.path, b.cache_warm, b.cache_reset), f"frame {t}"
        diff = (a.logits - b.logits).abs().max().item()
        assert diff <= atol, f"frame {t} (path {a.path}, warm {a.cache_warm}): logits differ by {diff}"
        assert (a.labels == b.labels).mean() >= 0.999, f"frame {t}: labels differ"


# -- the step module ------------------------------------------------------------------


def test_step_module_is_model_step():
    """StepModule(path, warm) computes TDNet.step with the cache stacked oldest -> newest."""
    model = Segmenter(tiny_model()).model
    with torch.inference_mode():
        for path, warm in step_keys(model):
            inputs = example_inputs(model, TINY_SIZE, warm, seed=path)
            cached = [(inputs[1][j], inputs[2][j], inputs[3][j]) for j in range(3)] if warm else None
            expected = model.step(inputs[0], path, cached)
            logits, q, k, v = StepModule(model, path, warm)(*inputs)
            assert torch.equal(logits, expected.logits)
            for got, want in zip((q, k, v), expected.cache_entry):
                assert torch.equal(got, want)
            if warm:  # the attention term is really used
                cold = model.step(inputs[0], path, None)
                assert (cold.logits - logits).abs().max() > 1e-3
    assert {name for name in (step_name(p, w) for p, w in step_keys(model))} == {
        f"path{p}_{s}" for p in range(4) for s in ("cold", "warm")
    }


def test_step_module_registers_only_its_sub_network():
    model = tiny_model()
    module = StepModule(model, 2, True)
    own = {id(p) for p in module.parameters()}
    assert own == {id(p) for p in model.paths[2].parameters()}
    with pytest.raises(ValueError, match="cached query"):
        module(example_inputs(model, TINY_SIZE, False)[0])


# -- ONNX -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory):
    """td4-tiny saved as a project checkpoint and exported by the command line tool."""
    root = tmp_path_factory.mktemp("onnx")
    checkpoint = save_checkpoint(tiny_model(), root / "tiny.pt")
    engines = root / "engines"
    assert (
        build_main(["--backend", "onnx", "--checkpoint", str(checkpoint), "--size", "128x256", "--out", str(engines)])
        == 0
    )
    return checkpoint, engines


def test_onnx_build_writes_every_step_and_a_manifest(onnx_build, capsys):
    checkpoint, engines = onnx_build
    (folder,) = engines.iterdir()
    assert folder.name.startswith("onnx-td4-tiny-128x256-float32-")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"]["input_size"] == [128, 256] and manifest["key"]["versions"]["torch"] == torch.__version__
    assert sorted(manifest["steps"]) == sorted(step_name(p, w) for p, w in step_keys(load_model(checkpoint)))
    for file in manifest["steps"].values():
        assert (folder / file).stat().st_size > 0


def test_onnx_steps_match_eager(onnx_build):
    checkpoint, engines = onnx_build
    segmenter = Segmenter.from_checkpoint(checkpoint)
    model = segmenter.model
    (folder,) = engines.iterdir()
    with torch.inference_mode():
        for path, warm in step_keys(model):
            inputs = example_inputs(model, TINY_SIZE, warm, seed=10 + path)
            expected = StepModule(model, path, warm)(*inputs)
            got = load_onnx_step(folder / f"{step_name(path, warm)}.onnx", torch.device("cpu"))(*inputs)
            for name, g, e in zip(("logits", "query", "key", "value"), got, expected):
                assert g.shape == e.shape and g.dtype == e.dtype
                assert (g - e).abs().max().item() <= 1e-4, f"{step_name(path, warm)} {name}"


def test_onnx_segmenter_matches_eager_across_reset(onnx_build):
    checkpoint, engines = onnx_build
    eager = Segmenter.from_checkpoint(checkpoint)
    onnx = Segmenter.from_checkpoint(checkpoint, backend="onnx", backend_options={"engine_dir": engines})
    assert onnx.backend == "onnx"
    onnx.warm_up()
    inputs = frames(6)
    assert_same_run(eager, onnx, inputs)
    eager.reset("s")
    onnx.reset("s")
    assert_same_run(eager, onnx, inputs[:5])
    assert onnx.segment(inputs[0], "s").timings["network"] > 0


def assert_same_batches(reference: Segmenter, other: Segmenter, count: int = 6, atol: float = 1e-4) -> None:
    """Three streams, "c" one frame behind: batches of two and of one, through both segmenters."""
    streams = {name: frames(count + 1, seed=seed) for seed, name in enumerate("abc")}
    for t in range(count):
        batch = {"a": streams["a"][t], "b": streams["b"][t], "c": streams["c"][max(t - 1, 0)]}
        if t == 0:
            del batch["c"]
        want, got = reference.segment_batch(batch), other.segment_batch(batch)
        for name in batch:
            a, b = want[name], got[name]
            assert (a.path, a.cache_warm) == (b.path, b.cache_warm), f"{name} frame {t}"
            diff = (a.logits - b.logits).abs().max().item()
            assert diff <= atol, f"{name} frame {t}: logits differ by {diff}"
            assert (a.labels == b.labels).mean() >= 0.999, f"{name} frame {t}: labels differ"


def test_onnx_runs_a_batch_of_streams_row_by_row(onnx_build):
    checkpoint, engines = onnx_build
    onnx = Segmenter.from_checkpoint(checkpoint, backend="onnx", backend_options={"engine_dir": engines})
    onnx.warm_up(streams=("a", "b", "c"))
    assert_same_batches(Segmenter.from_checkpoint(checkpoint), onnx)


def test_onnx_missing_artefacts_fall_back_with_one_message(onnx_build, tmp_path, caplog):
    checkpoint, engines = onnx_build
    # Another input size than the one exported: no artefacts for its key.
    other = Segmenter.from_checkpoint(
        checkpoint, backend="onnx", backend_options={"engine_dir": engines}, input_size=(96, 192)
    )
    reference = Segmenter.from_checkpoint(checkpoint, input_size=(96, 192))
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        assert_same_run(reference, other, frames(5))
    messages = [r.getMessage() for r in ours(caplog)]
    assert len(messages) == 1, messages
    assert "onnx backend unavailable at input 96x192" in messages[0]
    assert "tdnet-build-engines --backend onnx" in messages[0] and "--size 96x192" in messages[0]


def test_onnx_other_weights_do_not_load_stale_files(onnx_build, tmp_path, caplog):
    """Same model and size, other weights: another checkpoint hash, so the files do not fit."""
    _, engines = onnx_build
    torch.manual_seed(1)
    other = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "other.pt")
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter.from_checkpoint(other, backend="onnx", backend_options={"engine_dir": engines})
        seg.segment(frames(1)[0])
    assert any("no onnx artefacts" in r.getMessage() for r in ours(caplog))


def test_onnx_td4_psp18_step_at_small_size(tmp_path):
    """A published-size model (filled weights) exported at 129x257, warm step, against eager."""
    model = build_model(ModelConfig.from_name("td4-psp18"))
    from tdnet_ros.checkpoint import published_to_internal

    model.load_state_dict(
        {
            k: v
            for k, v in published_to_internal(filled_state_dict("td4-psp18", 0), 4).items()
            if k in model.state_dict()
        }
    )
    segmenter = Segmenter(model, input_size=(129, 257))
    key = ArtifactKey("onnx", "td4-psp18", (129, 257), "float32", "0" * 64, {})
    file = export_step(segmenter.model, 1, True, (129, 257), tmp_path / "path1_warm.onnx")
    inputs = example_inputs(segmenter.model, (129, 257), True, seed=3)
    with torch.inference_mode():
        expected = StepModule(segmenter.model, 1, True)(*inputs)
    got = load_onnx_step(file, torch.device("cpu"))(*inputs)
    scale = expected[0].abs().max().item()
    assert (got[0] - expected[0]).abs().max().item() <= 1e-4 * max(scale, 1.0)
    for g, e in zip(got[1:], expected[1:]):
        assert (g - e).abs().max().item() <= 1e-3
    assert key.dirname.startswith("onnx-td4-psp18-129x257-float32-000000000000-")


def test_onnx_float16_export_keeps_attention_in_float32(tmp_path):
    model = Segmenter(tiny_model(), precision="float16").model
    import onnx

    file = tmp_path / "path0_warm.onnx"
    export_step(model, 0, True, TINY_SIZE, file)
    graph = onnx.load(str(file)).graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.output)}
    assert types["x"] == onnx.TensorProto.FLOAT16 and types["logits"] == onnx.TensorProto.FLOAT16
    assert types["cached_query"] == types["query"] == types["value"] == onnx.TensorProto.FLOAT
    initializer_types = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializer_types and onnx.TensorProto.FLOAT in initializer_types
    # onnxruntime runs it, within float16 rounding of eager float16 (different accumulation order)
    inputs = example_inputs(model, TINY_SIZE, True, seed=5)
    with torch.inference_mode():
        expected = StepModule(model, 0, True)(*inputs)
    got = load_onnx_step(file, torch.device("cpu"))(*inputs)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        assert (g.float() - e.float()).abs().max().item() <= 5e-3 * e.float().abs().max().item()


# -- artefact keys and the build command --------------------------------------------------


@pytest.mark.parametrize("depth, guide", [(1, 0), (3, 0), (1, 4)])
def test_onnx_step_of_a_model_with_the_detail_refinement_matches_eager(tmp_path, depth, guide):
    """The stride-4 refinement (odd input size, so layer1 is not twice the stride-8 map's
    size exactly), with and without residual blocks, and reading the head's hidden features,
    exports into the step and returns its stride-4 logits."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8, detail_depth=depth,
                                              detail_guide_channels=guide))
    for path in model.paths:
        torch.nn.init.normal_(path.detail.classifier.weight, std=0.1)  # not the zero start
        for block in path.detail.blocks:
            torch.nn.init.normal_(block.norm.weight, std=0.5)  # nor the identity start
    segmenter = Segmenter(model, input_size=(129, 257))
    file = export_step(segmenter.model, 2, True, (129, 257), tmp_path / "path2_warm.onnx")
    inputs = example_inputs(segmenter.model, (129, 257), True, seed=4)
    with torch.inference_mode():
        expected = StepModule(segmenter.model, 2, True)(*inputs)
    got = load_onnx_step(file, torch.device("cpu"))(*inputs)
    assert expected[0].shape[-2:] == (33, 65)  # stride 4: 129 -> 65 -> 33 rows
    assert (got[0] - expected[0]).abs().max().item() <= 1e-4 * max(expected[0].abs().max().item(), 1.0)


def test_artifact_key_changes_with_everything_it_depends_on(tmp_path):
    base = ArtifactKey(
        "tensorrt", "td4-psp18", (769, 1537), "float16", "ab" * 32, {"torch": "2.13.0", "tensorrt": "10.3"}
    )
    variants = [
        ArtifactKey("onnx", "td4-psp18", (769, 1537), "float16", "ab" * 32, base.versions),
        ArtifactKey("tensorrt", "td2-psp50", (769, 1537), "float16", "ab" * 32, base.versions),
        ArtifactKey("tensorrt", "td4-psp18", (512, 1024), "float16", "ab" * 32, base.versions),
        ArtifactKey("tensorrt", "td4-psp18", (769, 1537), "bfloat16", "ab" * 32, base.versions),
        ArtifactKey("tensorrt", "td4-psp18", (769, 1537), "float16", "cd" * 32, base.versions),
        ArtifactKey("tensorrt", "td4-psp18", (769, 1537), "float16", "ab" * 32, {**base.versions, "tensorrt": "10.4"}),
    ]
    names = {base.dirname} | {v.dirname for v in variants}
    assert len(names) == 7
    assert (
        base.dirname
        == ArtifactKey("tensorrt", "td4-psp18", (769, 1537), "float16", "ab" * 32, dict(base.versions)).dirname
    )


def test_weights_hash_of_an_in_memory_channels_last_model():
    from tdnet_ros.backends import checkpoint_hash

    model = Segmenter(tiny_model()).model  # channels-last, BatchNorm folded: (K, C, 1, 1) weights
    before = checkpoint_hash(None, model)
    with torch.no_grad():
        model.paths[0].head[-1].weight[0, 0] += 1.0
    assert checkpoint_hash(None, model) != before


def test_find_artifacts_says_what_is_missing(tmp_path):
    key = ArtifactKey("tensorrt", "td4-tiny", (128, 256), "float16", "ab" * 32, {"torch": "x"})
    with pytest.raises(BackendUnavailable, match="no engine directory"):
        find_artifacts(None, key)
    with pytest.raises(BackendUnavailable, match="no tensorrt artefacts .*--size 128x256 --precision float16"):
        find_artifacts(tmp_path, key)
    folder = artifact_dir(tmp_path, key)
    folder.mkdir()
    other = ArtifactKey("tensorrt", "td4-tiny", (128, 256), "float16", "ab" * 32, {"torch": "y"})
    (folder / "manifest.json").write_text(json.dumps({"key": other.to_dict(), "steps": {}}))
    with pytest.raises(BackendUnavailable, match="built for another key"):
        find_artifacts(tmp_path, key)
    (folder / "manifest.json").write_text(json.dumps({"key": key.to_dict(), "steps": {"path0_cold": "path0_cold.ep"}}))
    with pytest.raises(BackendUnavailable, match="missing: .*path0_cold.ep"):
        find_artifacts(tmp_path, key)
    (folder / "path0_cold.ep").write_bytes(b"engine")
    assert find_artifacts(tmp_path, key) == {"path0_cold": folder / "path0_cold.ep"}


def test_build_command_errors_are_one_line(tmp_path, capsys):
    assert (
        build_main(
            ["--backend", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "--size", "64x64", "--out", str(tmp_path)]
        )
        == 1
    )
    assert "checkpoint file not found" in capsys.readouterr().err
    checkpoint = save_checkpoint(tiny_model(), tmp_path / "tiny.pt")
    assert (
        build_main(
            [
                "--backend",
                "onnx",
                "--checkpoint",
                str(checkpoint),
                "--size",
                "64x64",
                "--precision",
                "bf16",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "float32 or float16 only" in capsys.readouterr().err
    if not torch.cuda.is_available():
        checkpoint = save_checkpoint(tiny_model(), tmp_path / "tiny.pt")
        assert (
            build_main(
                ["--backend", "tensorrt", "--checkpoint", str(checkpoint), "--size", "64x64", "--out", str(tmp_path)]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


# -- fallbacks and options ----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
@pytest.mark.parametrize(
    "backend, message",
    [
        ("cuda-graph", "cuda-graph backend unavailable, running eager: it needs a CUDA device"),
        ("tensorrt", "tensorrt backend unavailable, running eager: TensorRT needs a CUDA GPU"),
    ],
)
def test_gpu_backends_fall_back_on_the_cpu_with_one_message(backend, message, caplog):
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter(tiny_model(), backend=backend)
    assert seg.backend == "eager"
    assert [r.getMessage() for r in ours(caplog) if message in r.getMessage()] and len(ours(caplog)) == 1
    assert_same_run(Segmenter(tiny_model()), seg, frames(5), atol=0.0)


def test_onnx_in_bfloat16_falls_back_with_one_message(caplog):
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter(tiny_model(), precision="bfloat16", backend="onnx")
    assert seg.backend == "eager"
    # On a CPU that emulates bfloat16 the segmenter also warns about that, from its own logger.
    (record,) = [r for r in ours(caplog) if r.name.startswith("tdnet_ros.backends")]
    assert "onnx backend unavailable, running eager: in bfloat16" in record.getMessage()
    others = [r.getMessage() for r in ours(caplog) if r is not record]
    assert len(others) == (0 if cpu_computes_bfloat16() else 1)


def test_unknown_backend_and_preprocess_are_value_errors():
    with pytest.raises(ValueError, match="unknown backend 'trt'.*tensorrt"):
        Segmenter(tiny_model(), backend="trt")
    with pytest.raises(ValueError, match="unknown preprocess"):
        Segmenter(tiny_model(), preprocess="gpu")
    with pytest.raises(ValueError, match="unknown fallback"):
        Segmenter(tiny_model(), backend="onnx", backend_options={"fallback": "none"})


def test_compile_traced_by_dynamo_matches_eager():
    """torch.compile's graph capture on every step (the 'eager' compiler: no code generation)."""
    seg = Segmenter(tiny_model(), backend="compile", backend_options={"compile_options": {"backend": "eager"}})
    assert seg.backend == "compile"
    seg.warm_up(streams=("s",))
    assert_same_run(Segmenter(tiny_model()), seg, frames(6), atol=1e-5)


def test_compile_runs_batches_of_streams():
    options = {"compile_options": {"backend": "eager"}}
    seg = Segmenter(tiny_model(), backend="compile", backend_options=options)
    seg.warm_up(streams=("a", "b", "c"))
    assert_same_batches(Segmenter(tiny_model()), seg, atol=1e-5)


def test_compile_failure_falls_back_with_one_message(caplog):
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter(
            tiny_model(), backend="compile", backend_options={"compile_options": {"backend": "no-such-compiler"}}
        )
        assert_same_run(Segmenter(tiny_model()), seg, frames(3), atol=0.0)
    (record,) = ours(caplog)
    assert "torch.compile failed: InvalidBackend" in record.getMessage() and "running eager" in record.getMessage()


def test_compile_inductor_matches_eager():
    seg = Segmenter(tiny_model(), backend="compile")
    seg.warm_up(streams=("s",))
    assert_same_run(Segmenter(tiny_model()), seg, frames(6), atol=1e-4)


def test_warm_up_leaves_streams_cold_and_results_unchanged():
    seg = Segmenter(tiny_model())
    seg.warm_up(frame_size=(96, 160), streams=("a", "b"))
    assert sorted(seg.streams()) == ["a", "b"]
    assert_same_run(Segmenter(tiny_model()), seg, frames(5), stream="a", atol=0.0)
    with pytest.raises(ValueError, match="frame_size"):
        Segmenter(tiny_model(), input_size="frame").warm_up()


# -- device-side preprocessing ------------------------------------------------------------


def test_device_preprocess_matches_cv2_normalization():
    frame = synthetic_frame(300, 500, seed=1)
    cpu = torch.device("cpu")
    for size in ((300, 500), (128, 256), (769, 1537)):
        expected = Normalizer(cpu, torch.float32, True)(resize_frame(frame, size))
        got = DevicePreprocessor(cpu)(frame, size)
        assert got.shape == expected.shape == (1, 3, *size)
        assert got.is_contiguous(memory_format=torch.channels_last)
        diff = (got - expected).abs()
        # cv2 resizes in fixed point and rounds to uint8: within one grey level (1 / 255 / std)
        bound = 1e-5 if size == (300, 500) else 1 / 255 / 0.225
        assert diff.max().item() <= bound, size


def test_device_preprocess_labels_agree_with_cv2_path():
    cv2_path = Segmenter(tiny_model())
    device_path = Segmenter(tiny_model(), preprocess="device")
    for t in range(4):
        frame = synthetic_frame(200, 360, seed=t)
        a, b = cv2_path.segment(frame, "s"), device_path.segment(frame, "s")
        assert a.labels.shape == b.labels.shape == (200, 360)
        assert (a.labels == b.labels).mean() >= 0.97, f"frame {t}"
