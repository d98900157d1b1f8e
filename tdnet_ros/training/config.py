"""Training configuration: one dataclass per section of the YAML file.

Unknown keys (in any section) and values of the wrong type fail when the file is read,
before anything is trained.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdnet_ros.data import rare_object_rate_problem
from tdnet_ros.runtime import MAX_SCALE, MIN_SCALE, scales_spread_problem

from .augment import AugmentConfig
from .losses import LossWeights

BATCH_NORM_STATISTICS = ("batch", "running", "pooled")  # optim.batch_norm


class ConfigError(ValueError):
    """A training configuration file or value is invalid (names the file and key)."""


@dataclass(frozen=True)
class DataConfig:
    kind: str = "generated"  # "generated", "cityscapes" (also generated folders) or "camvid"
    root: str = ""  # dataset root for cityscapes / camvid
    train_split: str = "train"
    val_split: str = "val"
    train_seeds: tuple[int, ...] = (1, 2, 3)  # generated: sequences used for training
    val_seeds: tuple[int, ...] = (1001,)  # generated: held-out sequences for validation
    frames: int = 120  # generated: frames per training sequence
    val_frames: int = 40  # generated: frames per validation sequence
    size: tuple[int, int] = (256, 512)  # generated: rendered (height, width)
    gaps: tuple[int, int] = (1, 2)  # range of frame gaps inside a clip
    cache_dir: str = "outputs/cache"  # generated: rendered sequences are kept here ("" = no cache)
    render_workers: int = 0  # generated: processes rendering missing cached sequences (0: one per core)
    # generated: training scenes with this many times the usual buses, trucks, motorcycles,
    # bicycles, cyclists and parks (StreetConfig.rare_object_rate, 1..4); validation keeps 1
    rare_object_rate: float = 1.0
    # DataLoader workers preparing (augmenting) batches ahead of the step. "auto": one on
    # CUDA, or where the training threads leave a CPU core free; none where they take every
    # core, since a worker would then take cycles from them (2 cores, 256x512 crops: 29.5
    # images/s with the data prepared in the loop, 22.8 with one worker)
    num_workers: int | str = "auto"
    prefetch: int = 4  # batches each worker keeps ready

    def __post_init__(self) -> None:
        if self.num_workers != "auto" and not (isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise ValueError(f"data.num_workers must be auto or a count of at least 0, got {self.num_workers!r}")
        if problem := rare_object_rate_problem(self.rare_object_rate):
            raise ValueError(f"data.rare_object_rate {problem}")


@dataclass(frozen=True)
class OptimConfig:
    iterations: int = 1000
    batch_size: int = 2  # per process
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 50  # linear warm-up from lr * warmup_ratio
    warmup_ratio: float = 0.1
    power: float = 0.9  # poly decay: lr * (1 - it / iterations) ** power
    # The detail refinement's parameters learn at lr times this: added to a trained model with
    # its correction at zero, it learns too slowly at the rate that fine-tunes the rest.
    detail_lr_scale: float = 1.0
    # What BatchNorm layers normalize with while training: "batch", each step's own statistics
    # (and their running statistics updated from them), or "running", the running statistics as at
    # inference, left unchanged (their scale and shift still learn), or "pooled", the running
    # statistics in the pyramid-pooling branches only. Each sub-network sees batch_size frames
    # per step, so under "batch" a pooling branch's 1x1 bin normalizes batch_size values per
    # channel (two values: always +-1), where inference uses the running statistics.
    batch_norm: str = "batch"

    def __post_init__(self) -> None:
        if not self.detail_lr_scale > 0:
            raise ValueError(f"optim.detail_lr_scale must be above 0, got {self.detail_lr_scale}")
        if self.batch_norm not in BATCH_NORM_STATISTICS:
            choices = f"{', '.join(BATCH_NORM_STATISTICS[:-1])} or {BATCH_NORM_STATISTICS[-1]}"
            raise ValueError(f"optim.batch_norm must be {choices}, got {self.batch_norm!r}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "outputs/train"
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: leave PyTorch's default)
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    # Mixed precision with float32 master weights and float32 losses: float16 autocast + grad
    # scaling on CUDA, bfloat16 autocast on the CPU (no scaling needed: bf16 has fp32's range).
    # "auto": on CUDA, and on CPUs that compute bfloat16 natively (AVX-512, Arm BF16); float32
    # on the others, where bfloat16 is emulated and far slower. true forces it everywhere.
    amp: bool | str = "auto"
    channels_last: bool = True  # NHWC activations and weights (faster convolutions on CPU and GPU)
    # Let glibc's malloc keep freed memory for reuse while training (Linux): otherwise every
    # step maps the large loss tensors anew and zero-fills them page by page, about 15 % of a
    # CPU step at 256x512. Restored to glibc's defaults when training ends.
    reuse_freed_memory: bool = True
    val_interval: int = 200  # iterations between validations (0: only at the end)
    val_max_clips: int = 40  # validation clips (evenly spread over the val set)
    checkpoint_interval: int = 100  # iterations between checkpoint saves (always at the end)
    # iterations between weight-only snapshots `snapshot_it<N>.pt`, kept for averaging the
    # end of a run (`training.average`); 0: none
    snapshot_interval: int = 0
    progress: bool = True  # tqdm progress bar
    log_interval: int = 10  # iterations between CSV rows
    init_checkpoint: str | None = ""  # start from these weights (a project checkpoint, or a teacher's; "" or null: none)

    def __post_init__(self) -> None:
        if not (isinstance(self.amp, bool) or self.amp == "auto"):
            raise ValueError(f"run.amp must be true, false or auto, got {self.amp!r}")
        if self.snapshot_interval < 0:
            raise ValueError(f"run.snapshot_interval must be 0 (none) or a number of iterations, got {self.snapshot_interval}")


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "student"  # "teacher" (single-frame grouped teacher) or "student" (TDNet)
    model: str = "td4-r18-narrow"  # ModelConfig variant of the student
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to replace
    teacher: dict[str, Any] = field(default_factory=dict)  # TeacherConfig fields (teacher stage)
    teacher_checkpoint: str = ""  # trained teacher for the distillation terms ("" = no KD)
    # A TDNet teacher_checkpoint runs each clip at these multiples of its size and teaches the
    # mean of their probabilities (loss.kd_full only); a grouped teacher runs at 1.0.
    teacher_scales: tuple[float, ...] = (1.0,)
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossWeights = LossWeights()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        if self.stage not in ("teacher", "student"):
            raise ConfigError(f"stage must be 'teacher' or 'student', got {self.stage!r}")
        if self.data.kind not in ("generated", "cityscapes", "camvid"):
            raise ConfigError(f"data.kind must be generated, cityscapes or camvid, got {self.data.kind!r}")
        if self.data.gaps[0] < 1 or self.data.gaps[1] < self.data.gaps[0]:
            raise ConfigError(f"data.gaps must be [min, max] with 1 <= min <= max, got {list(self.data.gaps)}")
        if self.optim.iterations < 1 or self.optim.batch_size < 1:
            raise ConfigError("optim.iterations and optim.batch_size must be >= 1")
        object.__setattr__(self, "teacher_scales", tuple(self.teacher_scales))  # a list from YAML
        scales = self.teacher_scales
        if not scales or scales_spread_problem(scales):
            raise ConfigError(f"teacher_scales must be distinct numbers within {MIN_SCALE}..{MAX_SCALE}, "
                              f"got {list(scales)}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of some sections replaced: replace(optim={"iterations": 2})."""
        return from_dict(_merge(self.to_dict(), sections))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("model_overrides", "teacher"):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _is_kind(value: Any, kind: Any) -> bool:
    """Whether a value read from YAML fits the field type `kind` (scalars, unions and tuples)."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # YAML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    if isinstance(kind, types.UnionType):
        return any(_is_kind(value, member) for member in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            return False
        if len(items) == 2 and items[1] is Ellipsis:
            return all(_is_kind(item, items[0]) for item in value)
        return len(value) == len(items) and all(_is_kind(item, k) for item, k in zip(value, items))
    if typing.get_origin(kind) is dict:  # its keys are checked where they are used
        return isinstance(value, dict)
    return True


def _kind_name(kind: Any) -> str:
    """`kind` in a user's words: "a number", "a list of 2 whole numbers"."""
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}
    if kind in names:
        return names[kind]
    if isinstance(kind, types.UnionType):
        return " or ".join(_kind_name(member) for member in typing.get_args(kind))
    if typing.get_origin(kind) is dict:
        return "a mapping"
    items = typing.get_args(kind)
    plural = {bool: "true or false values", int: "whole numbers", float: "numbers", str: "strings"}
    if len(items) == 2 and items[1] is Ellipsis:
        return f"a list of {plural.get(items[0], 'values')}"
    return f"a list of {len(items)} {plural.get(items[0], 'values')}"


def _section(cls: type, values: Any, source: str, name: str) -> Any:
    """Section `name` (`cls`) of the configuration `source` from its mapping `values`, each
    value checked against its field's type."""
    where = f"{source} section '{name}'"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(fields)}")
    kinds = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        if not _is_kind(value, kinds[key]):
            raise ConfigError(f"{source}: {name}.{key} must be {_kind_name(kinds[key])}, got {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        converted[key] = value
    return cls(**converted)


_SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig, "loss": LossWeights, "run": RunConfig}


def from_dict(values: dict[str, Any], source: str = "configuration") -> TrainConfig:
    """Builds a TrainConfig, failing on unknown keys and on values of the wrong type (a string
    for a number) with the section and key named."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a mapping at the top level")
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - top)
    if unknown:
        raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}; known: {', '.join(sorted(top))}")
    kwargs = dict(values)
    kinds = typing.get_type_hints(TrainConfig)
    for key, value in kwargs.items():
        if key not in _SECTIONS and not _is_kind(value, kinds[key]):
            raise ConfigError(f"{source}: {key} must be {_kind_name(kinds[key])}, got {value!r}")
    try:
        for name, cls in _SECTIONS.items():
            if name in kwargs:
                kwargs[name] = _section(cls, kwargs[name] or {}, source, name)
        return TrainConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {error}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """The content of a YAML file (`what` names it in the error: "training configuration")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse {path}: {error}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Reads a YAML training configuration (then applies `overrides`, nested by section)."""
    values = read_yaml(path, "training configuration")
    if overrides:
        values = _merge(values, overrides)
    return from_dict(values, str(path))
