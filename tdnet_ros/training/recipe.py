"""`tdnet-recipe`: the paper's two-stage recipe as one resumable command.

    tdnet-recipe config/recipe_default.yaml
    tdnet-recipe config/recipe_default.yaml --set student.optim.iterations=2 --set out_dir=outputs/x

Stages, each skipped when its output exists and resumed from its `last.pt` when interrupted:

1. teacher: the grouped single-frame teacher (`stage: teacher` training configuration);
2. student: the TDNet student on clips, distilled from that teacher (`teacher_checkpoint`
   is set to the teacher's `model.pt`);
3. export: the student packed as a shippable checkpoint (`<out_dir>/model.pt` + `.sha256`),
   with class offsets calibrated on the generated sequences of `calibration_seeds` when
   the recipe names any (`training.calibrate`; the uncalibrated export stays as
   `<out_dir>/uncalibrated.pt`);
4. held-out: mIoU, per-class IoU and CPU latency on generated sequences of seeds never
   used in training (`<out_dir>/heldout.json`).

Run it again after an interruption (or with `nohup` in the background) and it goes on where
it stopped. The recipe file names the two training configurations (paths relative to the
recipe file) and where everything goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, load_config, read_yaml


@dataclass(frozen=True)
class Recipe:
    teacher: str  # training configuration of stage 1 (stage: teacher); "" skips distillation
    student: str  # training configuration of stage 2 (stage: student)
    out_dir: str = "outputs/recipe"  # teacher/, student/, model.pt, heldout.json go here
    heldout_seeds: tuple[int, ...] = (2001, 2002, 2003)  # never used for training or validation
    heldout_frames: int = 60
    heldout_size: tuple[int, int] = (256, 512)  # (height, width) of the held-out (and calibration) renders
    calibration_seeds: tuple[int, ...] = ()  # validation sequences for class offsets; () skips calibration
    calibration_frames: int = 40
    overrides: dict[str, Any] = field(default_factory=dict)  # {"teacher"|"student": {section: {key: v}}}


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Reads a recipe YAML file; `overrides` may replace its keys or the stages' settings."""
    path = Path(path)
    values = read_yaml(path, "recipe")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must be a mapping at the top level")
    overrides = dict(overrides or {})
    stage_overrides = {k: overrides.pop(k) for k in ("teacher", "student") if isinstance(overrides.get(k), dict)}
    values.update(overrides)
    known = {"teacher", "student", "out_dir", "heldout_seeds", "heldout_frames", "heldout_size",
             "calibration_seeds", "calibration_frames"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not values.get("student"):
        raise ConfigError(f"{path} names no student configuration")

    def beside(name: str) -> str:
        return str(path.parent / name) if name and not Path(name).is_absolute() else name

    try:
        seeds = tuple(int(s) for s in values.get("heldout_seeds", Recipe.heldout_seeds))
        frames = int(values.get("heldout_frames", Recipe.heldout_frames))
        height, width = (int(v) for v in values.get("heldout_size", Recipe.heldout_size))
        calibration_seeds = tuple(int(s) for s in values.get("calibration_seeds") or ())
        calibration_frames = int(values.get("calibration_frames", Recipe.calibration_frames))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: heldout_seeds, heldout_frames, heldout_size [height, width], "
                          f"calibration_seeds and calibration_frames must be whole numbers ({error})") from None
    if not seeds or frames < 1 or not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise ConfigError(f"{path}: heldout_seeds must not be empty, heldout_frames must be >= 1 and "
                          "heldout_size within 16..4096 pixels")
    if calibration_frames < 1 or any(s < 0 for s in calibration_seeds) or set(calibration_seeds) & set(seeds):
        raise ConfigError(f"{path}: calibration_seeds must be non-negative and share none with heldout_seeds "
                          "(calibrating on the held-out sequences would score the calibration), "
                          "calibration_frames >= 1")
    return Recipe(
        teacher=beside(values.get("teacher") or ""), student=beside(values["student"]),
        out_dir=str(values.get("out_dir", Recipe.out_dir)), heldout_seeds=seeds, heldout_frames=frames,
        heldout_size=(height, width), calibration_seeds=calibration_seeds, calibration_frames=calibration_frames,
        overrides=stage_overrides,
    )


def stage_configs(recipe: Recipe) -> tuple[TrainConfig | None, TrainConfig]:
    """The two training configurations with the recipe's output folders and teacher link."""
    out = Path(recipe.out_dir)
    teacher = None
    if recipe.teacher:
        teacher = load_config(recipe.teacher, recipe.overrides.get("teacher"))
        if teacher.stage != "teacher":
            raise ConfigError(f"{recipe.teacher} must be a 'stage: teacher' configuration")
        teacher = teacher.replace(run={"out_dir": str(out / "teacher")})
    student = load_config(recipe.student, recipe.overrides.get("student"))
    if student.stage != "student":
        raise ConfigError(f"{recipe.student} must be a 'stage: student' configuration")
    teacher_checkpoint = str(out / "teacher" / "model.pt") if teacher is not None else ""
    student = student.replace(run={"out_dir": str(out / "student")}, teacher_checkpoint=teacher_checkpoint)
    return teacher, student


def _train_stage(config: TrainConfig, log) -> Path:
    """Trains one stage unless its final checkpoint exists; resumes from last.pt if present."""
    from .trainer import FINAL_CHECKPOINT, LAST_CHECKPOINT, train

    out = Path(config.run.out_dir)
    final = out / FINAL_CHECKPOINT
    if final.is_file():
        log(f"{config.stage}: done before ({final})")
        return final
    resume = (out / LAST_CHECKPOINT).is_file()
    log(f"{config.stage}: {'resuming' if resume else 'training'} in {out}")
    result = train(config, resume=resume)
    log(f"{config.stage}: {result.iterations} iterations, validation mIoU {100 * result.val_miou:.2f}, "
        f"{result.images_per_second:.2f} images/s")
    return result.checkpoint


def run_recipe(recipe: Recipe, log=print) -> dict[str, Any]:
    """Runs (or finishes) every stage; returns the held-out result (also in heldout.json)."""
    from .calibrate import calibrate_checkpoint, generated_data
    from .export import export
    from .heldout import evaluate

    teacher, student = stage_configs(recipe)
    if teacher is not None:
        _train_stage(teacher, log)
    student_checkpoint = _train_stage(student, log)
    out = Path(recipe.out_dir)
    model = out / "model.pt"
    height, width = recipe.heldout_size
    if recipe.calibration_seeds:
        uncalibrated, calibrated = out / "uncalibrated.pt", out / "calibrated.pt"
        export(student_checkpoint, uncalibrated)
        sequences, record = generated_data(recipe.calibration_seeds, recipe.calibration_frames, width, height)
        calibrate_checkpoint(uncalibrated, calibrated, sequences, record, log=log)
        digest = export(calibrated, model)
        calibrated.unlink()
    else:
        digest = export(student_checkpoint, model)
    log(f"export: {model} ({model.stat().st_size / 1e6:.2f} MB, sha256 {digest[:12]}...)")
    result = evaluate(recipe.heldout_seeds, recipe.heldout_frames, checkpoint=str(model), width=width, height=height)
    (out / "heldout.json").write_text(json.dumps(result, indent=2))
    log(f"held-out: mIoU {100 * result['miou']:.2f}, pixel accuracy {100 * result['pixel_accuracy']:.2f} "
        f"on seeds {list(recipe.heldout_seeds)} ({result['frames']} frames)")
    return result
