"""The VLM's synthetic pretraining corpus: image-question-answer samples about the miniature world.

Skills (``kind``) and the images they use (one image per camera, as in the paper)::

    ocr        [board]          What is written on the whiteboard?        -> "3 + 4 = ?"
    solve      [board]          Solve the equation on the whiteboard.     -> "3 + 4 = 7"
    arithmetic []               What is 6 × 3?                            -> "18"
    cards      [table]          List the cards and where they are.        -> "card 3 at the back left, ..."
    card_where [table]          Where is the card 7?                      -> "back left"
    answer_card [board, table]  Which card answers the board, and where?  -> "3 + 4 = 7. The card 7 is at ..."
    objects    [table]          What objects are on the table?            -> "the red cube and the yellow duck"
    colour     [table]          What colour is the yellow duck?           -> "yellow"
    count      [table]          How many toys are on the table?           -> "three"
    spatial    [table]          Where is the red cube relative to the duck? -> "left"

The *general* subset (``GENERAL_KINDS``) has no digits and no arithmetic at all: it is what the robot
co-training stage mixes in later (the paper's filtered COCO/GQA/TextVQA).

Held out from training, for the knowledge evaluation (``split="heldout"``):
  * writing styles ``sans_bold`` and ``stix`` (fonts no robot split uses) and fresh hand-writing seeds;
  * whiteboard equations: every 5th equation (sorted) is never shown on a whiteboard in training
    (its arithmetic fact is still taught in text form: evaluation tests reading *then* solving);
  * scene layouts: different random seeds (training and held-out seeds come from disjoint streams).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ..world.catalog import CARD_SLOTS, EQUATIONS, OBJECTS, WRITING_STYLES, Equation
from ..world.env import TOY_REGION
from ..world.language import describe_position, equation_words

KINDS = ("ocr", "solve", "arithmetic", "cards", "card_where", "answer_card", "objects", "colour", "count",
         "spatial")
GENERAL_KINDS = ("objects", "colour", "count", "spatial")
SPLITS = ("train", "heldout")

HELDOUT_STYLES = ("sans_bold", "stix")
TRAIN_STYLES = tuple(s for s in WRITING_STYLES if s not in HELDOUT_STYLES)
#: every equation with a card answer (0-9) that the robot world uses
ALL_EQUATIONS = sorted(set(EQUATIONS["in_domain"]) | set(EQUATIONS["open_world"]))
HELDOUT_EQUATIONS = tuple(ALL_EQUATIONS[2::5])
TRAIN_BOARD_EQUATIONS = tuple(e for e in ALL_EQUATIONS if e not in set(HELDOUT_EQUATIONS))
#: text-only arithmetic facts: all the above plus tables beyond them (answers may be > 9)
ARITHMETIC_FACTS = sorted(set(ALL_EQUATIONS) | {
    Equation(a, op, b) for a, b in itertools.product(range(13), repeat=2) for op in "+-×"
    if op != "-" or a >= b} | {Equation(a * b, "÷", b) for a in range(13) for b in range(1, 13)})
COLOURS = {name: name.split()[0] for name in OBJECTS if name.split()[0] in
           ("yellow", "red", "green", "white", "pink", "blue", "orange", "purple", "black")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

_Q = {
    "ocr": ("What is written on the whiteboard?", "Read the whiteboard.", "What does the board say?"),
    "solve": ("Solve the equation on the whiteboard.", "What is the answer to the equation on the board?",
              "Work out the whiteboard equation."),
    "arithmetic": ("What is {eq}?", "Compute {eq}.", "{eq} = ?"),
    "cards": ("List the cards and where they are.", "Which cards are on the table, and where?",
              "Read the number cards on the table with their positions."),
    "card_where": ("Where is the card {d}?", "Where does the card {d} lie?", "Find the card {d}."),
    "answer_card": ("Which card answers the equation on the board, and where is it?",
                    "Find the card with the answer to the whiteboard equation.",
                    "Solve the board and locate the answer card."),
    "objects": ("What objects are on the table?", "Name the toys on the table.", "Which toys do you see?"),
    "colour": ("What colour is the {o}?", "Tell me the colour of the {o}.", "Which colour does the {o} have?"),
    "count": ("How many toys are on the table?", "Count the toys on the table.", "How many objects do you see?"),
    "spatial": ("Where is the {a} relative to the {b}?", "Is the {a} left, right, in front of or behind the {b}?",
                "Describe where the {a} is compared with the {b}."),
}
_SPATIAL_WORD = {"left": "left", "right": "right", "front": "in front", "behind": "behind"}


@dataclass
class Sample:
    """One corpus item. ``images`` are names of views to render (``"board"``, ``"table"``) and the
    scene needed to render them; rendering happens in :mod:`workbench.vlm.render`."""

    kind: str
    question: str
    answer: str
    views: tuple[str, ...]
    board: dict | None = None  # {"text": "3+4=?", "style": name, "seed": int}
    table: dict | None = None  # {"cards": {digit: [x, y]}, "toys": {name: [x, y, yaw]}}
    facts: dict = field(default_factory=dict)  # ground truth for scoring


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _card_layout(rng, n: int, must_have: int | None = None) -> dict[int, list[float]]:
    digits = list(rng.choice(10, n, replace=False))
    if must_have is not None and must_have not in digits:
        digits[0] = must_have
    slots = rng.choice(len(CARD_SLOTS), n, replace=False)
    names = list(CARD_SLOTS)
    return {int(d): [CARD_SLOTS[names[s]][0] + rng.uniform(-0.01, 0.01),
                     CARD_SLOTS[names[s]][1] + rng.uniform(-0.01, 0.01)] for d, s in zip(digits, slots)}


def _cards_answer(cards: dict[int, list[float]]) -> str:
    order = sorted(cards, key=lambda d: (-round(cards[d][0], 1), -cards[d][1]))  # back row first, left to right
    return ", ".join(f"card {d} at the {describe_position(*cards[d])}" for d in order)


def _toy_layout(rng, n: int, names=None, min_sep: float = 0.11) -> dict[str, list[float]]:
    names = list(names) if names is not None else list(rng.choice(sorted(OBJECTS), n, replace=False))
    placed: dict[str, list[float]] = {}
    for name in names:
        for _ in range(500):
            q = np.array([rng.uniform(*TOY_REGION[0]), rng.uniform(*TOY_REGION[1])])
            if all(np.hypot(*(q - np.array(v[:2]))) >= min_sep for v in placed.values()):
                placed[name] = [float(q[0]), float(q[1]), float(rng.uniform(-0.4, 0.4))]
                break
        else:
            raise RuntimeError("could not place the toys")
    return placed


def _left_to_right(toys: dict[str, list[float]]) -> list[str]:
    return sorted(toys, key=lambda n: -toys[n][1])


def spatial_relation(a_xy, b_xy) -> str | None:
    """Which of left/right/front/behind ``a`` is relative to ``b``; ``None`` when ambiguous
    (the larger offset must be at least twice the smaller)."""
    dx, dy = a_xy[0] - b_xy[0], a_xy[1] - b_xy[1]
    if abs(dy) >= 2 * abs(dx):
        return "left" if dy > 0 else "right"
    if abs(dx) >= 2 * abs(dy):
        return "behind" if dx > 0 else "front"
    return None


class CorpusGenerator:
    """Draws :class:`Sample` objects of the requested kinds, deterministically from ``seed``.

    Args:
        split: ``"train"`` or ``"heldout"`` (styles, whiteboard equations and layout seeds differ).
        seed: base seed; ``train`` and ``heldout`` use disjoint random streams.
    """

    def __init__(self, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown corpus split {split!r}; expected one of {list(SPLITS)}")
        self.split = split
        self.rng = np.random.default_rng([seed, SPLITS.index(split), 7919])
        self.styles = TRAIN_STYLES if split == "train" else HELDOUT_STYLES + TRAIN_STYLES
        self.board_equations = TRAIN_BOARD_EQUATIONS if split == "train" else HELDOUT_EQUATIONS
        # hand-writing seeds: train in [0, 2**30), held-out in [2**30, 2**31)
        self._seed_base = 0 if split == "train" else 2**30

    def _q(self, kind: str, **kw) -> str:
        options = _Q[kind]
        return options[self.rng.integers(len(options))].format(**kw)

    def _board(self, eq: Equation) -> dict:
        style = self.styles[self.rng.integers(len(self.styles))]
        if self.split == "heldout" and self.rng.random() < 0.5:
            style = HELDOUT_STYLES[self.rng.integers(len(HELDOUT_STYLES))]
        return {"text": eq.text, "style": style, "seed": int(self._seed_base + self.rng.integers(2**30))}

    def sample(self, kind: str) -> Sample:
        rng = self.rng
        if kind in ("ocr", "solve", "answer_card"):
            eq = self.board_equations[rng.integers(len(self.board_equations))]
            board = self._board(eq)
            words = equation_words(eq)
            facts = {"equation": f"{eq.a}{eq.op}{eq.b}", "answer": eq.answer, "style": board["style"]}
            if kind == "ocr":
                return Sample(kind, self._q(kind), f"{words} = ?", ("board",), board=board, facts=facts)
            if kind == "solve":
                return Sample(kind, self._q(kind), f"{words} = {eq.answer}", ("board",), board=board, facts=facts)
            cards = _card_layout(rng, 4, must_have=eq.answer)
            slot = describe_position(*cards[eq.answer])
            facts["card_slot"] = slot
            return Sample(kind, self._q(kind), f"{words} = {eq.answer}. The card {eq.answer} is at the {slot}.",
                          ("board", "table"), board=board, table={"cards": cards, "toys": {}}, facts=facts)
        if kind == "arithmetic":
            eq = ARITHMETIC_FACTS[rng.integers(len(ARITHMETIC_FACTS))]
            value = {"+": eq.a + eq.b, "-": eq.a - eq.b, "×": eq.a * eq.b, "÷": eq.a // max(eq.b, 1)}[eq.op]
            return Sample(kind, self._q(kind, eq=equation_words(eq)), str(value), (),
                          facts={"equation": f"{eq.a}{eq.op}{eq.b}", "answer": value})
        if kind in ("cards", "card_where"):
            cards = _card_layout(rng, int(rng.integers(3, 6)))
            table = {"cards": cards, "toys": {}}
            if kind == "cards":
                return Sample(kind, self._q(kind), _cards_answer(cards), ("table",), table=table,
                              facts={"cards": {d: describe_position(*xy) for d, xy in cards.items()}})
            d = list(cards)[rng.integers(len(cards))]
            slot = describe_position(*cards[d])
            return Sample(kind, self._q(kind, d=d), slot, ("table",), table=table, facts={"card": d, "slot": slot})
        if kind in ("objects", "colour", "count"):
            toys = _toy_layout(rng, int(rng.integers(1, 5)))
            while kind == "colour" and not any(n in COLOURS for n in toys):
                toys = _toy_layout(rng, int(rng.integers(1, 5)))
            table = {"cards": {}, "toys": toys}
            names = _left_to_right(toys)
            if kind == "objects":
                return Sample(kind, self._q(kind), _join([f"the {n}" for n in names]), ("table",), table=table,
                              facts={"objects": names})
            if kind == "count":
                return Sample(kind, self._q(kind), NUMBER_WORDS[len(names)], ("table",), table=table,
                              facts={"count": len(names)})
            coloured = [n for n in names if n in COLOURS]
            o = coloured[rng.integers(len(coloured))]
            return Sample(kind, self._q(kind, o=o), COLOURS[o], ("table",), table=table,
                          facts={"object": o, "colour": COLOURS[o]})
        if kind == "spatial":
            for _ in range(100):
                toys = _toy_layout(rng, int(rng.integers(2, 4)))
                a, b = rng.choice(list(toys), 2, replace=False)
                rel = spatial_relation(toys[a][:2], toys[b][:2])
                if rel is not None:
                    return Sample(kind, self._q(kind, a=a, b=b), _SPATIAL_WORD[rel], ("table",),
                                  table={"cards": {}, "toys": toys}, facts={"a": a, "b": b, "relation": rel})
            raise RuntimeError("could not draw an unambiguous spatial relation")
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(KINDS)}")

    def samples(self, n: int, kinds=KINDS, weights=None) -> list[Sample]:
        """``n`` samples with kinds drawn with ``weights`` (default uniform)."""
        kinds = list(kinds)
        p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
        return [self.sample(kinds[self.rng.choice(len(kinds), p=p)]) for _ in range(n)]


def check_general(sample: Sample) -> bool:
    """True if a sample has no digits and no arithmetic (the co-training general subset's rule)."""
    text = sample.question + " " + sample.answer
    return not any(ch.isdigit() for ch in text) and not any(op in text for op in ("+", "×", "÷", "="))



#: Classes of the dense "what is under this image token" labels used to teach the vision tower to see.
TOKEN_CLASSES = ("background", *"0123456789", "+", "-", "×", "÷", "=", "?", *sorted(OBJECTS))
TOKEN_PX = 16  # one merged token = 2x2 patches of 8 px


def _token_centres(height: int, width: int) -> np.ndarray:
    """(rows*cols, 2) pixel centres (u, v) of merged tokens, row-major as the vision tower emits them."""
    rows, cols = height // TOKEN_PX, width // TOKEN_PX
    v, u = np.mgrid[0:rows, 0:cols]
    return np.c_[u.ravel() * TOKEN_PX + TOKEN_PX / 2, v.ravel() * TOKEN_PX + TOKEN_PX / 2]


class CorpusRenderer:
    """Turns a :class:`Sample` into its camera images ``[(H, W, 3) uint8, ...]`` (``sample.views``
    order) and, on request, per-image token labels ``[(H/16, W/16) int64, ...]`` indexing
    :data:`TOKEN_CLASSES`: the board character, card digit or toy under each merged token's centre.

    Board views use the fast :class:`~workbench.world.board_view.BoardView`; table views are rendered
    by PyBullet with the arm at home (about 25 ms each)."""

    def __init__(self):
        from ..world.board_view import BoardView
        from ..world.scene import TabletopScene

        self.scene = TabletopScene()
        self.board_view = BoardView(self.scene)
        self._cls = {c: i for i, c in enumerate(TOKEN_CLASSES)}

    def __call__(self, sample: Sample, labels: bool = False):
        from ..world.writing import render_text

        images, maps = [], []
        for view in sample.views:
            if view == "board":
                b = sample.board
                texture, cells = render_text(b["text"], b["style"], seed=b["seed"], return_boxes=True)
                img = self.board_view(texture)
                if labels:
                    maps.append(self._board_labels(img.shape, cells))
            elif view == "table":
                t = sample.table
                self.scene.reset_robot()
                self.scene.populate(cards={int(d): tuple(xy) for d, xy in t["cards"].items()},
                                    toys={n: tuple(v) for n, v in t["toys"].items()})
                img = self.scene.render(["table"])["table"]
                if labels:
                    maps.append(self._table_labels(img.shape))
            else:
                raise ValueError(f"unknown view {view!r}; expected 'board' or 'table'")
            images.append(img)
        return (images, maps) if labels else images

    def _board_labels(self, shape, cells) -> np.ndarray:
        h, w = shape[:2]
        tex = self.board_view.texture_coords(_token_centres(h, w))
        out = np.zeros(len(tex), np.int64)
        for ch, x0, y0, x1, y1 in cells:
            inside = (tex[:, 0] >= x0) & (tex[:, 0] < x1) & (tex[:, 1] >= y0) & (tex[:, 1] < y1)
            out[inside] = self._cls[ch]
        return out.reshape(h // TOKEN_PX, w // TOKEN_PX)

    def _table_labels(self, shape) -> np.ndarray:
        from ..world.board_view import project
        from ..world.scene import CAMERAS

        h, w = shape[:2]
        centres = _token_centres(h, w)
        out = np.zeros(len(centres), np.int64)
        bodies = [(str(d), b) for d, b in self.scene.cards.items()] + list(self.scene.toys.items())
        for name, body in bodies:
            lo, hi = self.scene.body_aabb(body)
            corners = np.array([[x, y, hi[2]] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
            px = project(corners, CAMERAS["table"])
            (u0, v0), (u1, v1) = px.min(0), px.max(0)
            inside = (centres[:, 0] >= u0) & (centres[:, 0] < u1) & (centres[:, 1] >= v0) & (centres[:, 1] < v1)
            out[inside] = self._cls[name]
        return out.reshape(h // TOKEN_PX, w // TOKEN_PX)

    def close(self):
        self.scene.close()
