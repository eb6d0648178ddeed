"""What the ``board`` camera sees for a given whiteboard image, without running PyBullet (~1 ms).

The whiteboard is a plane seen by a fixed camera, so its camera image is the board texture warped
by a homography onto a background render of the empty scene, times the board's lighting. This
reproduces ``TabletopScene.render(["board"])`` with the arm at home to a mean absolute difference of
about 8/255 (only stroke edges differ: TinyRenderer samples textures more crisply), at a fraction of
the cost — what the VLM's pretraining corpus needs to make tens of thousands of board views.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .scene import BOARD_CENTER, BOARD_SIZE, CAMERAS, TabletopScene
from .writing import BOARD_TEXTURE_SIZE, as_rgb_image


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` back to input points ``src``."""
    rows, rhs = [], []
    for (xs, ys), (xd, yd) in zip(src, dst):
        rows.append([xd, yd, 1, 0, 0, 0, -xs * xd, -xs * yd])
        rhs.append(xs)
        rows.append([0, 0, 0, xd, yd, 1, -ys * xd, -ys * yd])
        rhs.append(ys)
    return tuple(np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist())


class BoardView:
    """Callable: whiteboard image (PIL or array, any size) -> (96, 192, 3) uint8 board-camera image."""

    def __init__(self, scene: TabletopScene | None = None):
        own = scene is None
        scene = scene or TabletopScene()
        self.camera = CAMERAS["board"]
        scene.reset_robot()
        scene.set_whiteboard(Image.new("RGB", BOARD_TEXTURE_SIZE, (255, 255, 255)))
        self.background = scene.render(["board"])["board"].astype(np.float32)
        if own:
            scene.close()
        cx, cy, cz = BOARD_CENTER
        thickness, width, height = BOARD_SIZE
        x = cx - thickness / 2
        # texture corners: top-left is the robot's left (+y), top (+z)
        corners = np.array([[x, width / 2, cz + height / 2], [x, -width / 2, cz + height / 2],
                            [x, -width / 2, cz - height / 2], [x, width / 2, cz - height / 2]])
        tw, th = BOARD_TEXTURE_SIZE
        self._coeffs = _perspective_coeffs(np.array([[0, 0], [tw, 0], [tw, th], [0, th]], float),
                                           self.camera.project(corners)[:, ::-1])  # (row, col) -> (u, v)
        self._size = (self.camera.width, self.camera.height)
        mask = Image.new("L", BOARD_TEXTURE_SIZE, 255).transform(
            self._size, Image.Transform.PERSPECTIVE, self._coeffs, Image.Resampling.BILINEAR)
        self._mask = np.asarray(mask, np.float32)[..., None] / 255.0
        # lighting: a white texture renders as the background's board pixels
        self._gain = self.background / 255.0

    def texture_coords(self, uv: np.ndarray) -> np.ndarray:
        """Board-texture pixel coordinates (in :data:`BOARD_TEXTURE_SIZE`) of image points ``uv`` (N, 2)."""
        a, b, c, d, e, f, g, h = self._coeffs
        u, v = np.asarray(uv, float).T
        w = g * u + h * v + 1
        return np.c_[(a * u + b * v + c) / w, (d * u + e * v + f) / w]

    def __call__(self, whiteboard) -> np.ndarray:
        img = as_rgb_image(whiteboard, "whiteboard").resize(BOARD_TEXTURE_SIZE, Image.Resampling.LANCZOS)
        warped = np.asarray(img.transform(self._size, Image.Transform.PERSPECTIVE, self._coeffs,
                                          Image.Resampling.BILINEAR), np.float32)
        out = self.background * (1 - self._mask) + warped * self._gain * self._mask
        return out.round().clip(0, 255).astype(np.uint8)
