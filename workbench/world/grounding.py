"""Grounding on the table camera: Qwen2-VL's box format and the boxes of the world's things.

Boxes are ``(x1, y1, x2, y2)`` corners in 0-1000 of the table camera's image (x right, y down), written as
``<|object_ref_start|>the teddy bear<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``. They come from
the simulator's ground truth projected into the camera (:func:`table_box`), and :func:`table_point` maps an image
point back onto the table. Used by the VLM corpus (grounding questions), the robot's reasoning annotations
(:mod:`workbench.world.language`) and the evaluation (scoring boxes a model wrote).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .catalog import ANSWER_PAD, DIRECTIONS, OBJECTS

#: half-size (metres) of a placement box around the spot a toy should go to
AFFORDANCE_HALF = 0.035


def format_box(box) -> str:
    """Qwen2-VL's box text for ``(x1, y1, x2, y2)`` in 0-1000 image coordinates."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def grounded(phrase: str, box) -> str:
    """``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``."""
    return f"<|object_ref_start|>{phrase}<|object_ref_end|>{format_box(box)}"


_BOX = re.compile(r"<\|box_start\|>\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*,"
                  r"\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*<\|box_end\|>")


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in ``text``, in order."""
    return [tuple(int(v) for v in m) for m in _BOX.findall(text or "")]


def strip_boxes(text: str) -> str:
    """``text`` without its box coordinates."""
    return _BOX.sub("", text or "")


def table_box(points) -> tuple[float, float, float, float]:
    """The 0-1000 box ``(x1, y1, x2, y2)`` in the table camera's image around world points (N, 3)."""
    from .scene import CAMERAS

    cam = CAMERAS["table"]
    rc = cam.project(np.asarray(points, float))
    v0, u0 = rc.min(0)
    v1, u1 = rc.max(0)
    sx, sy = 1000 / cam.width, 1000 / cam.height
    return (float(np.clip(u0 * sx, 0, 1000)), float(np.clip(v0 * sy, 0, 1000)),
            float(np.clip(u1 * sx, 0, 1000)), float(np.clip(v1 * sy, 0, 1000)))


def table_point(u: float, v: float, z: float = 0.0) -> np.ndarray:
    """The table point (x, y) in metres seen at 0-1000 image coordinates ``(u, v)`` of the table camera
    (the camera looks straight down, so the map is affine; fitted once per height)."""
    return _table_affine(round(z, 3)) @ np.array([u, v, 1.0])


@functools.cache
def _table_affine(z: float) -> np.ndarray:
    xs, ys = np.meshgrid(np.linspace(0.3, 0.8, 4), np.linspace(-0.3, 0.3, 4))
    world = np.c_[xs.ravel(), ys.ravel(), np.full(xs.size, z)]
    box_uv = np.array([table_box(w[None]) for w in world])[:, :2]
    A, *_ = np.linalg.lstsq(np.c_[box_uv, np.ones(len(box_uv))], world[:, :2], rcond=None)
    return A.T  # (2, 3)


def card_box(xy) -> tuple[float, ...]:
    from .scene import CARD_SIZE

    hx, hy, hz = (v / 2 for v in CARD_SIZE)
    return table_box([[xy[0] + sx * hx, xy[1] + sy * hy, z] for sx in (-1, 1) for sy in (-1, 1) for z in (0, 2 * hz)])


def toy_box(name: str, pose) -> tuple[float, ...]:
    """The 0-1000 box of toy ``name`` at ``pose`` = (x, y, yaw): its bounding box as the scene spawns it
    (centred on (x, y), resting on the table)."""
    lo, hi = toy_extents(name, pose[2])
    return table_box([[pose[0] + x, pose[1] + y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                      for z in (0.0, hi[2])])


@functools.lru_cache(maxsize=4096)
def _toy_extents(name: str, yaw_key: int):
    from .scene import TabletopScene

    scene = _extent_scene()
    body = scene._spawn(OBJECTS[name], (0.5, 0.0), yaw_key / 100)
    lo, hi = scene.body_aabb(body)
    import pybullet as pb

    pb.removeBody(body, physicsClientId=scene.client)
    del TabletopScene
    return (lo[0] - 0.5, lo[1], 0.0), (hi[0] - 0.5, hi[1], hi[2])


@functools.cache
def _extent_scene():
    from .scene import TabletopScene

    return TabletopScene()


def toy_extents(name: str, yaw: float):
    """((x0, y0, 0), (x1, y1, height)) of toy ``name`` spawned with ``yaw`` at the origin (centred)."""
    return _toy_extents(name, int(round(yaw * 100)))


def affordance_point(target_xy, direction: str) -> np.ndarray:
    """Where a toy goes to be ``direction`` of a target at ``target_xy`` (the expert's goal)."""
    from .env import PLACE_OFFSET

    return np.asarray(target_xy[:2], float) + PLACE_OFFSET * np.array(DIRECTIONS[direction])


def placement_reachable(target_xy, direction: str, margin: float = 0.04) -> bool:
    """Whether the spot ``direction`` of a target at ``target_xy`` lies on the toy area (within ``margin`` metres)."""
    from .env import TOY_REGION

    goal = affordance_point(target_xy, direction)
    (x0, x1), (y0, y1) = TOY_REGION
    return bool(x0 - margin <= goal[0] <= x1 + margin and y0 - margin <= goal[1] <= y1 + margin)


def affordance_ok(point_xy, target_xy, direction: str) -> bool:
    """Whether a toy resting at ``point_xy`` is ``direction`` of the target (the env's success rule)."""
    from .env import PLACE_ACROSS, PLACE_ALONG

    d = np.array(DIRECTIONS[direction])
    off = np.asarray(point_xy, float)[:2] - np.asarray(target_xy, float)[:2]
    along, across = float(off @ d), float(abs(off[0] * d[1] - off[1] * d[0]))
    return PLACE_ALONG[0] <= along <= PLACE_ALONG[1] and across <= PLACE_ACROSS


def pad_box() -> tuple[float, ...]:
    """The 0-1000 box of the green answer pad."""
    from .scene import PAD_SIZE

    hx, hy = PAD_SIZE[0] / 2, PAD_SIZE[1] / 2
    return table_box([[ANSWER_PAD[0] + sx * hx, ANSWER_PAD[1] + sy * hy, 0.0] for sx in (-1, 1) for sy in (-1, 1)])


def affordance_box(target_xy, direction: str) -> tuple[float, ...]:
    """The 0-1000 placement box: where a toy goes to be ``direction`` of a target at ``target_xy``."""
    goal, h = affordance_point(target_xy, direction), AFFORDANCE_HALF
    return table_box([[goal[0] + sx * h, goal[1] + sy * h, 0.0] for sx in (-1, 1) for sy in (-1, 1)])


def box_centre(box) -> tuple[float, float]:
    """(u, v) centre of a 0-1000 box."""
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2


def box_hit(box, truth) -> bool:
    """A predicted box finds an object when its centre lies inside the true box or IoU >= 0.5."""
    cx, cy = box_centre(box)
    if truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]:
        return True
    ix = max(0.0, min(box[2], truth[2]) - max(box[0], truth[0]))
    iy = max(0.0, min(box[3], truth[3]) - max(box[1], truth[1]))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - ix * iy
    return union > 0 and ix * iy / union >= 0.5


def placement_ok(box, target_xy, direction: str) -> bool:
    """Whether a toy put down at the centre of the 0-1000 placement ``box`` would be ``direction`` of a target at
    ``target_xy`` (the env's success rule, :func:`affordance_ok`)."""
    return affordance_ok(table_point(*box_centre(box)), target_xy, direction)
