"""The Gymnasium environment: one Panda, two tasks (math matching, toy placement), two splits.

Observation (a ``dict``)::

    {"board": (96, 192, 3) uint8,   # whiteboard camera
     "table": (176, 256, 3) uint8,  # top-down table camera (image up = +x, left = +y)
     "state": (4,) float32}         # [ee_x, ee_y, ee_z] metres (robot frame), gripper width metres

Action (``(4,) float32``, one per control step at :data:`CONTROL_HZ` = 10 Hz)::

    [dx, dy, dz, grip]   # dx,dy,dz: end-effector displacement in metres per step, each in
                         # [-MAX_STEP, MAX_STEP] = [-0.04, 0.04] (<= 0.4 m/s); grip in [0, 1],
                         # >= 0.5 closes the gripper (grasps what is within reach), < 0.5 opens it.

The displacement moves the *commanded* end-effector target (clipped to the workspace
``scene.WORKSPACE_LOW``..``WORKSPACE_HIGH``); the arm follows it by inverse kinematics.
An episode ends (``terminated``) once the task is achieved and the gripper has let go, and is
truncated after ``max_steps`` (default 80 = 8 s).

``reset(seed=..., options=...)`` accepts (all optional)::

    math_matching: equation="3+4" | whiteboard=<PIL image or HxWx3 uint8> with answer=<0-9>,
                   writing_style=<name>, cards=[digits] or {digit: slot name or (x, y)}
    toy_placement: instruction="Pick the X and place it to the left of the Y" or
                   object=..., target=..., direction=..., toys=[names] or {name: (x, y)}
    both:          instruction=<text shown to the model>

``info`` carries the episode's ground truth (see :meth:`TabletopEnv.ground_truth`) and
``is_success``.
"""

from __future__ import annotations

import copy
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import language
from .catalog import (
    ANSWER_PAD,
    CARD_SLOTS,
    CARDS_PER_EPISODE,
    DIRECTIONS,
    OBJECTS,
    WRITING_STYLES,
    Equation,
    get_split,
)
from .grounding import affordance_ok, placement_reachable
from .scene import CAMERAS, CONTROL_HZ, HOME_EE, OVERVIEW, WORKSPACE_HIGH, WORKSPACE_LOW, TabletopScene
from .writing import as_rgb_image, render_text

MAX_STEP = 0.04
STATE_DIM = 4
ACTION_DIM = 4
#: toy placement: the goal is this far (centre to centre) from the target on the named side
PLACE_OFFSET = 0.11
#: success: along the direction, between these distances; across it, within this distance
PLACE_ALONG = (0.06, 0.20)
PLACE_ACROSS = 0.06
#: math matching: the answer card's centre within this distance of the pad centre (x and y)
PAD_TOLERANCE = 0.05
#: region where toys and goals may lie (x range, y range)
TOY_REGION = ((0.38, 0.68), (-0.22, 0.22))
MIN_SEPARATION = 0.10
#: caller-placed toys closer than this (metres, centre to centre) would overlap
TOY_OVERLAP = 0.06

_OPTIONS = {
    "math_matching": {"equation", "whiteboard", "answer", "writing_style", "cards", "instruction"},
    "toy_placement": {"instruction", "object", "target", "direction", "toys"},
}


class TabletopEnv(gym.Env):
    """ChatVLA-2's two tasks in PyBullet. See the module docstring for spaces and options.

    Args:
        task: ``"math_matching"`` or ``"toy_placement"``.
        split: ``"in_domain"`` or ``"open_world"`` (what random episodes are drawn from).
        cameras: which model cameras to render into observations (``()`` for state only: fast).
        render_mode: ``"rgb_array"`` to get a wide overview frame from :meth:`render`.
        max_steps: episode length limit in control steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, task: str = "math_matching", split: str = "in_domain",
                 cameras: tuple[str, ...] = ("board", "table"), render_mode: str | None = None,
                 max_steps: int = 80):
        self.spec_split = get_split(task, split)
        self.task, self.split = task, split
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; expected a subset of {list(CAMERAS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} is not supported; use None or 'rgb_array'")
        if not (isinstance(max_steps, int) and max_steps > 0):
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        self.cameras = tuple(cameras)
        self.render_mode = render_mode
        self.max_steps = max_steps
        obs = {c: spaces.Box(0, 255, (CAMERAS[c].height, CAMERAS[c].width, 3), np.uint8) for c in cameras}
        # end-effector position anywhere the arm can be (metres), gripper width 0-0.08 m
        obs["state"] = spaces.Box(np.array([-1.0, -1.0, -0.5, 0.0], np.float32),
                                  np.array([1.5, 1.0, 1.5, 0.1], np.float32), dtype=np.float32)
        self.observation_space = spaces.Dict(obs)
        self.action_space = spaces.Box(np.array([-MAX_STEP] * 3 + [0.0], np.float32),
                                       np.array([MAX_STEP] * 3 + [1.0], np.float32), dtype=np.float32)
        self.scene = TabletopScene()
        self._gt: dict[str, Any] = {}
        self._steps = 0

    # ------------------------------------------------------------------ episode setup
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - _OPTIONS[self.task]
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)} for {self.task}; "
                             f"allowed: {sorted(_OPTIONS[self.task])}")
        rng = self.np_random
        if self.task == "math_matching":
            self._gt = self._setup_math(options, rng)
        else:
            self._gt = self._setup_toys(options, rng)
        self._gt.update(task=self.task, split=self.split)
        self.scene.reset_robot()
        self._steps = 0
        return self._obs(), self._info()

    def _setup_math(self, opt: dict, rng: np.random.Generator) -> dict:
        split = self.spec_split
        style = opt.get("writing_style")
        if style is not None and style not in WRITING_STYLES:
            raise ValueError(f"unknown writing_style {style!r}; expected one of {list(WRITING_STYLES)}")
        if "whiteboard" in opt:
            if "equation" in opt:
                raise ValueError("give either 'equation' or 'whiteboard' (with 'answer'), not both")
            answer = opt.get("answer")
            if isinstance(answer, (bool, np.bool_)) or not (isinstance(answer, (int, np.integer)) and 0 <= answer <= 9):
                raise ValueError(f"a caller's whiteboard needs answer=<int 0-9>, got {answer!r}")
            board = as_rgb_image(opt["whiteboard"], "whiteboard")
            equation, style = None, None
        else:
            if "answer" in opt:
                raise ValueError("'answer' goes with a caller's 'whiteboard' image; with 'equation' "
                                 "the answer is computed")
            if "equation" in opt:
                eq = Equation.parse(str(opt["equation"]))
            else:
                eq = split.equations[rng.integers(len(split.equations))]
            style = style or split.writing_styles[rng.integers(len(split.writing_styles))]
            board = render_text(eq.text, style, seed=int(rng.integers(2**31)))
            equation, answer = eq.text, eq.answer
        cards = self._card_layout(opt.get("cards"), int(answer), rng)
        self.scene.set_whiteboard(board)
        self.scene.populate(cards={d: xy for d, (_, xy) in cards.items()}, toys={})
        instruction = opt["instruction"] if "instruction" in opt else language.math_instruction(rng)
        _check_text(instruction, "instruction")
        return {
            "instruction": instruction, "equation": equation, "answer": int(answer),
            "writing_style": style, "cards": {d: slot for d, (slot, _) in cards.items()},
            "answer_card_slot": cards[int(answer)][0],
            "answer_card_xy": [round(v, 4) for v in cards[int(answer)][1]],
        }

    def _card_layout(self, cards, answer: int, rng) -> dict[int, tuple[str, tuple[float, float]]]:
        """digit -> (slot name, (x, y))."""
        slots = list(CARD_SLOTS)
        if cards is None:
            others = [d for d in range(10) if d != answer]
            digits = [answer, *rng.choice(others, CARDS_PER_EPISODE - 1, replace=False).tolist()]
            cards = list(digits)
        if isinstance(cards, (list, tuple)):
            if len(set(cards)) < len(cards):
                raise ValueError(f"cards {list(cards)} repeat a digit; each digit has one card")
            if len(cards) > len(slots):
                raise ValueError(f"at most {len(slots)} cards fit on the table, got {len(cards)}")
            chosen = rng.choice(len(slots), len(cards), replace=False)
            cards = {d: slots[i] for d, i in zip(cards, chosen)}
        if not isinstance(cards, dict):
            raise ValueError("cards must be a list of digits or a dict {digit: slot name or (x, y)}")
        out = {}
        for d, where in cards.items():
            if isinstance(d, (bool, np.bool_)) or not (isinstance(d, (int, np.integer)) and 0 <= d <= 9):
                raise ValueError(f"card {d!r} is out of range; cards are the digits 0-9")
            if isinstance(where, str):
                if where not in CARD_SLOTS:
                    raise ValueError(f"unknown card slot {where!r}; expected one of {list(CARD_SLOTS)}")
                x, y = CARD_SLOTS[where]
                x, y = x + rng.uniform(-0.01, 0.01), y + rng.uniform(-0.01, 0.01)
            else:
                x, y = _check_xy(where, f"card {d} position")
            out[int(d)] = (language.describe_position(x, y), (x, y))
        if answer not in out:
            raise ValueError(f"the answer card {answer} is not among the cards {sorted(out)}")
        if len({s for s, _ in out.values()}) < len(out):
            raise ValueError("two cards share a slot; give each card its own slot or position")
        return out

    def _setup_toys(self, opt: dict, rng: np.random.Generator) -> dict:
        split = self.spec_split
        if "instruction" in opt:
            _check_text(opt["instruction"], "instruction")
            obj, target, direction = language.parse_toy_instruction(opt["instruction"])
            given = {k: opt[k] for k in ("object", "target", "direction") if k in opt}
            said = {"object": obj, "target": target, "direction": direction}
            clash = {k: v for k, v in given.items() if v != said[k]}
            if clash:
                raise ValueError(f"the instruction {opt['instruction']!r} says "
                                 f"{ {k: said[k] for k in clash} } but the options say {clash}; give one of them, "
                                 "or make them agree")
        else:
            obj = opt.get("object") or split.objects[rng.integers(len(split.objects))]
            pool = [o for o in split.scene_objects if o != obj]
            target = opt.get("target") or pool[rng.integers(len(pool))]
            direction = opt.get("direction") or list(split.directions)[rng.integers(len(split.directions))]
        for what, name in (("object", obj), ("target", target)):
            if name not in OBJECTS:
                raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(OBJECTS)}")
        if obj == target:
            raise ValueError(f"object and target are both {obj!r}; they must differ")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {list(DIRECTIONS)}")
        toys = opt.get("toys")
        if toys is None:
            pool = [o for o in split.scene_objects if o not in (obj, target)]
            n_distract = int(rng.integers(1, 3))
            toys = [obj, target, *rng.choice(pool, n_distract, replace=False).tolist()]
        if isinstance(toys, (list, tuple)):
            for n in toys:
                if n not in OBJECTS:
                    raise ValueError(f"unknown toy {n!r}; expected one of {sorted(OBJECTS)}")
            if len(set(toys)) < len(toys):
                raise ValueError(f"toys {list(toys)} name a toy twice; each toy is on the table once")
            for n in (obj, target):
                if n not in toys:
                    raise ValueError(f"{n!r} is named in the task but is not among the toys {list(toys)}")
            layout = self._toy_layout(list(toys), obj, target, direction, rng)
        elif isinstance(toys, dict):
            layout = {}
            for n, where in toys.items():
                if n not in OBJECTS:
                    raise ValueError(f"unknown toy {n!r}; expected one of {sorted(OBJECTS)}")
                x, y = _check_xy(where, f"toy {n!r} position")
                for m, (xm, ym, _) in layout.items():
                    if np.hypot(x - xm, y - ym) < TOY_OVERLAP:
                        raise ValueError(f"toys {m!r} at ({xm:.3f}, {ym:.3f}) and {n!r} at ({x:.3f}, {y:.3f}) are "
                                         f"closer than {TOY_OVERLAP} m; they would overlap")
                layout[n] = (x, y, 0.0)
        else:
            raise ValueError("toys must be a list of object names or a dict {name: (x, y)}")
        for n in (obj, target):
            if n not in layout:
                raise ValueError(f"{n!r} is named in the task but is not among the toys {list(layout)}")
        instruction = (opt["instruction"] if "instruction" in opt
                       else language.toy_instruction(obj, target, direction, rng))
        _check_text(instruction, "instruction")
        self.scene.set_whiteboard(render_text("", "sans"))
        self.scene.populate(cards={}, toys=layout)
        return {"instruction": instruction, "object": obj, "target": target, "direction": direction,
                "toys": {n: [round(v, 4) for v in xy[:2]] for n, xy in layout.items()}}

    def _toy_layout(self, names, obj, target, direction, rng):
        (x0, x1), (y0, y1) = TOY_REGION
        d = np.array(DIRECTIONS[direction])
        for _ in range(500):
            t = np.array([rng.uniform(x0 + 0.04, x1 - 0.04), rng.uniform(y0 + 0.04, y1 - 0.04)])
            goal = t + PLACE_OFFSET * d
            if not (x0 <= goal[0] <= x1 and y0 <= goal[1] <= y1):
                continue
            placed = {target: t}
            ok = True
            for n in names:
                if n == target:
                    continue
                for _ in range(200):
                    q = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
                    if all(np.linalg.norm(q - v) >= MIN_SEPARATION for v in placed.values()) and \
                            np.linalg.norm(q - goal) >= MIN_SEPARATION:
                        placed[n] = q
                        break
                else:
                    ok = False
                    break
            if ok:
                return {n: (float(v[0]), float(v[1]), float(rng.uniform(-0.4, 0.4))) for n, v in placed.items()}
        raise RuntimeError("could not lay out the toys; try fewer objects")

    # ------------------------------------------------------------------ stepping
    def step(self, action):
        a = np.asarray(action, dtype=np.float32)
        if a.shape != (ACTION_DIM,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers [dx, dy, dz, grip], got {action!r}")
        a = np.clip(a, self.action_space.low, self.action_space.high)
        self.scene.step(self.scene.ee_target + a[:3], bool(a[3] >= 0.5))
        self._steps += 1
        success = self.is_success()
        terminated = bool(success and self.scene.grasped is None)
        truncated = bool(not terminated and self._steps >= self.max_steps)
        return self._obs(), float(success), terminated, truncated, self._info(success)

    def is_success(self) -> bool:
        return self.achieved(self._gt)

    def achieved(self, ground_truth: dict) -> bool:
        """Whether the task of ``ground_truth`` (this episode's, or another in the same scene) is done now: its
        answer card on the pad, or its object on the named side of its target, released."""
        if self.task == "math_matching":
            return self.card_on_pad(ground_truth["answer"])
        return self.toy_placed(ground_truth["object"], ground_truth["target"], ground_truth["direction"])

    def card_on_pad(self, digit: int) -> bool:
        """Whether the card ``digit`` lies on the answer pad (released)."""
        s = self.scene
        body = s.cards[digit]
        pos = s.body_position(body)
        return bool(body != s.grasped and abs(pos[0] - ANSWER_PAD[0]) < PAD_TOLERANCE
                    and abs(pos[1] - ANSWER_PAD[1]) < PAD_TOLERANCE and pos[2] < 0.04)

    def toy_placed(self, obj: str, target: str, direction: str) -> bool:
        """Whether toy ``obj`` rests ``direction`` of toy ``target`` (released, on the table)."""
        s = self.scene
        body = s.toys[obj]
        lo, _ = s.body_aabb(body)
        return bool(body != s.grasped and lo[2] < 0.02
                    and affordance_ok(s.body_center(body), s.body_center(s.toys[target]), direction))

    # ------------------------------------------------------------------ ground truth & helpers
    def ground_truth(self) -> dict:
        """The episode's ground truth: task, split, instruction and either (equation, answer,
        writing_style, cards {digit: slot}, answer_card_slot, answer_card_xy [x, y]) or (object, target,
        direction, toys {name: [x, y]})."""
        return copy.deepcopy(self._gt)

    def counterfactual_task(self, rng: np.random.Generator) -> tuple[dict, str]:
        """Another task in this scene, as (its ground truth, the kind of change). Math matching: another card on
        the table is "the answer", of another equation of the split with that answer (``"card"``; its reasoning
        reads as an episode of that equation, while the board still shows the scene's own). Toy placement:
        alternately the object goes to another side of the target (``"side"``) or another toy goes where the
        object should (``"object"``). Positions are read from the simulator, so the boxes of its reasoning are
        exact. The instruction stays the scene's own. Counterfactual following hands a policy this task's
        reasoning; :meth:`retarget` makes it the task the episode checks."""
        gt = self.ground_truth()
        if self.task == "math_matching":
            others = sorted(d for d in gt["cards"] if int(d) != gt["answer"])
            d = int(others[rng.integers(len(others))])
            equations = [e for e in self.spec_split.equations if e.answer == d]  # the split has each digit
            return {**self._answering_card(gt, d), "equation": equations[rng.integers(len(equations))].text}, "card"
        toys = gt["toys"]
        if rng.random() < 0.5 or len(toys) < 3:
            sides = [d for d in DIRECTIONS if d != gt["direction"] and placement_reachable(toys[gt["target"]], d)]
            if sides:
                gt["direction"] = sides[rng.integers(len(sides))]
                return gt, "side"
        others = [n for n in toys if n not in (gt["object"], gt["target"])]
        gt["object"] = others[rng.integers(len(others))]
        return gt, "object"

    def stated_task(self, facts) -> dict | None:
        """The task that a reasoning states in this scene, from its facts (:func:`~workbench.world.language.
        parse_reasoning`), as a ground truth for :meth:`retarget`: math, the card it names, if that card is on the
        table; toys, its object, target and side, if they are two toys of the scene and a direction. None when the
        facts state no such task."""
        gt = self.ground_truth()
        if self.task == "math_matching":
            return None if facts.card not in gt["cards"] else self._answering_card(gt, facts.card)
        names = (facts.object, facts.target)
        if names[0] == names[1] or any(n not in gt["toys"] for n in names) or facts.direction not in DIRECTIONS:
            return None
        gt.update(object=facts.object, target=facts.target, direction=facts.direction)
        return gt

    def _answering_card(self, gt: dict, digit: int) -> dict:
        """``gt`` with card ``digit`` (on the table) as the answer card: its slot and where it lies now."""
        xy = self.scene.body_position(self.scene.cards[digit])[:2]
        return {**gt, "answer": digit, "answer_card_slot": gt["cards"][digit],
                "answer_card_xy": [float(v) for v in xy]}

    def retarget(self, ground_truth: dict) -> None:
        """Make ``ground_truth`` (another task in the same scene, e.g. from :meth:`counterfactual_task`) the
        episode's task: success, termination, :meth:`pick_and_place_targets` (the scripted expert) and
        :meth:`ground_truth` follow it from now on; the scene, the board and the instruction stay as reset."""
        if not self._gt:
            raise RuntimeError("retarget() needs a reset episode")
        scene_keys = ("task", "split", "instruction", "cards", "toys", "writing_style")
        changed = [k for k in scene_keys if ground_truth.get(k) != self._gt.get(k)]
        if changed:
            raise ValueError(f"retarget() takes another task in the same scene; {changed} differ from the episode's")
        if self.task == "math_matching":
            if int(ground_truth["answer"]) not in self._gt["cards"]:
                raise ValueError(f"card {ground_truth['answer']} is not on the table; "
                                 f"cards: {list(self._gt['cards'])}")
        else:
            names = [ground_truth[k] for k in ("object", "target")]
            if any(n not in self._gt["toys"] for n in names) or names[0] == names[1]:
                raise ValueError(f"object and target must be two toys of the scene {list(self._gt['toys'])}, "
                                 f"got {names}")
            if ground_truth["direction"] not in DIRECTIONS:
                raise ValueError(f"direction must be one of {list(DIRECTIONS)}, "
                                 f"got {ground_truth['direction']!r}")
        self._gt = copy.deepcopy({k: v for k, v in ground_truth.items() if k not in ("is_success", "step")})

    def pick_and_place_targets(self) -> tuple[int, np.ndarray]:
        """(body to pick, (x, y) where it must go) — what a scripted expert needs."""
        s = self.scene
        if self.task == "math_matching":
            return s.cards[self._gt["answer"]], np.array(ANSWER_PAD)
        goal = s.body_center(s.toys[self._gt["target"]])[:2] + PLACE_OFFSET * np.array(
            DIRECTIONS[self._gt["direction"]])
        return s.toys[self._gt["object"]], goal

    def _state(self) -> np.ndarray:
        return np.array([*self.scene.ee_position(), self.scene.gripper_width()], dtype=np.float32)

    def _obs(self) -> dict:
        obs = self.scene.render(self.cameras) if self.cameras else {}
        obs["state"] = self._state()
        return obs

    def _info(self, success: bool | None = None) -> dict:
        info = self.ground_truth()
        info["is_success"] = self.is_success() if success is None else success
        info["step"] = self._steps
        return info

    def render(self):
        if self.render_mode == "rgb_array":
            return self.scene.render([OVERVIEW.name])[OVERVIEW.name]
        return None

    def close(self):
        self.scene.close()


def commanded_targets(actions, start=HOME_EE) -> np.ndarray:
    """What the env makes of a sequence of actions (T, 4): the commanded end-effector target after each one,
    with the gripper command, (T, 4) = [x, y, z, grip]. ``start`` is the commanded target before the first
    action (after ``reset`` it is the home pose). Deltas are clipped to ``MAX_STEP`` and targets to the
    workspace, exactly as :meth:`TabletopEnv.step` does."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1, ACTION_DIM)
    cmd, out = np.asarray(start, dtype=np.float64)[:3].copy(), np.empty_like(a)
    for t, step in enumerate(a):
        cmd = np.clip(cmd + np.clip(step[:3], -MAX_STEP, MAX_STEP), WORKSPACE_LOW, WORKSPACE_HIGH)
        out[t] = [*cmd, step[3]]
    return out.astype(np.float32)


def actions_towards(start, targets) -> np.ndarray:
    """The inverse of :func:`commanded_targets`: actions (T, 4) that move the commanded target from ``start``
    (3,) through ``targets`` (T, 4) [x, y, z, grip], each step at most ``MAX_STEP`` per axis (a target out of
    reach is approached, and the next step starts from where the command really is)."""
    t = np.asarray(targets, dtype=np.float64).reshape(-1, ACTION_DIM)
    cmd, out = np.asarray(start, dtype=np.float64)[:3].copy(), np.empty_like(t)
    for k, goal in enumerate(t):
        nxt = np.clip(goal[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        step = np.clip(nxt - cmd, -MAX_STEP, MAX_STEP)
        cmd = cmd + step
        out[k] = [*step, np.clip(goal[3], 0.0, 1.0)]
    return out.astype(np.float32)


def _check_xy(where, what: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in where)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (x, y) in metres, got {where!r}") from None
    (x0, x1), (y0, y1) = TOY_REGION
    if not (x0 - 0.02 <= x <= x1 + 0.02 and y0 - 0.02 <= y <= y1 + 0.02):
        raise ValueError(f"{what} ({x:.3f}, {y:.3f}) is off the reachable table area "
                         f"x in [{x0}, {x1}], y in [{y0}, {y1}]")
    return x, y


def _check_text(text, what: str) -> None:
    language.check_text(text, what, max_chars=500)


def make_env(task: str = "math_matching", split: str = "in_domain", **kwargs) -> TabletopEnv:
    """Build a :class:`TabletopEnv` (same arguments)."""
    return TabletopEnv(task, split, **kwargs)
