"""A scripted expert that solves both tasks from the simulator's ground truth, and episode rollouts.

The expert plans waypoints (above the object, down, grasp, up, over the goal, down, release) and
moves the commanded end-effector target towards the current waypoint by at most ``MAX_STEP`` per
control step. Each action is labelled with its phase (``reach``, ``grasp``, ``lift``, ``carry``,
``place``, ``release``, ``done``), which the dataset turns into step-level reasoning. If a grasp
misses, it goes back up and tries again (twice at most); it never raises inside an episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .env import MAX_STEP, TabletopEnv

LIFT_Z = 0.17
GRASP_HOLD_STEPS = 2
RELEASE_STEPS = 2


class ScriptedExpert:
    """``act(obs) -> (action, phase)`` for a :class:`TabletopEnv` that was just reset."""

    def __init__(self, env: TabletopEnv):
        self.env = env.unwrapped if hasattr(env, "unwrapped") else env
        self.reset()

    def reset(self):
        self.phase = "reach"
        self._hold = 0
        self._retries = 0
        self._plan = None

    def _make_plan(self):
        env = self.env
        body, goal = env.pick_and_place_targets()
        lo, hi = env.scene.body_aabb(body)
        centre = (lo + hi) / 2
        grasp_z = max(hi[2] - 0.015, 0.015)
        # the object's bottom sits (grasp_z - lo_z) below the hand; put it down 1 cm above the table
        place_z = grasp_z - lo[2] + 0.012
        self._plan = {
            "above": np.array([centre[0], centre[1], LIFT_Z]),
            "grasp": np.array([centre[0], centre[1], grasp_z]),
            "lifted": np.array([centre[0], centre[1], LIFT_Z]),
            "over_goal": np.array([goal[0], goal[1], LIFT_Z]),
            "placed": np.array([goal[0], goal[1], place_z]),
            "retreat": np.array([goal[0], goal[1], LIFT_Z]),
        }

    def _move(self, waypoint, grip: float, tol: float = 0.012):
        """Action towards ``waypoint``; returns (action, arrived)."""
        scene = self.env.scene
        delta = np.clip(waypoint - scene.ee_target, -MAX_STEP, MAX_STEP)
        arrived = (np.linalg.norm(waypoint - scene.ee_target) < 1e-4
                   and np.linalg.norm(waypoint - scene.ee_position()) < tol)
        return np.array([*delta, grip], dtype=np.float32), arrived

    def act(self, obs=None) -> tuple[np.ndarray, str]:
        if self._plan is None:
            self._make_plan()
        plan, scene = self._plan, self.env.scene
        phase = self.phase
        if phase == "reach":
            a, ok = self._move(plan["above"], 0.0, tol=0.02)
            if ok:
                self.phase = "descend"
            return a, "reach"
        if phase == "descend":
            a, ok = self._move(plan["grasp"], 0.0)
            if ok:
                self.phase, self._hold = "grasp", 0
            return a, "grasp"
        if phase == "grasp":
            self._hold += 1
            if self._hold > GRASP_HOLD_STEPS:
                if scene.grasped is None and self._retries < 2:  # missed: go up and re-plan
                    self._retries += 1
                    self._make_plan()
                    self.phase = "regrasp"
                else:
                    self.phase = "lift"
            return np.array([0, 0, 0, 1.0], dtype=np.float32), "grasp"
        if phase == "regrasp":
            a, ok = self._move(plan["above"], 0.0, tol=0.02)
            if ok:
                self.phase = "descend"
            return a, "reach"
        if phase == "lift":
            a, ok = self._move(plan["lifted"], 1.0, tol=0.02)
            if ok:
                self.phase = "carry"
            return a, "lift"
        if phase == "carry":
            a, ok = self._move(plan["over_goal"], 1.0, tol=0.015)
            if ok:
                self.phase = "place"
            return a, "carry"
        if phase == "place":
            a, ok = self._move(plan["placed"], 1.0)
            if ok:
                self.phase, self._hold = "release", 0
            return a, "place"
        if phase == "release":
            self._hold += 1
            if self._hold >= RELEASE_STEPS:
                self.phase = "done"
            return np.array([0, 0, 0, 0.0], dtype=np.float32), "release"
        a, _ = self._move(plan["retreat"], 0.0)
        return a, "done"


@dataclass
class Episode:
    """One rollout. ``frames[camera]`` is (T, H, W, 3) uint8 for the T observations *before* each
    action; ``states`` (T, 4); ``actions`` (T, 4); ``phases`` T strings; ``ground_truth`` the
    episode's info at reset; ``success`` whether it succeeded; ``overview`` optional (T+1) frames."""

    seed: int | None
    ground_truth: dict
    states: np.ndarray
    actions: np.ndarray
    phases: list[str]
    success: bool
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    overview: np.ndarray | None = None
    error: str | None = None

    def __len__(self) -> int:
        return len(self.actions)

    def __repr__(self) -> str:
        gt = self.ground_truth
        what = gt.get("equation") or f"{gt.get('object')} -> {gt.get('direction')} of {gt.get('target')}"
        return (f"Episode({gt['task']}/{gt['split']}, seed={self.seed}, {what}, steps={len(self)}, "
                f"success={self.success})")


def rollout(env: TabletopEnv, policy=None, seed: int | None = None, options: dict | None = None,
            record_overview: bool = False) -> Episode:
    """Run one episode. ``policy(obs) -> (action, phase)``; default: a fresh :class:`ScriptedExpert`.

    Exceptions raised by the policy or the simulator while stepping end the episode as a failure
    (``Episode.error`` says why) instead of escaping, so long evaluations keep going.
    """
    obs, info = env.reset(seed=seed, options=options)
    if policy is None:
        policy = ScriptedExpert(env).act
    frames = {c: [] for c in env.unwrapped.cameras}
    states, actions, phases, overview = [], [], [], []
    success, error = False, None
    if record_overview:
        overview.append(env.unwrapped.scene.render(["overview"])["overview"])
    try:
        while True:
            action, phase = policy(obs)
            for c in frames:
                frames[c].append(obs[c])
            states.append(obs["state"])
            actions.append(np.asarray(action, dtype=np.float32))
            phases.append(phase)
            obs, _, terminated, truncated, step_info = env.step(action)
            if record_overview:
                overview.append(env.unwrapped.scene.render(["overview"])["overview"])
            success = bool(step_info["is_success"])
            if terminated or truncated:
                break
    except Exception as exc:  # noqa: BLE001 - an episode failure, reported, never raised
        error = f"{type(exc).__name__}: {exc}"
        success = False
    return Episode(
        seed=seed, ground_truth=info, states=np.array(states, np.float32).reshape(-1, 4),
        actions=np.array(actions, np.float32).reshape(-1, 4), phases=phases, success=success,
        frames={c: np.array(v) for c, v in frames.items()},
        overview=np.array(overview) if record_overview else None, error=error)
