"""The simulated world (sim side): scene, tasks and splits, Gymnasium env, scripted expert, language."""

import gymnasium as gym

from .catalog import OBJECTS, SPLITS, TASKS, WRITING_STYLES, Equation, get_split
from .env import TabletopEnv, make_env
from .expert import ScriptedExpert
from .rollout import Episode, rollout, steps

for _task, _id in (("math_matching", "MathMatching"), ("toy_placement", "ToyPlacement")):
    if f"workbench/{_id}-v0" not in gym.registry:
        gym.register(f"workbench/{_id}-v0", entry_point="workbench.world.env:TabletopEnv",
                     kwargs={"task": _task}, max_episode_steps=None)

__all__ = ["OBJECTS", "SPLITS", "TASKS", "WRITING_STYLES", "Equation", "Episode", "ScriptedExpert",
           "TabletopEnv", "get_split", "make_env", "rollout", "steps"]
