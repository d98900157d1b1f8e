"""Backends on CUDA against eager float32: shared vectors, CUDA-graph replay, multi-stream.

Skipped without a GPU. TensorRT checks are skipped where torch_tensorrt does not import.
Expect several minutes: torch.compile (inductor), the ONNX export (run by onnxruntime on
the CPU unless onnxruntime-gpu is installed) and the TensorRT builds (float32 and float16)
compile every step of both published models at 769x1537; select with -k to run less.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from published_vectors import filled_state_dict, published_preprocess, vector_files
from tdnet_ros import ModelConfig, Segmenter, build_model, save_checkpoint
from tdnet_ros.backends import CudaGraphRunner
from tdnet_ros.cli.build_engines import build
from tdnet_ros.benchmark import synthetic_frame

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ours(caplog) -> list[logging.LogRecord]:
    """The log records of this package (libraries may log warnings of their own)."""
    return [r for r in caplog.records if r.name.startswith("tdnet_ros")]


def _torch_tensorrt_imports() -> bool:
    try:
        import torch_tensorrt  # noqa: F401
    except Exception:
        return False
    return True


needs_tensorrt = pytest.mark.skipif(not _torch_tensorrt_imports(), reason="torch_tensorrt does not import")


@pytest.fixture(autouse=True, scope="module")
def strict_float32():
    """Eager float32 references without TF32 convolutions (the default on Ampere and later)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


VECTOR_CASES = [(m, p) for m in ("td4-psp18", "td2-psp50") for p in vector_files(m)[:1]]


@pytest.fixture(scope="module", params=VECTOR_CASES, ids=[m for m, _ in VECTOR_CASES])
def vectors(request, tmp_path_factory):
    """A published-layout checkpoint by the fill recipe, the frames, and eager CUDA float32 results."""
    model, path = request.param
    data = dict(np.load(path))
    checkpoint = tmp_path_factory.mktemp("ckpt") / f"{model}.pkl"
    torch.save(filled_state_dict(model, int(data["seed"])), checkpoint)
    inputs = [published_preprocess(f) for f in data["frames"]]
    eager = Segmenter.from_checkpoint(checkpoint, model=model, device="cuda")
    reference = [eager.segment_normalized(x, stream="v") for x in inputs]
    return model, checkpoint, inputs, reference


def compare_to_reference(reference, results, min_agreement: float = 0.999, logits: bool = True) -> None:
    for t, (want, got) in enumerate(zip(reference, results)):
        assert (want.path, want.cache_warm) == (got.path, got.cache_warm), f"frame {t}"
        agreement = (want.labels == got.labels).mean()
        assert agreement >= min_agreement, f"frame {t}: {agreement:.5f} of labels agree"
        if logits:
            diff = (want.logits - got.logits.to(want.logits.device)).abs()  # (K, h, w)
            assert diff.mean().item() <= 0.005, f"frame {t}: mean |diff| {diff.mean().item():.5f}"
            outliers = (diff.amax(dim=0) > 0.05).float().mean().item()
            assert outliers <= 0.002, f"frame {t}: {outliers:.2%} of positions off by > 0.05"


def run_vectors(segmenter: Segmenter, inputs) -> list:
    return [segmenter.segment_normalized(x, stream="v") for x in inputs]


def test_cuda_graph_matches_eager_on_vectors(vectors):
    model, checkpoint, inputs, reference = vectors
    seg = Segmenter.from_checkpoint(checkpoint, model=model, device="cuda", backend="cuda-graph")
    assert seg.backend == "cuda-graph"
    seg.warm_up(streams=("v",))
    compare_to_reference(reference, run_vectors(seg, inputs))


def test_compile_matches_eager_on_vectors(vectors):
    model, checkpoint, inputs, reference = vectors
    seg = Segmenter.from_checkpoint(checkpoint, model=model, device="cuda", backend="compile")
    seg.warm_up(streams=("v",))
    compare_to_reference(reference, run_vectors(seg, inputs))


def test_onnx_matches_eager_on_vectors(vectors, tmp_path):
    pytest.importorskip("onnxruntime")
    model, checkpoint, inputs, reference = vectors
    build("onnx", checkpoint, model, [(769, 1537)], "float32", tmp_path, device="cuda")
    seg = Segmenter.from_checkpoint(
        checkpoint, model=model, device="cuda", backend="onnx", backend_options={"engine_dir": tmp_path}
    )
    compare_to_reference(reference, run_vectors(seg, inputs))


@needs_tensorrt
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_tensorrt_matches_eager_on_vectors(vectors, tmp_path, precision, caplog):
    model, checkpoint, inputs, reference = vectors
    build("tensorrt", checkpoint, model, [(769, 1537)], precision, tmp_path, device="cuda")
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter.from_checkpoint(
            checkpoint,
            model=model,
            device="cuda",
            precision=precision,
            backend="tensorrt",
            backend_options={"engine_dir": tmp_path},
        )
        seg.warm_up(streams=("v",))
        results = run_vectors(seg, inputs)
    assert seg.backend == "tensorrt" and not ours(caplog), [r.getMessage() for r in ours(caplog)]
    if precision == "float32":
        compare_to_reference(reference, results)
    else:
        compare_to_reference(reference, results, min_agreement=0.99, logits=False)


@needs_tensorrt
def test_tensorrt_missing_engine_falls_back_to_cuda_graphs(vectors, tmp_path, caplog):
    model, checkpoint, inputs, reference = vectors
    with caplog.at_level(logging.WARNING, logger="tdnet_ros.backends"):
        seg = Segmenter.from_checkpoint(
            checkpoint,
            model=model,
            device="cuda",
            backend="tensorrt",
            backend_options={"engine_dir": tmp_path, "fallback": "cuda-graph"},
        )
        results = run_vectors(seg, inputs)
    (record,) = ours(caplog)
    assert "running cuda-graph instead" in record.getMessage() and "tdnet-build-engines" in record.getMessage()
    compare_to_reference(reference, results)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_reduced_precision_cuda_graph_labels_agree_with_float32(vectors, precision):
    model, checkpoint, inputs, reference = vectors
    seg = Segmenter.from_checkpoint(checkpoint, model=model, device="cuda", precision=precision, backend="cuda-graph")
    compare_to_reference(reference, run_vectors(seg, inputs), min_agreement=0.99, logits=False)


# -- CUDA graphs: replay across reset and size change, several streams ----------------------


def tiny_pair(**options) -> tuple[Segmenter, Segmenter]:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))
    return Segmenter(model, device="cuda", **options), Segmenter(model, device="cuda", backend="cuda-graph", **options)


def frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    return [synthetic_frame(height, width, seed=seed + t) for t in range(count)]


def assert_same(a, b, t) -> None:
    assert (a.path, a.cache_warm, a.cache_reset) == (b.path, b.cache_warm, b.cache_reset), f"frame {t}"
    assert (a.logits - b.logits).abs().max().item() <= 1e-3, f"frame {t}"
    assert (a.labels == b.labels).mean() >= 0.999, f"frame {t}"


def test_cuda_graph_replay_across_reset_and_size_change():
    eager, graphs = tiny_pair(input_size="frame")
    runner = graphs._runner
    assert isinstance(runner, CudaGraphRunner)
    graphs.warm_up(frame_size=(96, 160), streams=("s",))
    captured = runner._batches[("s",)]
    assert len(captured.captures) == 8
    schedule = (
        frames(6, 96, 160)
        + ["reset"]
        + frames(5, 96, 160, seed=10)
        + frames(5, 128, 200, seed=20)
        + frames(5, 96, 160, seed=30)
    )
    for t, frame in enumerate(schedule):
        if isinstance(frame, str):
            eager.reset("s")
            graphs.reset("s")
            continue
        assert_same(eager.segment(frame, "s"), graphs.segment(frame, "s"), t)
        if t < 12:  # before the size change: the warm-up's graphs replayed, across the reset
            assert runner._batches[("s",)] is captured
    assert runner._batches[("s",)] is not captured  # a size change captured new graphs
    assert runner._batches[("s",)].shape[-2:] == (96, 160)


def test_cuda_graph_several_streams_interleaved():
    eager, graphs = tiny_pair()
    graphs.warm_up(frame_size=(96, 160), streams=("front", "rear", "left"))
    names = ["front", "rear", "front", "left", "rear", "front", "left", "left", "rear", "front", "front", "rear"]
    for t, name in enumerate(names):
        frame = synthetic_frame(96, 160, seed=100 + t)
        assert_same(eager.segment(frame, name), graphs.segment(frame, name), t)
    assert set(graphs._runner._batches) == {("front",), ("left",), ("rear",), ("front", "rear", "left")}


def test_cuda_graph_batches_of_streams_match_eager():
    eager, graphs = tiny_pair()
    names = ("front", "rear", "left")
    graphs.warm_up(frame_size=(96, 160), streams=names)
    rig = graphs._runner._batches[names]  # the warm-up captured the whole rig as one batch
    for t in range(10):
        batch = {name: synthetic_frame(96, 160, seed=10 * t + i) for i, name in enumerate(names)}
        if t in (4, 5):
            del batch["left"]  # "left" falls one step behind: a batch of two and one of one
        want, got = eager.segment_batch(batch), graphs.segment_batch(batch)
        for name in batch:
            assert_same(want[name], got[name], t)
    assert graphs._runner._batches[names] is rig
    assert ("front", "rear") in graphs._runner._batches  # captured at its first frame


def test_batch_on_cuda_streams_with_device_preprocess_matches_one_at_a_time():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))
    alone = Segmenter(model, device="cuda", preprocess="device")
    batched = Segmenter(model, device="cuda", preprocess="device", backend="cuda-graph")
    names = [f"camera{i}" for i in range(4)]
    batched.warm_up(streams=tuple(names))
    for t in range(6):
        batch = {name: synthetic_frame(1080, 1920, seed=100 * i + t) for i, name in enumerate(names)}
        got = batched.segment_batch(batch)
        for name, frame in batch.items():
            assert_same(alone.segment(frame, name), got[name], t)
    cuda_streams = {batched._streams[name].cuda_stream for name in names}
    assert len(cuda_streams) == 4 and torch.cuda.current_stream() not in cuda_streams


def test_cuda_graph_logits_are_not_overwritten_by_the_next_replay():
    _, graphs = tiny_pair()
    first = graphs.segment(synthetic_frame(96, 160, seed=1), "s")
    kept = first.logits.clone()
    graphs.segment(synthetic_frame(96, 160, seed=2), "s")
    assert torch.equal(first.logits, kept)


def test_device_preprocess_on_cuda_agrees_with_cv2_path():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny"))
    cv2_path = Segmenter(model, device="cuda")
    device_path = Segmenter(model, device="cuda", preprocess="device", backend="cuda-graph")
    for t in range(6):
        frame = synthetic_frame(720, 1280, seed=t)
        a, b = cv2_path.segment(frame, "s"), device_path.segment(frame, "s")
        assert a.labels.shape == b.labels.shape == (720, 1280)
        assert (a.labels == b.labels).mean() >= 0.97, f"frame {t}"


@needs_tensorrt
def test_tensorrt_tiny_engines_build_reload_and_match(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "tiny.pt")
    (folder,) = build("tensorrt", checkpoint, None, [(128, 256)], "float32", tmp_path / "engines", device="cuda")
    assert (folder / "manifest.json").is_file() and len(list(folder.glob("*.ep"))) == 8
    eager = Segmenter.from_checkpoint(checkpoint, device="cuda")
    trt = Segmenter.from_checkpoint(
        checkpoint, device="cuda", backend="tensorrt", backend_options={"engine_dir": tmp_path / "engines"}
    )
    for t in range(6):
        frame = synthetic_frame(128, 256, seed=t)
        assert_same(eager.segment(frame, "s"), trt.segment(frame, "s"), t)
