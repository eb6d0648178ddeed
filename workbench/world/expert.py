"""A scripted expert that solves both tasks from the simulator's ground truth.

The expert plans waypoints (above the object, down, grasp, up, over the goal, down, release) and
moves the commanded end-effector target towards the current waypoint by at most ``MAX_STEP`` per
control step. Each action is labelled with its phase (``reach``, ``grasp``, ``lift``, ``carry``,
``place``, ``release``, ``done``), which the dataset turns into step-level reasoning. If a grasp
misses, it goes back up and tries again (twice at most); it never raises inside an episode.
"""

from __future__ import annotations

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
