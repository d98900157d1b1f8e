"""Procedural street scenes rendered with pybullet's CPU renderer.

A seed fixes everything: the city (an endless grid of blocks built lazily
around the camera, each block from its own random stream), the textures, the
lighting, the sky, the camera route (a random walk over intersections with
smooth turns) and the moving people and vehicles. Rendering uses pybullet's
TinyRenderer, whose per-pixel object-id buffer is turned into Cityscapes train
ids through a table filled while bodies are spawned. Pixels with no object are
sky, so every pixel is labelled.

Typical use::

    for rgb, labels, stamp_ns in generate_sequence(seed=3, frames=100):
        ...
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from tdnet_ros.classes import CLASS_COLORS, IGNORE_ID, TrainId
from tdnet_ros.data import rare_object_rate_problem


@contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what pybullet's C++ code prints (build banner, URDF importer warnings)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


try:
    with _quiet_native_output():
        import pybullet as pb
        import pybullet_data
except ImportError as error:  # pragma: no cover - exercised only without pybullet
    raise ImportError(
        "The street generator needs pybullet: pip install 'pybullet==3.2.7'"
    ) from error

# Classes the generator can draw; the others (train) never appear.
USED_CLASSES: frozenset[int] = frozenset(int(c) for c in TrainId if c != TrainId.TRAIN)

_SEED_OFFSET = 1 << 20  # grid coordinates are shifted by this to be non-negative seeds
_HUMANOID_HEIGHT_AT_UNIT_SCALE = 6.5  # pybullet_data humanoid: 1.62 m at scale 0.25


class Frame(NamedTuple):
    """One rendered frame."""

    rgb: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8 Cityscapes train ids
    stamp_ns: int  # capture time in nanoseconds


@dataclass(frozen=True)
class StreetConfig:
    """Scene and camera settings (all lengths in metres)."""

    width: int = 512  # image width in pixels
    height: int = 256  # image height in pixels
    fps: float = 10.0  # frame rate of the stamps and of the motion
    start_stamp_ns: int = 1_700_000_000_000_000_000  # stamp of frame 0
    vertical_fov_deg: float = 30.0  # camera field of view, vertical
    block_size: float = 44.0  # edge of a city block, curb to curb
    lane_width: float = 3.5  # one driving lane
    parking_width: float = 2.5  # parking strip on each side of the lanes
    sidewalk_width: float = 3.5
    load_radius: float = 115.0  # blocks closer than this (centre distance) are built
    people_radius: float = 75.0  # people are placed in blocks closer than this
    far_plane: float = 170.0
    flat_class_colors: bool = False  # draw every object in its class colour, unlit (label checks)
    # How often the objects of the rarest classes are placed, as a multiple of the usual rate:
    # buses and trucks among vehicles, parked motorcycles, bicycles at the curb, cyclists, and
    # parks (with their walls and fences). 1 draws exactly the usual scenes; training data
    # may ask for more of them (data.rare_object_rate) while held-out scenes keep 1.
    rare_object_rate: float = 1.0

    @property
    def road_half_width(self) -> float:
        return self.lane_width + self.parking_width

    @property
    def pitch(self) -> float:
        """Distance between parallel road centre lines."""
        return self.block_size + 2.0 * self.road_half_width

    def validate(self) -> None:
        """Raise ValueError for settings the generator cannot render."""
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise ValueError(f"frame size must be within 16..4096 pixels, got {self.width}x{self.height}")
        if not (self.fps > 0.0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if not 5.0 <= self.vertical_fov_deg <= 120.0:
            raise ValueError(f"vertical_fov_deg must be within 5..120, got {self.vertical_fov_deg}")
        if problem := rare_object_rate_problem(self.rare_object_rate):
            raise ValueError(f"rare_object_rate {problem}")

    def rare_share(self, usual: float, most: float = 1.0) -> float:
        """The probability of placing a rare object whose usual probability is `usual`.

        At a rate of 1 it is `usual` exactly, so the random draws, and hence the scenes, are
        those of the usual setting.
        """
        return min(usual * self.rare_object_rate, most)


# --------------------------------------------------------------------------- randomness


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A random stream fixed by the sequence seed and integer keys (may be negative)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *(k + _SEED_OFFSET for k in keys)]))


def _hsv_color(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float],
               val: tuple[float, float]) -> tuple[float, float, float]:
    """A random RGB colour in [0, 1] drawn from HSV ranges (hue in degrees)."""
    h = rng.uniform(*hue) % 360.0
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    c = v * s
    x = c * (1 - abs((h / 60.0) % 2 - 1))
    m = v - c
    sector = int(h // 60) % 6
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][sector]
    return (r + m, g + m, b + m)


# --------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int | tuple[int, int]) -> np.ndarray:
    """Band-limited noise in [0, 1] of the given (H, W) size from a (rows, columns) grid of random cells."""
    grid = (cells, cells) if isinstance(cells, int) else cells
    coarse = rng.random(grid).astype(np.float32)
    return cv2.resize(coarse, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).clip(0.0, 1.0)


def _asphalt_texture(rng: np.random.Generator) -> np.ndarray:
    """Road texture for a 12 m wide road, u along the road (1 tile = 12 m)."""
    size = 256
    base = rng.uniform(55, 95)
    grain = rng.normal(0.0, 7.0, (size, size)).astype(np.float32)
    blotch = (_smooth_noise(rng, (size, size), 8) - 0.5) * rng.uniform(10, 30)
    gray = base + grain + blotch
    tex = np.repeat(gray[:, :, None], 3, axis=2)
    tex += np.array(rng.normal(0, 3, 3), np.float32)  # slight tint
    # Lane markings (v across the road: rows; u along the road: columns).
    paint = np.array([235, 235, 225] if rng.random() < 0.8 else [230, 190, 60], np.float32)
    row = lambda metres: int(round(metres / 12.0 * size))  # noqa: E731
    half = size // 2
    dash_cols = np.arange(size) % (size // 2) < size // 5
    centre = slice(half - 2, half + 2)
    if rng.random() < 0.6:
        tex[centre, dash_cols] = paint
    else:
        tex[centre, :] = paint
    for edge in (row(2.5), row(9.5)):  # parking strip limits
        tex[edge - 1:edge + 1, :] = paint * 0.9
    return tex.clip(0, 255).astype(np.uint8)


def _paving_texture(rng: np.random.Generator) -> np.ndarray:
    """Sidewalk tiles; one texture tile = 2 m."""
    size = 128
    tone = _hsv_color(rng, (0, 60), (0.0, 0.25), (0.5, 0.8))
    tex = np.empty((size, size, 3), np.float32)
    tex[:] = np.array(tone, np.float32) * 255
    tex += rng.normal(0, 6, (size, size, 1))
    tiles = int(rng.choice([4, 5, 8]))
    step = size // tiles
    joint = np.array(tone, np.float32) * 255 * 0.7
    for k in range(0, size, step):
        tex[k:k + 1, :] = joint
        tex[:, k:k + 1] = joint
    return tex.clip(0, 255).astype(np.uint8)


def _grass_texture(rng: np.random.Generator) -> np.ndarray:
    """Terrain (grass, dirt patches); one tile = 4 m."""
    size = 128
    green = np.array(_hsv_color(rng, (70, 110), (0.4, 0.7), (0.35, 0.6)), np.float32) * 255
    dirt = np.array(_hsv_color(rng, (25, 45), (0.3, 0.55), (0.35, 0.55)), np.float32) * 255
    mix = _smooth_noise(rng, (size, size), 6)[:, :, None] ** 2.0 * 0.6
    tex = green * (1 - mix) + dirt * mix + rng.normal(0, 10, (size, size, 1))
    return tex.clip(0, 255).astype(np.uint8)


def _facade_texture(rng: np.random.Generator) -> np.ndarray:
    """A building facade: one tile = one window bay (3 m wide, 3.2 m high)."""
    h, w = 64, 60
    wall = np.array(_hsv_color(rng, (0, 60), (0.05, 0.45), (0.35, 0.9)), np.float32) * 255
    glass = np.array(_hsv_color(rng, (180, 230), (0.1, 0.4), (0.12, 0.4)), np.float32) * 255
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = wall
    tex += rng.normal(0, 4, (h, w, 1))
    win_w = int(rng.uniform(0.35, 0.7) * w)
    win_h = int(rng.uniform(0.35, 0.6) * h)
    x0 = (w - win_w) // 2
    y0 = int((h - win_h) * 0.4)
    frame = wall * 0.6
    tex[y0 - 2:y0 + win_h + 2, x0 - 2:x0 + win_w + 2] = frame
    tex[y0:y0 + win_h, x0:x0 + win_w] = glass + rng.normal(0, 6, (win_h, win_w, 1))
    return tex.clip(0, 255).astype(np.uint8)


def _concrete_texture(rng: np.random.Generator) -> np.ndarray:
    """Concrete or brick for walls; one tile = 2 m."""
    size = 64
    tone = np.array(_hsv_color(rng, (0, 40), (0.0, 0.35), (0.45, 0.8)), np.float32) * 255
    tex = tone + rng.normal(0, 8, (size, size, 1)) + (_smooth_noise(rng, (size, size), 4)[:, :, None] - 0.5) * 30
    if rng.random() < 0.5:  # brick courses
        tex[::8, :] *= 0.7
    return tex.clip(0, 255).astype(np.uint8)


def _sky_panorama(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A 360-degree sky strip (H, width, 3) uint8: gradient plus clouds."""
    kind = rng.choice(["clear", "hazy", "overcast"], p=[0.5, 0.3, 0.2])
    if kind == "clear":
        top = np.array(_hsv_color(rng, (200, 220), (0.45, 0.75), (0.6, 0.9)))
        horizon = np.array(_hsv_color(rng, (195, 215), (0.1, 0.3), (0.85, 1.0)))
        cloudiness = rng.uniform(0.0, 0.4)
    elif kind == "hazy":
        top = np.array(_hsv_color(rng, (195, 215), (0.2, 0.45), (0.7, 0.9)))
        horizon = np.array(_hsv_color(rng, (20, 50), (0.05, 0.2), (0.85, 1.0)))
        cloudiness = rng.uniform(0.2, 0.6)
    else:
        top = np.array(_hsv_color(rng, (190, 230), (0.0, 0.1), (0.55, 0.75)))
        horizon = np.array(_hsv_color(rng, (190, 230), (0.0, 0.08), (0.75, 0.9)))
        cloudiness = rng.uniform(0.5, 0.9)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None] ** 0.8
    sky = (top[None, None, :] * (1 - rows) + horizon[None, None, :] * rows) * 255
    sky = np.broadcast_to(sky, (height, width, 3)).astype(np.float32)
    aspect = max(1, round(width / height))
    clouds = (_smooth_noise(rng, (height, width), (4, 4 * aspect)) * 0.6
              + _smooth_noise(rng, (height, width), (12, 12 * aspect)) * 0.4)
    # Make the strip wrap around: blend its two ends.
    ramp = np.linspace(0, 1, width // 8, dtype=np.float32)[None, :]
    clouds[:, -ramp.shape[1]:] = clouds[:, -ramp.shape[1]:] * (1 - ramp) + clouds[:, : ramp.shape[1]] * ramp
    cover = np.clip((clouds - (1.0 - cloudiness)) * 3.0, 0.0, 1.0)[:, :, None]
    cloud_color = np.array(_hsv_color(rng, (0, 360), (0.0, 0.05), (0.85, 1.0)), np.float32) * 255
    sky = sky * (1 - cover) + cloud_color * cover
    return sky.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


def _yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return (0.0, 0.0, math.sin(yaw / 2.0), math.cos(yaw / 2.0))


def _box_mesh(half: tuple[float, float, float], tile: tuple[float, float]) -> dict:
    """Vertices, normals, uvs and indices of a box whose texture repeats every ``tile`` metres.

    ``tile`` is (horizontal, vertical) size of one texture repeat; on top and
    bottom faces both directions use the horizontal size.
    """
    hx, hy, hz = half
    faces = [  # (normal, u axis, v axis, centre offset, u half, v half)
        ((1, 0, 0), (0, 1, 0), (0, 0, 1), (hx, 0, 0), hy, hz),
        ((-1, 0, 0), (0, -1, 0), (0, 0, 1), (-hx, 0, 0), hy, hz),
        ((0, 1, 0), (-1, 0, 0), (0, 0, 1), (0, hy, 0), hx, hz),
        ((0, -1, 0), (1, 0, 0), (0, 0, 1), (0, -hy, 0), hx, hz),
        ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, hz), hx, hy),
        ((0, 0, -1), (1, 0, 0), (0, -1, 0), (0, 0, -hz), hx, hy),
    ]
    vertices: list[list[float]] = []
    normals: list[list[float]] = []
    uvs: list[list[float]] = []
    indices: list[int] = []
    for normal, u_axis, v_axis, centre, u_half, v_half in faces:
        vertical = normal[2] == 0
        u_tile = tile[0]
        v_tile = tile[1] if vertical else tile[0]
        base = len(vertices)
        for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            vertices.append([centre[k] + su * u_half * u_axis[k] + sv * v_half * v_axis[k] for k in range(3)])
            normals.append(list(normal))
            uvs.append([(su + 1) * u_half / u_tile, (sv + 1) * v_half / v_tile])
        indices += [base, base + 1, base + 2, base, base + 2, base + 3]
    return {"vertices": vertices, "normals": normals, "uvs": uvs, "indices": indices}


@dataclass
class _Route:
    """The camera path: a dense polyline with headings and arc lengths."""

    points: np.ndarray  # (K, 2)
    headings: np.ndarray  # (K,) unwrapped, radians
    arc: np.ndarray  # (K,) cumulative length
    segments: list[tuple[tuple[int, int], tuple[int, int], float, float]]  # node_a, direction, s_a, s_b

    def pose(self, s: float) -> tuple[float, float, float]:
        """Position (x, y) and heading at arc length ``s``."""
        s = float(np.clip(s, self.arc[0], self.arc[-1]))
        k = int(np.searchsorted(self.arc, s, side="right")) - 1
        k = min(max(k, 0), len(self.arc) - 2)
        span = self.arc[k + 1] - self.arc[k]
        a = 0.0 if span <= 0 else (s - self.arc[k]) / span
        x, y = self.points[k] * (1 - a) + self.points[k + 1] * a
        return float(x), float(y), float(self.headings[k] * (1 - a) + self.headings[k + 1] * a)


def _build_route(rng: np.random.Generator, config: StreetConfig, length: float) -> _Route:
    """Random walk over intersections (right-hand traffic) with circular turns."""
    pitch = config.pitch
    offset = config.lane_width / 2.0
    n_nodes = int(length / pitch) + 4
    node = (0, 0)
    direction = (1, 0)
    nodes = [node]
    directions = [direction]
    for _ in range(n_nodes):
        node = (node[0] + direction[0], node[1] + direction[1])
        nodes.append(node)
        turn = rng.choice(["straight", "right", "left"], p=[0.45, 0.3, 0.25])
        if turn == "right":
            direction = (direction[1], -direction[0])
        elif turn == "left":
            direction = (-direction[1], direction[0])
        directions.append(direction)

    def right_of(d: tuple[int, int]) -> np.ndarray:
        return np.array([d[1], -d[0]], float)

    points: list[np.ndarray] = [np.array(nodes[0], float) * pitch + right_of(directions[0]) * offset]
    headings: list[float] = [math.atan2(directions[0][1], directions[0][0])]
    node_arc_index: list[int] = [0]
    for k in range(1, len(nodes) - 1):
        d_in, d_out = directions[k - 1], directions[k]
        centre_node = np.array(nodes[k], float) * pitch
        h_in = math.atan2(d_in[1], d_in[0])
        if d_in == d_out:
            points.append(centre_node + right_of(d_in) * offset)
            headings.append(h_in)
            node_arc_index.append(len(points) - 1)
            continue
        is_right = d_out == (d_in[1], -d_in[0])
        radius = 5.0 if is_right else 8.0
        corner = centre_node + offset * (right_of(d_in) + right_of(d_out))
        t_in = corner - np.array(d_in, float) * radius
        circle_centre = t_in + np.array(d_out, float) * radius
        start_angle = math.atan2(*(t_in - circle_centre)[::-1])
        sweep = -math.pi / 2 if is_right else math.pi / 2
        for a in np.linspace(0.0, 1.0, 13):
            angle = start_angle + sweep * a
            points.append(circle_centre + radius * np.array([math.cos(angle), math.sin(angle)]))
            headings.append(h_in + sweep * a)
            if a == 0.5:
                node_arc_index.append(len(points) - 1)
    last = np.array(nodes[-1], float) * pitch + right_of(directions[-2]) * offset
    points.append(last)
    headings.append(math.atan2(directions[-2][1], directions[-2][0]))
    node_arc_index.append(len(points) - 1)
    pts = np.array(points)
    unwrapped = np.unwrap(np.array(headings))
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    segments = [
        (nodes[k], directions[k], float(arc[node_arc_index[k]]), float(arc[node_arc_index[k + 1]]))
        for k in range(len(nodes) - 1)
    ]
    return _Route(points=pts, headings=unwrapped, arc=arc, segments=segments)


# --------------------------------------------------------------------------- scene


@dataclass
class _Actor:
    """A body whose pose is a function of time."""

    body: int
    pose_at: Callable[[float], tuple[tuple[float, float, float], float]]  # t -> (position, yaw)
    animate: Callable[[int, float], None] | None = None
    base_orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)


@dataclass
class _Block:
    bodies: list[int] = field(default_factory=list)
    actors: list[_Actor] = field(default_factory=list)


class StreetScene:
    """A pybullet world holding one seeded street sequence.

    Args:
        seed: fixes the whole sequence.
        frames: number of frames the route must cover.
        config: scene and camera settings.
    """

    def __init__(self, seed: int, frames: int, config: StreetConfig | None = None) -> None:
        self.config = config or StreetConfig()
        self.config.validate()
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if frames < 1:
            raise ValueError(f"frames must be at least 1, got {frames}")
        self.seed = seed
        self.frames = frames
        self._client = pb.connect(pb.DIRECT)
        self._class_of_body: dict[int, int] = {}
        self._length_of_body: dict[int, float] = {}
        self._blocks: dict[tuple[int, int], _Block] = {}
        self._segment_groups: dict[int, _Block] = {}
        self._people: dict[tuple[int, int], _Block] = {}
        self._global = _Block()
        self._tmp = tempfile.TemporaryDirectory(prefix="tdnet_street_")
        self._data_path = Path(pybullet_data.getDataPath())
        try:
            self._setup()
        except Exception:
            self.close()
            raise

    # ----------------------------------------------------------------- setup

    def _setup(self) -> None:
        cfg = self.config
        rng = _rng(self.seed, 0)
        self.speed = float(rng.uniform(6.0, 11.0))  # camera speed, m/s
        self.camera_height = float(rng.uniform(1.2, 1.7))
        self.camera_pitch = math.radians(float(rng.uniform(-4.0, 0.0)))
        self._sway_phase = float(rng.uniform(0, 2 * math.pi))
        self._start_s = cfg.pitch * 0.35
        length = self._start_s + self.speed * self.frames / cfg.fps + 3 * cfg.pitch
        self.route = _build_route(_rng(self.seed, 1), cfg, length)

        # Lighting, fixed for the sequence.
        elevation = math.radians(rng.uniform(20, 75))
        azimuth = rng.uniform(0, 2 * math.pi)
        self.light = {
            "lightDirection": [math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                               math.sin(elevation)],
            "lightColor": list(_hsv_color(rng, (20, 60), (0.0, 0.25), (0.9, 1.0))),
            "lightAmbientCoeff": float(rng.uniform(0.35, 0.65)),
            "lightDiffuseCoeff": float(rng.uniform(0.35, 0.65)),
            "lightSpecularCoeff": float(rng.uniform(0.0, 0.15)),
            # TinyRenderer's shadow map doubles the render time and is hardly visible at street scale.
            "shadow": 0,
        }
        if cfg.flat_class_colors:
            self.light = {"lightAmbientCoeff": 1.0, "lightDiffuseCoeff": 0.0, "lightSpecularCoeff": 0.0,
                          "shadow": 0}
        hfov = 2 * math.degrees(math.atan(math.tan(math.radians(cfg.vertical_fov_deg) / 2) * cfg.width / cfg.height))
        self._sky = _sky_panorama(rng, cfg.height, max(cfg.width, int(round(cfg.width * 360.0 / hfov))))
        self._projection = pb.computeProjectionMatrixFOV(cfg.vertical_fov_deg, cfg.width / cfg.height, 0.1,
                                                         cfg.far_plane, physicsClientId=self._client)

        # Texture pools for the sequence.
        tex_rng = _rng(self.seed, 2)
        self._tex_asphalt = [self._texture(_asphalt_texture(tex_rng), f"asphalt{k}") for k in range(3)]
        self._tex_paving = [self._texture(_paving_texture(tex_rng), f"paving{k}") for k in range(2)]
        self._tex_grass = [self._texture(_grass_texture(tex_rng), f"grass{k}") for k in range(2)]
        self._tex_facade = [self._texture(_facade_texture(tex_rng), f"facade{k}") for k in range(8)]
        self._tex_concrete = [self._texture(_concrete_texture(tex_rng), f"concrete{k}") for k in range(2)]

        # A car ahead in the camera's lane, following the same path.
        if rng.random() < 0.5:
            gap = float(rng.uniform(12.0, 25.0))
            body = self._vehicle(rng, (0.0, 0.0, 0.0), 0.0, allow_urdf=False)

            def lead_pose(t: float, gap: float = gap) -> tuple[tuple[float, float, float], float]:
                x, y, yaw = self.route.pose(self._start_s + self.speed * t + gap)
                return (x, y, 0.0), yaw

            self._global.actors.append(_Actor(body, lead_pose))

    def _texture(self, image_rgb: np.ndarray, name: str) -> int:
        path = Path(self._tmp.name) / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        return pb.loadTexture(str(path), physicsClientId=self._client)

    # ----------------------------------------------------------------- spawning helpers

    def _register(self, body: int, train_id: TrainId, owner: _Block | None) -> int:
        """Record the class of a new body and, in flat mode, paint it in its class colour."""
        self._class_of_body[body] = int(train_id)
        if owner is not None:
            owner.bodies.append(body)
        if self.config.flat_class_colors:
            color = [c / 255.0 for c in CLASS_COLORS[train_id]] + [1.0]
            for link in range(-1, pb.getNumJoints(body, physicsClientId=self._client)):
                pb.changeVisualShape(body, link, rgbaColor=color, textureUniqueId=-1, physicsClientId=self._client)
        return body

    def _textured_box(self, centre: tuple[float, float, float], half: tuple[float, float, float], texture: int,
                      tile: tuple[float, float], train_id: TrainId, owner: _Block | None, yaw: float = 0.0) -> int:
        mesh = _box_mesh(half, tile)
        shape = pb.createVisualShape(pb.GEOM_MESH, rgbaColor=[1, 1, 1, 1], physicsClientId=self._client, **mesh)
        body = pb.createMultiBody(baseVisualShapeIndex=shape, basePosition=centre,
                                  baseOrientation=_yaw_quaternion(yaw), physicsClientId=self._client)
        if not self.config.flat_class_colors:
            pb.changeVisualShape(body, -1, textureUniqueId=texture, physicsClientId=self._client)
        return self._register(body, train_id, owner)

    def _shape(self, kind: str, size: tuple[float, ...], color: tuple[float, float, float],
               position: tuple[float, float, float] = (0.0, 0.0, 0.0),
               orientation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)) -> int:
        """A coloured primitive placed at ``position``/``orientation`` in its body's frame."""
        common = {"rgbaColor": [*color, 1.0], "visualFramePosition": list(position),
                  "visualFrameOrientation": list(orientation), "physicsClientId": self._client}
        if kind == "box":
            return pb.createVisualShape(pb.GEOM_BOX, halfExtents=list(size), **common)
        if kind == "sphere":
            return pb.createVisualShape(pb.GEOM_SPHERE, radius=size[0], **common)
        if kind == "cylinder":
            return pb.createVisualShape(pb.GEOM_CYLINDER, radius=size[0], length=size[1], **common)
        raise ValueError(f"unknown primitive {kind!r}")

    def _compound(self, shapes: list[int], position: tuple[float, float, float], yaw: float, train_id: TrainId,
                  owner: _Block | None) -> int:
        """One body made of visual shapes (each already placed in the body frame); the first is the base."""
        links = shapes[1:]
        n = len(links)
        body = pb.createMultiBody(
            baseMass=0,
            baseVisualShapeIndex=shapes[0],
            basePosition=list(position),
            baseOrientation=_yaw_quaternion(yaw),
            linkMasses=[0] * n,
            linkCollisionShapeIndices=[-1] * n,
            linkVisualShapeIndices=links,
            linkPositions=[[0, 0, 0]] * n,
            linkOrientations=[[0, 0, 0, 1]] * n,
            linkInertialFramePositions=[[0, 0, 0]] * n,
            linkInertialFrameOrientations=[[0, 0, 0, 1]] * n,
            linkParentIndices=[0] * n,
            linkJointTypes=[pb.JOINT_FIXED] * n,
            linkJointAxis=[[0, 0, 1]] * n,
            physicsClientId=self._client,
        )
        return self._register(body, train_id, owner)

    # ----------------------------------------------------------------- objects

    def _vehicle(self, rng: np.random.Generator, position: tuple[float, float, float], yaw: float,
                 owner: _Block | None = None, allow_urdf: bool = True) -> int:
        """A car, truck or bus standing on the road at ``position`` and heading ``yaw``."""
        # pybullet_data's racecar mesh costs about 2 ms of render time per copy (on screen or
        # not), ten times a primitive car, so it stays rare; the husky (5 ms) is not used.
        heavy = self.config.rare_share(0.07)  # each of truck and bus
        car = 0.695 - 2 * (heavy - 0.07)  # cars give way to them (0.695 exactly at the usual rate)
        kind = rng.choice(["car", "van", "truck", "bus", "urdf"], p=[car, 0.14, heavy, heavy, 0.025])
        if kind == "urdf" and not allow_urdf:
            kind = "car"
        paint = _hsv_color(rng, (0, 360), (0.0, 0.9), (0.15, 0.95))
        glass = _hsv_color(rng, (190, 220), (0.1, 0.3), (0.1, 0.3))
        tyre = (0.08, 0.08, 0.08)
        wheel_orn = pb.getQuaternionFromEuler([math.pi / 2, 0, 0])
        x, y, z = position
        if kind == "urdf":
            with _quiet_native_output():
                body = pb.loadURDF(str(self._data_path / "racecar/racecar.urdf"), basePosition=[x, y, z],
                                   globalScaling=4.5,
                                   baseOrientation=_yaw_quaternion(yaw), useFixedBase=True,
                                   physicsClientId=self._client)
            self._length_of_body[body] = 3.0  # racecar at 4.5x: 2.1 m from the rear axle origin, spaced as 3 m
            return self._register(body, TrainId.CAR, owner)
        if kind in {"car", "van"}:
            length = rng.uniform(3.8, 4.8) if kind == "car" else rng.uniform(4.8, 5.4)
            width = rng.uniform(1.7, 1.9)
            body_h = rng.uniform(0.6, 0.8)
            cabin_h = rng.uniform(0.5, 0.65) if kind == "car" else 1.1
            cabin_len = length * (rng.uniform(0.45, 0.55) if kind == "car" else 0.8)
            wheel_r = 0.33
            parts = [
                self._shape("box", (length / 2, width / 2, body_h / 2), paint, (0, 0, wheel_r + body_h / 2 - 0.1)),
                self._shape("box", (cabin_len / 2, width / 2 - 0.08, cabin_h / 2), glass, (-length * 0.08, 0, wheel_r + body_h - 0.1 + cabin_h / 2)),
                self._shape("box", (cabin_len / 2 - 0.2, width / 2 - 0.06, 0.05), paint, (-length * 0.08, 0, wheel_r + body_h - 0.1 + cabin_h)),
            ]
            for sx in (-1, 1):
                for sy in (-1, 1):
                    parts.append(self._shape("cylinder", (wheel_r, 0.25), tyre,
                                             (sx * length * 0.32, sy * (width / 2 - 0.1), wheel_r), wheel_orn))
            body = self._compound(parts, (x, y, z), yaw, TrainId.CAR, owner)
            self._length_of_body[body] = float(length)
            return body
        if kind == "truck":
            length = rng.uniform(6.5, 9.0)
            width = 2.4
            cargo_h = rng.uniform(2.2, 3.0)
            cab_len = 2.0
            wheel_r = 0.5
            cargo_color = _hsv_color(rng, (0, 360), (0.0, 0.5), (0.5, 0.95))
            parts = [
                self._shape("box", ((length - cab_len) / 2, width / 2, cargo_h / 2), cargo_color, (-cab_len / 2, 0, wheel_r + 0.4 + cargo_h / 2)),
                self._shape("box", (cab_len / 2, width / 2, 0.9), paint, (length / 2 - cab_len / 2 + 0.1, 0, wheel_r + 1.1)),
                self._shape("box", (0.05, width / 2 - 0.1, 0.4), glass, (length / 2 + 0.12, 0, wheel_r + 1.5)),
            ]
            for px in (length * 0.38, -length * 0.2, -length * 0.38):
                for sy in (-1, 1):
                    parts.append(self._shape("cylinder", (wheel_r, 0.35), tyre, (px, sy * (width / 2 - 0.15), wheel_r),
                                             wheel_orn))
            body = self._compound(parts, (x, y, z), yaw, TrainId.TRUCK, owner)
            self._length_of_body[body] = float(length) + 0.3
            return body
        # bus
        length = rng.uniform(10.0, 12.0)
        width = 2.55
        wheel_r = 0.5
        parts = [
            self._shape("box", (length / 2, width / 2, 0.75), paint, (0, 0, wheel_r + 0.65)),
            self._shape("box", (length / 2 - 0.05, width / 2 - 0.02, 0.55), glass, (0, 0, wheel_r + 1.95)),
            self._shape("box", (length / 2, width / 2, 0.3), paint, (0, 0, wheel_r + 2.75)),
        ]
        for px in (length * 0.33, -length * 0.3):
            for sy in (-1, 1):
                parts.append(self._shape("cylinder", (wheel_r, 0.3), tyre, (px, sy * (width / 2 - 0.15), wheel_r),
                                         wheel_orn))
        body = self._compound(parts, (x, y, z), yaw, TrainId.BUS, owner)
        self._length_of_body[body] = float(length)
        return body

    def _two_wheeler(self, rng: np.random.Generator, position: tuple[float, float, float], yaw: float,
                     motorcycle: bool, owner: _Block | None) -> int:
        """A bicycle or motorcycle built from primitives; wheels along the local x axis."""
        wheel_orn = pb.getQuaternionFromEuler([math.pi / 2, 0, 0])
        paint = _hsv_color(rng, (0, 360), (0.3, 0.9), (0.2, 0.9))
        dark = (0.06, 0.06, 0.06)
        if motorcycle:
            r, base = 0.3, 0.55
            parts = [
                self._shape("box", (0.55, 0.18, 0.2), paint, (0, 0, base)),
                self._shape("cylinder", (r, 0.12), dark, (0.7, 0, r), wheel_orn),
                self._shape("cylinder", (r, 0.12), dark, (-0.7, 0, r), wheel_orn),
                self._shape("box", (0.35, 0.15, 0.06), dark, (-0.2, 0, base + 0.26)),
                self._shape("box", (0.04, 0.35, 0.03), dark, (0.45, 0, base + 0.45)),
            ]
            body = self._compound(parts, position, yaw, TrainId.MOTORCYCLE, owner)
            self._length_of_body[body] = 2.0
            return body
        r = 0.34
        tilt = pb.getQuaternionFromEuler([0, 0.5, 0])
        parts = [
            self._shape("box", (0.45, 0.025, 0.025), paint, (0, 0, 0.62)),
            self._shape("cylinder", (r, 0.04), dark, (0.52, 0, r), wheel_orn),
            self._shape("cylinder", (r, 0.04), dark, (-0.52, 0, r), wheel_orn),
            self._shape("box", (0.025, 0.025, 0.3), paint, (-0.2, 0, 0.55), tilt),
            self._shape("box", (0.12, 0.06, 0.03), dark, (-0.28, 0, 0.88)),
            self._shape("box", (0.03, 0.25, 0.02), dark, (0.4, 0, 0.95)),
        ]
        body = self._compound(parts, position, yaw, TrainId.BICYCLE, owner)
        self._length_of_body[body] = 1.75
        return body

    def _humanoid(self, rng: np.random.Generator, train_id: TrainId, owner: _Block | None) -> tuple[int, float]:
        """A person (pybullet_data humanoid, coloured clothes); returns body and hip height."""
        height = float(rng.uniform(1.5, 1.9))
        scale = height / _HUMANOID_HEIGHT_AT_UNIT_SCALE
        with _quiet_native_output():
            body = pb.loadURDF(str(self._data_path / "humanoid/humanoid.urdf"), globalScaling=scale,
                               useFixedBase=True, physicsClientId=self._client)
        # Colours are drawn in flat mode too, so that both modes consume the same random numbers.
        skin = _hsv_color(rng, (15, 35), (0.25, 0.6), (0.3, 0.95))
        top = _hsv_color(rng, (0, 360), (0.0, 0.9), (0.1, 0.95))
        legs = _hsv_color(rng, (200, 240), (0.0, 0.6), (0.1, 0.6))
        shoes = _hsv_color(rng, (0, 360), (0.0, 0.3), (0.05, 0.4))
        if not self.config.flat_class_colors:
            # Link order: root chest neck r_shoulder r_elbow r_wrist l_shoulder l_elbow l_wrist
            #             r_hip r_knee r_ankle l_hip l_knee l_ankle
            colors = [top, top, skin, top, top, skin, top, top, skin, legs, legs, shoes, legs, legs, shoes]
            for link, color in enumerate(colors):
                pb.changeVisualShape(body, link, rgbaColor=[*color, 1.0], physicsClientId=self._client)
        self._register(body, train_id, owner)
        return body, 0.88 * scale / 0.25

    def _walker(self, rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, span: float,
                z: float, owner: _Block) -> None:
        """A pedestrian walking back and forth over ``span`` metres (0 = standing)."""
        body, hip = self._humanoid(rng, TrainId.PERSON, owner)
        speed = float(rng.uniform(0.9, 1.6)) if span > 0 else 0.0
        phase = float(rng.uniform(0, 2 * span)) if span > 0 else 0.0
        base_yaw = math.atan2(direction[1], direction[0]) + (0.0 if rng.random() < 0.5 else math.pi)
        stride = float(rng.uniform(0.35, 0.55))

        def pose(t: float) -> tuple[tuple[float, float, float], float]:
            if span <= 0:
                return (float(start[0]), float(start[1]), z + hip), base_yaw
            travel = (phase + speed * t) % (2 * span)
            forward = travel < span
            along = travel if forward else 2 * span - travel
            pos = start + direction * along
            yaw = math.atan2(direction[1], direction[0]) + (0.0 if forward else math.pi)
            return (float(pos[0]), float(pos[1]), z + hip), yaw

        def animate(body_id: int, t: float) -> None:
            swing = stride * math.sin(2 * math.pi * speed * t / 1.4) if span > 0 else 0.0
            self._set_legs(body_id, swing, -swing, 0.0)

        self._set_legs(body, 0.0, 0.0, 0.0)
        owner.actors.append(_Actor(body, pose, animate, pb.getQuaternionFromEuler([math.pi / 2, 0, 0])))

    def _set_legs(self, body: int, right_hip: float, left_hip: float, knee: float) -> None:
        """Rotate the humanoid's hips (forward positive) and knees (bent positive)."""
        c = self._client
        pb.resetJointStateMultiDof(body, 9, pb.getQuaternionFromAxisAngle([0, 0, 1], right_hip), physicsClientId=c)
        pb.resetJointStateMultiDof(body, 12, pb.getQuaternionFromAxisAngle([0, 0, 1], left_hip), physicsClientId=c)
        pb.resetJointStateMultiDof(body, 10, [-knee], physicsClientId=c)
        pb.resetJointStateMultiDof(body, 13, [-knee], physicsClientId=c)

    def _cyclist(self, rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, span: float, z: float,
                 owner: _Block) -> None:
        """A rider on a bicycle going back and forth along a sidewalk."""
        bike = self._two_wheeler(rng, (0, 0, 0), 0.0, motorcycle=False, owner=owner)
        rider, hip = self._humanoid(rng, TrainId.RIDER, owner)
        self._set_legs(rider, 1.3, 1.0, 1.2)
        pb.resetJointStateMultiDof(rider, 3, pb.getQuaternionFromAxisAngle([0, 0, 1], 0.9), physicsClientId=self._client)
        pb.resetJointStateMultiDof(rider, 6, pb.getQuaternionFromAxisAngle([0, 0, 1], 0.9), physicsClientId=self._client)
        speed = float(rng.uniform(2.5, 4.5))
        phase = float(rng.uniform(0, 2 * span))

        def bike_pose(t: float) -> tuple[tuple[float, float, float], float]:
            travel = (phase + speed * t) % (2 * span)
            forward = travel < span
            pos = start + direction * (travel if forward else 2 * span - travel)
            return (float(pos[0]), float(pos[1]), z), math.atan2(direction[1], direction[0]) + (0 if forward else math.pi)

        def rider_pose(t: float) -> tuple[tuple[float, float, float], float]:
            (x, y, _), yaw = bike_pose(t)
            back = 0.25
            return (x - back * math.cos(yaw), y - back * math.sin(yaw), z + 0.95), yaw

        owner.actors.append(_Actor(bike, bike_pose))
        owner.actors.append(_Actor(rider, rider_pose, None, pb.getQuaternionFromEuler([math.pi / 2, 0, 0])))

    def _tree(self, rng: np.random.Generator, x: float, y: float, z: float, owner: _Block) -> None:
        trunk_h = float(rng.uniform(1.8, 3.5))
        crown = float(rng.uniform(1.3, 2.6))
        bark = _hsv_color(rng, (20, 40), (0.3, 0.6), (0.2, 0.4))
        leaves = _hsv_color(rng, (75, 130), (0.4, 0.8), (0.2, 0.55))
        parts = [self._shape("cylinder", (0.15, trunk_h), bark, (0, 0, trunk_h / 2)),
                 self._shape("sphere", (crown,), leaves, (0, 0, trunk_h + crown * 0.7))]
        for _ in range(int(rng.integers(0, 3))):
            dx, dy = rng.uniform(-0.7, 0.7, 2) * crown
            parts.append(self._shape("sphere", (crown * float(rng.uniform(0.6, 0.9)),), leaves,
                                     (float(dx), float(dy), trunk_h + crown * float(rng.uniform(0.6, 1.2)))))
        self._compound(parts, (x, y, z), 0.0, TrainId.VEGETATION, owner)

    def _street_lamp(self, rng: np.random.Generator, x: float, y: float, z: float, toward_road: float,
                     owner: _Block) -> None:
        h = float(rng.uniform(5.0, 8.0))
        gray = _hsv_color(rng, (0, 360), (0.0, 0.15), (0.2, 0.6))
        arm = 1.2
        parts = [self._shape("cylinder", (0.08, h), gray, (0, 0, h / 2)),
                 self._shape("box", (arm / 2, 0.05, 0.05), gray, (arm / 2, 0, h)),
                 self._shape("box", (0.3, 0.14, 0.06), gray, (arm, 0, h - 0.05))]
        self._compound(parts, (x, y, z), toward_road, TrainId.POLE, owner)

    def _sign(self, rng: np.random.Generator, x: float, y: float, z: float, facing: float, owner: _Block) -> None:
        h = float(rng.uniform(2.2, 2.8))
        gray = (0.55, 0.55, 0.58)
        self._compound([self._shape("cylinder", (0.04, h), gray, (0, 0, h / 2))], (x, y, z), 0.0,
                       TrainId.POLE, owner)
        face = rng.choice([(0.8, 0.1, 0.1), (0.1, 0.3, 0.75), (0.95, 0.95, 0.95), (0.95, 0.8, 0.1)])
        size = float(rng.uniform(0.3, 0.45))
        if rng.random() < 0.5:
            shape = self._shape("cylinder", (size, 0.04), tuple(face), (0.06, 0, 0),
                                pb.getQuaternionFromEuler([0, math.pi / 2, 0]))
        else:
            shape = self._shape("box", (0.02, size, size), tuple(face), (0.06, 0, 0))
        self._compound([shape], (x, y, z + h), facing, TrainId.TRAFFIC_SIGN, owner)

    def _traffic_light(self, rng: np.random.Generator, x: float, y: float, z: float, facing: float,
                       owner: _Block) -> None:
        h = float(rng.uniform(3.0, 4.0))
        dark = (0.12, 0.12, 0.12)
        self._compound([self._shape("cylinder", (0.07, h + 0.5), (0.4, 0.4, 0.42), (0, 0, (h + 0.5) / 2))],
                       (x, y, z), 0.0, TrainId.POLE, owner)
        lit = int(rng.integers(0, 3))
        lamp_colors = [(0.9, 0.1, 0.05), (0.95, 0.7, 0.05), (0.1, 0.85, 0.3)]
        parts = [self._shape("box", (0.15, 0.18, 0.5), dark, (0, 0, 0))]
        for k, color in enumerate(lamp_colors):
            shade = color if k == lit else tuple(c * 0.25 for c in color)
            parts.append(self._shape("sphere", (0.11,), shade, (0.12, 0, 0.3 - 0.3 * k)))
        self._compound(parts, (x, y, z + h), facing, TrainId.TRAFFIC_LIGHT, owner)

    # ----------------------------------------------------------------- blocks

    def _build_block(self, i: int, j: int) -> _Block:
        """Block (i, j): the area between road lines i..i+1 (x) and j..j+1 (y), plus the roads
        and intersection on its south-west side and everything on them."""
        cfg = self.config
        rng = _rng(self.seed, 10, i, j)
        block = _Block()
        pitch, rh, sw = cfg.pitch, cfg.road_half_width, cfg.sidewalk_width
        x0, y0 = i * pitch + rh, j * pitch + rh  # curb corner
        size = cfg.block_size
        curb = 0.15

        # Roads (z in -0.1..0): segment along x (south), along y (west), intersection.
        asphalt = self._tex_asphalt[int(rng.integers(len(self._tex_asphalt)))]
        road_len = size / 2
        self._textured_box((x0 + road_len, j * pitch, -0.05), (road_len, rh, 0.05), asphalt, (12.0, 12.0),
                           TrainId.ROAD, block)
        self._textured_box((i * pitch, y0 + road_len, -0.05), (road_len, rh, 0.05), asphalt, (12.0, 12.0),
                           TrainId.ROAD, block, yaw=math.pi / 2)
        self._textured_box((i * pitch, j * pitch, -0.05), (rh, rh, 0.05), self._tex_asphalt[0], (48.0, 48.0),
                           TrainId.ROAD, block)

        # Sidewalk ring and the block interior.
        paving = self._tex_paving[int(rng.integers(len(self._tex_paving)))]
        grass = self._tex_grass[int(rng.integers(len(self._tex_grass)))]
        cx, cy = x0 + size / 2, y0 + size / 2

        def ring(outer: float, inner_edge: float, texture: int, tile: float, train_id: TrainId) -> None:
            """A square band of the block between ``outer`` and ``inner_edge`` metres from its edge."""
            middle, half_width = size / 2 - (outer + inner_edge) / 2, (inner_edge - outer) / 2
            for sign in (-1, 1):
                self._textured_box((cx, cy + sign * middle, curb / 2), (size / 2 - outer, half_width, curb / 2),
                                   texture, (tile, tile), train_id, block)
                self._textured_box((cx + sign * middle, cy, curb / 2), (half_width, size / 2 - inner_edge, curb / 2),
                                   texture, (tile, tile), train_id, block)

        if rng.random() < 0.35:  # a grass verge along the curb, trees and lamps stand on it
            verge = float(rng.uniform(1.0, 1.6))
            ring(0.0, verge, grass, 4.0, TrainId.TERRAIN)
            ring(verge, sw, paving, 2.0, TrainId.SIDEWALK)
        else:
            ring(0.0, sw, paving, 2.0, TrainId.SIDEWALK)
        inner = size / 2 - sw
        self._textured_box((cx, cy, curb / 2), (inner, inner, curb / 2), grass, (4.0, 4.0), TrainId.TERRAIN, block)

        # Each side of the block: outward normal, along direction, and the curb line.
        sides = []
        for normal in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            n = np.array(normal, float)
            along = np.array([-normal[1], normal[0]], float)
            sides.append((n, along, np.array([cx, cy]) + n * size / 2))
        is_park = rng.random() < cfg.rare_share(0.22, 0.5)
        if is_park:
            self._build_park(rng, block, cx, cy, inner, curb)
        else:
            self._build_buildings(rng, block, cx, cy, inner, curb)

        # Street furniture along the curb of each side.
        for n, along, mid in sides:
            facing_road = math.atan2(n[1], n[0])
            curb_line = mid - n * 0.6
            u = -size / 2 + rng.uniform(2.0, 6.0)
            while u < size / 2 - 2.0:
                x, y = curb_line + along * u
                choice = rng.random()
                if choice < 0.3:
                    self._street_lamp(rng, x, y, curb, facing_road, block)
                elif choice < 0.55:
                    self._tree(rng, x, y, curb, block)
                elif choice < 0.7:
                    self._sign(rng, x, y, curb, facing_road + rng.choice([-math.pi / 2, math.pi / 2]), block)
                # 0.78 exactly at the usual rate (0.7 + 0.08 is not); above the bound nothing is placed
                elif choice < 0.78 + (cfg.rare_share(0.08, 0.3) - 0.08):
                    self._two_wheeler(rng, (x, y, curb), math.atan2(along[1], along[0]) + 0.3,
                                      motorcycle=False, owner=block)
                u += rng.uniform(6.0, 14.0)
            # Traffic light at the corner that faces the traffic reaching the intersection.
            if rng.random() < 0.6:
                x, y = curb_line + along * (size / 2 - 1.0)
                self._traffic_light(rng, x, y, curb, math.atan2(-along[1], -along[0]), block)

        # Parked vehicles on the two road segments this block owns.
        for seg_start, seg_dir in (((x0, j * pitch), (1.0, 0.0)), ((i * pitch, y0), (0.0, 1.0))):
            d = np.array(seg_dir)
            right = np.array([d[1], -d[0]])
            for side in (-1, 1):
                lateral = side * (cfg.lane_width + cfg.parking_width / 2)
                u = rng.uniform(4.0, 9.0)
                while u < size - 6.0:  # u: where the next parked vehicle may start
                    if rng.random() < 0.45:
                        yaw = math.atan2(d[1], d[0]) + (0.0 if side > 0 else math.pi) + rng.normal(0, 0.03)
                        if rng.random() < cfg.rare_share(0.12, 0.5):
                            body = self._two_wheeler(rng, (0.0, 0.0, 0.0), yaw, motorcycle=True, owner=block)
                        else:
                            body = self._vehicle(rng, (0.0, 0.0, 0.0), yaw, block)
                        length = self._vehicle_length(body)
                        if u + length > size - 3.0:  # would reach into the intersection
                            block.bodies.remove(body)
                            self._remove(_Block(bodies=[body]))
                            break
                        x, y = np.array(seg_start) + d * (u + length / 2) + right * lateral
                        pb.resetBasePositionAndOrientation(body, [float(x), float(y), 0.0], _yaw_quaternion(yaw),
                                                           physicsClientId=self._client)
                        u += length + rng.uniform(0.8, 2.5)
                    else:
                        u += rng.uniform(3.0, 7.0)
        return block

    def _build_block_people(self, i: int, j: int) -> _Block:
        """Pedestrians and cyclists on the sidewalks of block (i, j).

        They are kept apart from the block because a humanoid costs about 0.7 ms of
        render time even off screen, so people exist only in blocks near the camera.
        """
        cfg = self.config
        rng = _rng(self.seed, 11, i, j)
        group = _Block()
        size, sw, curb = cfg.block_size, cfg.sidewalk_width, 0.15
        centre = np.array([i * cfg.pitch + cfg.road_half_width + size / 2, j * cfg.pitch + cfg.road_half_width + size / 2])
        for normal in ((0, -1), (0, 1), (-1, 0), (1, 0)):
            n = np.array(normal, float)
            along = np.array([-normal[1], normal[0]], float)
            walk_line = centre + n * (size / 2 - rng.uniform(1.2, sw - 0.5))
            for _ in range(int(rng.integers(0, 4))):
                start_u = rng.uniform(-size / 2 + 2, size / 2 - 12)
                span = float(rng.uniform(4, 10)) if rng.random() < 0.75 else 0.0
                self._walker(rng, walk_line + along * start_u, along, span, curb, group)
            if rng.random() < cfg.rare_share(0.15, 0.8):
                self._cyclist(rng, walk_line + along * (-size / 2 + 3), along, size - 6, curb, group)
        return group

    def _vehicle_length(self, body: int) -> float:
        """Length of a vehicle made by ``_vehicle`` or ``_two_wheeler`` (pybullet's AABBs of
        bodies without collision shapes are empty, so builders record it)."""
        return self._length_of_body[body]

    def _build_buildings(self, rng: np.random.Generator, block: _Block, cx: float, cy: float, inner: float,
                         z: float) -> None:
        """Buildings along the four sides of the block interior (a square of half size ``inner``)."""
        for side in range(4):
            # Local frame: u along the side, depth into the block.
            angle = [0.0, math.pi, -math.pi / 2, math.pi / 2][side]  # outward normal: -y, +y, -x, +x
            n = np.array([math.sin(angle), -math.cos(angle)])
            along = np.array([math.cos(angle), math.sin(angle)])
            u0, u1 = (-inner, inner) if side < 2 else (-inner + 16.0, inner - 16.0)
            u = u0
            while u < u1 - 4.0:
                width = min(float(rng.uniform(8.0, 20.0)), u1 - u)
                depth = float(rng.uniform(10.0, 16.0))
                setback = 0.0 if rng.random() < 0.6 else float(rng.uniform(1.5, 4.0))
                height = float(rng.uniform(7.0, 32.0))
                centre = np.array([cx, cy]) + n * (inner - setback - depth / 2) + along * (u + width / 2)
                yaw = math.atan2(along[1], along[0])
                facade = self._tex_facade[int(rng.integers(len(self._tex_facade)))]
                self._textured_box((float(centre[0]), float(centre[1]), z + height / 2),
                                   (width / 2, depth / 2, height / 2), facade, (3.0, 3.2), TrainId.BUILDING, block,
                                   yaw=yaw)
                if setback > 0 and rng.random() < 0.6:
                    edge = np.array([cx, cy]) + n * (inner - 0.2) + along * (u + width / 2)
                    if rng.random() < 0.5:
                        self._fence(rng, edge, along, width, z, block)
                    else:
                        hedge = _hsv_color(rng, (80, 130), (0.4, 0.8), (0.2, 0.5))
                        self._compound([self._shape("box", (width / 2, 0.4, 0.5), hedge, (0, 0, 0.5))],
                                       (float(edge[0]), float(edge[1]), z), yaw, TrainId.VEGETATION, block)
                u += width + (0.0 if rng.random() < 0.5 else float(rng.uniform(1.0, 5.0)))

    def _fence(self, rng: np.random.Generator, centre: np.ndarray, along: np.ndarray, length: float, z: float,
               block: _Block) -> None:
        color = _hsv_color(rng, (0, 360), (0.0, 0.4), (0.2, 0.8))
        h = float(rng.uniform(0.9, 1.6))
        parts = [self._shape("box", (length / 2, 0.03, 0.04), color, (0, 0, h)),
                 self._shape("box", (length / 2, 0.03, 0.04), color, (0, 0, h * 0.45))]
        n_posts = max(2, int(length / 0.8))
        for k in range(min(n_posts, 60)):
            px = -length / 2 + length * k / (n_posts - 1)
            parts.append(self._shape("box", (0.03, 0.03, h / 2), color, (px, 0, h / 2)))
        self._compound(parts, (float(centre[0]), float(centre[1]), z), math.atan2(along[1], along[0]), TrainId.FENCE,
                       block)

    def _build_park(self, rng: np.random.Generator, block: _Block, cx: float, cy: float, inner: float,
                    z: float) -> None:
        """Grass with trees, bounded by low walls or fences."""
        for _ in range(int(rng.integers(6, 14))):
            x, y = rng.uniform(-inner + 3, inner - 3, 2)
            self._tree(rng, cx + float(x), cy + float(y), z, block)
        boundary = rng.choice(["wall", "fence", "none"], p=[0.45, 0.35, 0.2])
        concrete = self._tex_concrete[int(rng.integers(len(self._tex_concrete)))]
        wall_h = float(rng.uniform(0.6, 2.0))
        for side in range(4):
            angle = [0.0, math.pi, -math.pi / 2, math.pi / 2][side]
            n = np.array([math.sin(angle), -math.cos(angle)])
            along = np.array([math.cos(angle), math.sin(angle)])
            edge = np.array([cx, cy]) + n * (inner - 0.3)
            length = 2 * inner - 0.6
            if boundary == "wall":
                self._textured_box((float(edge[0]), float(edge[1]), z + wall_h / 2), (length / 2 - 0.5, 0.2, wall_h / 2),
                                   concrete, (2.0, 2.0), TrainId.WALL, block, yaw=math.atan2(along[1], along[0]))
            elif boundary == "fence":
                self._fence(rng, edge, along, length, z, block)

    # ----------------------------------------------------------------- moving traffic

    def _segment_traffic(self, index: int) -> _Block:
        """Oncoming cars on route segment ``index`` (node A to node B).

        They drive as a platoon at one speed toward A, so they never overlap, and vanish
        once inside intersection A, which the camera has passed by then. They start
        beyond B only when the camera does not turn left at B (a left turn crosses
        their lane).
        """
        cfg = self.config
        rng = _rng(self.seed, 20, index)
        group = _Block()
        node, direction, s_a, _ = self.route.segments[index]
        d = np.array(direction, float)
        left = np.array([-d[1], d[0]])
        origin = np.array(node, float) * cfg.pitch + left * cfg.lane_width / 2
        t_enter = (s_a - 15.0 - self._start_s) / self.speed
        rh = cfg.road_half_width
        next_direction = self.route.segments[index + 1][1] if index + 1 < len(self.route.segments) else direction
        turns_left_at_b = next_direction == (-direction[1], direction[0])
        u_max = cfg.pitch - rh - 4.0 if turns_left_at_b else 2 * cfg.pitch - rh - 4.0
        speed = float(rng.uniform(0.5, 1.0)) * self.speed
        yaw = math.atan2(-d[1], -d[0])
        u0 = rh + float(rng.uniform(25.0, 35.0))
        for _ in range(int(rng.integers(0, 5))):
            if u0 > u_max:
                break
            body = self._vehicle(rng, (0.0, 0.0, -500.0), yaw, group, allow_urdf=False)

            def pose(t: float, u0: float = u0) -> tuple[tuple[float, float, float], float]:
                u = u0 - speed * (t - t_enter)
                if u < rh:  # inside intersection A, behind the camera: park it far below ground
                    return (0.0, 0.0, -500.0), yaw
                x, y = origin + d * u
                return (float(x), float(y), 0.0), yaw

            group.actors.append(_Actor(body, pose))
            u0 += self._vehicle_length(body) + float(rng.uniform(6.0, 25.0))
        return group

    # ----------------------------------------------------------------- streaming

    def _remove(self, block: _Block) -> None:
        for body in block.bodies:
            pb.removeBody(body, physicsClientId=self._client)
            del self._class_of_body[body]
            self._length_of_body.pop(body, None)

    def _update_world(self, x: float, y: float, heading: float, s: float) -> None:
        cfg = self.config
        pitch = cfg.pitch
        reach = cfg.load_radius
        wanted: set[tuple[int, int]] = set()
        wanted_people: set[tuple[int, int]] = set()
        forward = np.array([math.cos(heading), math.sin(heading)])
        for i in range(int(math.floor((x - reach) / pitch)) - 1, int(math.floor((x + reach) / pitch)) + 1):
            for j in range(int(math.floor((y - reach) / pitch)) - 1, int(math.floor((y + reach) / pitch)) + 1):
                centre = np.array([(i + 0.5) * pitch, (j + 0.5) * pitch])
                offset = centre - np.array([x, y])
                distance = float(np.linalg.norm(offset))
                ahead = float(offset @ forward)
                if distance < reach and ahead > -pitch:
                    wanted.add((i, j))
                    if distance < cfg.people_radius:
                        wanted_people.add((i, j))
        for key in sorted(set(self._blocks) - wanted):
            self._remove(self._blocks.pop(key))
        for key in sorted(wanted - set(self._blocks)):
            self._blocks[key] = self._build_block(*key)
        for key in sorted(set(self._people) - wanted_people):
            self._remove(self._people.pop(key))
        for key in sorted(wanted_people - set(self._people)):
            self._people[key] = self._build_block_people(*key)

        active: set[int] = set()
        for index, (_, _, s_a, s_b) in enumerate(self.route.segments):
            if s_a - 15.0 <= s <= s_b + 15.0:
                active.add(index)
        for index in sorted(set(self._segment_groups) - active):
            self._remove(self._segment_groups.pop(index))
        for index in sorted(active - set(self._segment_groups)):
            self._segment_groups[index] = self._segment_traffic(index)

    def _move_actors(self, t: float) -> None:
        groups = [self._global, *self._blocks.values(), *self._people.values(), *self._segment_groups.values()]
        for group in groups:
            for actor in group.actors:
                position, yaw = actor.pose_at(t)
                orientation = pb.multiplyTransforms([0, 0, 0], _yaw_quaternion(yaw), [0, 0, 0],
                                                    actor.base_orientation)[1]
                pb.resetBasePositionAndOrientation(actor.body, position, orientation, physicsClientId=self._client)
                if actor.animate is not None:
                    actor.animate(actor.body, t)

    # ----------------------------------------------------------------- rendering

    def camera_pose(self, frame: int) -> tuple[np.ndarray, float]:
        """Camera position (x, y, z) and heading at ``frame``."""
        t = frame / self.config.fps
        s = self._start_s + self.speed * t
        x, y, heading = self.route.pose(s)
        sway = 0.12 * math.sin(0.7 * t + self._sway_phase)
        x += -math.sin(heading) * sway
        y += math.cos(heading) * sway
        return np.array([x, y, self.camera_height + 0.02 * math.sin(3.1 * t)]), heading

    def bodies_per_class(self) -> dict[int, int]:
        """How many bodies of each train id the blocks built so far hold (`render` builds them)."""
        return dict(Counter(self._class_of_body.values()))

    def render(self, frame: int) -> Frame:
        """Render frame ``frame`` (frames must be rendered in increasing order for streaming to be cheap)."""
        cfg = self.config
        t = frame / cfg.fps
        eye, heading = self.camera_pose(frame)
        self._update_world(float(eye[0]), float(eye[1]), heading, self._start_s + self.speed * t)
        self._move_actors(t)
        pitch = self.camera_pitch + 0.01 * math.sin(2.3 * t + 1.0)
        look = np.array([math.cos(heading) * math.cos(pitch), math.sin(heading) * math.cos(pitch), math.sin(pitch)])
        view = pb.computeViewMatrix(eye.tolist(), (eye + look * 10.0).tolist(), [0, 0, 1],
                                    physicsClientId=self._client)
        _, _, rgba, _, seg = pb.getCameraImage(cfg.width, cfg.height, view, self._projection,
                                               renderer=pb.ER_TINY_RENDERER, physicsClientId=self._client,
                                               **self.light)
        rgb = np.asarray(rgba, np.uint8).reshape(cfg.height, cfg.width, 4)[:, :, :3].copy()  # (H, W, 3)
        body_ids = np.asarray(seg, np.int32).reshape(cfg.height, cfg.width)  # (H, W), -1 = nothing
        labels = self._labels_from_ids(body_ids)
        sky = labels == TrainId.SKY
        if cfg.flat_class_colors:
            rgb[sky] = CLASS_COLORS[TrainId.SKY]
        else:
            pano = self._sky
            column0 = int(round(-heading / (2 * math.pi) * pano.shape[1]))
            columns = (column0 + np.arange(cfg.width)) % pano.shape[1]
            rgb[sky] = pano[:, columns][sky]
        stamp = cfg.start_stamp_ns + int(round(frame * 1e9 / cfg.fps))
        return Frame(rgb, labels, stamp)

    def _labels_from_ids(self, body_ids: np.ndarray) -> np.ndarray:
        """Map the renderer's object ids to train ids; no object means sky."""
        size = max(self._class_of_body, default=0) + 2
        table = np.full(size, IGNORE_ID, np.uint8)
        for body, train_id in self._class_of_body.items():
            table[body + 1] = train_id
        table[0] = TrainId.SKY  # id -1
        ids = (body_ids & 0xFFFFFF) + 1
        ids[body_ids < 0] = 0
        return table[np.clip(ids, 0, size - 1)]

    def close(self) -> None:
        """Free the pybullet client and the temporary textures."""
        if getattr(self, "_client", None) is not None and self._client >= 0:
            try:
                pb.disconnect(physicsClientId=self._client)
            except pb.error:
                pass
            self._client = -1
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> StreetScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def generate_sequence(seed: int, frames: int, width: int = 512, height: int = 256, *,
                      config: StreetConfig | None = None) -> Iterator[Frame]:
    """Render a street sequence.

    Args:
        seed: non-negative integer; the same seed gives byte-identical frames and labels.
        frames: number of frames.
        width: image width in pixels (overrides ``config.width``).
        height: image height in pixels (overrides ``config.height``).
        config: other scene settings.

    Yields:
        ``Frame(rgb, labels, stamp_ns)``: (H, W, 3) uint8 RGB, (H, W) uint8 train ids and the
        stamp in nanoseconds (``config.fps`` apart).
    """
    config = replace(config or StreetConfig(), width=width, height=height)
    scene = StreetScene(seed, frames, config)
    try:
        for index in range(frames):
            yield scene.render(index)
    finally:
        scene.close()
