"""Language of the world: instructions, reasoning annotations, and parsers for both.

Reasoning follows ChatVLA-2: the model first says what it sees and concludes (the equation, its
answer, which card and where; the object, the target and the side), then which step it executes.
Each template has several phrasings so a model cannot latch onto one wording, but every phrasing
keeps the facts in a form :func:`parse_reasoning` reads back, so generated reasoning can be scored
against the ground truth (the paper's OCR / math / recognition / affordance scores).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from .catalog import CARD_SLOTS, DIRECTION_PHRASES, OBJECTS, OPERATORS, Equation

# ---------------------------------------------------------------------------- instructions

MATH_INSTRUCTIONS = (
    "Solve the equation on the whiteboard and put the answer card on the green pad.",
    "Find the card with the answer to the whiteboard equation and place it on the green pad.",
    "Read the whiteboard, work out the answer, and move that number card to the green pad.",
)
TOY_INSTRUCTIONS = (
    "Pick the {object} and place it {phrase} the {target}.",
    "Put the {object} {phrase} the {target}.",
    "Move the {object} so that it is {phrase} the {target}.",
)


_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
#: an operator as written in reasoning and answers (:data:`_OP_ALIASES` normalises the variants)
_OPERATOR = r"[+\-×÷*/x−:]"


#: the special tokens of Qwen2-VL's grounding format, which reasoning may contain
GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")


def check_text(text, what: str = "text", max_chars: int = 1000, example: str = "", grounding: bool = False) -> str:
    """The one validator of what people type (instructions, questions, edited reasoning): a non-empty string of at
    most ``max_chars`` characters with no chat-template special token in it (``<|image_pad|>``, ``<|im_end|>``,
    ...; ``grounding=True`` allows :data:`GROUNDING_TOKENS`). Returns it stripped; raises ``ValueError`` naming
    ``what`` and what was expected."""
    hint = f" such as {example!r}" if example else ""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be a non-empty string{hint}, got {text!r}")
    if len(text) > max_chars:
        raise ValueError(f"{what} is {len(text)} characters long; at most {max_chars} are allowed")
    special = [t for t in _SPECIAL.findall(text) if not (grounding and t in GROUNDING_TOKENS)]
    if special:
        raise ValueError(f"{what} contains the special token(s) {sorted(set(special))}; these belong to the chat "
                         "template (images are passed separately, not written into the text)")
    return text.strip()


def math_instruction(rng: np.random.Generator) -> str:
    return MATH_INSTRUCTIONS[rng.integers(len(MATH_INSTRUCTIONS))]


#: what a policy built with ``board_first`` asks its backbone before reasoning about the whiteboard (a question of
#: the pretrained VLM's corpus); its answer, the solved equation, opens the reasoning
SOLVE_QUESTION = "Solve the equation on the whiteboard."
_BOARD_WORDS = re.compile(r"\b(white)?board\b|\bequation\b", re.IGNORECASE)
#: a solved equation at the start of a text, and what separates it from the rest ("45 ÷ 5 = 9. On the table ...")
_OPENING = re.compile(rf"\s*(\d{{1,3}} ?{_OPERATOR} ?\d{{1,3}} ?= ?\d{{1,3}})(?:[.,]\s*|\s*$)")


def mentions_board(instruction: str) -> bool:
    """Whether an instruction is about the whiteboard (names the board or an equation): the math instructions do,
    the toy instructions do not."""
    return bool(_BOARD_WORDS.search(instruction or ""))


def split_board_answer(text: str) -> tuple[str, str] | None:
    """A text that opens with a solved equation, cut after it: ``"45 ÷ 5 = 9, so the answer is 9. ..."`` ->
    ("45 ÷ 5 = 9", "So the answer is 9. ...") (the rest capitalised; "" if nothing follows); None if it does not
    open with one."""
    m = _OPENING.match(text or "")
    if m is None:
        return None
    rest = text[m.end():].strip()
    return m.group(1), rest[:1].upper() + rest[1:]


def toy_instruction(obj: str, target: str, direction: str, rng: np.random.Generator) -> str:
    template = TOY_INSTRUCTIONS[rng.integers(len(TOY_INSTRUCTIONS))]
    return template.format(object=obj, target=target, phrase=DIRECTION_PHRASES[direction])


def find_objects(text: str) -> list[str]:
    """Object names mentioned in ``text``, in order of appearance (longest names win)."""
    found = []
    lowered = text.lower()
    for name in sorted(OBJECTS, key=len, reverse=True):
        for m in re.finditer(re.escape(name), lowered):
            if not any(s <= m.start() < e for _, s, e in found):
                found.append((name, m.start(), m.end()))
    return [n for n, _, _ in sorted(found, key=lambda t: t[1])]


def _find_direction(text: str) -> str | None:
    lowered = text.lower()
    hits = [(lowered.find(phrase), d) for d, phrase in DIRECTION_PHRASES.items() if phrase in lowered]
    return min(hits)[1] if hits else None


def parse_toy_instruction(text: str) -> tuple[str, str, str]:
    """``"Pick the red cube and place it to the left of the mug"`` -> (object, target, direction).

    Raises ``ValueError`` naming the known objects and direction phrases when it cannot tell.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("instruction is empty; expected e.g. 'Pick the red cube and place it to the "
                         "left of the yellow duck'")
    objs = find_objects(text)
    direction = _find_direction(text)
    if len(objs) != 2 or direction is None:
        raise ValueError(
            f"cannot read '<object> <direction> <target>' from {text!r}: found objects {objs} and "
            f"direction {direction!r}. Known objects: {sorted(OBJECTS)}; directions: "
            f"{list(DIRECTION_PHRASES.values())}")
    return objs[0], objs[1], direction


# ---------------------------------------------------------------------------- positions


def describe_position(x: float, y: float) -> str:
    """Name of the card slot nearest to (x, y), e.g. ``"back left"``."""
    return min(CARD_SLOTS, key=lambda s: (CARD_SLOTS[s][0] - x) ** 2 + (CARD_SLOTS[s][1] - y) ** 2)


def cards_listing(cards: dict) -> str:
    """``"card 3 at the back left, card 7 at the front right"``: every card (digit -> table (x, y)) with its slot,
    back row first, left to right: the pretrained VLM's answer to "List the cards and where they are.", which the
    math reasoning repeats; the answer card's slot (and box) is read from it (:func:`parse_reasoning`)."""
    order = sorted(cards, key=lambda d: (-round(cards[d][0], 1), -cards[d][1]))
    return ", ".join(f"card {d} at the {describe_position(*cards[d])}" for d in order)


# ---------------------------------------------------------------------------- reasoning

# {pad}, {obj}, {tgt} and {place} are grounded phrases (:func:`~workbench.world.grounding.grounded`): the reasoning
# says *where* each thing is, in Qwen2-VL's box format on the table camera, as ChatVLA-2's does. The answer card is
# located by the list of cards ({cards}: each card with its slot), not restated: the parser takes its slot, and the
# slot's box, from the list (:func:`parse_reasoning`), so the model never has to copy a slot back out of its list.
# Every math phrasing opens with the solved equation, "{eq} = {ans}.", which is how the pretrained VLM already answers
# a board question ("Which card answers the equation?" -> "45 ÷ 5 = 9. The card 9 is at ..."): the reasoning starts
# on the VLM's own reading and solving instead of a new phrase that robot data, holding only one-digit + and -,
# would teach to read (docs/chatvla2_experiments.md, "The reasoning opens as the VLM answers").
_MATH_REASONING = (
    "{eq} = {ans}. On the table: {cards}. So I need the card {ans}. I will place it on {pad}.",
    "{eq} = {ans}, so the answer is {ans}. The cards: {cards}. I'll move the card {ans} to {pad}.",
    "{eq} = {ans}. I see {cards}. I'll carry the card {ans} to {pad}.",
)
_TOY_REASONING = (
    "I see {obj} and {tgt}. The {object} must go {place}. I'll pick up the {object} and put it there.",
    "The task names the {object} and the {target}; I can see {obj} and {tgt}. The goal is {place}, so I "
    "will grasp the {object} first.",
    "On the table are {obj} and {tgt}. I need to place the {object} {place}. First I pick up the {object}.",
)
_STEP = {
    "reach": ("Moving above the {thing}.", "Reaching for the {thing}.", "Going to the {thing}."),
    "grasp": ("Grasping the {thing}.", "Closing the gripper on the {thing}.", "Picking up the {thing}."),
    "lift": ("Lifting the {thing}.", "Raising the {thing} off the table.", "Holding the {thing} up."),
    "carry": ("Carrying the {thing} to {goal}.", "Moving the {thing} towards {goal}.",
              "Bringing the {thing} to {goal}."),
    "place": ("Lowering the {thing} {goal_at}.", "Putting the {thing} down {goal_at}.",
              "Setting the {thing} down {goal_at}."),
    "release": ("Releasing the {thing}.", "Opening the gripper to let go of the {thing}.",
                "Letting go of the {thing}."),
    "done": ("Done.", "The task is complete.", "Finished."),
}
PHASES = tuple(_STEP)


def equation_words(eq: Equation) -> str:
    """``"3 + 4"`` (the spelling used in reasoning: spaces around the operator)."""
    return f"{eq.a} {eq.op} {eq.b}"


def episode_reasoning(ground_truth: dict, rng: np.random.Generator) -> str:
    """What the model should say before acting, from an episode's ground truth (``info``): the facts and,
    grounded with their boxes on the table camera, what to pick and where to put it (math: the cards with their
    slots, the answer card by its digit, and the pad's box)."""
    from .grounding import affordance_box, grounded, pad_box, toy_box

    if ground_truth["task"] == "math_matching":
        ans = ground_truth["answer"]
        pad = grounded("the green pad", pad_box())
        cards = cards_listing({int(d): CARD_SLOTS[slot] for d, slot in ground_truth["cards"].items()})
        if ground_truth.get("equation") is None:  # a caller's whiteboard: only its answer is known
            return f"The whiteboard's answer is {ans}. On the table: {cards}. So I need the card {ans}. I will place " \
                   f"it on {pad}."
        eq = Equation.parse(ground_truth["equation"])
        template = _MATH_REASONING[rng.integers(len(_MATH_REASONING))]
        return template.format(eq=equation_words(eq), ans=eq.answer, pad=pad, cards=cards)
    obj, tgt, d = ground_truth["object"], ground_truth["target"], ground_truth["direction"]
    toys = ground_truth["toys"]
    phrase = DIRECTION_PHRASES[d]
    template = _TOY_REASONING[rng.integers(len(_TOY_REASONING))]
    return template.format(object=obj, target=tgt, obj=grounded(f"the {obj}", toy_box(obj, (*toys[obj][:2], 0.0))),
                           tgt=grounded(f"the {tgt}", toy_box(tgt, (*toys[tgt][:2], 0.0))),
                           place=grounded(f"{phrase} the {tgt}", affordance_box(toys[tgt], d)))


def step_reasoning(phase: str, ground_truth: dict, rng: np.random.Generator) -> str:
    """What the robot is doing in ``phase`` (one of :data:`PHASES`)."""
    if phase not in _STEP:
        raise ValueError(f"unknown phase {phase!r}; expected one of {list(_STEP)}")
    if ground_truth["task"] == "math_matching":
        thing = f"card {ground_truth['answer']}"
        goal, goal_at = "the green pad", "on the green pad"
    else:
        thing = ground_truth["object"]
        phrase = DIRECTION_PHRASES[ground_truth["direction"]]
        goal = goal_at = f"the spot {phrase} the {ground_truth['target']}"
    options = _STEP[phase]
    return options[rng.integers(len(options))].format(thing=thing, goal=goal, goal_at=goal_at)


@dataclass
class ReasoningFacts:
    """What a piece of reasoning text asserts. Fields it does not mention are ``None``."""

    equation: str | None = None  # "3+4" (no spaces, no "=?")
    answer: int | None = None
    card: int | None = None
    card_slot: str | None = None
    object: str | None = None
    target: str | None = None
    direction: str | None = None
    #: 0-1000 boxes (x1, y1, x2, y2) on the table camera: what to pick (the card / the object), the target
    #: object, and where to put it (the pad / the placement spot)
    pick_box: tuple | None = None
    target_box: tuple | None = None
    place_box: tuple | None = None
    #: the cards it lists, slot -> digit ("card 3 at the back left"; the first digit named at each slot)
    cards: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_EQ_RE = re.compile(rf"(\d{{1,3}})\s*({_OPERATOR})\s*(\d{{1,3}})\s*=\s*(\?|\d{{1,3}})")
_OP_ALIASES = {"x": "×", "*": "×", "/": "÷", ":": "÷", "−": "-"}


def _equations(text: str) -> list[tuple[str, str]]:
    """Every ``a op b = rhs`` in ``text`` as ("a op b" without spaces, rhs), operators normalised."""
    return [(f"{int(a)}{_OP_ALIASES.get(op, op)}{int(b)}", rhs) for a, op, b, rhs in _EQ_RE.findall(text or "")]


def parse_equation(text: str) -> tuple[str, str] | None:
    """The first equation in ``text``: ``"3 x 4 = 12"`` -> ("3×4", "12"); ``"12 − 5 = ?"`` -> ("12-5", "?");
    None if there is none."""
    found = _equations(text)
    return found[0] if found else None


def parse_reasoning(text: str) -> ReasoningFacts:
    """Read the facts back from reasoning text (robust to the phrasings above; never raises).

    Math: the card is the boxed one, else the last one named (the choice comes after the list). When the text lists
    the cards with their slots (``"card 8 at the back middle"``) and the chosen card is among them, its slot is the
    listed one and ``pick_box`` is that slot's card box on the table camera: the list is the model's reading of the
    table, and a slot or box restated later does not override it."""
    facts = ReasoningFacts()
    if not isinstance(text, str):
        return facts
    for equation, rhs in _equations(text):
        if facts.equation is None:
            facts.equation = equation
        if rhs != "?" and facts.answer is None and equation == facts.equation:
            facts.answer = int(rhs)
    m = re.search(r"answer is (\d+)", text)
    if m and facts.answer is None:
        facts.answer = int(m.group(1))
    picked = [m for phrase, _ in grounded_phrases(text) for m in [re.search(r"card (\d)\b", phrase)] if m]
    named = list(re.finditer(r"card (\d)\b", text))
    m = picked[0] if picked else (named[-1] if named else None)  # the boxed card, else the last one named (a list
    # of the cards on the table comes before the choice)
    if m:
        facts.card = int(m.group(1))
    facts.card_slot = _card_slot(text, facts.card)
    listing = listed_cards(text)
    facts.cards = {slot: d for d, slot in reversed(listing)} or None  # the first digit named per slot
    objs = find_objects(text)
    if objs:
        facts.object = objs[0]
        others = [o for o in objs if o != objs[0]]
        facts.target = others[0] if others else None
    facts.direction = _find_direction(text)
    for phrase, box in grounded_phrases(text):
        named = find_objects(phrase)
        if _find_direction(phrase) is not None or "pad" in phrase:
            slot = "place_box"
        elif "card" in phrase or (named and named[0] == facts.object):
            slot = "pick_box"
        elif named and named[0] == facts.target:
            slot = "target_box"
        else:
            continue
        if getattr(facts, slot) is None:
            setattr(facts, slot, box)
    listed = next((slot for d, slot in listing if d == facts.card), None)
    if listed is not None:  # the list of the cards says where the chosen card is: its slot and the slot's box win
        from .grounding import card_box

        facts.card_slot = listed
        facts.pick_box = tuple(round(v) for v in card_box(CARD_SLOTS[listed]))
    return facts


_SLOT_RE = re.compile(r"\bthe (" + "|".join(CARD_SLOTS) + r")\b")


def listed_cards(text: str) -> list[tuple[int, str]]:
    """Every ``card D at the SLOT`` in ``text`` (case-insensitive), in order: ``"card 3 at the back left, card 7 at
    the front middle"`` -> [(3, "back left"), (7, "front middle")]."""
    return [(int(d), slot) for d, slot in re.findall(r"card (\d) at the (" + "|".join(CARD_SLOTS) + ")",
                                                     (text or "").lower())]


def _first_slot(text: str, skip=()) -> str | None:
    return next((m.group(1) for m in _SLOT_RE.finditer(text) if m.group(1) not in skip), None)


def _card_slot(text: str, card: int | None) -> str | None:
    """The slot stated for ``card``: the first one named after its last mention that names one (each mention's
    span ends at the next card's mention, so a list of every card gives each its own slot); else the first slot
    named anywhere that the text does not give to another card."""
    mentions = list(re.finditer(r"card (\d)\b", text))
    slot = None
    for i, m in enumerate(mentions):
        if card is not None and int(m.group(1)) == card:
            end = mentions[i + 1].start() if i + 1 < len(mentions) else len(text)
            slot = _first_slot(text[m.end():end]) or slot
    return slot or _first_slot(text, skip={s for d, s in listed_cards(text) if d != card})


_GROUNDED_RE = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>\s*(<\|box_start\|>.*?<\|box_end\|>)")


def grounded_phrases(text: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Every ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in ``text``,
    as (phrase, box), in order (malformed boxes are skipped)."""
    from .grounding import parse_boxes

    out = []
    for phrase, box_text in _GROUNDED_RE.findall(text or ""):
        boxes = parse_boxes(box_text)
        if boxes:
            out.append((phrase.strip().lower(), boxes[0]))
    return out


def math_score_parts(facts: ReasoningFacts, ground_truth: dict) -> dict:
    """Per-fact correctness of math reasoning against ground truth (used by the paper-style
    OCR / math scores in evaluation)."""
    eq = Equation.parse(ground_truth["equation"])
    return {
        "equation": facts.equation == f"{eq.a}{eq.op}{eq.b}",
        "answer": facts.answer == eq.answer,
        "card": facts.card == eq.answer,
        "card_slot": facts.card_slot == ground_truth.get("answer_card_slot"),
    }


__all__ = [
    "PHASES", "ReasoningFacts", "cards_listing", "describe_position", "episode_reasoning", "equation_words",
    "find_objects", "listed_cards",
    "GROUNDING_TOKENS", "check_text", "grounded_phrases",
    "math_instruction", "math_score_parts", "parse_equation", "parse_reasoning", "parse_toy_instruction",
    "step_reasoning", "toy_instruction", "OPERATORS", "SOLVE_QUESTION", "mentions_board", "split_board_answer",
]
