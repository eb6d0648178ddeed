"""The one closed control loop: a controller acts on observations until the episode ends.

:func:`steps` is the loop itself (a generator of :class:`Step`, so a caller can stream, record or time it);
:func:`rollout` runs it to the end and returns an :class:`Episode`. Everything that drives the env -- the
dataset's demonstrations, closed-loop evaluation, the notebooks' players, the live demo, the benchmarks --
goes through :func:`steps`.

A *controller* is any callable ``controller(obs) -> (action, note)``, e.g. the scripted expert's ``act`` (the
note is its phase); one with a ``start(env, obs, info, seed)`` method (:mod:`workbench.controllers`: the expert
with its reasoning, a ChatVLA-2 policy) is started by :func:`rollout` right after the reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .env import TabletopEnv

Controller = Callable[[dict], tuple[np.ndarray, str]]


@dataclass
class Step:
    """One control step: ``obs`` (before), the ``action`` taken and its ``note``, ``next_obs`` (after),
    the env's step ``info``, and whether the episode is ``done`` and a ``success`` so far."""

    t: int
    obs: dict
    action: np.ndarray
    note: str
    next_obs: dict
    info: dict
    done: bool
    success: bool


def steps(env: TabletopEnv, controller: Controller, obs: dict) -> Iterator[Step]:
    """Step ``env`` from observation ``obs`` with ``controller`` until it terminates or is truncated."""
    t = 0
    while True:
        action, note = controller(obs)
        action = np.asarray(action, dtype=np.float32)
        next_obs, _, terminated, truncated, info = env.step(action)
        done = bool(terminated or truncated)
        yield Step(t, obs, action, note, next_obs, info, done, bool(info["is_success"]))
        if done:
            return
        obs, t = next_obs, t + 1


@dataclass
class Episode:
    """One rollout. ``frames[camera]`` is (T, H, W, 3) uint8 for the T observations *before* each
    action; ``states`` (T, 4); ``actions`` (T, 4); ``phases`` T notes (the expert's phases); ``ground_truth``
    the episode's info at reset; ``success`` whether it succeeded; ``overview`` optional (T+1) frames;
    ``reasoning`` what the controller said before acting (if it says anything)."""

    seed: int | None
    ground_truth: dict
    states: np.ndarray
    actions: np.ndarray
    phases: list[str]
    success: bool
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    overview: np.ndarray | None = None
    error: str | None = None
    reasoning: str | None = None

    def __len__(self) -> int:
        return len(self.actions)

    def __repr__(self) -> str:
        gt = self.ground_truth
        what = gt.get("equation") or f"{gt.get('object')} -> {gt.get('direction')} of {gt.get('target')}"
        return (f"Episode({gt['task']}/{gt['split']}, seed={self.seed}, {what}, steps={len(self)}, "
                f"success={self.success})")


def rollout(env: TabletopEnv, controller: Controller | None = None, seed: int | None = None,
            options: dict | None = None, record_overview: bool = False) -> Episode:
    """Reset ``env`` and run one episode with ``controller`` (default: a fresh scripted expert); a controller
    with a ``start`` method is started first (its return value, the reasoning, is ``Episode.reasoning``).

    Exceptions raised by the controller or the simulator while stepping end the episode as a failure
    (``Episode.error`` says why) instead of escaping, so long evaluations keep going.
    """
    from .expert import ScriptedExpert

    obs, info = env.reset(seed=seed, options=options)
    if controller is None:
        controller = ScriptedExpert(env).act
    cameras = env.unwrapped.cameras
    frames = {c: [] for c in cameras}
    states, actions, phases, overview = [], [], [], []
    success, error, reasoning = False, None, None

    def snapshot():
        if record_overview:
            overview.append(env.unwrapped.scene.render(["overview"])["overview"])

    snapshot()
    try:
        if hasattr(controller, "start"):
            reasoning = controller.start(env, obs, info, seed)
        for step in steps(env, controller, obs):
            for c in frames:
                frames[c].append(step.obs[c])
            states.append(step.obs["state"])
            actions.append(step.action)
            phases.append(step.note)
            snapshot()
            success = step.success
    except Exception as exc:  # noqa: BLE001 - an episode failure, reported, never raised
        error = f"{type(exc).__name__}: {exc}"
        success = False
    return Episode(
        seed=seed, ground_truth=info, states=np.array(states, np.float32).reshape(-1, 4),
        actions=np.array(actions, np.float32).reshape(-1, 4), phases=phases, success=success,
        frames={c: np.array(v) for c, v in frames.items()},
        overview=np.array(overview) if record_overview else None, error=error, reasoning=reasoning)
