"""Cityscapes' 19 training classes: names, colours and label ids.

This is the single class table of the project. It is pure Python (no numpy, no
torch, no ROS) so that the core, the node, the trainer, the evaluator and the
data generator can all import it cheaply.

Train ids index the tuples below; ``IGNORE_ID`` (255) marks pixels that carry no
class. Label ids are Cityscapes' full label ids (``*_gtFine_labelIds.png``).
"""

from __future__ import annotations

from enum import IntEnum

NUM_CLASSES: int = 19
IGNORE_ID: int = 255


class TrainId(IntEnum):
    """Cityscapes train ids, in the official order."""

    ROAD = 0
    SIDEWALK = 1
    BUILDING = 2
    WALL = 3
    FENCE = 4
    POLE = 5
    TRAFFIC_LIGHT = 6
    TRAFFIC_SIGN = 7
    VEGETATION = 8
    TERRAIN = 9
    SKY = 10
    PERSON = 11
    RIDER = 12
    CAR = 13
    TRUCK = 14
    BUS = 15
    TRAIN = 16
    MOTORCYCLE = 17
    BICYCLE = 18


CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# Official Cityscapes colours (RGB), indexed by train id.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# Cityscapes label id of each train id (labels.py of cityscapesScripts).
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# Label id written for IGNORE_ID pixels ("unlabeled").
IGNORE_LABEL_ID: int = 0

IGNORE_COLOR: tuple[int, int, int] = (0, 0, 0)


def train_id_to_label_id_table() -> list[int]:
    """Return a 256-entry lookup table mapping a train id byte to a label id.

    Every byte that is not a train id (255 included) maps to ``IGNORE_LABEL_ID``.
    """
    table = [IGNORE_LABEL_ID] * 256
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        table[train_id] = label_id
    return table


def label_id_to_train_id_table() -> list[int]:
    """Return a 256-entry lookup table mapping a Cityscapes label id to a train id.

    Label ids that are not evaluated (void classes, license plate, ...) map to
    ``IGNORE_ID``.
    """
    table = [IGNORE_ID] * 256
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        table[label_id] = train_id
    return table


def palette() -> list[tuple[int, int, int]]:
    """Return a 256-entry RGB palette: class colours, then black for everything else."""
    colors = list(CLASS_COLORS)
    return colors + [IGNORE_COLOR] * (256 - len(colors))


assert len(CLASS_NAMES) == len(CLASS_COLORS) == len(TRAIN_ID_TO_LABEL_ID) == NUM_CLASSES == len(TrainId)
