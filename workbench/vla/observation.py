"""What a ChatVLA-2 policy is given at one control step: the two cameras and the robot state
(:class:`Observation`, shape-checked), and the instruction text (:func:`check_instruction`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..world.env import STATE_DIM
from ..world.scene import CAMERAS

#: the cameras a policy reads, in the order its prompt shows them
CAMERA_ORDER = ("board", "table")


@dataclass
class Observation:
    """What the policy sees at one control step (as the env returns it).

    Attributes:
        board: (96, 192, 3) uint8 — the whiteboard camera.
        table: (176, 256, 3) uint8 — the top-down table camera (image up = +x, left = +y).
        state: (4,) float32 — [ee_x, ee_y, ee_z] metres, gripper width metres.
    """

    board: np.ndarray
    table: np.ndarray
    state: np.ndarray

    def __post_init__(self):
        for name in CAMERA_ORDER:
            cam = CAMERAS[name]
            img = getattr(self, name)
            want = (cam.height, cam.width, 3)
            if not isinstance(img, np.ndarray) or img.shape != want or img.dtype != np.uint8:
                got = (f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}").strip()
                raise ValueError(f"Observation.{name} must be a {want} uint8 array (the {name} camera), got {got}")
        state = np.asarray(self.state, dtype=np.float32)
        if state.shape != (STATE_DIM,) or not np.isfinite(state).all():
            raise ValueError(f"Observation.state must be {STATE_DIM} finite floats [x, y, z, gripper], got "
                             f"{self.state!r}")
        self.state = state

    @classmethod
    def coerce(cls, obs) -> Observation:
        """An :class:`Observation` from itself or from the env's observation dict."""
        if isinstance(obs, cls):
            return obs
        if isinstance(obs, dict):
            missing = [k for k in (*CAMERA_ORDER, "state") if k not in obs]
            if missing:
                raise ValueError(f"observation dict lacks {missing}; expected keys {[*CAMERA_ORDER, 'state']} "
                                 "(make the env with both cameras)")
            return cls(obs["board"], obs["table"], obs["state"])
        raise TypeError(f"expected an Observation or the env's observation dict, got {type(obs).__name__}")

    @classmethod
    def fake(cls, seed: int = 0) -> Observation:
        """Random observation with the right shapes (tests, dry runs)."""
        rng = np.random.default_rng(seed)
        imgs = {n: rng.integers(0, 256, (CAMERAS[n].height, CAMERAS[n].width, 3), dtype=np.uint8)
                for n in CAMERA_ORDER}
        return cls(state=np.array([0.5, 0.0, 0.3, 0.08], np.float32), **imgs)


def check_instruction(instruction) -> str:
    """The instruction, validated (a clear error for a non-string, an empty or an over-long text)."""
    from ..world.language import check_text

    return check_text(instruction, "instruction", max_chars=500,
                      example="Pick the card that answers the equation on the whiteboard and place it on the green pad")
