"""What drives the robot in the closed loop (:mod:`workbench.world.rollout`): the scripted expert or a ChatVLA-2
policy, behind one interface, used by evaluation, the notebooks' players and the live demo alike.

A controller is called after ``env.reset`` as ``start(env, obs, info, seed, streamer=None) -> reasoning`` (the
episode's reasoning text; ``streamer`` receives a policy's generated tokens as they come), then as
``controller(obs) -> (action, note)`` once per step; ``path()`` is the latest predicted end-effector path.

    >>> ep = rollout(env, PolicyController(policy), seed=3)
    >>> ep = rollout(env, PolicyController(policy, reasoning="..."), seed=3)  # follow a given reasoning
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .world import language
from .world.expert import ScriptedExpert


def describe_action(action) -> str:
    """``[0.03, 0.01, -0.02, 1]`` -> ``"moving forward, left and down, gripper closed"`` (ignores axes under 5 mm)."""
    dx, dy, dz, grip = (float(v) for v in action)
    words = [pos if v > 0 else neg for v, pos, neg in ((dx, "forward", "back"), (dy, "left", "right"),
                                                       (dz, "up", "down")) if abs(v) >= 0.005]
    motion = "moving " + ", ".join(words[:-1]) + " and " * (len(words) > 1) + words[-1] if words else "holding still"
    return f"{motion}, gripper {'closed' if grip >= 0.5 else 'open'}"


class ExpertController:
    """The scripted expert. Its reasoning and step notes are the dataset's annotations of the ground truth
    (``language.episode_reasoning`` / ``step_reasoning``)."""

    def start(self, env, obs, info, seed=None, streamer=None) -> str:
        self.expert, self.info = ScriptedExpert(env), info
        self.rng = np.random.default_rng(seed)
        return language.episode_reasoning(info, self.rng)

    def __call__(self, obs):
        action, phase = self.expert.act(obs)
        return action, language.step_reasoning(phase, self.info, self.rng)

    def path(self):
        return None


class PolicyController:
    """A ChatVLA-2 policy (:class:`~workbench.vla.policy.ChatVLA2Policy`). ``start`` resets it with the episode's
    seed (the same seed replays the same episode) and generates its reasoning, or makes it follow ``reasoning``:
    a text, or a function ``(info, seed) -> text`` (e.g. the ground truth's annotation). Step notes say what the
    action does."""

    def __init__(self, policy, reasoning: str | Callable[[dict, int | None], str] | None = None):
        self.policy, self.reasoning = policy, reasoning

    def start(self, env, obs, info, seed=None, streamer=None) -> str:
        self.policy.reset(seed=seed)
        self.instruction = info["instruction"]
        given = self.reasoning(info, seed) if callable(self.reasoning) else self.reasoning
        if given is None:
            given = self.policy.generate_reasoning(obs, self.instruction, streamer=streamer) or "."
        self.policy.set_reasoning(given, self.instruction)
        return given

    def __call__(self, obs):
        action = self.policy.select_action(obs, self.instruction)
        return action, describe_action(action)

    def path(self):
        targets = getattr(self.policy, "last_targets", None)
        return None if targets is None else np.asarray(targets)[:, :3]
