"""Live browser demo: draw a whiteboard (or pick a task), watch the robot reason and act, edit its reasoning.

    python demos/app.py                                  # http://127.0.0.1:7860
    python demos/app.py --policy data_samples/policy --port 7861 --concurrency 2
    python demos/app.py --screenshot demos/screenshot.png  # draw a board, run the policy in Chromium, save the page

Two controllers drive the robot and look the same to the UI (:mod:`workbench.controllers`): the ChatVLA-2 policy
(when ``--policy`` names a policy folder; it generates its reasoning from the cameras, streamed token by
token, and can be told to *follow* a reasoning the visitor edited) and the scripted expert (always
available; its reasoning is the annotation written from the simulator's ground truth).

The whiteboard comes from the split (or a typed equation), from a drawing on the sketchpad, or from an
uploaded photo; the answer used for scoring comes from the answer field or the typed equation, and without
either the run still happens and the outcome says which card the robot brought ("no ground truth").
Each run has its own simulator and its own copy of the policy, so sessions never share state; runs beyond
``--concurrency`` wait in Gradio's queue, which shows their position.
``build_app(policy_path=...)`` returns the ``gr.Blocks`` for tests and notebooks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import html
import os
import re
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the machine

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from workbench.controllers import ExpertController, PolicyController
from workbench.viz import compose_frame, save_gif
from workbench.vlm.api import ask_stream
from workbench.world import grounding, language, make_env, steps
from workbench.world.catalog import CARD_SLOTS, DIRECTION_PHRASES, Equation
from workbench.world.scene import CAMERAS
from workbench.world.writing import as_rgb_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_POLICY = os.path.join(ROOT, "data_samples", "policy")
EXPERT, POLICY = "scripted expert", "ChatVLA-2 policy"
TASKS = {"math matching": "math_matching", "toy placement": "toy_placement"}
SPLIT_BOARD, DRAWN_BOARD, PHOTO_BOARD = "from the split (or the typed equation)", "my drawing", "my photo"
BOARD_SOURCES = (SPLIT_BOARD, DRAWN_BOARD, PHOTO_BOARD)
CUSTOM_HINT = {
    "math matching": ("Custom equation (optional)", "e.g. 7-3, 3×2, 8÷4, 12-5; empty: drawn from the split"),
    "toy placement": ("Custom instruction (optional)",
                      "e.g. Put the red cube to the left of the yellow duck; empty: drawn from the split"),
}
LOG_HEADERS = ["step", "dx (cm)", "dy (cm)", "dz (cm)", "grip", "step text"]
MAX_SEED = 2**31 - 1
MAX_UPLOAD_SIDE = 4096
VIEW_SCALE = 2  # the model's cameras are shown this many times larger


# ------------------------------------------------------------------------------------------------ controllers
def reasoning_stream(controller, env, obs, info, seed) -> Iterator[str]:
    """Start ``controller`` (:mod:`workbench.controllers`) and yield its reasoning as it grows: token by token
    when a policy generates it; the last item is the final text."""
    if isinstance(controller, PolicyController) and controller.reasoning is None:
        yield from ask_stream(lambda st: controller.start(env, obs, info, seed, streamer=st),
                              controller.policy.processor.tokenizer)
    else:
        yield controller.start(env, obs, info, seed)


# ------------------------------------------------------------------------------------------------ inputs
def fail(message: str) -> gr.Error:
    """A ``gr.Error`` whose text shows as written (Gradio renders messages as HTML: ``<object>`` would vanish)."""
    return gr.Error(html.escape(message))


def check_seed(seed) -> int:
    if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, float, np.integer, np.floating)) \
            or not 0 <= seed <= MAX_SEED or seed != int(seed):  # NaN fails the range test
        raise fail(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return int(seed)


def reset_options(task: str, text: str) -> dict:
    """The env's reset options for a custom equation / instruction (``{}`` when empty); ``ValueError`` if bad."""
    text = (text or "").strip()
    if not text:
        return {}
    if task == "math_matching":
        return {"equation": Equation.parse(text).text}
    obj, target, _ = language.parse_toy_instruction(text)
    if obj == target:
        raise ValueError(f"the object and the target are both {obj!r}; name two different toys")
    return {"instruction": text}


def sketch_image(sketch) -> Image.Image:
    """The drawing of a ``gr.Sketchpad`` value (its composite, transparent parts white); ``gr.Error`` when
    nothing is drawn."""
    composite = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if composite is None:
        raise fail("The sketchpad is empty: draw an equation such as 3+4=? on it first.")
    image = as_rgb_image(composite, "sketch")
    grey = np.asarray(image.convert("L"), np.float32)
    if (grey < 160).mean() < 0.002:  # (almost) no dark stroke anywhere
        raise fail("The sketchpad is empty: draw an equation such as 3+4=? on it first (dark strokes).")
    return image


def photo_image(photo) -> Image.Image:
    """An uploaded photo (a file path or an image) as RGB; ``gr.Error`` for a non-image file or a huge image."""
    if photo is None:
        raise fail("No photo uploaded: upload a picture of a whiteboard, or choose another board source.")
    if isinstance(photo, str):
        try:
            with Image.open(photo) as im:
                if max(im.size) > MAX_UPLOAD_SIDE:
                    raise fail(f"The photo is {im.size[0]}x{im.size[1]} pixels; at most {MAX_UPLOAD_SIDE} per side "
                               "are accepted.")
                photo = im.copy()
        except (OSError, Image.DecompressionBombError) as exc:
            raise fail(f"That file is not an image this demo can read ({type(exc).__name__}); upload a PNG or "
                       "JPEG photo of a whiteboard.") from None
    try:
        return as_rgb_image(photo, "photo", max_size=MAX_UPLOAD_SIDE)
    except ValueError as exc:
        raise fail(f"Unusable photo: {exc}") from None


def episode_options(task: str, custom: str, source: str = SPLIT_BOARD, sketch=None, photo=None,
                    answer=None) -> tuple[dict, bool]:
    """The env's reset options for the visitor's inputs and whether the run has a ground truth to score.

    A drawn or uploaded board is scored against ``answer`` (0-9) or, failing that, the typed equation's answer;
    with neither there is no ground truth: the env still needs an answer card, so one is drawn from the seed's
    cards and the outcome reports the card the robot brought instead of success."""
    if source not in BOARD_SOURCES:
        raise fail(f"Unknown board source {source!r}; choose one of {list(BOARD_SOURCES)}.")
    try:
        options = reset_options(task, custom)
    except ValueError as exc:
        raise fail(f"Invalid {'equation' if task == 'math_matching' else 'instruction'}: {exc}") from None
    if task != "math_matching" or source == SPLIT_BOARD:
        return options, True
    board = sketch_image(sketch) if source == DRAWN_BOARD else photo_image(photo)
    if isinstance(answer, str):
        answer = answer.strip()
    if answer not in (None, ""):
        if isinstance(answer, bool) or str(answer) not in [str(d) for d in range(10)]:
            raise fail(f"The answer must be a whole number from 0 to 9 (the number cards), got {answer!r}.")
        truth = int(answer)
    elif "equation" in options:
        truth = Equation.parse(options["equation"]).answer
    else:
        truth = None
    return {"whiteboard": board, "answer": 0 if truth is None else truth}, truth is not None


# ------------------------------------------------------------------------------------------------ outputs
class Update(NamedTuple):
    """One refresh of the page: live view, the model's cameras (boxes and path drawn), reasoning, truth table,
    action log (latest first), outcome, GIF file."""

    live: Image.Image | None
    model_view: Image.Image | None
    reasoning: str
    truth: str
    log: list
    status: str
    gif: str | None


def model_view(cameras: dict[str, np.ndarray], reasoning: str = "", path: np.ndarray | None = None) -> Image.Image:
    """The cameras the model saw at the start, enlarged: the reasoning's grounding boxes on the table image (they
    use 0-1000 coordinates of it) and the latest predicted end-effector path (blue, projected into it)."""
    s = VIEW_SCALE
    board = Image.fromarray(cameras["board"]).resize((cameras["board"].shape[1] * s, cameras["board"].shape[0] * s))
    table = Image.fromarray(cameras["table"]).resize((cameras["table"].shape[1] * s, cameras["table"].shape[0] * s))
    draw = ImageDraw.Draw(table)
    w, h = table.size
    for x1, y1, x2, y2 in grounding.parse_boxes(reasoning):
        draw.rectangle([x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000], outline=(230, 0, 0), width=3)
    if path is not None and len(path):
        rc = CAMERAS["table"].project(path) * s
        pts = [(float(c), float(r)) for r, c in rc]
        draw.line(pts, fill=(20, 60, 230), width=3)
        draw.ellipse([pts[-1][0] - 5, pts[-1][1] - 5, pts[-1][0] + 5, pts[-1][1] + 5], outline=(20, 60, 230), width=3)
    canvas = Image.new("RGB", (max(board.width, table.width), board.height + table.height + 4), "white")
    canvas.paste(board, (0, 0))
    canvas.paste(table, (0, board.height + 4))
    return canvas


def truth_table(reasoning: str, info: dict, has_truth: bool) -> str:
    """Markdown: each fact the reasoning states beside the simulator's truth, marked right or wrong."""
    facts = language.parse_reasoning(reasoning)
    if info["task"] == "math_matching":
        if not has_truth:
            return ("| fact | the reasoning says |\n|---|---|\n"
                    f"| equation | {facts.equation or '—'} |\n| answer | {_v(facts.answer)} |\n"
                    f"| card, slot | {_v(facts.card)}, {facts.card_slot or '—'} |\n\n"
                    "*No ground truth: give the answer (or type the equation) to have it checked.*")
        eq = None if info.get("equation") is None else Equation.parse(info["equation"])
        rows = [("equation", facts.equation, None if eq is None else f"{eq.a}{eq.op}{eq.b}"),
                ("answer", facts.answer, info["answer"]), ("card", facts.card, info["answer"]),
                ("card slot", facts.card_slot, info["answer_card_slot"])]
        card_xy = info.get("answer_card_xy") or CARD_SLOTS[info["answer_card_slot"]]
        boxes = [("card's box", facts.pick_box, grounding.card_box(card_xy))]
    else:
        toys = info["toys"]
        rows = [("object", facts.object, info["object"]), ("target", facts.target, info["target"]),
                ("side", facts.direction, info["direction"])]
        boxes = [("object's box", facts.pick_box, grounding.toy_box(info["object"], (*toys[info["object"]], 0))),
                 ("target's box", facts.target_box, grounding.toy_box(info["target"], (*toys[info["target"]], 0)))]
    lines = ["| fact | the reasoning says | truth | |", "|---|---|---|---|"]
    for name, said, truth in rows:
        mark = "" if truth is None else ("✓ right" if said == truth else "✗ wrong")
        lines.append(f"| {name} | {_v(said)} | {_v(truth) if truth is not None else '(your drawing)'} | {mark} |")
    for name, said, truth in boxes:  # a box is right when it finds the thing (IoU >= 0.5 or centre inside)
        mark = "✓ finds it" if said is not None and grounding.box_hit(said, truth) else "✗ misses"
        lines.append(f"| {name} | {_v(said)} | {_v(tuple(round(v) for v in truth))} | {mark} |")
    if info["task"] == "toy_placement":
        ok = facts.place_box is not None and grounding.placement_ok(facts.place_box, toys[info["target"]],
                                                                    info["direction"])
        lines.append(f"| placement box | {_v(facts.place_box)} | {DIRECTION_PHRASES[info['direction']]} the "
                     f"{html.escape(info['target'])} | {'✓ right side' if ok else '✗ wrong place'} |")
    return "\n".join(lines)


def _v(value) -> str:
    return "—" if value is None else html.escape(str(value))


def card_on_pad(env) -> int | None:
    """The card resting on the answer pad, if any."""
    return next((int(d) for d in env.unwrapped.scene.cards if env.unwrapped.card_on_pad(d)), None)


# ------------------------------------------------------------------------------------------------ episode
def run_episode(controller: ExpertController | PolicyController, task_label: str, split: str, seed, custom: str = "",
                source: str = SPLIT_BOARD, sketch=None, photo=None, answer=None,
                reasoning: str | None = None, gif_dir: str | None = None) -> Iterator[Update]:
    """Generator: one episode, yielding an :class:`Update` while the reasoning streams and after every step.

    ``reasoning`` (policy only): act on this text instead of generating it; when it states a task in the scene
    (a card on the table; two of its toys and a side), the episode is retargeted to that task
    (:meth:`~workbench.world.env.TabletopEnv.retarget`), so it ends once the robot has done what the text says and
    the outcome says whether it did. Bad inputs raise ``gr.Error`` before the robot moves; the episode ends at its
    success or the env's ``max_steps``; the last update carries the GIF.
    """
    if task_label not in TASKS:
        raise fail(f"Unknown task {task_label!r}; choose one of {list(TASKS)}.")
    if split not in ("in_domain", "open_world"):
        raise fail(f"Unknown split {split!r}; choose in_domain or open_world.")
    task, seed = TASKS[task_label], check_seed(seed)
    if reasoning is not None:
        try:
            reasoning = language.check_text(reasoning, "reasoning", max_chars=2000, grounding=True)
        except ValueError as exc:
            raise fail(f"Cannot follow that reasoning: {exc}") from None
    options, has_truth = episode_options(task, custom, source, sketch, photo, answer)
    env = make_env(task, split, render_mode="rgb_array")
    try:
        try:
            obs, info = env.reset(seed=seed, options=options)
        except ValueError as exc:
            raise fail(f"Cannot set up that episode: {exc}") from None
        stated = None if reasoning is None else env.unwrapped.stated_task(language.parse_reasoning(reasoning))
        if stated is not None:
            env.unwrapped.retarget(stated)  # the episode ends when what the reasoning says is done
        cams = {c: obs[c] for c in env.cameras}
        head = f"**Instruction:** {html.escape(info['instruction'])}  \n"
        frames = [compose_frame(env.render(), cams)]
        said = "(thinking…)"
        yield Update(frames[0], model_view(cams), said, "", [], head + "Reasoning…", None)
        if reasoning is not None:
            controller.reasoning = reasoning  # follow it
        for said in reasoning_stream(controller, env, obs, info, seed):
            yield Update(frames[0], model_view(cams, said), said, "", [], head + "Reasoning…", None)
        truth = truth_table(said, info, has_truth)
        rows = []
        for step in steps(env, controller, obs):
            n, action = step.t + 1, step.action
            rows.insert(0, [n, *(round(100 * float(v), 1) for v in action[:3]), round(float(action[3]), 2), step.note])
            frames.append(compose_frame(env.render(), {c: step.next_obs[c] for c in env.cameras}))
            if not step.done:
                outcome = f"Running… step {n}/{env.max_steps}"
            elif stated is not None:
                outcome = (f"**Did what the reasoning says** in {n} steps" if step.success
                           else f"**Did not do what the reasoning says** after {n} steps")
            elif has_truth:
                outcome = f"**Success** in {n} steps" if step.success else f"**Failure** after {n} steps"
            else:
                card = card_on_pad(env)
                outcome = (f"**No ground truth**: after {n} steps the robot brought the card {card} to the pad"
                           if card is not None else f"**No ground truth**: no card on the pad after {n} steps")
            gif = None
            if step.done:
                gif = save_gif(frames, os.path.join(gif_dir or tempfile.mkdtemp(prefix="demo_"), "episode.gif"))
            yield Update(frames[-1], model_view(cams, said, controller.path()), said, truth, rows, head + outcome, gif)
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------ app
def policy_status(path: str | None) -> str | None:
    """``None`` when ``path`` is a usable policy folder, else why not (the policy module is imported only here)."""
    if not path:
        return "no policy folder given (--policy)"
    if not os.path.isdir(path):
        return f"no policy folder at {path!r}"
    from workbench.vla.policy import is_policy_folder

    return None if is_policy_folder(path) else f"{path!r} is not a policy folder (no policy_config.json)"


def example_boards(folder: str) -> list[list]:
    """A few boards to click: held-out fonts and a mouse-style sketch, written to ``folder`` as PNGs;
    rows of (board source, photo path, answer)."""
    from workbench.vlm.boards import render_board as draw_board
    from workbench.vlm.boards import sample_look

    rows = []
    for k, (text, condition, answer) in enumerate((("3+4=?", None, 7), ("8÷2=?", "sketch", 4),
                                                   ("12-5=?", "coloured_ink", 7))):
        look = sample_look(np.random.default_rng(k), "heldout", condition=condition)
        path = os.path.join(folder, f"board_{k}.png")
        draw_board(text, look, seed=k)[0].save(path)
        rows.append([PHOTO_BOARD, path, str(answer)])
    return rows


def build_app(policy_path: str | None = DEFAULT_POLICY, concurrency: int = 2) -> gr.Blocks:
    """The demo as a ``gr.Blocks``; the controller dropdown offers the policy only if ``policy_path`` holds one."""
    unavailable = policy_status(policy_path)
    controllers = [EXPERT] if unavailable else [POLICY, EXPERT]
    loaded = {}  # the policy, loaded on first use; each run acts with its own copy

    def make_controller(name: str) -> ExpertController | PolicyController:
        if name == EXPERT:
            return ExpertController()
        if name != POLICY or unavailable:
            raise fail(f"Controller {name!r} is not available; choose one of {controllers}.")
        if "policy" not in loaded:
            from workbench.vla.policy import load_policy

            try:
                loaded["policy"] = load_policy(policy_path)
            except (OSError, ValueError) as exc:
                raise fail(f"Could not load the ChatVLA-2 policy from {policy_path!r}: {exc}") from exc
        return PolicyController(copy.deepcopy(loaded["policy"]))

    def run(task_label, split, seed, custom, controller_name, source, sketch, photo, answer):
        yield from run_episode(make_controller(controller_name), task_label, split, seed, custom, source, sketch,
                               photo, answer)

    def follow(task_label, split, seed, custom, controller_name, source, sketch, photo, answer, edited):
        if controller_name != POLICY:
            raise fail("Only the ChatVLA-2 policy follows a reasoning; choose it as the controller.")
        yield from run_episode(make_controller(controller_name), task_label, split, seed, custom, source, sketch,
                               photo, answer, reasoning=edited)

    def cleared():
        return Update(None, None, "", "", [], "", None)

    examples_dir = tempfile.mkdtemp(prefix="demo_boards_")
    with gr.Blocks(title="ChatVLA-2 workbench demo", analytics_enabled=False) as demo:
        gr.Markdown("# ChatVLA-2 workbench: reason, then act\nA simulated Panda reads the whiteboard (draw one!) or "
                    "the instruction, says what it concluded, then acts. Edit its reasoning and press *Follow this "
                    "reasoning* to see the robot do what the text says.")
        with gr.Row():
            with gr.Column(scale=1):
                task = gr.Radio(list(TASKS), value="math matching", label="Task", elem_id="task")
                split = gr.Radio(["in_domain", "open_world"], value="in_domain", label="Split", elem_id="split")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                custom = gr.Textbox(label=CUSTOM_HINT["math matching"][0], placeholder=CUSTOM_HINT["math matching"][1],
                                    elem_id="custom")
                source = gr.Radio(list(BOARD_SOURCES), value=SPLIT_BOARD, label="Whiteboard (math matching)",
                                  elem_id="source")
                with gr.Tab("Draw the board"):
                    sketch = gr.Sketchpad(type="numpy", image_mode="RGBA", canvas_size=(512, 256), fixed_canvas=True,
                                          brush=gr.Brush(default_size=10, colors=["#111111", "#1f3fbf", "#b01818"]),
                                          label="Write an equation, e.g. 3+4=?", elem_id="sketch", layers=False)
                with gr.Tab("Upload a photo"):
                    photo = gr.Image(type="filepath", sources=["upload", "clipboard"], label="A photo of a whiteboard",
                                     elem_id="photo")
                answer = gr.Textbox(value="", max_lines=1, elem_id="answer",
                                    label="Answer for scoring (optional; a digit 0-9)")
                controller = gr.Dropdown(controllers, value=controllers[0], label="Controller", elem_id="controller",
                                         info=f"ChatVLA-2 policy unavailable: {unavailable}" if unavailable else None)
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                gr.Examples(example_boards(examples_dir), [source, photo, answer], label="Example boards")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="outcome")
                with gr.Row():
                    live = gr.Image(label="Live: overview and the model's cameras", type="pil", interactive=False,
                                    elem_id="frame")
                    seen = gr.Image(label="What the model saw at the start (red: boxes in its reasoning; blue: "
                                          "its predicted path)", type="pil", interactive=False, elem_id="seen")
                reasoning = gr.Textbox(label="Reasoning (edit it, then follow it)", lines=3, interactive=True,
                                       elem_id="reasoning")
                follow_button = gr.Button("Follow this reasoning", elem_id="follow")
                truth = gr.Markdown(elem_id="truth")
                gif = gr.File(label="Episode GIF", elem_id="gif")
        log = gr.Dataframe(headers=LOG_HEADERS, label="Actions, latest first (displacement per 10 Hz step; grip ≥ 0.5 "
                           "closes)", interactive=False, elem_id="log", max_height=320)
        outputs = [live, seen, reasoning, truth, log, status, gif]
        inputs = [task, split, seed, custom, controller, source, sketch, photo, answer]
        task.change(lambda t: gr.Textbox(label=CUSTOM_HINT[t][0], placeholder=CUSTOM_HINT[t][1], value=""),
                    task, custom)
        sketch.change(lambda _: DRAWN_BOARD, sketch, source)
        photo.upload(lambda _: PHOTO_BOARD, photo, source)
        # clear the previous run first, so that an error never leaves an old outcome on the page
        run_button.click(cleared, None, outputs, queue=False).then(run, inputs, outputs, concurrency_limit=concurrency,
                                                                   concurrency_id="episodes")
        follow_button.click(follow, [*inputs, reasoning], outputs, concurrency_limit=concurrency,
                            concurrency_id="episodes")
    demo.queue(max_size=32, default_concurrency_limit=concurrency)
    return demo


# ------------------------------------------------------------------------------------------------ in a browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: "3+4=?" as a person writes it with a mouse: strokes of (x, y) points, in fractions of a character cell
SKETCH_STROKES = {
    "3": [[(0.1, 0.12), (0.8, 0.1), (0.4, 0.48), (0.85, 0.62), (0.8, 0.88), (0.15, 0.92)]],
    "+": [[(0.1, 0.5), (0.9, 0.5)], [(0.5, 0.15), (0.5, 0.85)]],
    "4": [[(0.7, 0.95), (0.7, 0.05), (0.08, 0.66), (0.95, 0.66)]],
    "=": [[(0.1, 0.36), (0.9, 0.36)], [(0.1, 0.64), (0.9, 0.64)]],
    "?": [[(0.15, 0.25), (0.35, 0.06), (0.7, 0.06), (0.85, 0.26), (0.5, 0.5), (0.5, 0.72)],
          [(0.5, 0.88), (0.52, 0.92)]],
}


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1300):
    """A page of the demo at ``url`` in Debian's headless Chromium (Playwright drives it; it never downloads a
    browser, and the page may reach nothing but the demo server)."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        raise FileNotFoundError(f"{CHROMIUM} is missing (install it: apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            host = re.escape(url.split("//", 1)[1].split("/", 1)[0])
            page.route(re.compile(rf"^(?!https?://{host})"), lambda route: route.abort())
            page.goto(url)
            yield page
        finally:
            browser.close()


def draw_sketch(page, text: str = "3+4=?") -> None:
    """Write ``text`` on the sketchpad with mouse strokes (press, move in small steps, release)."""
    canvas = page.locator("#sketch canvas").first
    canvas.wait_for(state="visible", timeout=30_000)
    page.locator("#sketch").get_by_role("button", name="Brush").click()  # the sketchpad draws once a tool is chosen
    box = canvas.bounding_box()  # the 2:1 drawing area sits in the middle of the canvas element
    cell_w, cell_h = box["width"] * 0.8 / len(text), box["height"] * 0.34
    x0, y0 = box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.33
    for k, ch in enumerate(text):
        for stroke in SKETCH_STROKES[ch]:
            pts = [(x0 + (k + 0.1 + 0.8 * u) * cell_w, y0 + v * cell_h) for u, v in stroke]
            page.mouse.move(*pts[0])
            page.mouse.down()
            for x, y in pts[1:]:
                page.mouse.move(x, y, steps=6)
            page.mouse.up()


def drive(page, controller: str = POLICY, answer: int | None = 7, text: str = "3+4=?",
          timeout_ms: int = 90_000) -> dict:
    """Draw ``text`` on the sketchpad, give the answer, choose the controller, run, and wait for the outcome.
    Returns what the page shows: reasoning, truth table, outcome."""
    from playwright.sync_api import expect

    page.locator("#task").get_by_label("math matching").check()
    draw_sketch(page, text)
    page.locator("#source").get_by_label(DRAWN_BOARD).check()
    if answer is not None:
        page.locator("#answer textarea, #answer input").first.fill(str(answer))
    page.locator("#controller input").click()
    page.get_by_role("option", name=controller).click()
    page.locator("#run").click()
    expect(page.locator("#outcome")).to_contain_text(re.compile("Success|Failure|No ground truth"), timeout=timeout_ms)
    return {"reasoning": page.locator("#reasoning textarea").input_value(),
            "truth": page.locator("#truth").inner_text(), "outcome": page.locator("#outcome").inner_text()}


def screenshot(path: str, policy_path: str | None = DEFAULT_POLICY) -> dict:
    """Serve the demo on a free local port, draw a board, run the policy in Chromium and save the page as a PNG."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(policy_path)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False)
    try:
        with browser_page(f"http://127.0.0.1:{port}/") as page:
            shown = drive(page, POLICY if not policy_status(policy_path) else EXPERT)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            page.screenshot(path=path, full_page=True)
    finally:
        demo.close()
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="ChatVLA-2 policy folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for the LAN)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--concurrency", type=int, default=2, help="episodes run at once; more wait in the queue")
    parser.add_argument("--screenshot", metavar="PNG", default=None,
                        help="instead of serving: draw a board and run the policy in headless Chromium, save the page")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.screenshot:
        shown = screenshot(args.screenshot, args.policy)
        print(f"wrote {args.screenshot}: {shown['outcome']!r}")
        return
    build_app(policy_path=args.policy, concurrency=args.concurrency).launch(
        server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
