"""Per-frame latency of the segmenter, per stage, for each model, size, device and precision.

  CPU, two precisions:
    tdnet-bench --model td4-psp18 --size 769x1537 --device cpu --precision float32 bfloat16

  GPU, every backend, 1920x1080 camera frames, beside the published code (one line):
    tdnet-bench --model td4-psp18 td2-psp50 --size 769x1537 --frame-size 1080x1920
      --device cuda --precision float32 float16 --backend eager cuda-graph compile tensorrt
      --engine-dir engines --preprocess device --published-code /path/to/TDNet/Testing

With `--published-code DIR` (a local checkout of the published TDNet `Testing/` folder,
which this project does not ship), the published model runs in the same process on the
same weights and input, frames interleaved with ours so that both see the same machine
load, and the speed ratio and label agreement are printed. Not a test: figures depend on
the machine; the README names the command and machine beside each one it quotes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model, published_to_internal
from .config import ModelConfig
from .model import build_model
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_frame
from .runtime import RuntimeConfig
from .segmenter import Segmenter
from .timing import percentiles


def synthetic_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, structured RGB frame (random noise would make every method look alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    return np.ascontiguousarray(resize_frame(small, (height, width)))


def published_model(code_dir: Path, name: str) -> torch.nn.Module:
    """The published implementation's model class, imported from a local checkout."""
    sys.path.insert(0, str(code_dir))
    module_name = name.replace("-", "_")
    module = __import__(f"model.pspnet.{module_name}", fromlist=[module_name])
    num_paths = ModelConfig.from_name(name).num_paths
    return getattr(module, module_name)(nclass=19, path_num=num_paths).eval()


def normalized_input(frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """The published preprocessing (float64 normalization) of a frame at the model input size."""
    resized = resize_frame(frame, size) / 255.0
    x = ((resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype(np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)


def run_published(model: torch.nn.Module, x: torch.Tensor, path: int, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        logits = model(x, pos_id=path)
        labels = logits.argmax(1)[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return labels.cpu().numpy()


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for name in args.model:
        published = None
        if args.published_code:
            published = published_model(args.published_code, name)
            # Our model gets the published model's (random) weights through the real loader.
            state = published_to_internal(published.state_dict(), ModelConfig.from_name(name).num_paths)
            model = build_model(ModelConfig.from_name(name))
            model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
        else:
            model = load_model(args.checkpoint, name) if args.checkpoint else build_model(ModelConfig.from_name(name))
        for size in args.size:
            for device_name in args.device:
                for precision in args.precision:
                    for backend in args.backend:
                        rows.append(measure_one(args, name, model, published, size, device_name, precision, backend))
                        total = rows[-1]["frame_ms"]
                        print(f"measured {name} {size[0]}x{size[1]} {device_name} {precision} {backend}: "
                              f"p50 {total['p50']:.2f} ms", file=sys.stderr, flush=True)
    return rows


def measure_one(args, name, model, published, size, device_name, precision, backend="eager") -> dict:
    runtime = RuntimeConfig(device=device_name, precision=precision, input_size=size, backend=backend,
                            preprocess=args.preprocess, engine_dir=str(args.engine_dir or ""))
    segmenter = Segmenter(model, runtime, checkpoint=args.checkpoint)
    device = segmenter.device
    cameras = [f"camera{i}" for i in range(args.cameras)]
    segmenter.warm_up(streams=tuple(cameras))  # CUDA graph captures, compilation, engine loads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frame = synthetic_frame(*(args.frame_size or size))
    x = normalized_input(frame, size)
    stages: dict[str, list[float]] = {}
    ours_ms, published_ms, agreement = [], [], []
    if published is not None:
        published.to(device)
    # Reduced precision is judged by its label agreement with float32 on the same frames.
    reference = Segmenter(model, runtime.replace(precision="float32", backend="eager")) if precision != "float32" else None
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for i in range(args.warmup + args.frames):
        start = clock()
        result = segmenter.segment_batch({camera: frame for camera in cameras})[cameras[0]]  # a rig triggered together
        if i >= args.warmup:
            ours_ms.append((clock() - start) * 1e3)
            for stage, ms in result.timings.items():
                stages.setdefault(stage, []).append(ms)
        if published is not None and precision == "float32":
            start = clock()
            labels = run_published(published, x.to(device), result.path, device)
            if i >= args.warmup:
                published_ms.append((clock() - start) * 1e3)
                ours = resize_frame_labels(result.labels, labels.shape)
                agreement.append(float((ours == labels).mean()))
        if reference is not None:
            labels = reference.segment(frame, stream=cameras[0]).labels
            if i >= args.warmup:
                agreement.append(float((result.labels == labels).mean()))
    row = {
        "model": name,
        "input": f"{size[0]}x{size[1]}",
        "frame": f"{frame.shape[0]}x{frame.shape[1]}",
        "device": str(device),
        "precision": precision,
        "backend": segmenter.backend,
        "preprocess": segmenter.preprocess,
        "cameras": args.cameras,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "stages_ms": {stage: percentiles(v, (50, 95)) for stage, v in stages.items()},
        "frame_ms": percentiles(ours_ms, (50, 95)),
        "fps": args.cameras * 1e3 / float(np.median(ours_ms)),  # camera frames per second, per the chosen clock
    }
    if device.type == "cuda":
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["gpu_peak_beyond_weights_mb"] = row["gpu_peak_mb"] - segmenter.weights_bytes / 2**20
    if published_ms:
        row["published_ms"] = percentiles(published_ms, (50, 95))
        # per camera frame: the published loop runs one frame where ours ran `cameras`
        row["speedup_p50"] = row["published_ms"]["p50"] * args.cameras / row["frame_ms"]["p50"]
    if agreement:
        # with the published code (float32) or with our float32 (reduced precision)
        row["label_agreement_min"] = min(agreement)
    return row


def resize_frame_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    return F.interpolate(tensor, shape, mode="nearest")[0, 0].long().numpy()


def print_table(rows: list[dict]) -> None:
    print()
    print(
        "| model | input | frame | device | precision | backend | cameras | call p50 / p95 ms | per stage p50 ms "
        "| camera fps | GPU peak MB (beyond weights) | published p50 ms | speed-up | min label agreement |"
    )
    print("| --- " * 14 + "|")
    for row in rows:
        total = row["frame_ms"]
        stages = ", ".join(f"{k} {v['p50']:.2f}" for k, v in row["stages_ms"].items() if k != "total")
        published = f"{row['published_ms']['p50']:.2f}" if "published_ms" in row else "-"
        speedup = f"{row['speedup_p50']:.2f}x" if "speedup_p50" in row else "-"
        agreement = f"{row['label_agreement_min']:.2%}" if "label_agreement_min" in row else "-"
        memory = f"{row['gpu_peak_mb']:.0f} ({row['gpu_peak_beyond_weights_mb']:.0f})" if "gpu_peak_mb" in row else "-"
        print(
            f"| {row['model']} | {row['input']} | {row['frame']} | {row['device']} | {row['precision']} "
            f"| {row['backend']} | {row['cameras']} | {total['p50']:.2f} / {total['p95']:.2f} | {stages} "
            f"| {row['fps']:.1f} | {memory} | {published} | {speedup} | {agreement} |"
        )
