"""Short training runs of the tiny model on the CPU: checkpoint, resume, teacher + distillation,
configuration errors. Sequences are rendered once per session (pybullet) and cached."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tdnet_ros.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from tdnet_ros.config import ModelConfig
from tdnet_ros.data import generate_sequence
from tdnet_ros.model import build_model
from tdnet_ros.segmenter import Segmenter
from tdnet_ros.cli.train import main as train_cli
from tdnet_ros.training.config import ConfigError, TrainConfig, from_dict, load_config
from tdnet_ros.training.teacher import ScaledTDNetTeacher, load_distillation_teacher
from tdnet_ros.training.trainer import _batches, _student_config, _TrainView, build_datasets, learning_rate, train

TINY = {
    "model": "td4-tiny",
    "data": {"train_seeds": [1], "val_seeds": [2], "frames": 10, "val_frames": 6, "size": [64, 128]},
    "augment": {"base_size": [64, 128], "crop": [48, 96]},
    "optim": {"iterations": 2, "batch_size": 2, "warmup_iterations": 1},
    "run": {"threads": 1, "val_interval": 0, "val_max_clips": 2, "log_interval": 1, "progress": False},
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("street_cache"))


def tiny_config(out_dir: Path, cache: str, **sections) -> TrainConfig:
    config = from_dict(TINY).replace(data={"cache_dir": cache}, run={"out_dir": str(out_dir)})
    return config.replace(**sections) if sections else config


def _log(out_dir: Path) -> list[dict]:
    with open(out_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_iterations_write_a_checkpoint_that_segments(tmp_path, cache_dir):
    result = train(tiny_config(tmp_path, cache_dir))
    assert result.checkpoint == tmp_path / "model.pt" and result.iterations == 2
    assert (tmp_path / "log.csv").is_file() and (tmp_path / "log.png").is_file()
    rows = _log(tmp_path)
    assert [int(r["iteration"]) for r in rows] == [1, 2] and rows[-1]["val_miou"] != ""
    segmenter = Segmenter.from_checkpoint(result.checkpoint)
    assert segmenter.class_names[13] == "car" and segmenter.config.input_size == (64, 128)
    frame = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    labels = segmenter.segment(frame).labels
    assert labels.shape == (64, 128) and labels.max() < 19
    content = torch.load(result.checkpoint, weights_only=True)  # extra entries are plain data
    assert content["train_config"]["model"] == "td4-tiny"


@pytest.mark.parametrize("refined", [False, True])
def test_resume_continues_the_schedule(tmp_path, cache_dir, refined):
    """Also with the detail refinement at its own multiple of the learning rate, which the
    resumed run takes from its configuration."""
    sections = {"optim": {"iterations": 4, "warmup_iterations": 2}, "run": {"checkpoint_interval": 1}}
    if refined:
        sections["optim"]["detail_lr_scale"] = 10.0
        sections["model_overrides"] = {"detail_channels": 8, "name": "td4-tiny-s4"}
    straight = tiny_config(tmp_path / "straight", cache_dir, **sections)
    train(straight)
    broken = tiny_config(tmp_path / "broken", cache_dir, **sections)
    first = train(broken, stop_at=2)
    assert first.iterations == 2 and not (tmp_path / "broken/model.pt").exists()
    assert read_checkpoint(tmp_path / "broken/last.pt")["iteration"] == 2
    with open(tmp_path / "broken/log.csv", "a") as log:  # a row a killed run wrote after its checkpoint
        log.write("3,0.5,9.0,9.0,0.0,1000.0,1.0\n")
    train(broken, resume=True)
    assert [int(r["iteration"]) for r in _log(tmp_path / "broken")] == [1, 2, 3, 4]
    lrs = [float(r["lr"]) for r in _log(tmp_path / "broken")]
    assert lrs == pytest.approx([learning_rate(i, broken) for i in range(4)], rel=1e-4)
    seconds = [float(r["seconds"]) for r in _log(tmp_path / "broken")]
    assert seconds[2] > seconds[1] > 0  # the resumed run counts on from the interrupted one's time
    assert lrs == pytest.approx([float(r["lr"]) for r in _log(tmp_path / "straight")], rel=1e-6)
    a = read_checkpoint(tmp_path / "straight/model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "broken/model.pt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_whole_frame_batches_mix_with_crops_and_resume_alike(cache_dir):
    # augment.whole_frame decides per batch: every batch has one shape, both shapes occur,
    # and a stream resumed at iteration k yields the batches the uninterrupted one does.
    config = tiny_config(Path("unused"), cache_dir, augment={"whole_frame": 0.5}, data={"num_workers": 0})
    train_set, _ = build_datasets(config, 4)
    view = _TrainView(train_set, config)
    stream = _batches(view, config, 0, 1, 0, workers=0)
    straight = [next(stream) for _ in range(12)]  # spans three epochs of the 10-frame sequence
    shapes = [tuple(x.shape) for x, _, _ in straight]
    assert set(shapes) == {(2, 4, 3, 48, 96), (2, 4, 3, 64, 128)}
    assert all(tuple(y.shape) == s[:2] + s[3:] for (_, y, _), s in zip(straight, shapes))
    resumed = _batches(_TrainView(train_set, config), config, 0, 1, 5, workers=0)
    for x, y, window in straight[5:]:
        rx, ry, rwindow = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y) and torch.equal(rwindow, window)


def test_aligned_layer_norm_trains_the_parameters_under_each_crop(tmp_path, cache_dir):
    # augment.align_layer_norm reaches the model: from the same start and the same batches, the
    # LayerNorm parameters learn differently, and nothing else about the run changes.
    runs = {}
    for align in (False, True):
        config = tiny_config(tmp_path / str(align), cache_dir, augment={"align_layer_norm": align},
                             loss={"auxiliary": 0.0})
        runs[align] = read_checkpoint(train(config).checkpoint)["state_dict"]
    norm_keys = [k for k in runs[True] if ".layer_norm." in k]
    assert norm_keys and any(not torch.equal(runs[True][k], runs[False][k]) for k in norm_keys)
    assert all(torch.isfinite(v).all() for v in runs[True].values() if v.is_floating_point())


@pytest.mark.parametrize("batch_norm", ["batch", "running", "pooled"])
def test_batch_norm_statistics_follow_the_configuration(tmp_path, cache_dir, batch_norm):
    # optim.batch_norm decides which BatchNorms update their running statistics while training;
    # their scale and shift learn in every mode. A validation after the first iteration puts the
    # model in eval mode; the second iteration must train in the configured mode again.
    start = train(tiny_config(tmp_path / "start", cache_dir))
    run = train(tiny_config(tmp_path / batch_norm, cache_dir, optim={"batch_norm": batch_norm},
                            run={"init_checkpoint": str(start.checkpoint), "val_interval": 1}))
    before = read_checkpoint(start.checkpoint)["state_dict"]
    after = read_checkpoint(run.checkpoint)["state_dict"]
    means = [k for k in before if k.endswith(".running_mean")]
    pooling = {k for k in means if ".pyramid." in k}
    assert pooling and len(pooling) < len(means)
    unchanged = {k for k in means if torch.equal(before[k], after[k])}
    expected = {"batch": set(), "running": set(means), "pooled": pooling}[batch_norm]
    assert unchanged == expected
    pooling_scales = [k.replace(".running_mean", ".weight") for k in pooling]
    assert all(not torch.equal(before[k], after[k]) for k in pooling_scales)


def test_unknown_batch_norm_mode_is_one_line():
    with pytest.raises(ValueError, match="optim.batch_norm must be batch, running or pooled, got 'frozen'"):
        from_dict({**TINY, "optim": {"batch_norm": "frozen"}})


def test_teacher_then_distilled_student(tmp_path, cache_dir):
    teacher = train(tiny_config(tmp_path / "teacher", cache_dir).replace(
        stage="teacher", teacher={"layers": [1, 1, 1, 1], "base_width": 8, "feature_channels": 32}
    ))
    student = tiny_config(tmp_path / "student", cache_dir).replace(teacher_checkpoint=str(teacher.checkpoint))
    train(student)
    row = _log(tmp_path / "student")[-1]
    assert float(row["loss_kd_full"]) > 0 and float(row["loss_kd_group"]) > 0
    no_kd = tiny_config(tmp_path / "no_kd", cache_dir).replace(
        teacher_checkpoint=str(teacher.checkpoint), loss={"kd_full": 0.0, "kd_group": 0.0}
    )
    train(no_kd)
    assert "loss_kd_full" not in _log(tmp_path / "no_kd")[-1]

    # a grouped teacher runs at the clip's size only
    with pytest.raises(CheckpointError, match=r"teacher_scales \[1.0, 1.5\] apply to a TDNet"):
        load_distillation_teacher(teacher.checkpoint, (1.0, 1.5))

    # held-out scoring of the teacher, against its logits upsampled by F.interpolate here
    from tdnet_ros.metrics import SegmentationScores
    from tdnet_ros.training.augment import to_tensor
    from tdnet_ros.training.heldout import evaluate
    from tdnet_ros.training.teacher import load_teacher

    net, reference = load_teacher(teacher.checkpoint), SegmentationScores(19)
    for frame in generate_sequence(5, 2, width=128, height=64):
        with torch.no_grad():
            logits = net(to_tensor(frame.rgb)[None])["out"]
        logits = torch.nn.functional.interpolate(logits, (64, 128), mode="bilinear", align_corners=False)
        reference.update(logits.argmax(1)[0].numpy().astype(np.int64), frame.labels.astype(np.int64))
    scores = evaluate([5], 2, teacher=str(teacher.checkpoint), width=128, height=64)
    assert scores["frames"] == 2 and scores["miou"] == pytest.approx(reference.mean_iou, abs=1e-9)


def test_a_tdnet_teacher_teaches_its_multi_scale_probabilities():
    """ScaledTDNetTeacher: at scale 1 its output's softmax is the model's own on the clip; at
    (1, 1.5) it is the mean of that and the model's on the clip enlarged 1.5x (frames by
    F.interpolate here), each brought to the student's logit size."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("td4-tiny")).eval()
    clip = [torch.randn(2, 3, 64, 128) for _ in range(4)]  # N x (B, 3, h, w)
    with torch.no_grad():
        own = model.forward_clip(clip, 1)[-1].logits  # (2, 19, 8, 16)
        enlarged = model.forward_clip([F.interpolate(f, (96, 192), mode="bilinear") for f in clip], 1)[-1].logits
    one = ScaledTDNetTeacher(model, (1.0,))(clip, 1, (8, 16))
    torch.testing.assert_close(torch.softmax(one, 1), torch.softmax(own, 1), rtol=1e-5, atol=1e-6)
    two = ScaledTDNetTeacher(model, (1.0, 1.5))(clip, 1, (8, 16))
    expected = (torch.softmax(own, 1) + torch.softmax(F.interpolate(enlarged, (8, 16), mode="bilinear"), 1)) / 2
    torch.testing.assert_close(torch.softmax(two, 1), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.softmax(two, 1), torch.softmax(one, 1), atol=1e-3)  # the second scale counts


def test_a_student_distils_a_tdnet_checkpoint_at_two_scales(tmp_path, cache_dir, capsys):
    start = train(tiny_config(tmp_path / "start", cache_dir)).checkpoint
    student = tiny_config(tmp_path / "student", cache_dir).replace(
        teacher_checkpoint=str(start), teacher_scales=[1.0, 1.5], loss={"kd_full": 1.0, "kd_group": 0.0})
    assert student.teacher_scales == (1.0, 1.5)
    train(student)
    row = _log(tmp_path / "student")[-1]
    assert float(row["loss_kd_full"]) > 0 and "loss_kd_group" not in row
    with pytest.raises(ValueError, match="loss.kd_group needs a grouped teacher"):
        train(student.replace(loss={"kd_group": 0.5}))
    # tdnet-train says so in one line
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({**TINY, "teacher_checkpoint": str(start),
                                                      "loss": {"kd_group": 0.5}}))
    assert train_cli([str(tmp_path / "kd.yaml"), "--set", f"run.out_dir={tmp_path / 'kd'}",
                      "--set", f"data.cache_dir={cache_dir}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.kd_group needs a grouped teacher" in err[0], err
    with pytest.raises(ConfigError, match=r"teacher_scales must be distinct numbers within 0.25..4.0, got \[1.0, 1.0\]"):
        student.replace(teacher_scales=[1.0, 1.0])
    with pytest.raises(CheckpointError, match="neither a grouped teacher nor a TDNet checkpoint"):
        torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
        load_distillation_teacher(tmp_path / "other.pt", (1.0,))


def test_reused_freed_memory_keeps_a_freed_large_block_for_reuse():
    """By default glibc returns a freed 64 MiB block to the system at once (it was mapped on
    its own: it is above glibc's largest mapping threshold), so the next one comes as fresh
    pages to zero-fill; inside the context the block stays in the process for reuse. Seen in
    the resident size after the free, in a fresh process (what earlier tests freed would
    blur the default)."""
    import subprocess
    import sys

    code = """
import os
import numpy as np
from tdnet_ros.training.trainer import reused_freed_memory

def resident_mib_kept_after_a_free():
    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
    resident = lambda: int(open("/proc/self/statm").read().split()[1]) * page_mib
    before = resident()
    np.ones(16 * 2**20, np.float32)  # 64 MiB, allocated, touched and freed
    return resident() - before

returned = resident_mib_kept_after_a_free()
with reused_freed_memory(True):
    kept = resident_mib_kept_after_a_free()
print(returned, kept)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    returned, kept = (float(n) for n in out.split())
    assert returned < 8 and kept > 56, (returned, kept)


def test_auto_data_workers_leave_the_cores_to_training_threads_that_take_them_all():
    import os

    from tdnet_ros.training.trainer import data_workers

    config = load_config("config/train_default.yaml")
    assert config.data.num_workers == "auto"
    cores = len(os.sched_getaffinity(0))
    every_core = config.replace(run={"threads": cores})
    assert data_workers(every_core, torch.device("cpu")) == 0
    assert data_workers(every_core, torch.device("cuda")) == 1
    if cores > 1:
        assert data_workers(config.replace(run={"threads": cores - 1}), torch.device("cpu")) == 1
    assert data_workers(config.replace(data={"num_workers": 3}), torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="data.num_workers"):
        config.replace(data={"num_workers": "many"})


def test_unknown_key_fails_before_training(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"run: {{out_dir: {tmp_path / 'out'}}}\noptim: {{iteratons: 2}}\n")
    assert train_cli([str(config)]) == 2
    assert "iteratons" in capsys.readouterr().err and not (tmp_path / "out").exists()
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(config)


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"optim": {"lr": "abc"}}, "optim.lr must be a number, got 'abc'"),
        ({"optim": {"iterations": 2.5}}, "optim.iterations must be a whole number, got 2.5"),
        ({"run": {"progress": 1}}, "run.progress must be true or false, got 1"),
        ({"augment": {"crop": [256, 512, 3]}}, r"augment.crop must be a list of 2 whole numbers, got \[256, 512, 3\]"),
        ({"data": {"train_seeds": [1, "a"]}}, r"data.train_seeds must be a list of whole numbers, got \[1, 'a'\]"),
        ({"run": {"init_checkpoint": 3}}, "run.init_checkpoint must be a string or null, got 3"),
        ({"model_overrides": [1]}, r"model_overrides must be a mapping, got \[1\]"),
    ],
)
def test_values_of_the_wrong_type_are_named(values, line):
    with pytest.raises(ConfigError, match=line):
        from_dict(values)


def test_wrong_type_on_the_command_line_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert train_cli([str(Path(__file__).parents[1] / "config/train_default.yaml"), "--set", "optim.lr=abc",
                      "--set", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"tdnet-train: {Path(__file__).parents[1] / 'config/train_default.yaml'}: optim.lr must be a number, got 'abc'"]
    assert not out.exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "config").glob("train_*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_training_config_loads(path):
    config = load_config(path)
    assert config.optim.iterations >= 1 and config.stage in ("teacher", "student")


def test_default_config_is_valid():
    config = load_config(Path(__file__).parents[1] / "config/train_default.yaml")
    assert config.model == "td4-r18-narrow" and config.stage == "student"
    bundled = ModelConfig.from_dict(read_checkpoint(Path(__file__).parents[1] / config.run.init_checkpoint)["config"])
    trained = _student_config(config)
    # the bundled model's architecture, trained at 1024x512 and run at 1280x640 since session 31 (README)
    assert trained.input_size == (512, 1024) and bundled.input_size == (640, 1280)
    assert trained == dataclasses.replace(bundled, input_size=trained.input_size)


def test_export_and_held_out_scoring(tmp_path, cache_dir):
    from tdnet_ros.checkpoint import file_sha256
    from tdnet_ros.training.export import export
    from tdnet_ros.training.heldout import evaluate

    result = train(tiny_config(tmp_path / "run", cache_dir))
    digest = export(result.checkpoint, tmp_path / "shipped.pt")
    assert digest == file_sha256(tmp_path / "shipped.pt")
    assert (tmp_path / "shipped.pt.sha256").read_text().split()[0] == digest
    assert "optimizer" not in torch.load(tmp_path / "shipped.pt", weights_only=True)
    scores = evaluate([5], 3, checkpoint=str(tmp_path / "shipped.pt"), width=128, height=64)
    assert scores["frames"] == 3 and 0.0 <= scores["miou"] <= 1.0 and "car" in scores["iou"]
    assert abs(sum(scores["pixel_share"].values()) - 1.0) < 1e-9
    assert all(0.0 < f <= 1.0 for others in scores["confused_with"].values() for f in others.values())

    # each frame four times (a still scene for td4): against the segmenter run by hand
    from tdnet_ros.metrics import SegmentationScores

    segmenter, still = Segmenter.from_checkpoint(str(tmp_path / "shipped.pt")), SegmentationScores(19)
    paths = []
    for frame in generate_sequence(5, 3, width=128, height=64):
        results = [segmenter.segment(frame.rgb) for _ in range(4)]
        paths.append([r.path for r in results])
        still.update(results[-1].labels.astype(np.int64), frame.labels.astype(np.int64))
    assert paths == [[0, 1, 2, 3]] * 3  # every sub-network has seen the frame by its last run
    repeated = evaluate([5], 3, checkpoint=str(tmp_path / "shipped.pt"), width=128, height=64, repeat=4)
    assert repeated["repeat"] == 4 and repeated["miou"] == pytest.approx(still.mean_iou, abs=1e-12)


def test_export_with_float16_kernels_halves_the_file_and_segments_alike(tmp_path, cache_dir):
    from tdnet_ros.training.export import main as export_main

    result = train(tiny_config(tmp_path / "run", cache_dir))
    assert export_main([str(result.checkpoint), str(tmp_path / "full.pt")]) == 0
    assert export_main([str(result.checkpoint), str(tmp_path / "half.pt"), "--float16-kernels"]) == 0
    stored = torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"]
    assert all(v.dtype == (torch.float16 if v.dim() == 4 else torch.float32)
               for v in stored.values() if v.is_floating_point())
    assert (tmp_path / "half.pt").stat().st_size < 0.7 * (tmp_path / "full.pt").stat().st_size
    full, half = Segmenter.from_checkpoint(tmp_path / "full.pt"), Segmenter.from_checkpoint(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    full_weights = full.model.state_dict()
    for key, value in half.model.state_dict().items():  # float16's rounding, no more
        torch.testing.assert_close(value, full_weights[key], rtol=1e-3, atol=1e-5, msg=key)
    agreement = []
    for frame in generate_sequence(5, 4, width=256, height=128):
        a, b = full.segment(frame.rgb), half.segment(frame.rgb)
        agreement.append(float((a.labels == b.labels).mean()))
    assert min(agreement) > 0.99


def test_snapshots_average_into_a_checkpoint_that_segments(tmp_path, cache_dir):
    from tdnet_ros.training.average import main as average_main
    from tdnet_ros.training.export import export

    sections = {"optim": {"iterations": 4, "warmup_iterations": 1}, "run": {"snapshot_interval": 2}}
    result = train(tiny_config(tmp_path / "run", cache_dir, **sections))
    snapshots = [tmp_path / "run" / f"snapshot_it{n}.pt" for n in (2, 4)]
    assert sorted((tmp_path / "run").glob("snapshot_it*.pt")) == snapshots
    assert "optimizer" not in torch.load(snapshots[0], weights_only=True)
    sources = [snapshots[0], result.checkpoint]
    assert average_main([str(tmp_path / "mean.pt")] + [str(p) for p in sources]) == 0
    states = [torch.load(p, weights_only=True)["state_dict"] for p in sources]
    mean = torch.load(tmp_path / "mean.pt", weights_only=True)
    assert mean["iteration"] == 4 and mean["averaged_from"] == [str(p) for p in sources]
    export(tmp_path / "mean.pt", tmp_path / "shipped.pt")  # the record travels with the weights
    assert torch.load(tmp_path / "shipped.pt", weights_only=True)["averaged_from"] == mean["averaged_from"]
    moved = 0
    for key, value in mean["state_dict"].items():
        a, b = states[0][key], states[1][key]
        if value.is_floating_point():  # computed here as the midpoint, in float64
            torch.testing.assert_close(value, ((a.double() + b.double()) / 2).float(), msg=key)
            moved += int(not torch.equal(a, b))
        else:
            assert torch.equal(value, b), key
    assert moved > 0  # the two snapshots differ, so the mean is neither of them
    segmenter = Segmenter.from_checkpoint(tmp_path / "mean.pt")
    frame = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    assert segmenter.segment(frame).labels.shape == (64, 128)


def test_averaging_takes_a_calibrated_checkpoints_offsets_off_and_refuses_bad_sources_in_one_line(
        tmp_path, cache_dir, capsys):
    from tdnet_ros.checkpoint import model_from_checkpoint
    from tdnet_ros.training.average import main as average_main
    from tdnet_ros.training.calibrate import fold_offsets

    result = train(tiny_config(tmp_path / "run", cache_dir))
    content = torch.load(result.checkpoint, weights_only=True)
    # the same weights calibrated: offsets folded into the last convolutions and recorded
    offsets = torch.linspace(-1.0, 1.0, 19)
    calibrated = fold_offsets(model_from_checkpoint(content, result.checkpoint), offsets)
    torch.save({**content, "state_dict": calibrated.state_dict(), "calibration": {"offsets": offsets.tolist()}},
               tmp_path / "calibrated.pt")
    assert average_main([str(tmp_path / "mean.pt"), str(result.checkpoint), str(tmp_path / "calibrated.pt")]) == 0
    assert "calibrated.pt carries class offsets from calibration; they are taken off" in capsys.readouterr().out
    mean = torch.load(tmp_path / "mean.pt", weights_only=True)
    assert "calibration" not in mean
    moved = 0
    for key, value in mean["state_dict"].items():  # the mean of a model and itself
        torch.testing.assert_close(value, content["state_dict"][key], msg=key)
        moved += int(not torch.equal(calibrated.state_dict()[key], content["state_dict"][key]))
    assert moved > 0  # the calibrated copy differed before its offsets were taken off
    (tmp_path / "mean.pt").unlink()
    assert average_main([str(tmp_path / "mean.pt"), str(result.checkpoint)]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err
    assert average_main([str(tmp_path / "mean.pt"), str(result.checkpoint), str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file not found" in err and "missing.pt" in err
    assert not (tmp_path / "mean.pt").exists()


def test_bundled_default_model_matches_its_hash():
    from tdnet_ros.checkpoint import file_sha256

    models = Path(__file__).parents[1] / "tdnet_ros/models"
    path = models / "default.pt"
    assert path.stat().st_size <= 20 * 1024 * 1024
    digest = file_sha256(path)
    assert (models / "default.pt.sha256").read_text().split()[0] == digest
    # the README's section on the bundled model quotes the digest in full
    assert f"`{digest}`" in (Path(__file__).parents[1] / "README.md").read_text()
    segmenter = Segmenter.default()
    # run at 640x1280 since session 31, chosen on validation seeds (README)
    assert segmenter.config.name == "td4-r18-narrow" and segmenter.config.input_size == (640, 1280)
    assert segmenter.config.detail_channels == 0  # dropped in sitting 41 (README)


def test_the_stride_8_ceiling_loses_objects_narrower_than_a_cell_and_keeps_wide_ones():
    from tdnet_ros.metrics import SegmentationScores
    from tdnet_ros.preprocess import labels_from_logits
    from tdnet_ros.training.heldout import ideal_logits

    labels = np.full((64, 128), 2, np.uint8)  # building
    labels[:, 40] = 5  # a pole one pixel wide
    labels[:, 80:96] = 13  # a car 16 pixels wide
    labels[:8] = 255  # ignored rows count for no class
    for input_size, pole_found in (((64, 128), False), ((512, 1024), True)):  # cells of 8 and 1 frame pixels
        logits = ideal_logits(labels, input_size, 19)  # (1, 19, h/8, w/8)
        assert logits.shape[-2:] == (input_size[0] // 8, input_size[1] // 8)
        scores = SegmentationScores(19)
        scores.update(labels_from_logits(logits, input_size, labels.shape, align_corners=False).numpy().astype(np.int64),
                      labels.astype(np.int64))
        assert scores.iou[13] > 0.8
        assert bool(scores.iou[5] > 0.5) == pole_found, (input_size, scores.iou[5])


def test_the_stride_4_ceiling_keeps_a_pole_that_the_stride_8_one_loses():
    """A pole two frame pixels wide, enlarged 2x to the input, fills half a stride-8 cell and a
    whole stride-4 cell: only the stride-4 output (the detail refinement's) can draw it."""
    from tdnet_ros.metrics import SegmentationScores
    from tdnet_ros.preprocess import labels_from_logits
    from tdnet_ros.training.heldout import ideal_logits

    labels = np.full((64, 128), 2, np.uint8)  # building
    labels[:, 40:42] = 5  # a pole two frame pixels wide
    found = {}
    for stride in (8, 4):
        logits = ideal_logits(labels, (128, 256), 19, stride)  # (1, 19, 128/stride, 256/stride)
        assert logits.shape[-2:] == (128 // stride, 256 // stride)
        scores = SegmentationScores(19)
        scores.update(labels_from_logits(logits, (128, 256), labels.shape, align_corners=False).numpy().astype(np.int64),
                      labels.astype(np.int64))
        found[stride] = scores.iou[5]
    assert found[8] < 0.3 < 0.5 < found[4], found


def test_held_out_scoring_refuses_a_bad_input_size(capsys):
    from tdnet_ros.training.heldout import main as heldout_main

    with pytest.raises(SystemExit) as stopped:
        heldout_main(["--checkpoint", "x.pt", "--seeds", "2001", "--input-size", "wide"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--input-size" in err and "'wide'" in err and "Traceback" not in err
    for wrong in (["--checkpoint", "x.pt", "--repeat", "0"], ["--ceiling", "64x128", "--repeat", "4"]):
        with pytest.raises(SystemExit) as stopped:
            heldout_main([*wrong, "--seeds", "2001"])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "--repeat must be at least 1, and above 1 only with --checkpoint" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stopped:
        heldout_main(["--ceiling", "64x128", "--seeds", "2001", "--scales", "1 1.5"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--scales applies only with --checkpoint" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stopped:
        heldout_main(["--checkpoint", "x.pt", "--seeds", "2001", "--scales", "1 1.5", "--compare-precision", "bfloat16"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--repeat and --scales do not apply to --compare-precision" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stopped:
        heldout_main(["--checkpoint", "x.pt", "--seeds", "2001", "--repeat", "4", "--compare-precision", "bfloat16"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--repeat and --scales do not apply to --compare-precision" in err and "Traceback" not in err


def test_held_out_scoring_stops_quietly_when_its_reader_closes_the_pipe(tmp_path):
    """`heldout ... | head` once ended in a BrokenPipeError traceback; the JSON must still be
    written. The read end is closed before the process starts, so its first print fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    json_path = tmp_path / "ceiling.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tdnet_ros.training.heldout", "--ceiling", "64x128", "--seeds", "2001",
             "--frames", "1", "--width", "128", "--height", "64", "--json", str(json_path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(json_path.read_text())["frames"] == 1


@pytest.mark.parametrize("guide", [0, 4])
def test_export_without_detail_keeps_the_stride8_logits_and_the_offsets(tmp_path, guide):
    """--without-detail drops the stride-4 refinement (its guide from the head's hidden
    features too): the exported model's stride-8 logits, upsampled 2x as the refinement
    upsamples them, equal the refined model's output with the layer1-dependent part of its
    correction switched off (its last conv's kernel zeroed, so only its bias, here holding
    calibration offsets, is left)."""
    from tdnet_ros.training.calibrate import fold_offsets
    from tdnet_ros.training.export import main as export_main

    torch.manual_seed(0)
    refined = build_model(ModelConfig.from_name("td4-tiny", detail_channels=8, detail_depth=2,
                                                detail_guide_channels=guide))
    for path in refined.paths:
        torch.nn.init.normal_(path.detail.classifier.weight, std=0.1)
        torch.nn.init.normal_(path.detail.blocks[0].norm.weight, std=0.5)
    fold_offsets(refined, torch.linspace(-1.0, 1.0, refined.config.num_classes))
    source = save_checkpoint(refined, tmp_path / "refined.pt")
    assert export_main([str(source), str(tmp_path / "plain.pt"), "--without-detail", "td4-tiny-plain"]) == 0
    plain = load_model(tmp_path / "plain.pt")  # as stored: no BatchNorm folding to blur the comparison
    assert plain.config.detail_channels == 0 and plain.config.name == "td4-tiny-plain"
    assert plain.config.detail_guide_channels == 0
    for path in refined.paths:
        torch.nn.init.zeros_(path.detail.classifier.weight)
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        for index in range(refined.config.num_paths):
            coarse = plain.step(x, index, None).logits  # (1, K, 16, 32)
            expected = refined.step(x, index, None).logits  # (1, K, 32, 64)
            got = F.interpolate(coarse, size=expected.shape[-2:], mode="bilinear", align_corners=False)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_at_another_input_size_runs_there_as_the_source_would(tmp_path, capsys):
    """--input-size makes another size the model's own: run by default at 160x320, the
    exported model gives the source's labels and logits when the source is run at 160x320
    (its LayerNorms resized by the forward pass); the stored LayerNorms have the new shape."""
    from tdnet_ros.training.export import main as export_main

    torch.manual_seed(0)
    source_model = build_model(ModelConfig.from_name("td4-tiny"))  # input 128x256
    for path in source_model.paths:
        torch.nn.init.normal_(path.layer_norm.weight, 1.0, 0.3)  # not flat: a wrong resize would show
        torch.nn.init.normal_(path.layer_norm.bias, 0.0, 0.3)
    source = save_checkpoint(source_model, tmp_path / "source.pt")
    assert export_main([str(source), str(tmp_path / "wide.pt"), "--input-size", "160x320"]) == 0
    exported = load_model(tmp_path / "wide.pt")
    assert exported.config.input_size == (160, 320) and exported.paths[0].layer_norm.weight.shape == (20, 40)
    at_size = Segmenter.from_checkpoint(source, input_size=(160, 320))
    by_default = Segmenter.from_checkpoint(tmp_path / "wide.pt")
    rng = np.random.default_rng(3)
    for _ in range(5):
        frame = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
        a, b = at_size.segment(frame), by_default.segment(frame)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(b.labels, a.labels)
    with pytest.raises(SystemExit) as stopped:
        export_main([str(source), str(tmp_path / "x.pt"), "--input-size", "wide"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--input-size" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_export_without_detail_of_a_model_without_one_is_one_line(tmp_path, capsys):
    from tdnet_ros.training.export import main as export_main

    source = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny")), tmp_path / "plain.pt")
    assert export_main([str(source), str(tmp_path / "out.pt"), "--without-detail", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"export: {source} has no detail refinement to drop"
    assert not (tmp_path / "out.pt").exists()
