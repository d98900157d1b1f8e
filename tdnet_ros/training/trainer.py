"""The training loop: teacher or TDNet student, one process or several (DDP)."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tdnet_ros.checkpoint import CheckpointError, load_file, load_into, read_checkpoint, save_checkpoint, stored_config
from tdnet_ros.config import ModelConfig
from tdnet_ros.evaluation.plots import headless_pyplot
from tdnet_ros.classes import CLASS_COLORS, CLASS_NAMES
from tdnet_ros.metrics import SegmentationScores
from tdnet_ros.model import PyramidPooling, TDNet, build_model, fit_layer_norms
from tdnet_ros.preprocess import labels_from_logits
from tdnet_ros.runtime import cpu_computes_bfloat16, usable_cpu_cores

from .augment import augment_clip, prepare_eval_clip, to_tensor
from .calibrate import without_offsets
from .config import TrainConfig
from .datasets import CAMVID_CLASSES, CAMVID_COLORS, CamVidClips, CityscapesClips, ClipDataset, GeneratedClips
from .losses import balanced_class_weights, cross_entropy, ohem_cross_entropy, student_loss
from .teacher import (ScaledTDNetTeacher, TeacherConfig, TeacherNet, load_distillation_teacher, load_teacher,
                      save_teacher)
from .widen import widen_state

LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"


# -- schedule -------------------------------------------------------------------------------


def learning_rate(iteration: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then poly decay to 0 at `iterations`."""
    o = config.optim
    if iteration < o.warmup_iterations:
        ratio = o.warmup_ratio + (1 - o.warmup_ratio) * iteration / o.warmup_iterations
        return o.lr * ratio
    return o.lr * (1 - iteration / o.iterations) ** o.power


# -- models ---------------------------------------------------------------------------------


class AuxiliaryHeads(nn.Module):
    """One auxiliary classifier per sub-network on its layer3 features (training only)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c3 = 4 * config.base_width * config.expansion
        hidden = max(c3 // 2, 8)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c3, hidden, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Dropout2d(0.1),
                nn.Conv2d(hidden, config.num_classes, 1),
            )
            for _ in range(config.num_paths)
        )


class StudentForTraining(nn.Module):
    """TDNet + auxiliary heads behind one `forward`, so DistributedDataParallel can wrap it."""

    def __init__(self, model: TDNet, with_auxiliary: bool) -> None:
        super().__init__()
        self.model = model
        self.auxiliary = AuxiliaryHeads(model.config) if with_auxiliary else None

    def forward(
        self, clip: list[torch.Tensor], first_path: int, window: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outputs = self.model.forward_clip(clip, first_path, with_layer3=self.auxiliary is not None, window=window)
        logits = [o.logits for o in outputs]  # N x (B, K, h, w); the last is attention-composed
        aux = []
        if self.auxiliary is not None:
            n = self.model.num_paths
            aux = [self.auxiliary.heads[(first_path + j) % n](o.layer3) for j, o in enumerate(outputs)]
        return logits, aux


# -- data -----------------------------------------------------------------------------------


def class_table(config: TrainConfig) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    if config.data.kind == "camvid":
        return CAMVID_CLASSES, CAMVID_COLORS
    return tuple(CLASS_NAMES), tuple(tuple(c) for c in CLASS_COLORS)


def build_datasets(config: TrainConfig, clip_length: int) -> tuple[ClipDataset, ClipDataset]:
    d = config.data
    num_classes = len(class_table(config)[0])
    if d.kind == "generated":
        cache = d.cache_dir or None
        train = GeneratedClips(d.train_seeds, d.frames, d.size, clip_length, d.gaps, cache, num_classes,
                               d.render_workers, d.rare_object_rate)
        val = GeneratedClips(d.val_seeds, d.val_frames, d.size, clip_length, (1, 1), cache, num_classes,
                             d.render_workers)
    elif d.kind == "cityscapes":
        train = CityscapesClips(d.root, d.train_split, clip_length, d.gaps, num_classes)
        val = CityscapesClips(d.root, d.val_split, clip_length, (1, 1), num_classes)
    else:
        train = CamVidClips(d.root, d.train_split, clip_length, d.gaps, num_classes)
        val = CamVidClips(d.root, d.val_split, clip_length, (1, 1), num_classes)
    return train, val


class _TrainView(torch.utils.data.Dataset):
    """Augmented training clips; the random draw depends on (seed, epoch, index) only.

    Keys are (index, whole_frame): `_batches` decides per batch whether its clips are whole
    frames (augment.whole_frame), since the clips of one batch must share a shape.
    """

    def __init__(self, clips: ClipDataset, config: TrainConfig) -> None:
        self.clips, self.config, self.epoch = clips, config, 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, whole_frame = key
        rng = np.random.default_rng([self.config.run.seed, self.epoch, index])
        frames, labels = self.clips.load_clip(index, rng)
        clip = augment_clip(frames, labels, self.config.augment, rng, whole_frame)
        x = torch.stack([to_tensor(f) for f in clip.frames])  # (N, 3, h, w)
        y = torch.from_numpy(np.stack(clip.labels)).long()  # (N, h, w)
        return x, y, torch.from_numpy(clip.window)  # window: (4,)


def _epoch_keys(
    view: _TrainView, config: TrainConfig, rank: int, world: int, epoch: int, per_epoch: int
) -> list[list[tuple[int, bool]]]:
    """This process's batches of epoch `epoch`: shuffled with seed (run.seed, epoch), sharded.

    Whether batch b is whole frames is drawn from (run.seed, epoch, b), the same on every
    process, so the replicas of one distributed step share a shape too.
    """
    sampler = torch.utils.data.DistributedSampler(
        view, num_replicas=world, rank=rank, shuffle=True, seed=config.run.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    size = config.optim.batch_size
    whole = np.random.default_rng([config.run.seed, epoch, 11]).random(per_epoch) < config.augment.whole_frame
    return [[(i, bool(whole[b])) for i in indices[b * size : (b + 1) * size]] for b in range(per_epoch)]


def data_workers(config: TrainConfig, device: torch.device) -> int:
    """data.num_workers, with "auto" resolved for `device` and the cores of this machine."""
    if config.data.num_workers != "auto":
        return int(config.data.num_workers)
    if device.type == "cuda":
        return 1
    threads = config.run.threads or torch.get_num_threads()
    return 1 if threads < usable_cpu_cores() else 0


def _batches(view: _TrainView, config: TrainConfig, rank: int, world: int, start_iteration: int, workers: int):
    """Endless batches, epoch after epoch, resuming at `start_iteration`, prepared by
    `workers` DataLoader processes (0: in the loop)."""
    per_epoch = max(len(view) // (config.optim.batch_size * world), 1)
    epoch, skip = divmod(start_iteration, per_epoch)
    while True:
        view.epoch = epoch
        loader = torch.utils.data.DataLoader(
            view, batch_sampler=_epoch_keys(view, config, rank, world, epoch, per_epoch)[skip:],
            num_workers=workers, prefetch_factor=config.data.prefetch if workers else None,
        )
        yield from loader
        skip, epoch = 0, epoch + 1


# -- validation -----------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: nn.Module, clips: ClipDataset, config: TrainConfig, input_size: tuple[int, int], device: torch.device,
    num_classes: int, teacher_stage: bool,
) -> SegmentationScores:
    """mIoU of the last frame's output on evenly spread validation clips (tdnet_ros.metrics)."""
    was_training = model.training
    model.eval()
    scores = SegmentationScores(num_classes)
    count = min(config.run.val_max_clips, len(clips))
    for index in np.linspace(0, len(clips) - 1, count).round().astype(int):
        frames, labels = clips.load_clip(int(index), None)
        frames, target = prepare_eval_clip(frames, labels, input_size)
        tensors = [to_tensor(f)[None].to(device) for f in frames]
        if teacher_stage:
            logits = model(tensors[-1])["out"]
        else:
            logits = model.forward_clip(tensors, 0)[-1].logits
        # As the model's inference upsamples them (the teacher's head: align_corners=False).
        align_corners = False if teacher_stage else model.config.upsample_align_corners
        labels = labels_from_logits(logits.float(), tuple(target.shape), align_corners=align_corners)
        scores.update(labels.cpu().numpy().astype(np.int64), target.astype(np.int64))
    if was_training:
        enter_training(model, config.optim.batch_norm)
    return scores


def enter_training(model: nn.Module, batch_norm: str) -> None:
    """Training mode, with the BatchNorm layers normalizing as `optim.batch_norm` says: "batch"
    (train mode), "running" (eval mode: running statistics, left unchanged), or "pooled"
    (eval mode in the pyramid-pooling branches only)."""
    model.train()
    if batch_norm == "batch":
        return
    scopes = [model] if batch_norm == "running" else [m for m in model.modules() if isinstance(m, PyramidPooling)]
    for scope in scopes:
        for module in scope.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


# -- logging --------------------------------------------------------------------------------


class TrainingLog:
    """CSV rows (iteration, lr, loss terms, mIoU) and a PNG plot of them."""

    def __init__(self, out_dir: Path, resume_at: int | None) -> None:
        """A new log, or with `resume_at` the existing one up to that iteration: the rows a
        killed run wrote after its last checkpoint are dropped, since they are trained again."""
        self.csv_path, self.png_path = out_dir / "log.csv", out_dir / "log.png"
        self.rows: list[dict[str, Any]] = []
        if resume_at is not None and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= resume_at]

    def last_seconds(self) -> float:
        """Training time logged so far (0 for a new log)."""
        times = [float(r["seconds"]) for r in self.rows if r.get("seconds")]
        return times[-1] if times else 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def write(self, plot: bool = True) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        if plot:
            self._plot(columns)

    def _plot(self, columns: list[str]) -> None:
        plt = headless_pyplot()

        def series(name: str) -> tuple[list[int], list[float]]:
            points = [(int(r["iteration"]), float(r[name])) for r in self.rows if r.get(name) not in (None, "")]
            return [p[0] for p in points], [p[1] for p in points]

        fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(11, 4))
        for name in columns:
            if name == "loss" or name.startswith("loss_"):
                ax_loss.plot(*series(name), label=name)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=8)
        ax_miou.plot(*series("val_miou"), marker="o")
        ax_miou.set_xlabel("iteration")
        ax_miou.set_ylabel("validation mIoU")
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=90)
        plt.close(fig)


# -- the loop -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint: Path  # final checkpoint (project format for the student, teacher format otherwise)
    iterations: int
    val_miou: float
    seconds: float
    model: nn.Module  # the trained network (TDNet or TeacherNet), on the training device
    images_per_second: float  # training images (clip frames) per second, validation excluded


class ImageRate:
    """Training throughput in images per second: over the run and over the last steps.

    The first step is not counted (it includes start-up: workers forking, allocations).
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.restart()
        self.total_images, self.total_seconds = 0, 0.0

    def restart(self) -> None:
        self.last = None
        self.recent_steps: list[tuple[int, float]] = []

    def add(self, images: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            seconds = now - self.last
            self.total_images += images
            self.total_seconds += seconds
            self.recent_steps = [*self.recent_steps[-(self.window - 1):], (images, seconds)]
        self.last = now

    def recent(self) -> float:
        seconds = sum(s for _, s in self.recent_steps)
        return sum(i for i, _ in self.recent_steps) / seconds if seconds else math.nan

    def overall(self) -> float:
        return self.total_images / self.total_seconds if self.total_seconds else math.nan


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    name = config.run.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def _student_config(config: TrainConfig) -> ModelConfig:
    names, colors = class_table(config)
    overrides = {"num_classes": len(names), "class_names": names, "class_colors": colors}
    if config.data.kind == "generated":
        overrides["input_size"] = tuple(config.data.size)
    overrides.update(config.model_overrides)
    for key in ("input_size", "layers", "class_names"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    if "class_colors" in overrides:
        overrides["class_colors"] = tuple(tuple(c) for c in overrides["class_colors"])
    name = overrides.pop("name", config.model)  # a renamed variant, e.g. one sub-network alone
    return dataclasses.replace(ModelConfig.from_name(config.model, **overrides), name=name)


def _parameter_groups(net: nn.Module, detail_lr_scale: float) -> tuple[list[dict[str, Any]], list[float]]:
    """The optimizer's parameter groups and each one's multiple of the learning rate: the
    detail refinement's (if any) at `detail_lr_scale`, everything else at 1. The multiples
    stay out of the optimizer's state, so `last.pt` files written without them resume."""
    named = list(net.named_parameters())
    groups = [{"params": [p for name, p in named if ".detail." not in name]}]
    detail = [p for name, p in named if ".detail." in name]
    if detail:
        groups.append({"params": detail})
    return groups, [1.0, detail_lr_scale][: len(groups)]


def _load_initial_student(student: TDNet, path: str, seed: int) -> None:
    """Loads run.init_checkpoint into the student. A checkpoint of the same model at a smaller
    base_width is widened to it (training.widen), one at another input size gets its spatial
    LayerNorm parameters resized: either way the run starts from what the checkpoint computes.
    Class offsets added by `training.calibrate` are taken off again: training goes on from
    the trained logits (calibrate the result anew)."""
    content = read_checkpoint(path)
    state = content["state_dict"]
    stored = stored_config(content, f"run.init_checkpoint {path}") if "config" in content else None
    target = student.config
    if "calibration" in content and stored is not None:
        state = without_offsets(content, path)
        print(f"run.init_checkpoint: {path} carries class offsets from calibration; training starts without "
              "them (calibrate the trained model again)")
    if stored is not None and stored.base_width < target.base_width:
        try:
            state = widen_state(state, stored, target, generator=torch.Generator().manual_seed(seed))
        except ValueError as error:
            raise CheckpointError(f"run.init_checkpoint {path} cannot be widened to {target.name!r}: {error}") from None
        print(f"run.init_checkpoint: {path} widened from base_width {stored.base_width} to {target.base_width}")
    # A refinement, or refinement blocks, the checkpoint lacks keep their start (a zero
    # correction, identity blocks): the student computes what the checkpoint does.
    new_detail = {k: v for k, v in student.state_dict().items() if ".detail." in k and k not in state}
    if new_detail:
        state = {**new_detail, **state}
        if stored is None or not stored.detail_channels:
            print(f"run.init_checkpoint: {path} has no detail refinement; the student's starts at zero")
        else:
            print(f"run.init_checkpoint: {path} has a detail refinement of depth {stored.detail_depth}; "
                  f"the student's {target.detail_depth - stored.detail_depth} more blocks start as the identity")
    load_into(student, fit_layer_norms(state, student), path)


def train(config: TrainConfig, resume: bool = False, stop_at: int | None = None) -> TrainResult:
    """Trains the teacher or the student as `config` says; returns the final checkpoint.

    With `resume`, continues from `<out_dir>/last.pt` (weights, optimizer, iteration and random
    state, so the learning-rate schedule and the data go on where they stopped). `stop_at`
    ends the run after that iteration (with `last.pt` written), as an interruption would. Under torchrun (WORLD_SIZE > 1) every
    process runs this and gradients are averaged by DistributedDataParallel.
    """
    with reused_freed_memory(config.run.reuse_freed_memory):
        return _train(config, resume, stop_at)


# glibc's mallopt parameters (malloc.h) and their default values
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def reused_freed_memory(enabled: bool):
    """While active, glibc's malloc keeps freed memory for the next allocations (run.reuse_freed_memory).

    By default glibc maps every large block on its own and unmaps it when freed, so a
    training step's big tensors (the logits at label resolution) arrive as fresh pages that
    the kernel zero-fills on first touch, every step. Here no block is mapped on its own
    and up to 2 GiB of freed heap are kept. On exit both settings go back to glibc's
    defaults (its dynamic adjustment of them stays off). A no-op where malloc is not glibc's.
    """
    libc = None
    if enabled:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt  # noqa: B018 (musl and other C libraries have no mallopt)
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def _train(config: TrainConfig, resume: bool, stop_at: int | None) -> TrainResult:
    """train()'s body, with run.reuse_freed_memory applied around it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(config, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    torch.manual_seed(config.run.seed)
    main_process = rank == 0
    out_dir = Path(config.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_stage = config.stage == "teacher"
    names, _ = class_table(config)
    num_classes = len(names)

    # Models
    student_config = _student_config(config)
    teacher_kd: TeacherNet | ScaledTDNetTeacher | None = None
    if teacher_stage:
        teacher_fields = {"num_groups": student_config.num_paths, "num_classes": num_classes, **config.teacher}
        net: nn.Module = TeacherNet(TeacherConfig.from_dict(teacher_fields))
        if config.run.init_checkpoint:
            net.load_state_dict(load_teacher(config.run.init_checkpoint).state_dict())
        clip_length = 1
        input_size = student_config.input_size
    else:
        student = build_model(student_config)
        if config.run.init_checkpoint:
            _load_initial_student(student, config.run.init_checkpoint, config.run.seed)
        net = StudentForTraining(student, with_auxiliary=bool(config.loss.auxiliary))
        clip_length = student_config.num_paths
        input_size = student_config.input_size
        if config.teacher_checkpoint and (config.loss.kd_full or config.loss.kd_group):
            teacher_kd = load_distillation_teacher(config.teacher_checkpoint, config.teacher_scales).to(device).eval()
            if isinstance(teacher_kd, ScaledTDNetTeacher) and config.loss.kd_group:
                raise CheckpointError(f"loss.kd_group needs a grouped teacher; teacher_checkpoint "
                                      f"{config.teacher_checkpoint} is a TDNet, which teaches loss.kd_full only: "
                                      "set loss.kd_group to 0")
            if isinstance(teacher_kd, TeacherNet) and teacher_kd.config.num_groups != student_config.num_paths:
                raise CheckpointError(
                    f"teacher {config.teacher_checkpoint} has {teacher_kd.config.num_groups} groups, "
                    f"the student {student_config.num_paths} sub-networks"
                )
    net.to(device)
    if distributed and device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    enter_training(net, config.optim.batch_norm)
    parameter_groups, lr_scales = _parameter_groups(net, config.optim.detail_lr_scale)
    optimizer = torch.optim.SGD(
        parameter_groups, lr=config.optim.lr, momentum=config.optim.momentum, weight_decay=config.optim.weight_decay
    )
    # float16 needs loss scaling (CUDA); bfloat16 keeps float32's exponent range (CPU).
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    use_amp = autocast_enabled(config.run.amp, device, report=main_process)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    memory_format = torch.channels_last if config.run.channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)
    if teacher_kd is not None:
        teacher_kd.to(memory_format=memory_format)

    # Resume
    start = 0
    last_path = out_dir / LAST_CHECKPOINT
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint {last_path}")
        state = load_file(last_path, "training checkpoint")
        _module_of(net, teacher_stage).load_state_dict(state["state_dict"])
        if not teacher_stage and state.get("auxiliary_state") is not None and net.auxiliary is not None:
            net.auxiliary.load_state_dict(state["auxiliary_state"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
    wrapped = (
        nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
        if distributed
        else net
    )

    train_set, val_set = build_datasets(config, clip_length)
    class_weights = None
    if config.loss.class_balance and not teacher_stage:
        class_weights = balanced_class_weights(train_set.class_pixel_counts(), config.loss.class_balance).to(device)
        if main_process:
            print("class weights of the OHEM term: " + ", ".join(f"{w:.2f}" for w in class_weights.tolist()),
                  flush=True)
    batches = _batches(_TrainView(train_set, config), config, rank, world, start, data_workers(config, device))
    log = TrainingLog(out_dir, start if resume else None)
    progress = None
    if main_process and config.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.optim.iterations, initial=start, desc=f"train {config.stage}", dynamic_ncols=True)

    began = time.time()
    # a resumed run's log goes on counting from where the interrupted one stopped
    earlier_seconds = log.last_seconds()
    images_per_step = config.optim.batch_size * world * clip_length
    speed = ImageRate()
    val_miou = math.nan
    path_rng = np.random.default_rng([config.run.seed, 7])  # first sub-network of each clip
    for _ in range(start):
        path_rng.integers(0, clip_length)  # the same draws as an uninterrupted run
    end = config.optim.iterations if stop_at is None else min(stop_at, config.optim.iterations)
    for iteration in range(start, end):
        lr = learning_rate(iteration, config)
        for group, scale in zip(optimizer.param_groups, lr_scales):
            group["lr"] = lr * scale
        x, y, window = next(batches)  # (B, N, 3, h, w), (B, N, h, w), (B, 4)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        window = window.to(device) if config.augment.align_layer_norm else None
        first_path = int(path_rng.integers(0, clip_length))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            if teacher_stage:
                frames = x[:, -1].contiguous(memory_format=memory_format)
                total, terms = _teacher_loss(wrapped, frames, y[:, -1], config)
            else:
                total, terms = _student_step_loss(wrapped, teacher_kd, x, y, first_path, config, memory_format,
                                                  class_weights, window, student_config.upsample_align_corners)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

        done = iteration + 1
        total = total.detach()
        if not torch.isfinite(total):
            raise FloatingPointError(f"the training loss is {float(total)} at iteration {done}; lower optim.lr")
        speed.add(images_per_step)
        row: dict[str, Any] = {}
        if done % config.run.log_interval == 0 or done == config.optim.iterations:
            row = {"iteration": done, "lr": f"{lr:.6g}", "loss": f"{float(total):.5f}"}
            row.update({f"loss_{k}": f"{v:.5f}" for k, v in terms.items()})
            row["seconds"] = f"{earlier_seconds + time.time() - began:.1f}"
            row["images_per_s"] = f"{speed.recent():.2f}"
        validate_now = done == config.optim.iterations or (config.run.val_interval and done % config.run.val_interval == 0)
        if validate_now and main_process:
            module = _module_of(net, teacher_stage)
            scores = validate(module, val_set, config, input_size, device, num_classes, teacher_stage)
            val_miou = scores.mean_iou
            row = row or {"iteration": done, "lr": f"{lr:.6g}", "loss": f"{float(total):.5f}"}
            row["val_miou"] = f"{val_miou:.4f}"
            if progress is not None:
                progress.write(f"iteration {done}: validation mIoU {100 * val_miou:.1f}, "
                               f"{speed.recent():.1f} images/s")
            speed.restart()  # validation time is not training speed
        if row and main_process:
            log.add(row)
            log.write(plot="val_miou" in row)
        if main_process and (done % config.run.checkpoint_interval == 0 or done in (end, config.optim.iterations)):
            _save(net, teacher_stage, optimizer, scaler, done, config, last_path)
        if main_process and config.run.snapshot_interval and done % config.run.snapshot_interval == 0:
            _save(net, teacher_stage, None, None, done, config, out_dir / f"snapshot_it{done}.pt")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{float(total):.3f}", lr=f"{lr:.2e}", img_s=f"{speed.recent():.1f}")
    if progress is not None:
        progress.close()
    if distributed:
        _average_buffers(net, world)
    final = out_dir / FINAL_CHECKPOINT
    if main_process and end == config.optim.iterations:
        _save(net, teacher_stage, None, None, end, config, final, val_miou=val_miou)
    if distributed:
        dist.barrier()
    return TrainResult(final if end == config.optim.iterations else last_path, end, val_miou,
                       time.time() - began, _module_of(net, teacher_stage), speed.overall())


def _average_buffers(net: nn.Module, world: int) -> None:
    """BatchNorm running statistics differ per process (each saw its own data): average them."""
    for buffer in net.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def _module_of(net: nn.Module, teacher_stage: bool) -> nn.Module:
    return net if teacher_stage else net.model


def _save(net, teacher_stage, optimizer, scaler, iteration, config, path, **extra) -> None:
    content: dict[str, Any] = {"iteration": iteration, "train_config": config.to_dict(), **extra}
    if optimizer is not None:
        content["optimizer"] = optimizer.state_dict()
        content["scaler"] = scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}
        content["torch_rng"] = torch.get_rng_state()
    if teacher_stage:
        save_teacher(net, path, **content)
    else:
        if net.auxiliary is not None and optimizer is not None:
            content["auxiliary_state"] = net.auxiliary.state_dict()
        save_checkpoint(net.model, path, **content)


def _teacher_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig):
    """OHEM on the full head, plus cross-entropy on every group head and the auxiliary head."""
    out = net(x)
    w = config.loss
    terms = {"ohem": ohem_cross_entropy(out["out"], y, threshold=w.ohem_threshold, min_kept=w.ohem_min_kept)}
    terms["groups"] = torch.stack([cross_entropy(g, y) for g in out["groups"]]).mean()
    if w.auxiliary:
        terms["auxiliary"] = w.auxiliary * cross_entropy(out["aux"], y)
    total = torch.stack(list(terms.values())).sum()
    return total, {k: float(v.detach()) for k, v in terms.items()}


def autocast_enabled(amp: bool | str, device: torch.device, report: bool = True) -> bool:
    """run.amp resolved for `device`: "auto" is on except on a CPU that emulates bfloat16.

    With `report`, a CPU without native bfloat16 gets one line saying what was chosen.
    """
    if device.type != "cpu" or cpu_computes_bfloat16():
        return amp is True or amp == "auto"
    if amp == "auto" and report:
        print("run.amp auto: this CPU has no native bfloat16 (AVX-512 or Arm BF16), where bfloat16 "
              "runs far slower than float32; training in float32", flush=True)
    elif amp is True and report:
        print("run.amp true: this CPU emulates bfloat16 (no AVX-512 or Arm BF16); expect training far "
              "slower than in float32 (run.amp auto would choose float32 here)", flush=True)
    return amp is True


def _student_step_loss(net, teacher: TeacherNet | ScaledTDNetTeacher | None, x, y, first_path: int, config: TrainConfig,
                       memory_format: torch.memory_format = torch.contiguous_format,
                       class_weights: torch.Tensor | None = None, window: torch.Tensor | None = None,
                       align_corners: bool = False):
    """Student loss on one batch of clips (B, N, 3, h, w) with labels (B, N, h, w); `window`
    (B, 4) places each clip's crop in its frame for the LayerNorm (augment.align_layer_norm);
    `align_corners`: how the student's logits are upsampled (ModelConfig.upsample_align_corners)."""
    n = x.shape[1]
    clip = [x[:, j].contiguous(memory_format=memory_format) for j in range(n)]
    logits, aux = net(clip, first_path, window)
    teacher_full, sub_logits, teacher_groups = None, None, None
    if isinstance(teacher, ScaledTDNetTeacher):
        teacher_full = teacher(clip, first_path, tuple(logits[-1].shape[-2:]))
    elif teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(x.flatten(0, 1).contiguous(memory_format=memory_format))  # (B*N, 3, h, w)
        b = x.shape[0]
        teacher_full = teacher_out["out"].unflatten(0, (b, n))[:, -1]
        # Sub-network p keeps channel group p: its single-frame outputs (the frames before
        # the last) learn from the teacher's group-p head on the same frame.
        sub_logits = logits[:-1]
        teacher_groups = [
            teacher_out["groups"][(first_path + j) % n].unflatten(0, (b, n))[:, j] for j in range(n - 1)
        ]
    return student_loss(
        logits[-1], y[:, -1], config.loss,
        auxiliary_logits=aux, auxiliary_targets=[y[:, j] for j in range(n)],
        teacher_full=teacher_full, sub_logits=sub_logits, teacher_groups=teacher_groups,
        class_weights=class_weights, align_corners=align_corners,
    )
