"""Live browser demo: a PyBullet robot solves a whiteboard equation or places a toy, its reasoning beside its actions.

    python demos/app.py                                  # http://127.0.0.1:7860
    python demos/app.py --policy data_samples/policy --port 7861

Two controllers drive the robot and look the same to the UI (a :class:`Controller`): the ChatVLA-2 policy
(when ``--policy`` names a policy folder; it generates its reasoning from the cameras) and the scripted
expert (always available; its reasoning is the annotation written from the simulator's ground truth).
``build_app(policy_path=...)`` returns the ``gr.Blocks`` for tests and notebooks.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the machine

import gradio as gr
import numpy as np

from workbench.viz import compose_frame
from workbench.world import ScriptedExpert, language, make_env
from workbench.world.catalog import Equation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_POLICY = os.path.join(ROOT, "data_samples", "policy")
EXPERT, POLICY = "scripted expert", "ChatVLA-2 policy"
TASKS = {"math matching": "math_matching", "toy placement": "toy_placement"}
CUSTOM_HINT = {
    "math matching": ("Custom equation (optional)", "e.g. 7-3, 3×2, 8÷4, 12-5; empty: drawn from the split"),
    "toy placement": ("Custom instruction (optional)",
                      "e.g. Put the red cube to the left of the yellow duck; empty: drawn from the split"),
}
LOG_HEADERS = ["step", "dx (cm)", "dy (cm)", "dz (cm)", "grip", "step text"]


class Controller:
    """What the UI drives: ``start(...) -> reasoning`` once per episode, then ``act(obs) -> (action, step text)``."""

    def start(self, env, obs: dict, info: dict, seed: int) -> str:
        raise NotImplementedError

    def act(self, obs: dict) -> tuple[np.ndarray, str]:
        raise NotImplementedError


class ExpertController(Controller):
    """The scripted expert; reasoning and step texts are the dataset's annotations of the ground truth."""

    def start(self, env, obs, info, seed):
        self.expert, self.info, self.rng = ScriptedExpert(env), info, np.random.default_rng(seed)
        return language.episode_reasoning(info, self.rng)

    def act(self, obs):
        action, phase = self.expert.act(obs)
        return action, language.step_reasoning(phase, self.info, self.rng)


class PolicyController(Controller):
    """The ChatVLA-2 policy; it reasons on its first action, and a step's text says what the action does."""

    def __init__(self, policy):
        self.policy = policy

    def start(self, env, obs, info, seed):
        self.policy.reset(seed=seed)  # the same seed replays the same episode
        self.instruction = info["instruction"]
        self.first = self.policy.select_action(obs, self.instruction)  # generates policy.reasoning
        return self.policy.reasoning

    def act(self, obs):
        action = self.first if self.first is not None else self.policy.select_action(obs, self.instruction)
        self.first = None
        return action, describe_action(action)


def describe_action(action) -> str:
    """``[0.03, 0.01, -0.02, 1]`` -> ``"moving forward, left and down, gripper closed"`` (ignores axes under 5 mm)."""
    dx, dy, dz, grip = (float(v) for v in action)
    words = [pos if v > 0 else neg for v, pos, neg in ((dx, "forward", "back"), (dy, "left", "right"),
                                                       (dz, "up", "down")) if abs(v) >= 0.005]
    motion = "moving " + ", ".join(words[:-1]) + " and " * (len(words) > 1) + words[-1] if words else "holding still"
    return f"{motion}, gripper {'closed' if grip >= 0.5 else 'open'}"


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


def camera_frame(env, obs: dict):
    """The overview camera beside the two model cameras (whiteboard above, table below)."""
    return compose_frame(env.render(), {c: obs[c] for c in env.cameras})


def run_episode(controller: Controller, task_label: str, split: str, seed, custom: str):
    """Generator: one episode, yielding (frame, reasoning, action log rows, status markdown) after every step.

    Bad inputs raise ``gr.Error`` before the robot moves; the episode ends at the env's ``max_steps``.
    """
    if task_label not in TASKS:
        raise gr.Error(f"Unknown task {task_label!r}; choose one of {list(TASKS)}.")
    if seed is None or seed < 0 or seed != int(seed):
        raise gr.Error(f"Seed must be a whole number ≥ 0, got {seed!r}.")
    task, seed = TASKS[task_label], int(seed)
    try:
        options = reset_options(task, custom)
    except ValueError as exc:
        raise gr.Error(f"Invalid {'equation' if task == 'math_matching' else 'instruction'}: {exc}") from None
    env = make_env(task, split, render_mode="rgb_array")
    try:
        obs, info = env.reset(seed=seed, options=options)
        head = f"**Instruction:** {info['instruction']}  \n"
        yield camera_frame(env, obs), "(thinking…)", [], head + "Reasoning…"
        reasoning = controller.start(env, obs, info, seed)
        rows, success = [], False
        for step in range(1, env.max_steps + 1):
            action, text = controller.act(obs)
            obs, _, terminated, truncated, step_info = env.step(action)
            success = bool(step_info["is_success"])
            rows.append([step, *(round(100 * float(v), 1) for v in action[:3]), round(float(action[3]), 2), text])
            done = terminated or truncated
            outcome = (f"**Success** in {step} steps" if success else f"**Failure** after {step} steps") if done \
                else f"Running… step {step}/{env.max_steps}"
            yield camera_frame(env, obs), reasoning, rows, head + outcome
            if done:
                break
    finally:
        env.close()


def policy_status(path: str | None) -> str | None:
    """``None`` when ``path`` is a usable policy folder, else why not (the policy module is imported only here)."""
    if not path:
        return "no policy folder given (--policy)"
    if not os.path.isdir(path):
        return f"no policy folder at {path!r}"
    from workbench.vla.policy import is_policy_folder

    return None if is_policy_folder(path) else f"{path!r} is not a policy folder (no policy_config.json)"


def build_app(policy_path: str | None = DEFAULT_POLICY) -> gr.Blocks:
    """The demo as a ``gr.Blocks``; the controller dropdown offers the policy only if ``policy_path`` holds one."""
    unavailable = policy_status(policy_path)
    controllers = [EXPERT] if unavailable else [POLICY, EXPERT]
    loaded = {}  # the policy, loaded on first use

    def make_controller(name: str) -> Controller:
        if name == EXPERT:
            return ExpertController()
        if name != POLICY or unavailable:
            raise gr.Error(f"Controller {name!r} is not available; choose one of {controllers}.")
        if "policy" not in loaded:
            from workbench.vla.policy import load_policy

            try:
                loaded["policy"] = load_policy(policy_path)
            except (OSError, ValueError) as exc:
                raise gr.Error(f"Could not load the ChatVLA-2 policy from {policy_path!r}: {exc}") from exc
        return PolicyController(loaded["policy"])

    def run(task_label, split, seed, custom, controller_name):
        yield from run_episode(make_controller(controller_name), task_label, split, seed, custom)

    with gr.Blocks(title="ChatVLA-2 workbench demo", analytics_enabled=False) as demo:
        gr.Markdown("# ChatVLA-2 workbench: reason, then act\nA simulated Panda reads the whiteboard or the "
                    "instruction, says what it concluded, then acts. Left: overview camera; right: the two "
                    "cameras the model sees (whiteboard, table from above).")
        with gr.Row():
            with gr.Column(scale=1):
                task = gr.Radio(list(TASKS), value="math matching", label="Task", elem_id="task")
                split = gr.Radio(["in_domain", "open_world"], value="in_domain", label="Split", elem_id="split")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                custom = gr.Textbox(label=CUSTOM_HINT["math matching"][0], placeholder=CUSTOM_HINT["math matching"][1],
                                    elem_id="custom")
                controller = gr.Dropdown(controllers, value=controllers[0], label="Controller", elem_id="controller",
                                         info=f"ChatVLA-2 policy unavailable: {unavailable}" if unavailable else None)
                run_button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                frame = gr.Image(label="Cameras", type="pil", interactive=False, elem_id="frame")
                status = gr.Markdown(elem_id="outcome")
                reasoning = gr.Textbox(label="Reasoning", lines=3, interactive=False, elem_id="reasoning")
        log = gr.Dataframe(headers=LOG_HEADERS, label="Actions (displacement per 10 Hz step; grip ≥ 0.5 closes)",
                           interactive=False, elem_id="log")
        task.change(lambda t: gr.Textbox(label=CUSTOM_HINT[t][0], placeholder=CUSTOM_HINT[t][1], value=""),
                    task, custom)
        run_button.click(run, [task, split, seed, custom, controller], [frame, reasoning, log, status])
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="ChatVLA-2 policy folder (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for the LAN)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build_app(policy_path=args.policy).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
