"""Everything the miniature world is made of, as data: objects, writing styles, equations and splits.

This module is the *one place* where the in-domain / open-world splits are defined. The rest of the
code (scene, environment, dataset, evaluation) only reads from here, so a split can be audited by
reading this file alone.

Conventions (robot frame, metres): the Panda's base is at the origin on the table top (z = 0),
facing +x. "left" is +y, "right" is -y, "behind" is +x (away from the robot), "front" is -x
(towards the robot): the directions a person standing behind the robot would use, and the ones the
top-down table camera shows (image up = +x, image left = +y).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# Toy objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """A toy object: what people call it and how to build it in PyBullet.

    ``kind`` is one of ``"urdf"`` (a file from ``pybullet_data``), ``"mesh"`` (an OBJ from
    ``pybullet_data`` used for both collision and visual) or ``"box" | "sphere" | "cylinder"``
    (a coloured primitive of the given ``size``: box half-extents, sphere radius, cylinder
    (radius, height)).
    """

    name: str
    kind: str
    asset: str = ""
    scale: float = 1.0
    size: tuple[float, ...] = ()
    rgba: tuple[float, float, float, float] | None = None
    euler: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mass: float = 0.1


OBJECTS: dict[str, ObjectSpec] = {
    o.name: o
    for o in [
        ObjectSpec("yellow duck", "urdf", "duck_vhacd.urdf", scale=0.7, rgba=(1.0, 0.85, 0.1, 1)),
        ObjectSpec("teddy bear", "urdf", "teddy_vhacd.urdf", scale=0.7, rgba=(0.55, 0.33, 0.15, 1)),
        ObjectSpec("soccer ball", "urdf", "soccerball.urdf", scale=0.06),
        ObjectSpec("red mug", "urdf", "objects/mug.urdf", scale=0.55, rgba=(0.85, 0.1, 0.1, 1)),
        ObjectSpec("green lego brick", "urdf", "lego/lego.urdf", scale=1.7, rgba=(0.1, 0.7, 0.2, 1)),
        ObjectSpec("jenga block", "urdf", "jenga/jenga.urdf", scale=0.5),
        ObjectSpec("white rabbit", "mesh", "bunny.obj", scale=0.045, rgba=(0.95, 0.95, 0.95, 1),
                   euler=(1.5708, 0.0, 0.0)),
        ObjectSpec("pink donut", "mesh", "torus/torus_textured.obj", scale=0.042,
                   rgba=(1.0, 0.45, 0.7, 1), euler=(1.5708, 0.0, 0.0)),
        ObjectSpec("red cube", "box", size=(0.025, 0.025, 0.025), rgba=(0.9, 0.1, 0.1, 1)),
        ObjectSpec("blue cube", "box", size=(0.025, 0.025, 0.025), rgba=(0.1, 0.2, 0.95, 1)),
        ObjectSpec("green cylinder", "cylinder", size=(0.025, 0.06), rgba=(0.1, 0.75, 0.3, 1)),
        ObjectSpec("orange can", "cylinder", size=(0.032, 0.045), rgba=(1.0, 0.5, 0.0, 1)),
        ObjectSpec("purple ball", "sphere", size=(0.028,), rgba=(0.55, 0.15, 0.8, 1)),
        ObjectSpec("black box", "box", size=(0.035, 0.022, 0.02), rgba=(0.08, 0.08, 0.08, 1)),
    ]
}

# --------------------------------------------------------------------------------------------
# Writing styles (whiteboard equations)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WritingStyle:
    """How an equation is written on the whiteboard.

    ``kind == "font"``: a TrueType font shipped with matplotlib (``source`` is the file name).
    ``kind == "hand"``: a Hershey stroke font (``source`` is its name) drawn with per-point jitter,
    slant and wobble, so that every rendering looks like a different hand.
    """

    name: str
    kind: str
    source: str
    jitter: float = 0.0  # stroke jitter, as a fraction of the character height
    slant: float = 0.0  # shear: x += slant * height_above_baseline
    stroke: float = 0.09  # stroke width, as a fraction of the character height


WRITING_STYLES: dict[str, WritingStyle] = {
    s.name: s
    for s in [
        WritingStyle("sans", "font", "DejaVuSans.ttf"),
        WritingStyle("serif", "font", "DejaVuSerif.ttf"),
        WritingStyle("mono", "font", "DejaVuSansMono.ttf"),
        WritingStyle("sans_bold", "font", "DejaVuSans-Bold.ttf"),
        WritingStyle("serif_italic", "font", "DejaVuSerif-Italic.ttf"),
        WritingStyle("stix", "font", "STIXGeneral.ttf"),
        WritingStyle("hand_print", "hand", "futural", jitter=0.035, slant=0.08, stroke=0.10),
        WritingStyle("hand_roman", "hand", "rowmans", jitter=0.04, slant=0.15, stroke=0.09),
        WritingStyle("hand_script", "hand", "scripts", jitter=0.04, slant=0.2, stroke=0.08),
        WritingStyle("hand_messy", "hand", "futural", jitter=0.07, slant=-0.1, stroke=0.12),
    ]
}

# --------------------------------------------------------------------------------------------
# Equations
# --------------------------------------------------------------------------------------------

OPERATORS = {"+": "plus", "-": "minus", "×": "times", "÷": "divided by"}


@dataclass(frozen=True, order=True)
class Equation:
    """``a op b = ?`` with a single-digit answer (there are number cards 0-9 only)."""

    a: int
    op: str
    b: int

    def __post_init__(self):
        if self.op not in OPERATORS:
            raise ValueError(f"operator {self.op!r} is not one of {sorted(OPERATORS)}")

    @property
    def value(self) -> int:
        """``a op b`` (any size; a division must be exact)."""
        a, b = self.a, self.b
        if self.op == "÷" and (b == 0 or a % b):
            raise ValueError(f"{self.text} is not an exact division")
        return {"+": a + b, "-": a - b, "×": a * b, "÷": a // max(b, 1)}[self.op]

    @property
    def answer(self) -> int:
        """The value, which must be one card (0-9)."""
        try:
            value = self.value
        except ValueError:
            value = -1
        if not 0 <= value <= 9:
            raise ValueError(f"{self.text} has no single-digit answer (cards are 0-9)")
        return value

    @property
    def text(self) -> str:
        """What is written on the board, e.g. ``"3+4=?"``."""
        return f"{self.a}{self.op}{self.b}=?"

    @classmethod
    def parse(cls, text: str, card_answer: bool = True) -> Equation:
        """Parse ``"3+4"``, ``"3 + 4 = ?"``, ``"12-5=?"``, ``"3*4"``, ``"8/2"``; ``card_answer=False`` also accepts an
        equation whose answer is not one card (e.g. a free whiteboard equation of the VLM corpus)."""
        import re

        t = text.replace(" ", "").replace("*", "×").replace("x", "×").replace("/", "÷").replace("−", "-")
        m = re.fullmatch(r"(\d{1,2})([+\-×÷])(\d{1,2})(=\??)?", t)
        if not m:
            raise ValueError(f"cannot read an equation 'a op b' (op one of + - × ÷) from {text!r}")
        eq = cls(int(m.group(1)), m.group(2), int(m.group(3)))
        if card_answer:
            _ = eq.answer  # validates the single-digit answer
        return eq


def _has_card_answer(eq: Equation) -> bool:
    try:
        return eq.answer >= 0
    except ValueError:
        return False


def _single_digit(eqs):
    return sorted({e for e in eqs if _has_card_answer(e)})


EQUATIONS: dict[str, list[Equation]] = {
    # Robot data: one-digit addition and subtraction only.
    "in_domain": _single_digit(
        [Equation(a, op, b) for a, b in itertools.product(range(10), repeat=2) for op in "+-"]
    ),
    # Never in robot data: multiplication, division, two-digit operands.
    "open_world": _single_digit(
        [Equation(a, "×", b) for a, b in itertools.product(range(1, 10), repeat=2)]
        + [Equation(a, "÷", b) for a in range(1, 82) for b in range(1, 10)]
        + [Equation(a, "-", b) for a in range(10, 20) for b in range(1, 20)]
    ),
}

# --------------------------------------------------------------------------------------------
# Card slots and directions
# --------------------------------------------------------------------------------------------

#: Card slots on the table: name -> (x, y). Two rows (front/back) of three columns.
CARD_SLOTS: dict[str, tuple[float, float]] = {
    f"{row} {col}": (x, y)
    for row, x in (("front", 0.43), ("back", 0.57))
    for col, y in (("left", 0.15), ("middle", 0.0), ("right", -0.15))
}
CARDS_PER_EPISODE = 4
#: Where the answer card must end up (x, y): a pad in front of the whiteboard.
ANSWER_PAD = (0.72, 0.0)

#: Toy placement directions: name -> unit offset (dx, dy) in the robot frame.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (0.0, 1.0),
    "right": (0.0, -1.0),
    "front": (-1.0, 0.0),
    "behind": (1.0, 0.0),
}
#: How the direction is said in an instruction ("to the left of", "in front of", ...).
DIRECTION_PHRASES = {"left": "to the left of", "right": "to the right of", "front": "in front of",
                     "behind": "behind"}

# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

TASKS = ("math_matching", "toy_placement")
SPLIT_NAMES = ("in_domain", "open_world")


@dataclass(frozen=True)
class Split:
    """What one task/split may contain. Open-world content never appears in-domain."""

    task: str
    name: str
    equations: tuple[Equation, ...] = ()
    writing_styles: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()  # objects that may be picked (math: empty)
    scene_objects: tuple[str, ...] = ()  # every object that may appear at all
    directions: tuple[str, ...] = field(default_factory=lambda: tuple(DIRECTIONS))


_IN_DOMAIN_STYLES = ("sans", "serif", "hand_print")
_OPEN_WORLD_STYLES = ("mono", "serif_italic", "hand_roman", "hand_script", "hand_messy")
_OPEN_WORLD_OBJECTS = ("teddy bear", "white rabbit", "blue cube", "orange can")
_IN_DOMAIN_OBJECTS = tuple(n for n in OBJECTS if n not in _OPEN_WORLD_OBJECTS)

SPLITS: dict[tuple[str, str], Split] = {
    ("math_matching", "in_domain"): Split(
        "math_matching", "in_domain", tuple(EQUATIONS["in_domain"]), _IN_DOMAIN_STYLES
    ),
    ("math_matching", "open_world"): Split(
        "math_matching", "open_world", tuple(EQUATIONS["open_world"]), _OPEN_WORLD_STYLES
    ),
    ("toy_placement", "in_domain"): Split(
        "toy_placement", "in_domain", objects=_IN_DOMAIN_OBJECTS, scene_objects=_IN_DOMAIN_OBJECTS
    ),
    # Open-world: the object to pick is never seen in robot data; the rest of the scene may be
    # anything.
    ("toy_placement", "open_world"): Split(
        "toy_placement", "open_world", objects=_OPEN_WORLD_OBJECTS, scene_objects=tuple(OBJECTS)
    ),
}


def get_split(task: str, split: str) -> Split:
    """The :class:`Split` for ``task``/``split``, with an error naming the allowed values."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_NAMES)}")
    return SPLITS[(task, split)]
