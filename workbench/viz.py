"""Pictures of episodes: composed video frames (GIF) and a plotly end-effector trajectory."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .world.expert import Episode


@functools.cache
def _caption_font(size: int = 13):
    import os

    import matplotlib

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)


def compose_frame(overview: np.ndarray | None, cameras: dict[str, np.ndarray], caption: str = "") -> Image.Image:
    """One video frame: the overview on the left, the model's cameras stacked on the right, and a
    caption (instruction / reasoning) underneath. All inputs are (H, W, 3) uint8."""
    right = [Image.fromarray(v) for v in cameras.values()]
    col_w = max([r.width for r in right], default=0)
    col_h = sum(r.height for r in right)
    left = Image.fromarray(overview) if overview is not None else None
    h = max(col_h, left.height if left else 0)
    w = (left.width if left else 0) + col_w
    cap_h = 36 if caption else 0
    canvas = Image.new("RGB", (w, h + cap_h), (255, 255, 255))
    x = 0
    if left:
        canvas.paste(left, (0, 0))
        x = left.width
    y = 0
    for r in right:
        canvas.paste(r, (x, y))
        y += r.height
    if caption:
        draw = ImageDraw.Draw(canvas)
        font = _caption_font()
        words, lines, line = caption.split(), [], ""
        for word in words:
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) > w - 8 and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        for k, text in enumerate(lines[:2]):
            draw.text((4, h + 2 + 16 * k), text, fill=(20, 20, 20), font=font)
    return canvas


def episode_frames(episode: Episode, step_text: list[str] | None = None) -> list[Image.Image]:
    """Composed frames of an episode recorded with ``record_overview=True`` (one per step)."""
    n = len(episode)
    if episode.overview is None:
        raise ValueError("this episode has no overview frames; record it with rollout(..., record_overview=True)")
    gt = episode.ground_truth
    frames = []
    for t in range(n):
        cams = {c: v[t] for c, v in episode.frames.items()}
        text = gt["instruction"] + (f"  |  {step_text[t]}" if step_text else f"  |  {episode.phases[t]}")
        frames.append(compose_frame(episode.overview[t], cams, text))
    return frames


def save_gif(frames: list[Image.Image], path: str, fps: int = 10) -> str:
    """Write frames as an animated GIF (loops forever); returns ``path``."""
    import imageio.v3 as iio

    iio.imwrite(path, [np.asarray(f) for f in frames], duration=1000 / fps, loop=0)
    return path


def trajectory_figure(episode: Episode, title: str | None = None):
    """A 3-D plotly figure of the end-effector path, coloured by phase, with grasp/release marked."""
    import plotly.graph_objects as go

    s = episode.states
    fig = go.Figure()
    phases = episode.phases
    for ph in dict.fromkeys(phases):
        idx = [i for i, p in enumerate(phases) if p == ph]
        fig.add_trace(go.Scatter3d(x=s[idx, 0], y=s[idx, 1], z=s[idx, 2], mode="markers+lines",
                                   name=ph, marker={"size": 3}))
    fig.update_layout(
        title=title or repr(episode), height=420, margin={"l": 0, "r": 0, "t": 40, "b": 0},
        scene={"xaxis_title": "x (m, forward)", "yaxis_title": "y (m, left)", "zaxis_title": "z (m)",
               "aspectmode": "data"})
    return fig
