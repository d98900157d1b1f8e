"""CPU mixed precision, the chained recipe, init_checkpoint and the images-per-second print,
on the tiny model (pybullet renders cached per session)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tdnet_ros.checkpoint import load_model, read_checkpoint, save_checkpoint
from tdnet_ros.cli.train import main as train_cli
from tdnet_ros.runtime import cpu_computes_bfloat16
from tdnet_ros.training.config import ConfigError, from_dict
from tdnet_ros.cli.recipe import main as recipe_cli
from tdnet_ros.training.calibrate import fold_offsets
from tdnet_ros.training.trainer import train

from test_training_run import TINY as TINY_TWO_ITERATIONS  # noqa: E402  (the tiny run's settings)

TINY = {**TINY_TWO_ITERATIONS, "optim": {**TINY_TWO_ITERATIONS["optim"], "iterations": 3}}
TINY_TEACHER = {"layers": [1, 1, 1, 1], "base_width": 8, "feature_channels": 32}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("street_cache"))


def tiny(out_dir: Path, cache: str, **sections):
    config = from_dict(TINY).replace(data={"cache_dir": cache}, run={"out_dir": str(out_dir)})
    return config.replace(**sections) if sections else config


def test_bfloat16_autocast_on_the_cpu_trains_with_finite_losses(tmp_path, cache_dir):
    config = tiny(tmp_path, cache_dir, run={"amp": True, "channels_last": True}, optim={"iterations": 4})
    result = train(config)
    import csv

    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # The weights stay float32 (master weights) and moved away from their initial values.
    weights = read_checkpoint(result.checkpoint)["state_dict"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    fresh = train(tiny(tmp_path / "fresh", cache_dir, optim={"iterations": 1, "lr": 0.0}))
    changed = [k for k, v in fresh.model.state_dict().items()
               if v.is_floating_point() and k in weights and not torch.equal(v, weights[k])]
    assert changed


def test_the_bf16_step_follows_the_float32_step(tmp_path, cache_dir):
    """One bf16 step lands near the float32 step (same data, same initial weights)."""
    common = {"optim": {"iterations": 1, "warmup_iterations": 0, "lr": 0.01}}
    a = train(tiny(tmp_path / "fp32", cache_dir, run={"amp": False}, **common)).model.state_dict()
    b = train(tiny(tmp_path / "bf16", cache_dir, run={"amp": True}, **common)).model.state_dict()
    for key in a:
        if a[key].is_floating_point() and key.endswith("weight"):
            torch.testing.assert_close(b[key], a[key], rtol=0.05, atol=2e-3, msg=key)


def test_amp_auto_trains_in_bfloat16_only_where_the_cpu_computes_it(tmp_path, cache_dir, capsys):
    """run.amp auto takes the exact step of amp true on a CPU with native bfloat16, and of
    amp false (with one line saying so) on a CPU that would emulate it."""
    common = {"optim": {"iterations": 1, "warmup_iterations": 0, "lr": 0.01}}
    native = cpu_computes_bfloat16()
    auto = train(tiny(tmp_path / "auto", cache_dir, run={"amp": "auto"}, **common)).model.state_dict()
    printed = capsys.readouterr().out
    same = train(tiny(tmp_path / "same", cache_dir, run={"amp": native}, **common)).model.state_dict()
    for key in auto:
        torch.testing.assert_close(auto[key], same[key], rtol=0, atol=0, msg=key)
    line = "run.amp auto: this CPU has no native bfloat16"
    assert (line in printed) is (not native)


def test_amp_takes_only_true_false_or_auto():
    with pytest.raises(ConfigError, match="run.amp must be true, false or auto, got 'yes'"):
        from_dict({"run": {"amp": "yes"}})


def test_snapshot_interval_refuses_a_negative_count():
    with pytest.raises(ConfigError, match="run.snapshot_interval must be 0 .none. or a number of iterations, got -5"):
        from_dict({"run": {"snapshot_interval": -5}})


def test_init_checkpoint_keeps_the_weights(tmp_path, cache_dir):
    first = train(tiny(tmp_path / "first", cache_dir))
    shipped = read_checkpoint(first.checkpoint)["state_dict"]
    # At learning rate 0 the parameters stay those of init_checkpoint (buffers, e.g. BatchNorm
    # statistics, still follow the data).
    second = train(tiny(tmp_path / "second", cache_dir, optim={"iterations": 1, "lr": 0.0, "weight_decay": 0.0},
                        run={"init_checkpoint": str(first.checkpoint)}))
    parameters = dict(second.model.named_parameters())
    for key, value in parameters.items():
        torch.testing.assert_close(value.detach(), shipped[key], rtol=0, atol=0, msg=key)
    # Without it, the same run starts elsewhere.
    third = train(tiny(tmp_path / "third", cache_dir, optim={"iterations": 1, "lr": 0.0}, run={"seed": 5}))
    assert any(not torch.equal(v.detach(), shipped[k]) for k, v in third.model.named_parameters())


def test_init_checkpoint_with_calibrated_offsets_trains_from_the_weights_without_them(tmp_path, cache_dir, capsys):
    first = train(tiny(tmp_path / "first", cache_dir))
    content = read_checkpoint(first.checkpoint)
    offsets = torch.linspace(-1.0, 1.0, first.model.config.num_classes)
    calibrated = save_checkpoint(fold_offsets(load_model(first.checkpoint), offsets), tmp_path / "calibrated.pt",
                                 calibration={"offsets": offsets.tolist()})
    second = train(tiny(tmp_path / "second", cache_dir, optim={"iterations": 1, "lr": 0.0, "weight_decay": 0.0},
                        run={"init_checkpoint": str(calibrated)}))
    assert "carries class offsets from calibration" in capsys.readouterr().out
    for key, value in second.model.named_parameters():
        torch.testing.assert_close(value.detach(), content["state_dict"][key], rtol=0, atol=1e-6, msg=key)


def test_the_cli_prints_images_per_second(tmp_path, cache_dir, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "out", cache_dir).to_dict()))
    assert train_cli([str(path)]) == 0
    out = capsys.readouterr().out
    rate = float(out.split("speed: ")[1].split(" images/s")[0])
    assert rate > 0
    assert all(float(r) > 0 for r in _column(tmp_path / "out/log.csv", "images_per_s")[1:])


def _column(path: Path, name: str) -> list[str]:
    import csv

    with open(path, newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


def test_recipe_chains_teacher_student_export_and_heldout_and_resumes(tmp_path, cache_dir, capsys):
    student = tiny(tmp_path / "unused", cache_dir).to_dict()
    teacher = tiny(tmp_path / "unused", cache_dir, stage="teacher", teacher=TINY_TEACHER).to_dict()
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    out = tmp_path / "recipe"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "teacher": "teacher.yaml", "student": "student.yaml", "out_dir": str(out),
        "heldout_seeds": [7], "heldout_frames": 3, "heldout_size": [64, 128],
        "calibration_seeds": [5], "calibration_frames": 2,
    }))
    assert recipe_cli([str(tmp_path / "recipe.yaml")]) == 0
    log = capsys.readouterr().out
    assert "teacher: training" in log and "student: training" in log and "held-out: mIoU" in log
    # The exported model carries the offsets chosen on the calibration sequences; without them
    # it is the uncalibrated export.
    assert "validation mIoU" in log
    calibration = read_checkpoint(out / "model.pt")["calibration"]
    assert calibration["seeds"] == [5] and calibration["frames"] == 2
    expected = fold_offsets(load_model(out / "uncalibrated.pt"), torch.tensor(calibration["offsets"])).state_dict()
    for key, value in load_model(out / "model.pt").state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert (out / "teacher/model.pt").is_file() and (out / "student/model.pt").is_file()
    # The student was distilled from the recipe's teacher.
    assert read_checkpoint(out / "student/model.pt")["train_config"]["teacher_checkpoint"] == str(
        out / "teacher/model.pt")
    assert float(_column(out / "student/log.csv", "loss_kd_full")[-1]) > 0
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["frames"] == 3 and 0 <= heldout["miou"] <= 1
    assert (out / "model.pt.sha256").read_text().split()[0]
    # Interrupted in the student stage: the rerun skips the teacher and resumes the student.
    (out / "student/model.pt").unlink()
    train(read_stage(out / "student/last.pt"), stop_at=1)  # an earlier, interrupted state
    assert recipe_cli([str(tmp_path / "recipe.yaml")]) == 0
    log = capsys.readouterr().out
    assert "teacher: done before" in log and "student: resuming" in log
    assert read_checkpoint(out / "student/model.pt")["iteration"] == 3


def read_stage(checkpoint: Path):
    """The training configuration stored in a checkpoint."""
    return from_dict(read_checkpoint(checkpoint)["train_config"])


def test_recipe_errors_name_the_file_and_key(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("student: s.yaml\nout_dir: x\nheldout_seed: [1]\n")
    assert recipe_cli([str(tmp_path / "r.yaml")]) == 2
    assert "heldout_seed" in capsys.readouterr().err
    assert recipe_cli([str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("student: s.yaml\n")
    assert recipe_cli([str(tmp_path / "r.yaml")]) == 2
    assert "s.yaml" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("student: s.yaml\nheldout_seeds: [2001]\ncalibration_seeds: [1001, 2001]\n")
    assert recipe_cli([str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration_seeds" in err[0] and "share none with heldout_seeds" in err[0]


def test_the_training_curve_is_drawn_from_the_log(tmp_path):
    from tdnet_ros.training.curve import main as curve, read_validation

    log = tmp_path / "log.csv"
    log.write_text("iteration,lr,loss,seconds,val_miou\n10,0.01,2.0,5.0,\n20,0.01,1.5,10.0,0.25\n40,0.01,1.0,20.0,0.40\n")
    assert read_validation(log) == [(20, 10.0, 25.0), (40, 20.0, 40.0)]
    assert curve([str(log), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_the_shipped_line_is_drawn_from_the_training_log(tmp_path, capsys):
    from tdnet_ros.training.curve import SHIPPED_TABLE_HEADER, ShippedModel, main as curve, read_shipped

    log = tmp_path / "log.md"
    log.write_text(f"# log\n\n{SHIPPED_TABLE_HEADER} what it changed |\n| --- | --- | --- | --- |\n"
                   "| before 1 | 19 | 25.6 | the old model |\n| 1 | ≈97 | 31.4 | the recipe |\n"
                   "| 10 | 0 | 52.0 | calibrated |\n\nAfter the table.\n")
    assert read_shipped(log) == [ShippedModel("before 1", 19.0, 25.6, "the old model"),
                                 ShippedModel("1", 97.0, 31.4, "the recipe"), ShippedModel("10", 0.0, 52.0, "calibrated")]
    assert curve(["--shipped", str(log), "--out", str(tmp_path / "line.png")]) == 0
    assert (tmp_path / "line.png").stat().st_size > 1000
    # The repository's own training log parses, sittings in order.
    rows = read_shipped(Path(__file__).resolve().parents[1] / "docs" / "training-log.md")
    numbers = [int(row.sitting) for row in rows[1:]]
    assert rows[0].sitting == "before 1" and numbers == sorted(numbers) and len(numbers) > 10
    log.write_text(f"{SHIPPED_TABLE_HEADER} what |\n| --- | --- | --- | --- |\n| 2 | about an hour | 35.4 | x |\n")
    with pytest.raises(SystemExit) as caught:
        curve(["--shipped", str(log), "--out", str(tmp_path / "bad.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert caught.value.code == 2 and "about an hour" in err[-1] and "Traceback" not in "".join(err)
    with pytest.raises(SystemExit):
        curve([str(tmp_path / "log.csv"), "--shipped", str(log), "--out", str(tmp_path / "both.png")])
    assert "not both" in capsys.readouterr().err


def test_weights_continue_at_another_input_size():
    # The spatial LayerNorm's parameters are resized when a checkpoint continues at a new
    # input size; the model then computes exactly what the old one computes at that size.
    import dataclasses

    from tdnet_ros.config import ModelConfig
    from tdnet_ros.model import build_model, fit_layer_norms
    from tdnet_ros.segmenter import Segmenter

    torch.manual_seed(0)
    small = build_model(ModelConfig.from_name("td4-tiny")).eval()
    size = (small.config.input_size[0] * 2, small.config.input_size[1] * 2)
    large = build_model(dataclasses.replace(small.config, input_size=size)).eval()
    with pytest.raises(RuntimeError, match="layer_norm"):
        large.load_state_dict(small.state_dict())
    large.load_state_dict(fit_layer_norms(small.state_dict(), large))
    frames = np.random.default_rng(1).integers(0, 256, (5, *size, 3), dtype=np.uint8)
    run_small, run_large = Segmenter(small, input_size=size), Segmenter(large)
    for frame in frames:  # every path once, then with a full cache
        a, b = run_small.segment(frame), run_large.segment(frame)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)


def test_init_checkpoint_of_a_narrower_student_is_widened_to_the_configured_width(tmp_path, cache_dir, capsys):
    """A run at a larger base_width starts from the narrower checkpoint, widened (that the
    widened model computes the same is test_training_widen's)."""
    narrow = train(tiny(tmp_path / "narrow", cache_dir))
    wide_model = {"model_overrides": {"base_width": 12, "name": "td4-tiny-wide"}}
    wide = train(tiny(tmp_path / "wide", cache_dir, optim={"iterations": 1, "lr": 0.0, "weight_decay": 0.0},
                      run={"init_checkpoint": str(narrow.checkpoint)}, **wide_model))
    assert "widened from base_width 8 to 12" in capsys.readouterr().out
    assert wide.model.config.base_width == 12 and wide.model.config.name == "td4-tiny-wide"
    narrow_stem = read_checkpoint(narrow.checkpoint)["state_dict"]["paths.0.backbone.conv1.weight"]  # (8, 3, 7, 7)
    wide_stem = wide.model.state_dict()["paths.0.backbone.conv1.weight"]  # (12, 3, 7, 7)
    torch.testing.assert_close(wide_stem[:4], narrow_stem[:4], rtol=0, atol=0)  # group 0's old channels in place
    assert wide_stem.shape[0] == 12


@pytest.mark.parametrize("guide", [0, 4])
def test_init_checkpoint_without_the_detail_refinement_starts_a_refined_student_from_its_weights(
        tmp_path, cache_dir, capsys, guide):
    """A run with model_overrides.detail_channels (with or without a guide from the head's
    hidden features) starts from a checkpoint that has no refinement: its weights load
    unchanged and the refinement's correction starts at zero (so the student computes what
    the checkpoint did, upsampled; test_segmenter checks that)."""
    plain = train(tiny(tmp_path / "plain", cache_dir))
    stored = read_checkpoint(plain.checkpoint)["state_dict"]
    refined = train(tiny(tmp_path / "refined", cache_dir, optim={"iterations": 1, "lr": 0.0, "weight_decay": 0.0},
                         run={"init_checkpoint": str(plain.checkpoint)},
                         model_overrides={"detail_channels": 8, "detail_guide_channels": guide,
                                          "name": "td4-tiny-s4"}))
    assert "has no detail refinement; the student's starts at zero" in capsys.readouterr().out
    parameters = dict(refined.model.named_parameters())
    for key, value in stored.items():
        if key in parameters:
            torch.testing.assert_close(parameters[key].detach(), value, rtol=0, atol=0, msg=key)
    assert all(not parameters[f"paths.{i}.detail.classifier.weight"].any() for i in range(4))
    assert read_checkpoint(refined.checkpoint)["config"]["detail_channels"] == 8
    assert read_checkpoint(refined.checkpoint)["config"]["detail_guide_channels"] == guide
    assert ("paths.0.detail.guide.weight" in parameters) == bool(guide)


def test_init_checkpoint_with_a_shallower_refinement_adds_identity_blocks(tmp_path, cache_dir, capsys):
    """A run with model_overrides.detail_depth above the checkpoint's loads its refinement
    unchanged; the new residual blocks start as the identity (their BN scale at zero)."""
    refined = {"detail_channels": 8, "name": "td4-tiny-s4"}
    shallow = train(tiny(tmp_path / "shallow", cache_dir, model_overrides=refined))
    stored = read_checkpoint(shallow.checkpoint)["state_dict"]
    deep = train(tiny(tmp_path / "deep", cache_dir, optim={"iterations": 1, "lr": 0.0, "weight_decay": 0.0},
                      run={"init_checkpoint": str(shallow.checkpoint)},
                      model_overrides={**refined, "detail_depth": 3, "name": "td4-tiny-s4d3"}))
    assert "has a detail refinement of depth 1; the student's 2 more blocks start as the identity" in \
        capsys.readouterr().out
    parameters = dict(deep.model.named_parameters())
    for key, value in stored.items():
        if key in parameters:
            torch.testing.assert_close(parameters[key].detach(), value, rtol=0, atol=0, msg=key)
    assert all(not parameters[f"paths.{i}.detail.blocks.{b}.norm.weight"].any() for i in range(4) for b in range(2))
    assert read_checkpoint(deep.checkpoint)["config"]["detail_depth"] == 3


def test_detail_lr_scale_multiplies_only_the_refinements_step(tmp_path, cache_dir):
    """One SGD step from the same weights on the same data: the refinement's parameters move
    10x as far with optim.detail_lr_scale 10, every other parameter exactly as far."""
    refined = {"model_overrides": {"detail_channels": 8, "name": "td4-tiny-s4"}}
    start = train(tiny(tmp_path / "start", cache_dir, optim={"iterations": 1, "lr": 0.0}, **refined))
    for path in start.model.paths:  # a correction away from zero, so every refinement parameter has a gradient
        torch.nn.init.normal_(path.detail.classifier.weight, std=0.1)
    initial = save_checkpoint(start.model, tmp_path / "initial.pt")
    moved = {}
    for scale in (1.0, 10.0):
        result = train(tiny(tmp_path / f"scale{scale}", cache_dir, run={"init_checkpoint": str(initial)},
                            optim={"iterations": 1, "lr": 0.01, "warmup_iterations": 0, "detail_lr_scale": scale},
                            **refined))
        moved[scale] = {k: v.detach() - start.model.state_dict()[k] for k, v in result.model.named_parameters()}
    for key, step in moved[1.0].items():
        expected = 10 * step if ".detail." in key else step
        # atol: the float32 rounding of (w + step) - w, far below the steps (about 1e-3)
        torch.testing.assert_close(moved[10.0][key], expected, rtol=1e-3, atol=1e-6, msg=key)
    assert any(".detail." in k and v.abs().max() > 0 for k, v in moved[1.0].items())
    with pytest.raises(ConfigError, match="optim.detail_lr_scale must be above 0, got 0"):
        from_dict({"optim": {"detail_lr_scale": 0}})


def test_init_checkpoint_that_does_not_fit_is_one_line(tmp_path, cache_dir, capsys):
    narrow = train(tiny(tmp_path / "narrow", cache_dir))
    path = tmp_path / "other.yaml"
    other = tiny(tmp_path / "other", cache_dir, run={"init_checkpoint": str(narrow.checkpoint)},
                 model_overrides={"base_width": 12, "key_channels": 8})
    path.write_text(yaml.safe_dump(other.to_dict()))
    assert train_cli([str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tdnet-train: run.init_checkpoint {narrow.checkpoint} cannot be widened")
    assert "changes only base_width" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(tiny(tmp_path / "other", cache_dir,
                                        run={"init_checkpoint": str(tmp_path / "missing.pt")}).to_dict()))
    assert train_cli([str(path)]) == 1
    assert capsys.readouterr().err.strip() == f"tdnet-train: checkpoint file not found: {tmp_path / 'missing.pt'}"
    # The recipe's student stage says it the same way.
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"student": str(path), "out_dir": str(tmp_path / "r")}))
    assert recipe_cli([str(tmp_path / "recipe.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"tdnet-recipe: checkpoint file not found: {tmp_path / 'missing.pt'}"
    # A checkpoint whose stored model configuration is invalid.
    content = torch.load(narrow.checkpoint, weights_only=True)
    content["config"]["num_paths"] = 0
    torch.save(content, tmp_path / "invalid.pt")
    path.write_text(yaml.safe_dump(tiny(tmp_path / "other", cache_dir,
                                        run={"init_checkpoint": str(tmp_path / "invalid.pt")}).to_dict()))
    assert train_cli([str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tdnet-train: run.init_checkpoint {tmp_path / 'invalid.pt'} stores an invalid model configuration")
    assert "num_paths" in err and "\n" not in err
