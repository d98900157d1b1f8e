"""Tests of the rendered street-video generator and its writers (tdnet_ros.data)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pybullet")

from tdnet_ros.classes import (  # noqa: E402
    CLASS_COLORS,
    CLASS_NAMES,
    IGNORE_ID,
    NUM_CLASSES,
    TRAIN_ID_TO_LABEL_ID,
    TrainId,
    label_id_to_train_id_table,
    train_id_to_label_id_table,
)
from tdnet_ros.cli.generate import main as generate_main  # noqa: E402
from tdnet_ros.data.street import (  # noqa: E402
    USED_CLASSES,
    StreetConfig,
    StreetScene,
    generate_sequence,
)
from tdnet_ros.data.writers import IMAGE_TOPIC, LABEL_TOPIC, write_rosbag  # noqa: E402

WIDTH, HEIGHT = 192, 96


def _render(seed: int, frames: int, **config_changes: object) -> list[tuple[np.ndarray, np.ndarray, int]]:
    config = replace(StreetConfig(), **config_changes)
    return [tuple(frame) for frame in generate_sequence(seed, frames, WIDTH, HEIGHT, config=config)]


@pytest.fixture(scope="module")
def sequence_seed3() -> list[tuple[np.ndarray, np.ndarray, int]]:
    return _render(3, 12)


# --------------------------------------------------------------------------- class table


def test_class_table_is_cityscapes() -> None:
    assert NUM_CLASSES == 19 == len(CLASS_NAMES) == len(CLASS_COLORS)
    assert CLASS_NAMES[TrainId.ROAD] == "road" and CLASS_NAMES[TrainId.BICYCLE] == "bicycle"
    assert CLASS_COLORS[TrainId.SKY] == (70, 130, 180) and CLASS_COLORS[TrainId.CAR] == (0, 0, 142)
    to_label = train_id_to_label_id_table()
    to_train = label_id_to_train_id_table()
    assert [to_label[t] for t in range(19)] == list(TRAIN_ID_TO_LABEL_ID)
    assert all(to_train[to_label[t]] == t for t in range(19))
    assert to_label[IGNORE_ID] == 0 and to_train[0] == IGNORE_ID


# --------------------------------------------------------------------------- generator


def test_same_seed_gives_identical_video(sequence_seed3: list) -> None:
    again = _render(3, 12)
    assert len(again) == len(sequence_seed3) == 12
    for (rgb_a, lab_a, stamp_a), (rgb_b, lab_b, stamp_b) in zip(sequence_seed3, again):
        assert rgb_a.tobytes() == rgb_b.tobytes()
        assert lab_a.tobytes() == lab_b.tobytes()
        assert stamp_a == stamp_b


def test_different_seeds_differ(sequence_seed3: list) -> None:
    other = _render(4, 3)
    for (rgb_a, lab_a, _), (rgb_b, lab_b, _) in zip(sequence_seed3, other):
        assert np.mean(rgb_a != rgb_b) > 0.3
        assert np.mean(lab_a != lab_b) > 0.05


def test_frames_shapes_types_and_stamps(sequence_seed3: list) -> None:
    stamps = []
    for rgb, labels, stamp in sequence_seed3:
        assert rgb.shape == (HEIGHT, WIDTH, 3) and rgb.dtype == np.uint8
        assert labels.shape == (HEIGHT, WIDTH) and labels.dtype == np.uint8
        stamps.append(stamp)
    assert np.all(np.diff(stamps) == 100_000_000)  # 10 Hz
    # Consecutive frames differ (the camera moves) but stay alike (it is a video).
    first, second = sequence_seed3[0][1], sequence_seed3[1][1]
    assert 0.0 < np.mean(first != second) < 0.5


def test_only_used_classes_and_every_pixel_labelled(sequence_seed3: list) -> None:
    seen = set()
    for _, labels, _ in sequence_seed3:
        seen |= set(np.unique(labels).tolist())
    assert IGNORE_ID not in seen
    assert TrainId.TRAIN not in seen
    assert seen <= USED_CLASSES


def test_short_sequences_show_many_classes() -> None:
    seen: set[int] = set()
    for seed in (11, 12):
        for _, labels, _ in _render(seed, 10):
            seen |= set(np.unique(labels).tolist())
    required = {TrainId.ROAD, TrainId.SIDEWALK, TrainId.BUILDING, TrainId.POLE, TrainId.VEGETATION, TrainId.SKY,
                TrainId.CAR}
    assert required <= seen, f"missing {[CLASS_NAMES[c] for c in required - seen]}"
    assert len(seen) >= 11, [CLASS_NAMES[c] for c in sorted(seen)]


def test_labels_match_a_render_in_class_colours() -> None:
    """Render the same scene with every object painted in its class colour, unlit and untextured:
    the colour drawn at each pixel must name the class the labels give that pixel."""
    seed, frames = 21, 8
    normal = _render(seed, frames)
    flat = _render(seed, frames, flat_class_colors=True)
    palette = np.array(CLASS_COLORS, np.int32)  # (19, 3)
    for (_, labels, _), (flat_rgb, flat_labels, _) in zip(normal, flat):
        assert np.array_equal(labels, flat_labels)  # flat mode keeps the geometry
        distance = np.abs(flat_rgb.astype(np.int32)[:, :, None, :] - palette[None, None]).sum(-1)  # (H, W, 19)
        drawn_class = distance.argmin(-1)
        assert distance.min(-1).max() <= 6, "a pixel was drawn in a colour that is no class colour"
        agreement = np.mean(drawn_class == labels)
        assert agreement == 1.0, f"labels and drawn classes agree on only {agreement:.4%} of pixels"


def test_labels_match_natural_appearance() -> None:
    """In the normal render, classes look like what they are: green vegetation, grey road,
    sky above the horizon. A wrong id-to-class table breaks these."""
    checked = {"road": 0, "vegetation": 0}
    config = StreetConfig(width=WIDTH, height=HEIGHT)
    with StreetScene(5, 10, config) as scene:
        for index in range(10):
            rgb, labels, _ = scene.render(index)
            rgb16 = rgb.astype(np.int16)
            saturation = rgb16.max(-1) - rgb16.min(-1)
            road = labels == TrainId.ROAD
            if road.sum() > 100:
                assert np.median(saturation[road]) < 40  # asphalt and paint are grey/white
                checked["road"] += 1
            vegetation = labels == TrainId.VEGETATION
            if vegetation.sum() > 100:
                r, g, b = (rgb16[..., k][vegetation] for k in range(3))
                assert np.mean(g >= np.maximum(r, b) - 5) > 0.7  # foliage is green (trunks are few)
                checked["vegetation"] += 1
            # Sky only above the horizon: camera pitch is within -4..0 degrees (plus jitter).
            rows = np.nonzero((labels == TrainId.SKY).any(axis=1))[0]
            horizon = HEIGHT / 2 * (1 + math.tan(math.radians(5)) / math.tan(math.radians(config.vertical_fov_deg / 2)))
            assert rows.size == 0 or rows.max() < horizon
    assert checked["road"] >= 8 and checked["vegetation"] >= 3, checked


def test_camera_turns_within_a_long_route() -> None:
    with StreetScene(2, 600) as scene:
        headings = [scene.camera_pose(frame)[1] for frame in range(0, 600, 10)]
    assert max(headings) - min(headings) > math.pi / 4  # at least one turn in a minute of driving


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="frames"):
        next(generate_sequence(0, 0))
    with pytest.raises(ValueError, match="seed"):
        next(generate_sequence(-1, 2))
    with pytest.raises(ValueError, match="frame size"):
        next(generate_sequence(0, 2, width=8, height=8))


def _bodies_per_class(rare_object_rate: float, seeds: tuple[int, ...]) -> dict[TrainId, int]:
    """How many bodies of each class the scenes of `seeds` place around their first frame."""
    counts = dict.fromkeys(TrainId, 0)
    for seed in seeds:
        config = StreetConfig(width=64, height=32, rare_object_rate=rare_object_rate)
        with StreetScene(seed, 1, config) as scene:
            scene.render(0)  # builds the blocks around the camera
            for train_id, count in scene.bodies_per_class().items():
                counts[TrainId(train_id)] += count
    return counts


def test_rare_object_rate_places_more_of_the_rarest_classes() -> None:
    seeds = (1, 2, 3)
    usual, more = _bodies_per_class(1.0, seeds), _bodies_per_class(3.0, seeds)
    for rare in (TrainId.BUS, TrainId.TRUCK, TrainId.MOTORCYCLE, TrainId.BICYCLE, TrainId.RIDER, TrainId.WALL):
        assert more[rare] > 1.4 * usual[rare], (rare.name, usual[rare], more[rare])
    assert more[TrainId.CAR] < usual[TrainId.CAR]  # cars give way to buses and trucks
    # the route and its roads do not depend on the rate
    assert more[TrainId.ROAD] == usual[TrainId.ROAD] and more[TrainId.SIDEWALK] == usual[TrainId.SIDEWALK]
    with pytest.raises(ValueError, match=r"rare_object_rate must be within 1..4 \(1: the usual scenes\), got 0.5"):
        next(generate_sequence(0, 1, config=StreetConfig(rare_object_rate=0.5)))


# --------------------------------------------------------------------------- writers and CLI


def test_cli_writes_cityscapes_layout(tmp_path: Path, sequence_seed3: list) -> None:
    out = tmp_path / "ds"
    status = generate_main(["--seed", "3", "--frames", "4", "--out", str(out), "--format", "cityscapes",
                            "--width", str(WIDTH), "--height", str(HEIGHT), "--split", "val", "--city", "town",
                            "--quiet"])
    assert status == 0
    images = sorted((out / "leftImg8bit_sequence" / "val" / "town").iterdir())
    assert [p.name for p in images] == [f"town_000003_{k:06d}_leftImg8bit.png" for k in range(4)]
    label_dir = out / "gtFine" / "val" / "town"
    label_id_lut = np.array(train_id_to_label_id_table(), np.uint8)
    for k, (rgb, labels, _) in enumerate(sequence_seed3[:4]):
        stem = f"town_000003_{k:06d}"
        image = cv2.cvtColor(cv2.imread(str(images[k]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        train_ids = cv2.imread(str(label_dir / f"{stem}_gtFine_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
        label_ids = cv2.imread(str(label_dir / f"{stem}_gtFine_labelIds.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(image, rgb)
        assert train_ids.dtype == np.uint8 and np.array_equal(train_ids, labels)
        assert np.array_equal(label_ids, label_id_lut[labels])


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_rosbag_round_trip(tmp_path: Path, storage: str, sequence_seed3: list) -> None:
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    frames = sequence_seed3[:5]
    bag = tmp_path / f"street_{storage}"
    assert write_rosbag(frames, bag, storage=storage) == 5
    received: dict[str, list] = {IMAGE_TOPIC: [], LABEL_TOPIC: []}
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_KILTED)) as reader:
        assert {c.topic for c in reader.connections} == set(received)
        for connection, timestamp, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            assert stamp == timestamp and msg.header.frame_id == "camera"
            received[connection.topic].append((stamp, msg))
    assert [s for s, _ in received[IMAGE_TOPIC]] == [s for s, _ in received[LABEL_TOPIC]] == [f[2] for f in frames]
    for (rgb, labels, _), (_, image), (_, label) in zip(frames, received[IMAGE_TOPIC], received[LABEL_TOPIC]):
        assert image.encoding == "rgb8" and image.step == WIDTH * 3
        assert label.encoding == "mono8" and label.step == WIDTH
        assert np.array_equal(image.data.reshape(HEIGHT, WIDTH, 3), rgb)
        assert np.array_equal(label.data.reshape(HEIGHT, WIDTH), labels)


def test_cli_rare_object_rate_reaches_the_scene(tmp_path: Path) -> None:
    # seed 2 at rate 4 places other bodies than at rate 1, so equal labels show the flag arrived
    out = tmp_path / "ds"
    assert generate_main(["--seed", "2", "--frames", "1", "--out", str(out), "--width", "64", "--height", "32",
                          "--rare-object-rate", "4", "--quiet"]) == 0
    written = cv2.imread(str(next((out / "gtFine").rglob("*_labelTrainIds.png"))), cv2.IMREAD_UNCHANGED)
    frame_at = {rate: next(generate_sequence(2, 1, 64, 32, config=StreetConfig(rare_object_rate=rate)))
                for rate in (1.0, 4.0)}
    assert not np.array_equal(frame_at[1.0][1], frame_at[4.0][1])
    assert np.array_equal(written, frame_at[4.0][1])


def test_cli_writes_bag(tmp_path: Path) -> None:
    bag = tmp_path / "bag"
    assert generate_main(["--seed", "1", "--frames", "2", "--out", str(bag), "--format", "sqlite3",
                          "--width", "64", "--height", "32", "--quiet"]) == 0
    assert (bag / "metadata.yaml").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "x", "--frames", "2"], "--seed: expected a whole number"),
        (["--seed", "-3", "--frames", "2"], "--seed: must be >= 0"),
        (["--seed", "1", "--frames", "0"], "--frames: must be >= 1"),
        (["--seed", "1", "--frames", "2", "--width", "4"], "--width: must be within 16..4096"),
        (["--seed", "1", "--frames", "2", "--format", "avi"], "invalid choice: 'avi'"),
        (["--seed", "1", "--frames", "2", "--fps", "0"], "--fps: must be within 0.1..1000"),
        (["--seed", "1", "--frames", "2", "--rare-object-rate", "5"], "--rare-object-rate: must be within 1..4"),
        (["--seed", "1", "--frames", "2", "--rare-object-rate", "nan"], "--rare-object-rate: must be within 1..4"),
        (["--frames", "2"], "the following arguments are required: --seed"),
        (["--seed", "1", "--frames", "2", "--city", "../x"], "--city '../x' must be letters"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    if "--out" not in argv and "required" not in message:
        argv = [*argv, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        generate_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_existing_bag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        generate_main(["--seed", "1", "--frames", "1", "--out", str(tmp_path), "--format", "mcap"])
    assert "exists already" in capsys.readouterr().err
