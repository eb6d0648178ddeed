"""The PyBullet scene: a Franka Panda on a table, a whiteboard, number cards, toys and cameras.

One :class:`TabletopScene` owns one headless PyBullet client. The robot, table, whiteboard and
answer pad are built once; cards and toys are (re)spawned for each episode by :meth:`populate`.

Physics: 240 Hz simulation, the arm is position-controlled from inverse kinematics on the
``panda_grasptarget`` link (gripper pointing down). A grasp that does not slip: when the gripper
closes within reach of an object, a fixed constraint ties the object to the hand until it opens.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pybullet as p
import pybullet_data
from PIL import Image

from .catalog import ANSWER_PAD, OBJECTS, ObjectSpec
from .writing import BOARD_TEXTURE_SIZE, render_card

SIM_HZ = 240
CONTROL_HZ = 10
SUBSTEPS = SIM_HZ // CONTROL_HZ

CARD_SIZE = (0.065, 0.065, 0.012)  # x, y, z (metres)
BOARD_SIZE = (0.02, 0.44, 0.22)  # thickness, width, height
BOARD_CENTER = (0.86, 0.0, 0.16)
PAD_SIZE = (0.10, 0.10, 0.004)
EE_LINK = 11  # panda_grasptarget
FINGER_JOINTS = (9, 10)
ARM_JOINTS = tuple(range(7))
REST_POSE = (0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.785)
GRIPPER_DOWN = p.getQuaternionFromEuler((np.pi, 0.0, 0.0))
#: End-effector workspace (x, y, z) bounds in metres; commanded targets are clipped to it.
WORKSPACE_LOW = np.array([0.30, -0.32, 0.015])
WORKSPACE_HIGH = np.array([0.80, 0.32, 0.40])
HOME_EE = np.array([0.30, 0.0, 0.36])
GRASP_REACH = 0.03  # the hand grabs an object whose bounding box is this close to the grasp point


@dataclass(frozen=True)
class Camera:
    """A fixed pinhole camera. ``width``/``height`` in pixels, ``fov`` vertical, degrees."""

    name: str
    width: int
    height: int
    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    up: tuple[float, float, float]
    fov: float

    def matrices(self):
        view = p.computeViewMatrix(self.eye, self.target, self.up)
        proj = p.computeProjectionMatrixFOV(self.fov, self.width / self.height, 0.05, 3.0)
        return view, proj

    def project(self, points) -> np.ndarray:
        """Pixel coordinates (N, 2) = (row, col), floats, of world points (N, 3) in metres (pinhole model
        of :meth:`matrices`; row 0 is the image's top edge, col 0 its left edge)."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        if pts.shape[-1] != 3:
            raise ValueError(f"points must be (N, 3) world coordinates, got shape {pts.shape}")
        view, proj = (np.asarray(m, dtype=np.float64).reshape(4, 4).T for m in self.matrices())  # column-major
        clip = (proj @ view @ np.c_[pts, np.ones(len(pts))].T).T  # (N, 4)
        ndc = clip[:, :2] / clip[:, 3:4]  # x right, y up, in [-1, 1]
        return np.stack([(1 - ndc[:, 1]) / 2 * self.height, (ndc[:, 0] + 1) / 2 * self.width], -1)


#: The model's cameras. Resolutions are multiples of 16 (Qwen2-VL: 8-px patches, 2x2 merge), and
#: chosen so digits on the board and on the cards are ~24-26 px tall, i.e. about three patches.
#: ``board`` reads the whiteboard; ``table`` looks straight down on the table (image up = +x,
#: image left = +y = the robot's left).
CAMERAS: dict[str, Camera] = {
    "board": Camera("board", 192, 96, eye=(0.40, 0.0, 0.30), target=(0.86, 0.0, 0.165),
                    up=(0.0, 0.0, 1.0), fov=29.0),
    "table": Camera("table", 256, 176, eye=(0.55, 0.0, 0.75), target=(0.55, 0.0, 0.0),
                    up=(1.0, 0.0, 0.0), fov=27.0),
}
#: A wide view for people (``render()``, videos); never given to the model.
OVERVIEW = Camera("overview", 320, 240, eye=(-0.35, -0.75, 0.75), target=(0.55, 0.0, 0.05),
                  up=(0.0, 0.0, 1.0), fov=45.0)


def _textured_box_obj(path: str, half: tuple[float, float, float], face: str) -> None:
    """Write an OBJ box whose ``face`` carries the whole texture, upright as seen from outside.

    ``face`` is ``"+z"`` (seen from above: image up = +x, image left = +y) or ``"-x"`` (seen from
    -x: image up = +z, image left = +y). Other faces sample the texture's corner (its border).
    """
    hx, hy, hz = half
    # each face: outward normal, then corners bottom-left, bottom-right, top-right, top-left
    # as seen by a viewer outside the box
    faces = {
        "+z": ((0, 0, 1), [(-hx, hy, hz), (-hx, -hy, hz), (hx, -hy, hz), (hx, hy, hz)]),
        "-z": ((0, 0, -1), [(hx, hy, -hz), (hx, -hy, -hz), (-hx, -hy, -hz), (-hx, hy, -hz)]),
        "-x": ((-1, 0, 0), [(-hx, hy, -hz), (-hx, -hy, -hz), (-hx, -hy, hz), (-hx, hy, hz)]),
        "+x": ((1, 0, 0), [(hx, -hy, -hz), (hx, hy, -hz), (hx, hy, hz), (hx, -hy, hz)]),
        "+y": ((0, 1, 0), [(hx, hy, -hz), (-hx, hy, -hz), (-hx, hy, hz), (hx, hy, hz)]),
        "-y": ((0, -1, 0), [(-hx, -hy, -hz), (hx, -hy, -hz), (hx, -hy, hz), (-hx, -hy, hz)]),
    }
    lines = ["vt 0 0", "vt 1 0", "vt 1 1", "vt 0 1", "vt 0.01 0.99"]
    n = 0
    for name, (normal, quad) in faces.items():
        q = np.array(quad, dtype=float)
        assert np.dot(np.cross(q[1] - q[0], q[2] - q[0]), normal) > 0, name  # counter-clockwise
        lines += [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in quad]
        uv = [1, 2, 3, 4] if name == face else [5, 5, 5, 5]
        lines.append("f " + " ".join(f"{n + i + 1}/{t}" for i, t in enumerate(uv)))
        n += 4
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class TabletopScene:
    """A headless PyBullet world with the Panda, table, whiteboard, answer pad, cards and toys.

    Example:
        >>> scene = TabletopScene()
        >>> scene.set_whiteboard(render_text("3+4=?", "sans"))
        >>> scene.populate(cards={7: (0.43, 0.15)}, toys={})
        >>> images = scene.render(["board", "table"])  # {"board": (96, 192, 3) uint8, ...}
    """

    _MAX_TEXTURES = 200

    def __init__(self):
        self.client = None
        self._tmp = tempfile.TemporaryDirectory(prefix="workbench_scene_")
        self._connect()

    def _connect(self):
        """(Re)build the world in a fresh PyBullet client."""
        if self.client is not None and p.isConnected(self.client):
            p.disconnect(self.client)
        self.client = c = p.connect(p.DIRECT)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)
        p.setTimeStep(1.0 / SIM_HZ, physicsClientId=c)
        self._textures_loaded = 0
        self._build_static()
        self.cards: dict[int, int] = {}  # digit -> body id
        self.toys: dict[str, int] = {}  # name -> body id
        self.grasped: int | None = None
        self._grasp_constraint: int | None = None
        self.whiteboard_image = Image.new("RGB", BOARD_TEXTURE_SIZE, (246, 246, 242))
        self.reset_robot()

    # ---------------------------------------------------------------- construction
    def _build_static(self):
        c = self.client
        table_half = (0.55, 0.6, 0.02)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=table_half, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=table_half, rgbaColor=(0.72, 0.56, 0.4, 1),
                                  physicsClientId=c)
        self.table = p.createMultiBody(0, col, vis, (0.45, 0.0, -table_half[2]), physicsClientId=c)
        self.robot = p.loadURDF("franka_panda/panda.urdf", (0, 0, 0), useFixedBase=True,
                                flags=p.URDF_USE_SELF_COLLISION_EXCLUDE_PARENT, physicsClientId=c)
        # whiteboard: a box standing on the table, texture on its -x face (facing the robot)
        half = tuple(s / 2 for s in BOARD_SIZE)
        obj = os.path.join(self._tmp.name, "board.obj")
        _textured_box_obj(obj, half, "-x")
        vis = p.createVisualShape(p.GEOM_MESH, fileName=obj, physicsClientId=c)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=c)
        self.board = p.createMultiBody(0, col, vis, BOARD_CENTER, physicsClientId=c)
        # stand under the board
        leg_half = (0.01, 0.01, (BOARD_CENTER[2] - half[2]) / 2)
        for y in (-0.15, 0.15):
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=leg_half, rgbaColor=(0.3, 0.3, 0.3, 1),
                                      physicsClientId=c)
            p.createMultiBody(0, -1, vis, (BOARD_CENTER[0], y, leg_half[2]), physicsClientId=c)
        p.changeVisualShape(self.board, -1, rgbaColor=(0.96, 0.96, 0.95, 1), physicsClientId=c)
        # answer pad: a thin green square on the table
        pad_half = tuple(s / 2 for s in PAD_SIZE)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=pad_half, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=pad_half, rgbaColor=(0.2, 0.75, 0.3, 1),
                                  physicsClientId=c)
        self.pad = p.createMultiBody(0, col, vis, (*ANSWER_PAD, pad_half[2]), physicsClientId=c)
        # card textures and mesh, made once
        self._card_obj = os.path.join(self._tmp.name, "card.obj")
        _textured_box_obj(self._card_obj, tuple(s / 2 for s in CARD_SIZE), "+z")
        self._card_tex = {}
        for d in range(10):
            path = os.path.join(self._tmp.name, f"card{d}.png")
            if not os.path.exists(path):
                render_card(d).save(path)
            self._card_tex[d] = p.loadTexture(path, physicsClientId=c)

    def set_whiteboard(self, image: Image.Image) -> None:
        """Show ``image`` (any RGB PIL image) on the whiteboard, resized to the board's texture.

        TinyRenderer ignores ``p.changeTexture``, so each new board image is a new texture; as
        PyBullet never frees textures, the client is rebuilt every ``_MAX_TEXTURES`` boards (this
        clears cards and toys: call :meth:`populate` afterwards, as ``reset`` does).
        """
        img = image.convert("RGB").resize(BOARD_TEXTURE_SIZE, Image.Resampling.LANCZOS)
        if self._textures_loaded >= self._MAX_TEXTURES:
            self._connect()
        path = os.path.join(self._tmp.name, f"board_{self._textures_loaded}.png")
        img.save(path)
        tex = p.loadTexture(path, physicsClientId=self.client)
        os.remove(path)
        self._textures_loaded += 1
        p.changeVisualShape(self.board, -1, textureUniqueId=tex, rgbaColor=(1, 1, 1, 1),
                            physicsClientId=self.client)
        self.whiteboard_image = img

    def _spawn(self, spec: ObjectSpec, xy, yaw: float) -> int:
        c = self.client
        orn = p.getQuaternionFromEuler((spec.euler[0], spec.euler[1], spec.euler[2] + yaw))
        if spec.kind == "urdf":
            body = p.loadURDF(spec.asset, (xy[0], xy[1], 0.1), orn, globalScaling=spec.scale,
                              physicsClientId=c)
        elif spec.kind == "mesh":
            path = os.path.join(pybullet_data.getDataPath(), spec.asset)
            scale = [spec.scale] * 3
            col = p.createCollisionShape(p.GEOM_MESH, fileName=path, meshScale=scale, physicsClientId=c)
            vis = p.createVisualShape(p.GEOM_MESH, fileName=path, meshScale=scale, physicsClientId=c)
            body = p.createMultiBody(spec.mass, col, vis, (xy[0], xy[1], 0.1), orn, physicsClientId=c)
        else:
            if spec.kind == "box":
                geom, col_kw, vis_kw = p.GEOM_BOX, {"halfExtents": spec.size}, {"halfExtents": spec.size}
            elif spec.kind == "sphere":
                geom, col_kw = p.GEOM_SPHERE, {"radius": spec.size[0]}
                vis_kw = col_kw
            else:  # cylinder: collision takes "height", visual takes "length"
                geom, col_kw = p.GEOM_CYLINDER, {"radius": spec.size[0], "height": spec.size[1]}
                vis_kw = {"radius": spec.size[0], "length": spec.size[1]}
            col = p.createCollisionShape(geom, physicsClientId=c, **col_kw)
            vis = p.createVisualShape(geom, rgbaColor=spec.rgba, physicsClientId=c, **vis_kw)
            body = p.createMultiBody(spec.mass, col, vis, (xy[0], xy[1], 0.1), orn, physicsClientId=c)
        if spec.rgba is not None and spec.kind in ("urdf", "mesh"):
            p.changeVisualShape(body, -1, rgbaColor=spec.rgba, physicsClientId=c)
        # centre its bounding box on (x, y) and rest its lowest point on the table (z = 0)
        lo, hi = p.getAABB(body, physicsClientId=c)
        pos, orn = p.getBasePositionAndOrientation(body, physicsClientId=c)
        shift = (xy[0] - (lo[0] + hi[0]) / 2, xy[1] - (lo[1] + hi[1]) / 2, -lo[2] + 0.001)
        p.resetBasePositionAndOrientation(body, tuple(a + b for a, b in zip(pos, shift)), orn,
                                          physicsClientId=c)
        # rolling/spinning friction keep balls and cans from rolling away when nudged
        p.changeDynamics(body, -1, lateralFriction=0.9, rollingFriction=0.002, spinningFriction=0.002,
                         physicsClientId=c)
        return body

    def populate(self, cards: dict[int, tuple[float, float]], toys: dict[str, tuple[float, float, float]]):
        """Remove last episode's cards and toys, then place ``cards`` (digit -> (x, y)) and ``toys``
        (name -> (x, y, yaw)). Objects settle for a few physics steps."""
        c = self.client
        self.release()
        for body in [*self.cards.values(), *self.toys.values()]:
            p.removeBody(body, physicsClientId=c)
        self.cards, self.toys = {}, {}
        half = tuple(s / 2 for s in CARD_SIZE)
        for digit, (x, y) in cards.items():
            vis = p.createVisualShape(p.GEOM_MESH, fileName=self._card_obj, physicsClientId=c)
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=c)
            body = p.createMultiBody(0.05, col, vis, (x, y, half[2] + 0.001), physicsClientId=c)
            p.changeVisualShape(body, -1, textureUniqueId=self._card_tex[digit], physicsClientId=c)
            p.changeDynamics(body, -1, lateralFriction=0.9, physicsClientId=c)
            self.cards[digit] = body
        for name, (x, y, yaw) in toys.items():
            self.toys[name] = self._spawn(OBJECTS[name], (x, y), yaw)
        for _ in range(SUBSTEPS):
            p.stepSimulation(physicsClientId=c)

    # ---------------------------------------------------------------- robot
    def reset_robot(self, ee: np.ndarray = HOME_EE):
        c = self.client
        for j, q in zip(ARM_JOINTS, REST_POSE):
            p.resetJointState(self.robot, j, q, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.resetJointState(self.robot, j, 0.04, physicsClientId=c)
        self.ee_target = np.asarray(ee, dtype=float).copy()
        self.gripper_closed = False
        q = self._ik(self.ee_target)
        for j, qj in zip(ARM_JOINTS, q):
            p.resetJointState(self.robot, j, qj, physicsClientId=c)
        self._command()

    def _ik(self, target) -> list[float]:
        lower = [-2.9, -1.8, -2.9, -3.0, -2.9, 0.0, -2.9]
        upper = [2.9, 1.8, 2.9, -0.1, 2.9, 3.7, 2.9]
        q = p.calculateInverseKinematics(
            self.robot, EE_LINK, target.tolist(), GRIPPER_DOWN, lowerLimits=lower, upperLimits=upper,
            jointRanges=[u - lo for u, lo in zip(upper, lower)], restPoses=list(REST_POSE),
            maxNumIterations=60, residualThreshold=1e-4, physicsClientId=self.client)
        return list(q[:7])

    def _command(self):
        c = self.client
        q = self._ik(self.ee_target)
        p.setJointMotorControlArray(self.robot, ARM_JOINTS, p.POSITION_CONTROL, targetPositions=q,
                                    forces=[250.0] * 7, positionGains=[0.05] * 7, physicsClientId=c)
        width = 0.0 if self.gripper_closed else 0.04
        p.setJointMotorControlArray(self.robot, FINGER_JOINTS, p.POSITION_CONTROL,
                                    targetPositions=[width, width], forces=[20.0, 20.0], physicsClientId=c)

    def step(self, ee_target: np.ndarray, gripper_closed: bool) -> None:
        """Advance one control period (1/CONTROL_HZ s) towards ``ee_target`` with the gripper state."""
        self.ee_target = np.clip(np.asarray(ee_target, dtype=float), WORKSPACE_LOW, WORKSPACE_HIGH)
        if gripper_closed and not self.gripper_closed:
            self.gripper_closed = True
            self._try_grasp()
        elif not gripper_closed and self.gripper_closed:
            self.gripper_closed = False
            self.release()
        self._command()
        for _ in range(SUBSTEPS):
            p.stepSimulation(physicsClientId=self.client)

    def ee_position(self) -> np.ndarray:
        return np.array(p.getLinkState(self.robot, EE_LINK, physicsClientId=self.client)[4])

    def gripper_width(self) -> float:
        return float(sum(p.getJointState(self.robot, j, physicsClientId=self.client)[0]
                         for j in FINGER_JOINTS))

    def _try_grasp(self):
        """Attach the object nearest to the grasp point, if its bounding box is within reach."""
        ee = self.ee_position()
        best, best_d = None, GRASP_REACH
        for body in [*self.cards.values(), *self.toys.values()]:
            lo, hi = self.body_aabb(body)
            d = float(np.linalg.norm(np.maximum(np.maximum(lo - ee, 0.0), ee - hi)))
            if d < best_d:
                best, best_d = body, d
        if best is None:
            return
        hand = p.getLinkState(self.robot, EE_LINK, physicsClientId=self.client)
        obj_pos, obj_orn = p.getBasePositionAndOrientation(best, physicsClientId=self.client)
        inv_pos, inv_orn = p.invertTransform(hand[4], hand[5])
        rel_pos, rel_orn = p.multiplyTransforms(inv_pos, inv_orn, obj_pos, obj_orn)
        self._grasp_constraint = p.createConstraint(
            self.robot, EE_LINK, best, -1, p.JOINT_FIXED, (0, 0, 0), rel_pos, (0, 0, 0), rel_orn,
            physicsClientId=self.client)
        p.changeConstraint(self._grasp_constraint, maxForce=200, physicsClientId=self.client)
        self.grasped = best

    def release(self):
        if self._grasp_constraint is not None:
            p.removeConstraint(self._grasp_constraint, physicsClientId=self.client)
        self._grasp_constraint, self.grasped = None, None

    # ---------------------------------------------------------------- queries
    def body_position(self, body: int) -> np.ndarray:
        return np.array(p.getBasePositionAndOrientation(body, physicsClientId=self.client)[0])

    def body_center(self, body: int) -> np.ndarray:
        """Centre of the body's bounding box (mesh origins can be far from the geometry)."""
        lo, hi = self.body_aabb(body)
        return (lo + hi) / 2

    def body_aabb(self, body: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = p.getAABB(body, physicsClientId=self.client)
        return np.array(lo), np.array(hi)

    def render(self, names, cameras: dict[str, Camera] | None = None) -> dict[str, np.ndarray]:
        """Render cameras by name: ``{name: (H, W, 3) uint8}`` (ER_TINY_RENDERER, no GPU)."""
        cams = {**CAMERAS, OVERVIEW.name: OVERVIEW, **(cameras or {})}
        out = {}
        for name in names:
            cam = cams[name]
            view, proj = cam.matrices()
            _, _, rgba, _, _ = p.getCameraImage(
                cam.width, cam.height, view, proj, renderer=p.ER_TINY_RENDERER, shadow=0,
                lightDirection=(-1.0, -0.4, 1.2), lightAmbientCoeff=0.65, lightDiffuseCoeff=0.4,
                lightSpecularCoeff=0.0, flags=p.ER_NO_SEGMENTATION_MASK,
                physicsClientId=self.client)
            out[name] = np.asarray(rgba, dtype=np.uint8).reshape(cam.height, cam.width, 4)[:, :, :3].copy()
        return out

    def close(self):
        if self.client is not None and p.isConnected(self.client):
            p.disconnect(self.client)
        self.client = None
        self._tmp.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
