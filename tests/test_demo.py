"""The live demo (demos/app.py): its episode generator called directly, and the app driven in a real browser."""

import importlib.util
import os
import re
import socket

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


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


def test_run_episode_streams_reasoning_actions_and_outcome(app):
    outputs = list(app.run_episode(app.ExpertController(), "math matching", "in_domain", 3, ""))
    assert len(outputs) > 10  # one update per step, streamed
    frame, reasoning, rows, status = outputs[-1]
    assert frame.size == (576, 272)  # overview 320x240 beside the board (192x96) and table (256x176) cameras
    assert board_equation(3) in reasoning
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and len(rows[0]) == len(app.LOG_HEADERS)
    assert all(abs(v) <= 4.0 for r in rows for v in r[1:4]) and all(isinstance(r[5], str) and r[5] for r in rows)
    assert "Success" in status and f"{len(rows)} steps" in status
    assert all("Running" in s for *_, s in outputs[1:-1])


def test_inputs_are_validated(app):
    gr = pytest.importorskip("gradio")
    expert = app.ExpertController()
    for task, text, message in [("math matching", "9+9", "no single-digit answer"),
                                ("math matching", "hello", "cannot read an equation"),
                                ("toy placement", "Put the dragon left of the duck", "Known objects"),
                                ("toy placement", "Put the red cube behind the red cube", "two different toys")]:
        with pytest.raises(gr.Error, match=message):
            next(app.run_episode(expert, task, "in_domain", 0, text))
    with pytest.raises(gr.Error, match="whole number"):
        next(app.run_episode(expert, "math matching", "in_domain", None, ""))
    assert app.reset_options("math_matching", " 3 x 2 ") == {"equation": "3×2=?"}


def test_policy_adapter_and_availability(app, tmp_path):
    class FakePolicy:  # the ChatVLA-2 policy's interface
        def reset(self, seed=None):
            self.reasoning, self.calls, self.seed = None, 0, seed

        def select_action(self, obs, instruction):
            self.reasoning, self.calls = f"I read the board for: {instruction}", self.calls + 1
            return np.array([0.0, 0.02, -0.01, 1.0], np.float32)

    policy = FakePolicy()
    controller = app.PolicyController(policy)
    assert controller.start(None, {}, {"instruction": "Solve it."}, 7) == "I read the board for: Solve it."
    assert policy.seed == 7  # the demo's seed also seeds the policy's diffusion noise
    action, text = controller.act({})
    assert policy.calls == 1 and text == "moving left and down, gripper closed"  # the first action is not recomputed
    controller.act({})
    assert policy.calls == 2
    assert "no policy folder" in app.policy_status(str(tmp_path / "missing"))
    (tmp_path / "policy_config.json").write_text("{}")
    assert app.policy_status(str(tmp_path)) is None


# ------------------------------------------------------------------------------------------------ real browser
@pytest.fixture(scope="module")
def server(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_app(policy_path=None)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (install it: apt-get install chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        # nothing but the demo server may be reached
        page.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), lambda route: route.abort())
        page.goto(server)
        yield page
        browser.close()


def test_browser_runs_scripted_expert_to_success(page):
    from playwright.sync_api import expect

    page.locator("#task").get_by_label("math matching").check()
    page.locator("#controller input").click()
    page.get_by_role("option", name="scripted expert").click()
    page.locator("#seed input").fill("3")
    page.locator("#run").click()
    expect(page.locator("#reasoning textarea")).to_have_value(re.compile(re.escape(board_equation(3))), timeout=30_000)
    expect(page.locator("#outcome")).to_contain_text("Success", timeout=30_000)
    steps = int(re.search(r"Success in (\d+) steps", page.locator("#outcome").inner_text()).group(1))
    rows = int(page.locator("#log [role=grid]").get_attribute("aria-rowcount")) - 1  # virtualised: count, not <tr>s
    assert rows == steps > 10


def test_browser_shows_bad_equation_error(page):
    from playwright.sync_api import expect

    page.locator("#task").get_by_label("math matching").check()
    page.locator("#custom textarea").fill("12+9")
    page.locator("#run").click()
    expect(page.get_by_text("no single-digit answer").first).to_be_visible(timeout=15_000)
