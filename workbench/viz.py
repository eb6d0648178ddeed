"""Pictures of episodes: composed video frames (GIF) and a plotly end-effector trajectory."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .world.rollout import Episode


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


def sample_card(images: list[np.ndarray], question: str, answer: str, width: int = 460) -> Image.Image:
    """One corpus sample as a picture: its camera images side by side, then question and answer."""
    row_h = max([im.shape[0] for im in images], default=0)
    canvas = Image.new("RGB", (width, row_h + 40), "white")
    x = 0
    for im in images:
        canvas.paste(Image.fromarray(im), (x, 0))
        x += im.shape[1] + 4
    draw = ImageDraw.Draw(canvas)
    font = _caption_font(11)
    draw.text((2, row_h + 3), f"Q: {question}"[:80], fill=(30, 30, 120), font=font)
    draw.text((2, row_h + 20), f"A: {answer}"[:80], fill=(20, 100, 20), font=font)
    return canvas


def stack_images(images: list[Image.Image], columns: int = 2) -> Image.Image:
    """Tile PIL images in a grid, row by row."""
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (w * columns, h * rows), "white")
    for k, im in enumerate(images):
        canvas.paste(im, ((k % columns) * w, (k // columns) * h))
    return canvas


def token_overlay(image: np.ndarray, labels: np.ndarray, classes, scale: int = 3, token_px: int = 16) -> Image.Image:
    """The image enlarged ``scale`` times with the 16-px token grid and each token's class written in it
    (background left blank): what the vision tower is taught to see in the ``see`` phase."""
    big = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    font = _caption_font(10)
    step = token_px * scale
    for r in range(labels.shape[0]):
        for c in range(labels.shape[1]):
            box = [c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1]
            draw.rectangle(box, outline=(180, 180, 255))
            if labels[r, c]:
                name = classes[labels[r, c]]
                draw.text((box[0] + 2, box[1] + 2), name[:6], fill=(200, 0, 0), font=font)
    return big


def training_figure(*log_csvs: str):
    """plotly: loss per phase against steps (left) and held-out accuracy per row against wall-clock minutes
    since the run started (right; pauses of a resumed run included). Several logs (a saved VLM continued with
    ``init``) are drawn one after the other, the time between the invocations left out."""
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .vlm.pretrain import PHASES

    if not log_csvs:
        raise ValueError("training_figure needs at least one log.csv path")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "held-out accuracy during training"))
    offset, minutes, names = 0, 0.0, []
    evals = []
    for n, path in enumerate(log_csvs):
        log = pd.read_csv(path)
        suffix = f" (run {n + 1})" if len(log_csvs) > 1 else ""
        for phase in PHASES:
            part = log[log.phase == phase]
            if len(part):
                fig.add_trace(go.Scatter(x=part.step + offset, y=part.loss.rolling(10, min_periods=1).mean(),
                                         name=f"{phase} loss{suffix}"), 1, 1)
                offset += int(part.step.max())
                names.append(phase)
        ev = log[log.phase == "eval"].copy()
        ev["minutes"] = minutes + (ev.time - log.time.min()) / 60
        evals.append(ev)
        minutes += (log.time.max() - log.time.min()) / 60
    ev = pd.concat(evals)
    for metric in dict.fromkeys(ev.metric):
        part = ev[ev.metric == metric]
        fig.add_trace(go.Scatter(x=part.minutes, y=part.value, mode="lines+markers", name=metric,
                                 visible=True if len(metric.split()) == 1 else "legendonly"), 1, 2)
    fig.update_layout(height=400, margin={"t": 40, "b": 30})
    fig.update_xaxes(title_text="step (" + ", then ".join(names) + ")", row=1, col=1)
    fig.update_xaxes(title_text="wall-clock minutes since the start", row=1, col=2)
    return fig


def draw_boxes(image: np.ndarray, boxes, labels=(), scale: int = 2, colour=(230, 0, 0)) -> Image.Image:
    """The image enlarged ``scale`` times with boxes ``(x1, y1, x2, y2)`` in Qwen2-VL's 0-1000 coordinates
    drawn on it (and an optional label above each)."""
    h, w = image.shape[:2]
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    font = _caption_font(11)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        box = [x1 * w * scale / 1000, y1 * h * scale / 1000, x2 * w * scale / 1000, y2 * h * scale / 1000]
        draw.rectangle(box, outline=colour, width=2)
        if k < len(labels):
            draw.text((box[0], max(0, box[1] - 13)), labels[k], fill=colour, font=font)
    return big


def board_looks(split: str = "train", n: int = 12, seed: int = 0, condition: str | None = None,
                columns: int = 4) -> Image.Image:
    """A grid of whiteboards as the model is shown them (through the board camera, as the image itself, in a photo),
    drawn the way VLM pretraining draws them (``split="train"``: training font families and augmentations) or the
    knowledge suite's held-out ones (``condition``: one of its robustness rows)."""
    from .vlm.corpus import CorpusGenerator, CorpusRenderer

    gen = CorpusGenerator(split, seed=seed, condition=condition)
    renderer = CorpusRenderer()
    tiles = []
    for _ in range(n):
        s = gen.sample("ocr")
        (img,) = renderer(s)
        b = s.board
        size = (f", {b['width']} px" if "width" in b else "") + (f", {b['aspect']:.1f}:1" if "aspect" in b else "")
        caption = b.get("style") or f"{b['look']['family']} ({b['view']}{size})"
        tile = Image.new("RGB", (img.shape[1], img.shape[0] + 14), "white")
        tile.paste(Image.fromarray(img), (0, 0))
        ImageDraw.Draw(tile).text((2, img.shape[0]), caption[:40], fill=(60, 60, 60), font=_caption_font(10))
        tiles.append(tile)
    renderer.close()
    return stack_images(tiles, columns)


def knowledge_figure(result: dict, title: str = "Knowledge on held-out data"):
    """plotly bar chart of a knowledge-suite result
    (:func:`workbench.evaluation.knowledge.evaluate_knowledge`), with 95% Wilson intervals."""
    import plotly.graph_objects as go

    rows = result["rows"]
    ci = [r.get("ci") or (r["accuracy"], r["accuracy"]) for r in rows]
    fig = go.Figure(go.Bar(x=[100 * r["accuracy"] for r in rows], y=[f"{r['skill']} (N={r['n']})" for r in rows],
                           orientation="h", text=[f"{100 * r['accuracy']:.0f}%" for r in rows],
                           error_x={"type": "data", "symmetric": False,
                                    "array": [100 * (hi - r["accuracy"]) for r, (_, hi) in zip(rows, ci)],
                                    "arrayminus": [100 * (r["accuracy"] - lo) for r, (lo, _) in zip(rows, ci)]}))
    fig.update_layout(title=title, height=60 + 28 * len(rows), xaxis={"range": [0, 105], "title": "accuracy (%)"},
                      yaxis={"autorange": "reversed"}, margin={"l": 10, "r": 10, "t": 40, "b": 30})
    return fig


# ------------------------------------------------------------------------------------------------ widgets
# Controls for the notebooks (ipywidgets). Each shows its default at once, so a notebook run without a live
# kernel (nbval in CI) renders the default view; moving a control recomputes.
def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).save(buf, format="PNG")
    return buf.getvalue()


def episode_player(frames: list, captions: list[str] | None = None, width: int = 640):
    """ipywidgets: a play button and a slider over an episode's frames (PIL images or arrays), with a caption
    per frame (e.g. the step's reasoning)."""
    import ipywidgets as widgets

    if not frames:
        raise ValueError("episode_player needs at least one frame")
    view = widgets.Image(value=_png(frames[0]), format="png", layout={"width": f"{width}px"})
    caption = widgets.Label(captions[0] if captions else "")
    slider = widgets.IntSlider(0, 0, len(frames) - 1, description="step")
    play = widgets.Play(value=0, min=0, max=len(frames) - 1, interval=150)
    widgets.jslink((play, "value"), (slider, "value"))

    def show(change):
        view.value = _png(frames[change["new"]])
        if captions:
            caption.value = captions[min(change["new"], len(captions) - 1)]

    slider.observe(show, names="value")
    return widgets.VBox([widgets.HBox([play, slider]), view, caption])


def ask_panel(model, processor, scenes: dict[str, list], question: str = "What is written on the whiteboard?"):
    """ipywidgets: choose a scene (its camera images) and type any question; shows the images and the VLM's
    answer (``workbench.vlm.api.ask``). ``scenes``: name -> list of (H, W, 3) images, one per camera."""
    import ipywidgets as widgets

    from .vlm.api import ask

    def answer(scene, question):
        images = scenes[scene]
        strip = stack_images([Image.fromarray(np.asarray(im)) for im in images], columns=len(images))
        from IPython.display import display

        display(strip.resize((strip.width * 2, strip.height * 2)))
        try:
            print(f"Q: {question}\nA: {ask(model, processor, images, question)}")
        except ValueError as exc:
            print(f"(not asked: {exc})")

    return widgets.interactive(answer, scene=list(scenes),
                               question=widgets.Text(question, continuous_update=False, layout={"width": "600px"}))


def rollout_player(policy=None, tasks=("math_matching", "toy_placement"), splits=("in_domain", "open_world"),
                   seeds=range(3), max_steps: int = 80):
    """ipywidgets: choose a task, a split and a seed; the episode runs (cached) with ``policy`` (a ChatVLA-2
    policy) or, if None, the scripted expert, and a player steps through it, each frame captioned with what was
    happening (the expert's annotated step, or the policy's chunk and reasoning)."""
    import ipywidgets as widgets
    from IPython.display import display

    from .controllers import ExpertController, PolicyController
    from .world import make_env, steps

    cache: dict[tuple, tuple[list, list]] = {}

    def run(task, split, seed):
        key = (task, split, seed)
        if key not in cache:
            env = make_env(task, split, render_mode="rgb_array", max_steps=max_steps)
            obs, info = env.reset(seed=seed)
            controller = ExpertController() if policy is None else PolicyController(policy)
            reasoning = controller.start(env, obs, info, seed)
            frames, captions = [], []
            for step in steps(env, controller, obs):
                what = step.note if policy is None else \
                    f"chunk {step.t // policy.config.n_action_steps}: {reasoning}"
                # the scene after the step, with the cameras' view of it
                frames.append(compose_frame(env.render(), {c: step.next_obs[c] for c in env.cameras}))
                captions.append(f"step {step.t}, {what}")
                if step.done:
                    captions[-1] += f"  -> {'success' if step.success else 'failure'}"
            env.close()
            cache[key] = (frames, captions)
        display(episode_player(*cache[key]))

    return widgets.interactive(run, task=widgets.Dropdown(options=list(tasks)),
                               split=widgets.Dropdown(options=list(splits)),
                               seed=widgets.Dropdown(options=list(seeds)))
