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
    ground_card [table]         Locate the card 7.                        -> "<|object_ref_start|>the card 7
                                <|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>" (one line)
    ground_toy  [table]         Locate the teddy bear.                    -> (the same grounding format)
    affordance  [table]         Where should the duck go to be left of the red cube? -> a box on the table

Boxes use Qwen2-VL's grounding format: corners in 0-1000 of the table image (x right, y down).

The *general* subset (``GENERAL_KINDS``) has no number reading and no arithmetic: it is what the robot
co-training stage mixes in later (the paper's filtered COCO/GQA/TextVQA, plus RoboPoint-like grounding).
Its only digits are box coordinates.

Boards: in training, a quarter are drawn exactly as the robot world draws them (its writing styles, grey
frame, black ink) and the rest in a fresh :class:`~workbench.vlm.boards.BoardLook` from the training font
families (:mod:`workbench.vlm.boards`); some are shown as the raw image instead of the board camera's view.
Tables get a random arm pose now and then (occlusion) and photometric jitter.

Held out from training, for the knowledge evaluation (``split="heldout"``):
  * whole font families (``boards.FAMILIES["heldout"]``) and fresh hand-writing seeds, optionally under a
    robustness ``condition`` (no frame, coloured ink, tilted, a mouse sketch, or a caller's image through
    the real PyBullet whiteboard: ``"env"``);
  * whiteboard equations: every 5th equation (sorted) is never shown on a whiteboard in training
    (its arithmetic fact is still taught in text form: evaluation tests reading *then* solving);
  * scene layouts: different random seeds (training and held-out seeds come from disjoint streams).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..world.catalog import CARD_SLOTS, DIRECTION_PHRASES, DIRECTIONS, EQUATIONS, OBJECTS, WRITING_STYLES, Equation
from ..world.env import TOY_REGION
from ..world.grounding import affordance_box, card_box, grounded, placement_reachable, strip_boxes, toy_box
from ..world.language import cards_listing, describe_position, equation_words
from .api import MAX_IMAGE_SIDE, MIN_SCALED_SIDE

KINDS = ("ocr", "solve", "arithmetic", "cards", "card_where", "answer_card", "objects", "colour", "count",
         "spatial", "ground_card", "ground_toy", "affordance")
GENERAL_KINDS = ("objects", "colour", "count", "spatial", "ground_toy", "affordance")
BOARD_KINDS = ("ocr", "solve", "answer_card")
CARD_KINDS = ("cards", "card_where", "ground_card")
TOY_KINDS = ("objects", "colour", "count", "spatial", "ground_toy", "affordance")
#: robustness conditions of held-out boards (``boards.CONDITIONS``, the real PyBullet whiteboard, the board image
#: itself at a caller's size: ``"raw"``, the board image at a caller's size *and shape*, not 2:1: ``"shape"``, and a
#: photo of the board on a wall, in perspective, at a caller's size: ``"photo"``; training shows photos only with
#: ``photos``)
CONDITIONS = ("no_frame", "coloured_ink", "tilted", "sketch", "env", "raw", "shape", "photo")
#: the conditions that are a way of showing the board (its ``view``) rather than a look drawn on it
VIEW_CONDITIONS = ("env", "raw", "shape", "photo")
#: width : height of the board images of the ``"shape"`` row and of training's ``other_shapes`` (log-uniform in this
#: range, never within 15% of the robot's 2 : 1): a square drawing, a 4 : 3 photo, a long strip
OTHER_ASPECTS = (1.0, 3.0)
#: width : height of the photos of the ``"photo"`` row and of training's ``photos`` (log-uniform in this range): a
#: square crop to a wide phone shot
PHOTO_ASPECTS = (1.0, 1.8)
#: widths (px, 2:1 images) at which pretraining shows a board image itself (``view="raw"``): multiples of 32, so
#: both sides are whole merged tokens, over the range :func:`~workbench.vlm.api.ask` resizes a caller's image into
#: (``api.MIN_SCALED_SIDE`` to ``api.MAX_IMAGE_SIDE``). A reader trained at one scale reads a board shown larger
#: than it trained on poorly (the model shipped at commit 5de8515, trained at 192 px only: 38 of 60 held-out boards
#: at 192 px, 19 at 256, 1 at 320; docs/vlm_experiments.md, "Boards at a caller's size")
RAW_WIDTHS = tuple(range(MIN_SCALED_SIDE, MAX_IMAGE_SIDE + 1, 32))
#: the caller's sizes of the ``"raw"`` robustness row (any width in this range; ``ask`` shrinks those above
#: ``api.MAX_IMAGE_SIDE``)
CALLER_WIDTHS = (160, 640)
SPLITS = ("train", "heldout")

HELDOUT_STYLES = ("stix",)  # the world's styles in a held-out font family
TRAIN_STYLES = tuple(s for s in WRITING_STYLES if s not in HELDOUT_STYLES)
#: every equation with a card answer (0-9) that the robot world uses
ALL_EQUATIONS = sorted(set(EQUATIONS["in_domain"]) | set(EQUATIONS["open_world"]))
HELDOUT_EQUATIONS = tuple(ALL_EQUATIONS[2::5])
TRAIN_BOARD_EQUATIONS = tuple(e for e in ALL_EQUATIONS if e not in set(HELDOUT_EQUATIONS))
EQUATIONS_BY_TEXT = {e.text: e for e in ALL_EQUATIONS}
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
    "ground_card": ("Locate the card {d}.", "Where is the card {d}? Give its box.",
                    "Give the bounding box of the card {d}."),
    "ground_toy": ("Locate the {o}.", "Where is the {o}? Give its box.", "Give the bounding box of the {o}."),
    "affordance": ("Where should the {o} go to be {phrase} the {t}?", "Point to where the {o} goes {phrase} the {t}.",
                   "Give the box where the {o} should be placed {phrase} the {t}."),
}
#: where a placed toy goes: this far from the target, a box this wide (metres) -- inside the success zone
_SPATIAL_WORD = {"left": "left", "right": "right", "front": "in front", "behind": "behind"}


@dataclass
class Sample:
    """One corpus item. ``images`` are names of views to render (``"board"``, ``"table"``) and the
    scene needed to render them; rendering happens in :mod:`workbench.vlm.render`."""

    kind: str
    question: str
    answer: str
    views: tuple[str, ...]
    # {"text": "3+4=?", "seed": int, "view": v, "aug": bool} and "style" (a world style) or "look" (a BoardLook dict)
    board: dict | None = None
    table: dict | None = None  # {"cards": {digit: [x, y]}, "toys": {name: [x, y, yaw]}, "arm": None | [x, y, z]}
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


_HELDOUT_SET = frozenset(HELDOUT_EQUATIONS)


def other_aspect(rng: np.random.Generator) -> float:
    """A board image's width : height other than 2 : 1, log-uniform in :data:`OTHER_ASPECTS`, redrawn while
    within 15% of 2 (the robot's board and every board image that training shows without ``other_shapes``)."""
    while True:
        aspect = _log_uniform(rng, OTHER_ASPECTS)
        if abs(np.log(aspect / 2)) > np.log(1.15):
            return round(aspect, 3)


def photo_aspect(rng: np.random.Generator) -> float:
    """A photo's width : height, log-uniform in :data:`PHOTO_ASPECTS` (a square crop to a wide shot)."""
    return round(_log_uniform(rng, PHOTO_ASPECTS), 3)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(*np.log(bounds))))


def _whole_tokens_height(width: int, aspect: float) -> int:
    """The height of an image ``width`` px wide at ``aspect`` (width : height), rounded to whole merged tokens."""
    return max(TOKEN_PX, round(width / aspect / TOKEN_PX) * TOKEN_PX)


def free_equation(rng) -> Equation:
    """A whiteboard equation to copy: ``a op b`` with each number of one or two digits (a subtraction's result not
    negative, a division exact), never a held-out whiteboard equation (:data:`HELDOUT_EQUATIONS`)."""
    while True:
        op = "+-×÷"[rng.integers(4)]
        a, b = (int(rng.integers(0, 10) if rng.random() < 0.5 else rng.integers(10, 100)) for _ in range(2))
        if op == "-" and a < b:
            a, b = b, a
        if op == "÷":
            b = max(b, 1)
            a = b * int(rng.integers(0, 99 // b + 1))
        eq = Equation(a, op, b)
        if eq not in _HELDOUT_SET:
            return eq


class CorpusGenerator:
    """Draws :class:`Sample` objects of the requested kinds, deterministically from ``seed``.

    Args:
        split: ``"train"`` or ``"heldout"`` (fonts, whiteboard equations and layout seeds differ).
        seed: base seed; ``train`` and ``heldout`` use disjoint random streams.
        condition: held-out boards only: one of :data:`CONDITIONS` (robustness rows), or None.
        free_boards: training only: the share of ``ocr`` whiteboards showing a *free* equation
            (:func:`free_equation`: any numbers below 100, never a held-out one) instead of one of the robot
            world's, so that transcribing is copying what is written, not recalling one of the few hundred
            equations the world has (no ``solve`` question follows a free board).
        other_shapes: training only: the share of board images shown as the image itself (``view="raw"``) that
            are drawn at another width : height than 2 : 1 (:func:`other_aspect`), as a caller's square drawing or
            photo would be.
        photos: training only: the share of board images shown as the image itself that are instead a photo of
            the board hanging on a wall (:func:`.boards.photograph`: perspective, a mount, a wall, uneven light).
    """

    def __init__(self, split: str = "train", seed: int = 0, condition: str | None = None, free_boards: float = 0.0,
                 other_shapes: float = 0.0, photos: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"unknown corpus split {split!r}; expected one of {list(SPLITS)}")
        if condition is not None and condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; expected one of {list(CONDITIONS)} or None")
        if condition is not None and split != "heldout":
            raise ValueError("robustness conditions are for the held-out split only")
        if not 0 <= free_boards <= 1 or (free_boards and split != "train"):
            raise ValueError(f"free_boards must be in [0, 1], and 0 outside the training split; got {free_boards!r}")
        if not 0 <= other_shapes <= 1 or (other_shapes and split != "train"):
            raise ValueError(f"other_shapes must be in [0, 1], and 0 outside the training split; got {other_shapes!r}")
        if not 0 <= photos <= 1 or (photos and split != "train"):
            raise ValueError(f"photos must be in [0, 1], and 0 outside the training split; got {photos!r}")
        self.split, self.condition, self.free_boards, self.other_shapes = split, condition, free_boards, other_shapes
        self.photos = photos
        self.rng = np.random.default_rng([seed, SPLITS.index(split), 7919])
        self.board_equations = TRAIN_BOARD_EQUATIONS if split == "train" else HELDOUT_EQUATIONS
        # hand-writing seeds: train in [0, 2**30), held-out in [2**30, 2**31)
        self._seed_base = 0 if split == "train" else 2**30
        self._table: tuple[str, dict] | None = None  # the last table layout, reused by ``same_table``
        # the last whiteboard (equation, board, free), reused by ``same_board``
        self._last_board: tuple | None = None

    def _q(self, kind: str, **kw) -> str:
        options = _Q[kind]
        return options[self.rng.integers(len(options))].format(**kw)

    def _board(self, eq: Equation) -> dict:
        from .boards import sample_look

        rng = self.rng
        seed = int(self._seed_base + rng.integers(2**30))
        if self.split == "train" and rng.random() < 0.25:  # exactly as the robot world draws it
            return {"text": eq.text, "style": TRAIN_STYLES[rng.integers(len(TRAIN_STYLES))], "seed": seed,
                    "view": "camera", "aug": True}
        look = sample_look(rng, self.split, condition=None if self.condition in VIEW_CONDITIONS else self.condition)
        board = {"text": eq.text, "look": look.to_dict(), "seed": seed, "view": "camera", "aug": self.split == "train"}
        if self.split == "train" and rng.random() < 0.3:
            board.update(view="raw", width=int(RAW_WIDTHS[rng.integers(len(RAW_WIDTHS))]))
            if self.photos and rng.random() < self.photos:
                board.update(view="photo", photo_aspect=photo_aspect(rng))
            elif self.other_shapes and rng.random() < self.other_shapes:
                board["aspect"] = other_aspect(rng)
        elif self.condition in VIEW_CONDITIONS:
            board["view"] = self.condition if self.condition in ("env", "photo") else "raw"
            if board["view"] != "env":
                board["width"] = int(rng.integers(CALLER_WIDTHS[0], CALLER_WIDTHS[1] + 1))
            if self.condition == "shape":
                board["aspect"] = other_aspect(rng)
            if self.condition == "photo":
                board["photo_aspect"] = photo_aspect(rng)
        return board

    def _arm(self):
        """Sometimes (training) the arm hangs over the table, hiding part of it."""
        if self.split != "train" or self.rng.random() >= 0.25:
            return None
        return [float(self.rng.uniform(0.35, 0.7)), float(self.rng.uniform(-0.25, 0.25)),
                float(self.rng.uniform(0.12, 0.35))]

    def _layout(self, what: str, same_table: bool, **kw) -> dict:
        if same_table and self._table is not None and self._table[0] == what:
            return self._table[1]
        rng = self.rng
        if what == "cards":
            table = {"cards": _card_layout(rng, int(rng.integers(3, 6)), **kw), "toys": {}}
        else:
            table = {"cards": {}, "toys": _toy_layout(rng, int(rng.integers(kw.get("min_toys", 1), 5)))}
        table["arm"] = self._arm()
        table["aug"] = self.split == "train"
        self._table = (what, table)
        return table

    def sample(self, kind: str, same_table: bool = False, same_board: bool = False) -> Sample:
        """One sample of ``kind``. ``same_table=True`` asks about the previous table sample's layout when
        it suits ``kind`` (cheaper to render: one scene, several questions); ``same_board=True`` asks ``ocr`` or
        ``solve`` about the previous whiteboard (:meth:`conversation`)."""
        rng = self.rng
        if kind in BOARD_KINDS:
            last = self._last_board
            if same_board and kind != "answer_card" and last is not None and (kind == "ocr" or not last[2]):
                eq, board, free = last
            else:
                free = kind == "ocr" and bool(self.free_boards) and rng.random() < self.free_boards
                eq = free_equation(rng) if free else self.board_equations[rng.integers(len(self.board_equations))]
                board = self._board(eq)
                self._last_board = (eq, board, free)
            words = equation_words(eq)
            facts = {"equation": f"{eq.a}{eq.op}{eq.b}", "answer": None if free else eq.answer,
                     "style": board.get("style") or board["look"]["family"]}
            if kind == "ocr":
                return Sample(kind, self._q(kind), f"{words} = ?", ("board",), board=board, facts=facts)
            if kind == "solve":
                return Sample(kind, self._q(kind), f"{words} = {eq.answer}", ("board",), board=board, facts=facts)
            cards = _card_layout(rng, 4, must_have=eq.answer)
            slot = describe_position(*cards[eq.answer])
            facts["card_slot"] = slot
            return Sample(kind, self._q(kind), f"{words} = {eq.answer}. The card {eq.answer} is at the {slot}.",
                          ("board", "table"), board=board,
                          table={"cards": cards, "toys": {}, "arm": None, "aug": self.split == "train"}, facts=facts)
        if kind == "arithmetic":
            eq = ARITHMETIC_FACTS[rng.integers(len(ARITHMETIC_FACTS))]
            value = eq.value
            return Sample(kind, self._q(kind, eq=equation_words(eq)), str(value), (),
                          facts={"equation": f"{eq.a}{eq.op}{eq.b}", "answer": value})
        if kind in CARD_KINDS:
            table = self._layout("cards", same_table)
            cards = table["cards"]
            if kind == "cards":
                return Sample(kind, self._q(kind), cards_listing(cards), ("table",), table=table,
                              facts={"cards": {d: describe_position(*xy) for d, xy in cards.items()}})
            d = list(cards)[rng.integers(len(cards))]
            if kind == "ground_card":
                box = card_box(cards[d])
                return Sample(kind, self._q(kind, d=d), grounded(f"the card {d}", box), ("table",), table=table,
                              facts={"card": d, "box": box})
            slot = describe_position(*cards[d])
            return Sample(kind, self._q(kind, d=d), slot, ("table",), table=table, facts={"card": d, "slot": slot})
        if kind in ("objects", "colour", "count", "ground_toy"):
            table = self._layout("toys", same_table)
            while kind == "colour" and not any(n in COLOURS for n in table["toys"]):
                table = self._layout("toys", False)
            toys = table["toys"]
            names = _left_to_right(toys)
            if kind == "objects":
                return Sample(kind, self._q(kind), _join([f"the {n}" for n in names]), ("table",), table=table,
                              facts={"objects": names})
            if kind == "count":
                return Sample(kind, self._q(kind), NUMBER_WORDS[len(names)], ("table",), table=table,
                              facts={"count": len(names)})
            if kind == "ground_toy":
                o = names[rng.integers(len(names))]
                box = toy_box(o, toys[o])
                return Sample(kind, self._q(kind, o=o), grounded(f"the {o}", box), ("table",), table=table,
                              facts={"object": o, "box": box})
            coloured = [n for n in names if n in COLOURS]
            o = coloured[rng.integers(len(coloured))]
            return Sample(kind, self._q(kind, o=o), COLOURS[o], ("table",), table=table,
                          facts={"object": o, "colour": COLOURS[o]})
        if kind == "spatial":
            for attempt in range(100):
                table = self._layout("toys", same_table and attempt == 0, min_toys=2)
                toys = table["toys"]
                if len(toys) < 2:
                    continue
                a, b = rng.choice(list(toys), 2, replace=False)
                rel = spatial_relation(toys[a][:2], toys[b][:2])
                if rel is not None:
                    return Sample(kind, self._q(kind, a=a, b=b), _SPATIAL_WORD[rel], ("table",),
                                  table=table, facts={"a": a, "b": b, "relation": rel})
            raise RuntimeError("could not draw an unambiguous spatial relation")
        if kind == "affordance":
            for attempt in range(100):
                table = self._layout("toys", same_table and attempt == 0, min_toys=2)
                toys = table["toys"]
                if len(toys) < 2:
                    continue
                o, t = (str(v) for v in rng.choice(list(toys), 2, replace=False))
                d = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
                if not placement_reachable(toys[t], d):
                    continue
                box = affordance_box(toys[t], d)
                phrase = DIRECTION_PHRASES[d]
                return Sample(kind, self._q(kind, o=o, t=t, phrase=phrase), grounded(f"{phrase} the {t}", box),
                              ("table",), table=table,
                              facts={"object": o, "target": t, "direction": d, "target_xy": list(toys[t][:2]),
                                     "box": box})
            raise RuntimeError("could not draw a placement on the table")
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(KINDS)}")

    def conversation(self, kind: str, turns: int, weights: dict[str, float], same_table: bool = False,
                     about: Sample | None = None) -> list[Sample]:
        """Up to ``turns`` questions about one scene: a sample of ``kind``, then follow-ups whose kinds are drawn
        with ``weights`` among those that ask about the same image (a whiteboard: ``ocr`` and ``solve``; a card
        table: :data:`CARD_KINDS`; a toy table: :data:`TOY_KINDS`). A follow-up that needed a new layout (e.g. a
        colour question about a table without a coloured toy) ends the conversation; one whose answer repeats an
        earlier answer is dropped (it would be copied, not read). ``answer_card`` (two images) is asked alone.
        ``same_table``: the first question may reuse the previous table (as in :meth:`sample`). ``about``: ask
        about that sample's one image (a table or a whiteboard) instead; ``kind`` must be of its family
        (:func:`scene_family`). If the first question cannot be asked about it, the conversation is about a new scene.
        """
        if about is not None:
            if kind not in scene_family(about.kind) or len(about.views) != 1:
                raise ValueError(f"a {kind!r} question cannot be asked about a {about.kind!r} sample's scene")
            if about.board is not None:
                text = about.board["text"]  # a free board's answer need not be a card
                self._last_board = (Equation.parse(text, card_answer=False), about.board, text not in EQUATIONS_BY_TEXT)
            else:
                self._table = ("cards" if about.kind in CARD_KINDS else "toys", about.table)
        first = self.sample(kind, same_table or about is not None, same_board=about is not None)
        kinds = [k for k in scene_family(kind) if weights.get(k, 0) > 0]
        out = [first]
        if not kinds or turns < 2:
            return out
        p = np.array([weights[k] for k in kinds], float)
        for k in self.rng.choice(kinds, turns - 1, p=p / p.sum()):
            s = self.sample(str(k), same_table=True, same_board=True)
            if s.table is not first.table or s.board is not first.board:
                break
            if all(s.answer != o.answer for o in out):
                out.append(s)
        return out

    def samples(self, n: int, kinds=KINDS, weights=None) -> list[Sample]:
        """``n`` samples with kinds drawn with ``weights`` (default uniform)."""
        kinds = list(kinds)
        p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
        return [self.sample(kinds[self.rng.choice(len(kinds), p=p)]) for _ in range(n)]


def scene_family(kind: str) -> tuple[str, ...]:
    """The kinds that ask about the same one image as ``kind``: a whiteboard's (``ocr``, ``solve``), a card
    table's (:data:`CARD_KINDS`) or a toy table's (:data:`TOY_KINDS`); ``()`` for ``answer_card`` and ``arithmetic``."""
    return next((f for f in (("ocr", "solve"), CARD_KINDS, TOY_KINDS) if kind in f), ())


def check_general(sample: Sample) -> bool:
    """True if a sample has no number reading and no arithmetic (the co-training general subset's rule):
    no digits outside box coordinates, no arithmetic signs."""
    text = strip_boxes(sample.question + " " + sample.answer)
    return not any(ch.isdigit() for ch in text) and not any(op in text for op in ("+", "×", "÷", "="))


#: Classes of the dense "what is under this image token" labels used to teach the vision tower to see.
TOKEN_CLASSES = ("background", *"0123456789", "+", "-", "×", "÷", "=", "?", *sorted(OBJECTS))
TOKEN_PX = 16  # one merged token = 2x2 patches of 8 px


def token_grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The row and the column of each merged token of a ``rows`` x ``cols`` image, (rows*cols,) each, row-major as
    the vision tower emits them."""
    r, c = np.mgrid[0:rows, 0:cols]
    return r.ravel(), c.ravel()


def _token_centres(height: int, width: int) -> np.ndarray:
    """(rows*cols, 2) pixel centres (u, v) of merged tokens, row-major as the vision tower emits them."""
    v, u = token_grid(height // TOKEN_PX, width // TOKEN_PX)
    return np.c_[u * TOKEN_PX + TOKEN_PX / 2, v * TOKEN_PX + TOKEN_PX / 2]


class CorpusRenderer:
    """Turns a :class:`Sample` into its camera images ``[(H, W, 3) uint8, ...]`` (``sample.views``
    order) and, on request, per-image token labels ``[(H/16, W/16) int64, ...]`` indexing
    :data:`TOKEN_CLASSES`: the board character, card digit or toy under each merged token's centre.

    Board views use the fast :class:`~workbench.world.board_view.BoardView` (``view="camera"``), the texture
    itself at the sample's width (``"raw"``; :data:`RAW_WIDTHS` in training), or the real PyBullet whiteboard
    (``"env"``); table views are rendered by PyBullet (about 25 ms each; the last table is reused when the next
    sample shares it). Samples marked ``aug`` get photometric jitter seeded by their own seed. ``board_scale`` > 1
    upsamples board images by that factor (bicubic) after the camera, so each character covers ``board_scale``²
    times as many merged tokens (:mod:`workbench.vlm.probe` measures what that does to reading; the models here use 1).

    ``owners=True`` (with ``labels``) also returns, per image, the index of the board character under each merged
    token (``(H/16, W/16)``, -1 where none; None for tables): the characters are the board's text without spaces,
    in order."""

    def __init__(self, board_scale: int = 1):
        from ..world.board_view import BoardView
        from ..world.scene import TabletopScene

        if not (isinstance(board_scale, int) and board_scale >= 1):
            raise ValueError(f"board_scale must be an int >= 1, got {board_scale!r}")
        self.board_scale = board_scale
        self.scene = TabletopScene()
        self.board_view = BoardView(self.scene)
        self._cls = {c: i for i, c in enumerate(TOKEN_CLASSES)}
        self._last_table: tuple[str, np.ndarray, np.ndarray] | None = None

    def __call__(self, sample: Sample, labels: bool = False, owners: bool = False):
        images, maps, whose = [], [], []
        for view in sample.views:
            if view == "board":
                img, lab, own = self._board(sample.board, labels or owners)
            elif view == "table":
                (img, lab), own = self._table(sample.table, labels), None
            else:
                raise ValueError(f"unknown view {view!r}; expected 'board' or 'table'")
            images.append(img)
            maps.append(lab)
            whose.append(own)
        if owners:
            return images, maps, whose
        return (images, maps) if labels else images

    def _board(self, b: dict, labels: bool):
        from ..world.scene import CAMERAS
        from ..world.writing import BOARD_TEXTURE_SIZE, render_text
        from .boards import BoardLook, apply_homography, photograph, photometric, render_board, unrotate

        rotation, aspect, view = 0.0, b.get("aspect"), b.get("view", "camera")
        if aspect is not None and ("look" not in b or view != "raw"):
            raise ValueError("a board of another shape (aspect) is drawn in a look and shown as the image itself "
                             f"(view 'raw'); got view {view!r}" + ("" if "look" in b else " without a look"))
        if "look" in b:
            look = BoardLook.from_dict(b["look"])
            size = BOARD_TEXTURE_SIZE if aspect is None else (round(BOARD_TEXTURE_SIZE[1] * aspect),
                                                              BOARD_TEXTURE_SIZE[1])
            texture, cells = render_board(b["text"], look, seed=b["seed"], size=size)
            rotation = look.rotation
        else:
            texture, cells = render_text(b["text"], b["style"], seed=b["seed"], return_boxes=True)
        cam = CAMERAS["board"]
        if view == "camera":
            img = self.board_view(texture)
        elif view == "raw":  # the image itself, at its sample's width (the camera's if none)
            width = b.get("width", cam.width)
            height = (width * texture.height // texture.width if aspect is None  # 2:1: whole tokens at RAW_WIDTHS
                      else _whole_tokens_height(width, aspect))
            img = np.asarray(texture.resize((width, height), Image.Resampling.LANCZOS))
        elif view == "photo":  # a photo of the board on a wall, at its sample's width and width : height
            photo_size = (b["width"], _whole_tokens_height(b["width"], b["photo_aspect"]))
            img, to_texture = photograph(texture, photo_size, np.random.default_rng([b["seed"], 2]))
        elif view == "env":
            self.scene.reset_robot()
            self.scene.set_whiteboard(texture)
            img = self.scene.render(["board"])["board"]
        else:
            raise ValueError(f"unknown board view {view!r}; expected 'camera', 'raw', 'photo' or 'env'")
        if b.get("aug"):
            img = photometric(img, np.random.default_rng([b["seed"], 1]))
        h, w = img.shape[:2]
        k = self.board_scale
        if k > 1:
            img = np.asarray(Image.fromarray(img).resize((w * k, h * k), Image.Resampling.BICUBIC))
        if not labels:
            return img, None, None
        centres = _token_centres(h * k, w * k) / k  # in the camera image's pixels
        if view == "raw":
            tex = centres * np.array(texture.size, float) / np.array([w, h], float)
        elif view == "photo":
            tex = apply_homography(to_texture, centres)
        else:
            tex = self.board_view.texture_coords(centres)
        tex = unrotate(tex, rotation, size=texture.size)
        owner = np.full(len(tex), -1, np.int64)
        for i, (_, x0, y0, x1, y1) in enumerate(cells):
            owner[(tex[:, 0] >= x0) & (tex[:, 0] < x1) & (tex[:, 1] >= y0) & (tex[:, 1] < y1)] = i
        classes = np.array([self._cls[c[0]] for c in cells] + [0], np.int64)  # owner -1: background
        grid = (h * k // TOKEN_PX, w * k // TOKEN_PX)
        return img, classes[owner].reshape(grid), owner.reshape(grid)

    def _table(self, t: dict, labels: bool):
        import json
        import zlib

        from .boards import photometric

        key = json.dumps(t, sort_keys=True, default=str)
        if self._last_table is None or self._last_table[0] != key:
            if t.get("arm"):
                self.scene.reset_robot(np.asarray(t["arm"], float))
            else:
                self.scene.reset_robot()
            self.scene.populate(cards={int(d): tuple(xy) for d, xy in t["cards"].items()},
                                toys={n: tuple(v) for n, v in t["toys"].items()})
            img = self.scene.render(["table"])["table"]
            if t.get("aug"):
                img = photometric(img, np.random.default_rng(zlib.crc32(key.encode())), strength=0.7)
            self._last_table = (key, img, self._table_labels(img.shape))
        _, img, lab = self._last_table
        return img, (lab if labels else None)

    def _table_labels(self, shape) -> np.ndarray:
        from ..world.scene import CAMERAS

        h, w = shape[:2]
        centres = _token_centres(h, w)
        out = np.zeros(len(centres), np.int64)
        bodies = [(str(d), b) for d, b in self.scene.cards.items()] + list(self.scene.toys.items())
        for name, body in bodies:
            lo, hi = self.scene.body_aabb(body)
            corners = np.array([[x, y, hi[2]] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
            rc = CAMERAS["table"].project(corners)
            (v0, u0), (v1, u1) = rc.min(0), rc.max(0)
            inside = (centres[:, 0] >= u0) & (centres[:, 0] < u1) & (centres[:, 1] >= v0) & (centres[:, 1] < v1)
            out[inside] = self._cls[name]
        return out.reshape(h // TOKEN_PX, w // TOKEN_PX)

    def close(self):
        self.scene.close()
