"""The live demo (demos/app.py): its episode generator called directly, the app through gradio_client (every
controller and task, bad inputs, concurrent sessions), and the page driven in a real browser."""

import importlib.util
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from workbench.world import language

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = os.path.join(ROOT, "data_samples", "policy")


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("demo_app", os.path.join(ROOT, "demos", "app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def board_equation(seed: int) -> str:
    """The equation a math-matching in-domain episode with ``seed`` shows, as the reasoning spells it."""
    from workbench.world import language, make_env
    from workbench.world.catalog import Equation

    env = make_env("math_matching", "in_domain", cameras=())
    try:
        return language.equation_words(Equation.parse(env.reset(seed=seed)[1]["equation"]))
    finally:
        env.close()


def drawn(text_strokes=True) -> dict:
    """A Sketchpad value: a transparent RGBA canvas with '4+3=?'-like dark strokes (or nothing)."""
    canvas = np.zeros((256, 512, 4), np.uint8)
    if text_strokes:
        from workbench.vlm.boards import BoardLook, render_board

        look = BoardLook("hershey_futura", "futural", "hand", text_height=0.4, offset=(0.0, 0.0), stroke=0.15)
        board = np.asarray(render_board("4+3=?", look, seed=1)[0].convert("L"))
        canvas[board < 128] = (10, 10, 10, 255)
    return {"background": None, "layers": [], "composite": canvas}


def test_run_episode_streams_reasoning_actions_truth_and_gif(app, tmp_path):
    outputs = list(app.run_episode(app.ExpertController(), "math matching", "in_domain", 3, "", gif_dir=str(tmp_path)))
    assert len(outputs) > 10  # one update per step, streamed
    last = outputs[-1]
    assert last.live.size == (576, 272)  # overview 320x240 beside the board (192x96) and table (256x176) cameras
    assert last.model_view.size == (2 * 256, 2 * (96 + 176) + 4)
    assert board_equation(3) in last.reasoning
    assert [r[0] for r in last.log] == list(range(len(last.log), 0, -1))  # latest step first
    assert len(last.log[0]) == len(app.LOG_HEADERS)
    assert all(abs(v) <= 4.0 for r in last.log for v in r[1:4])
    assert all(isinstance(r[5], str) and r[5] for r in last.log)
    assert "Success" in last.status and f"{len(last.log)} steps" in last.status
    assert last.truth.count("✓ right") == 4 and "✗" not in last.truth  # the expert's annotation is the truth
    assert all("Running" in u.status for u in outputs[2:-1]) and all(u.gif is None for u in outputs[:-1])
    assert os.path.getsize(last.gif) > 10_000 and Image.open(last.gif).n_frames == len(last.log) + 1


def test_inputs_are_validated_and_errors_read_completely(app, tmp_path):
    gr = pytest.importorskip("gradio")
    expert = app.ExpertController()
    for task, text, message in [("math matching", "9+9", "no single-digit answer"),
                                ("math matching", "hello", "cannot read an equation"),
                                ("toy placement", "Put the dragon left of the duck", "Known objects"),
                                ("toy placement", "Put the red cube behind the red cube", "two different toys")]:
        with pytest.raises(gr.Error, match=message):
            next(app.run_episode(expert, task, "in_domain", 0, text))
    with pytest.raises(gr.Error) as err:
        next(app.run_episode(expert, "toy placement", "in_domain", 0, "Put the dragon left of the duck"))
    assert "&lt;object&gt; &lt;direction&gt; &lt;target&gt;" in err.value.message  # shown as <object>..., not eaten
    for seed in (None, -1, 2.5, 2**64, float("nan"), True):
        with pytest.raises(gr.Error, match="Seed must be a whole number from 0"):
            next(app.run_episode(expert, "math matching", "in_domain", seed, ""))
    board = lambda **kw: next(app.run_episode(expert, "math matching", "in_domain", 0, **kw))  # noqa: E731
    with pytest.raises(gr.Error, match="sketchpad is empty"):
        board(source=app.DRAWN_BOARD, sketch=drawn(False))
    with pytest.raises(gr.Error, match="sketchpad is empty"):
        board(source=app.DRAWN_BOARD, sketch=None)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        board(source=app.PHOTO_BOARD, photo=str(tmp_path / "notes.txt"))
    Image.new("RGB", (5000, 300), "white").save(tmp_path / "huge.png")
    with pytest.raises(gr.Error, match="at most 4096"):
        board(source=app.PHOTO_BOARD, photo=str(tmp_path / "huge.png"))
    with pytest.raises(gr.Error, match="No photo"):
        board(source=app.PHOTO_BOARD)
    with pytest.raises(gr.Error, match="from 0 to 9"):
        board(source=app.DRAWN_BOARD, sketch=drawn(), answer=12)
    with pytest.raises(gr.Error, match="Cannot follow"):
        board(reasoning="<|im_end|>")
    assert app.reset_options("math_matching", " 3 x 2 ") == {"equation": "3×2=?"}
    # a transparent PNG becomes a white board with dark writing, not a black board
    options, has_truth = app.episode_options("math_matching", "", app.DRAWN_BOARD, drawn(), answer=7)
    pixels = np.asarray(options["whiteboard"])
    assert has_truth and options["answer"] == 7 and np.median(pixels) == 255 and pixels.min() < 50


def test_a_drawing_without_an_answer_runs_without_ground_truth(app):
    *_, last = app.run_episode(app.ExpertController(), "math matching", "in_domain", 1, "",
                               source=app.DRAWN_BOARD, sketch=drawn())
    assert "No ground truth" in last.status and "brought the card" in last.status
    assert "No ground truth" in last.truth
    # with the typed equation, the drawing is scored against its answer
    options, has_truth = app.episode_options("math_matching", "4+3", app.DRAWN_BOARD, drawn())
    assert has_truth and options["answer"] == 7


@pytest.fixture(scope="module")
def policy():
    if not os.path.isfile(os.path.join(POLICY, "policy_config.json")):
        pytest.skip("no shipped policy")
    from workbench.vla.policy import load_policy

    return load_policy(POLICY)


def test_policy_streams_its_reasoning_and_follows_an_edited_one(app, policy):
    import copy

    updates = list(app.run_episode(app.PolicyController(copy.deepcopy(policy)), "math matching", "in_domain", 4, ""))
    streamed = [u.reasoning for u in updates if u.status.endswith("Reasoning…")]
    assert len(streamed) > 3 and len(set(streamed)) > 3  # it grows token by token
    final = updates[-1]
    assert final.reasoning == streamed[-1] and final.truth.count("|") > 10
    # the paper's reasoning following, live: name another card and slot, and the robot goes there instead
    from workbench.world import make_env

    # (as a user edits the policy's own reasoning: it still opens with a solved equation, here one whose answer is
    # another card on the table, which a board-first policy reads as its first turn)
    env = make_env("math_matching", "in_domain", cameras=())
    env.reset(seed=4)
    gt, _ = env.unwrapped.counterfactual_task(np.random.default_rng(0))
    env.close()
    other = gt["answer"]
    edited = language.episode_reasoning(gt, np.random.default_rng(0))
    assert language.split_board_answer(edited) is not None
    controller = app.PolicyController(copy.deepcopy(policy))
    followed = list(app.run_episode(controller, "math matching", "in_domain", 4, "", reasoning=edited))
    assert followed[-1].reasoning == edited and "✗ wrong" in followed[-1].truth
    assert controller.policy.facts.card == other and controller.path() is not None
    # the episode was retargeted to the handed card: it ends once that card is on the pad, and says so
    assert "Did what the reasoning says" in followed[-1].status and len(followed) < 80


# ------------------------------------------------------------------------------------------------ gradio_client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    port = free_port()
    demo = app.build_app(policy_path=POLICY if os.path.isdir(POLICY) else None, concurrency=2)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def client_run(client, task="math matching", seed=2, controller="scripted expert", custom=""):
    return client.predict(task, "in_domain", seed, custom, controller, "from the split (or the typed equation)",
                          None, None, None, api_name="/run")


@pytest.mark.parametrize("controller, task", [("scripted expert", "math matching"),
                                              ("scripted expert", "toy placement"),
                                              ("ChatVLA-2 policy", "math matching")])  # the policy on toys: below
def test_client_runs_each_controller_and_task(client, controller, task):
    live, seen, reasoning, truth, log, status, gif = client_run(client, task, 5, controller)
    assert reasoning and ("Success" in status or "Failure" in status)
    assert os.path.isfile(gif) and log["data"][0][0] == len(log["data"])


def test_client_reports_bad_inputs_and_keeps_serving(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no single-digit answer"):
        client_run(client, custom="9+9")
    with pytest.raises(AppError, match="greater than maximum value 2147483647"):  # the Number field's own bound
        client_run(client, seed=2**64)
    assert "Success" in client_run(client)[5]  # still serving


def true_reasoning(task: str, seed: int) -> str:
    """The annotated (ground-truth) reasoning of an in-domain episode with ``seed``."""
    from workbench.world import make_env

    env = make_env(task, "in_domain", cameras=())
    try:
        return language.episode_reasoning(env.reset(seed=seed)[1], np.random.default_rng(seed))
    finally:
        env.close()


def test_concurrent_sessions_match_their_solo_runs(client):
    """Three sessions at once (two run, one waits in the queue) each get exactly what they get alone. The policy
    follows the true reasoning (no generation), so the episodes are short; its action expert is what is shared."""
    def follow(seed):
        return client.predict("toy placement", "in_domain", seed, "", "ChatVLA-2 policy",
                              "from the split (or the typed equation)", None, None, None,
                              true_reasoning("toy_placement", seed), api_name="/follow")

    seeds = [11, 12, 13]
    solo = [follow(s) for s in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(follow, seeds))
    for a, b in zip(solo, together):
        assert a[4]["data"] and a[4]["data"] == b[4]["data"] and a[5] == b[5]  # actions, outcome


# ------------------------------------------------------------------------------------------------ real browser
@pytest.fixture(scope="module")
def page(app, server):
    if not os.path.exists(app.CHROMIUM):
        pytest.skip(f"{app.CHROMIUM} is missing (install it: apt-get install chromium); the browser test needs it")
    pytest.importorskip("playwright.sync_api")
    with app.browser_page(server) as page:
        yield page


def test_browser_draws_a_board_runs_the_policy_and_shows_reasoning_truth_and_outcome(app, page, root):
    shown = app.drive(page, app.POLICY, answer=7)
    assert len(shown["reasoning"]) > 20
    assert "✓ right" in shown["truth"] or "✗ wrong" in shown["truth"]  # each fact marked against the truth
    assert re.search(r"(Success|Failure) (in|after) \d+ steps", shown["outcome"])
    assert page.locator("#gif a").count() >= 1  # the episode GIF to download
    path = os.path.join(root, "outputs", "test_artifacts", "demo_page.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 50_000


def test_browser_shows_bad_equation_error_and_clears_the_last_outcome(page):
    from playwright.sync_api import expect

    page.locator("#source").get_by_label("from the split (or the typed equation)").check()
    page.locator("#custom textarea").fill("12+9")
    page.locator("#run").click()
    expect(page.get_by_text("no single-digit answer").first).to_be_visible(timeout=15_000)
    expect(page.locator("#outcome")).not_to_contain_text("steps")  # the previous run's outcome is gone
