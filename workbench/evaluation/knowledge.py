"""The knowledge suite: what a VLM knows, on held-out data (the analogue of the paper's Table 5).

Rows (each on the corpus' held-out split: held-out writing styles and hand-writing seeds, whiteboard
equations never shown on a board in training, fresh layouts), with N:

* OCR exact match: the whiteboard transcribed exactly (``"12 - 5 = ?"``).
* Arithmetic (per operator): the answer to a held-out whiteboard equation (read *and* solved).
* Arithmetic, text: ``"What is 7 × 8?"`` (facts taught in text form).
* Card reading + position: every card on the table named with its slot, nothing extra.
* Object recognition: the exact set of toys on the table (all 14 toys, including those robot data
  holds out).
* Spatial relations: left / right / in front / behind between two toys.
* Colour, count: the general (digit-free) skills.
* Grounding of cards and toys: the box written for a named card or toy finds it (IoU >= 0.5 or its centre
  inside); placement affordance: a toy put at the centre of the box written for "where should X go to be
  <side> of Y?" would satisfy the environment's success rule.
* Robustness rows of the board (OCR and solving): no frame, coloured ink, tilted, a mouse sketch, a caller's
  image through the env's whiteboard.

Answers come from greedy ``generate()`` with a KV cache and are parsed leniently (spacing, ``x``/``*``
for ×, ``/`` for ÷); output that cannot be parsed counts as wrong. Works on any Qwen2-VL checkpoint of
the project, including later ones with MoE layers.
"""

from __future__ import annotations

import re

from tqdm.auto import tqdm

from ..vlm.corpus import CorpusGenerator, CorpusRenderer, Sample
from ..world.language import find_objects, parse_equation
from . import wilson_interval

KNOWLEDGE_ROWS = ("ocr", "solve", "arithmetic", "cards", "objects", "spatial", "colour", "count", "ground_card",
                  "ground_toy", "affordance")
#: whiteboard rows repeated under each robustness condition (``"ocr no_frame"``, ``"solve sketch"``, ...)
ROBUSTNESS_KINDS = ("ocr", "solve")


def parse_cards(text: str) -> dict[int, str]:
    """``"card 3 at the back left, card 7 at the front middle"`` -> {3: "back left", 7: "front middle"}."""
    from ..world.language import listed_cards

    return dict(listed_cards(text))


def score(sample: Sample, output: str) -> bool:
    """Whether ``output`` answers ``sample`` correctly (lenient parsing, strict facts)."""
    from ..world.grounding import box_hit, parse_boxes, placement_ok

    f, raw = sample.facts, (output or "").strip()
    out = raw.lower()
    if sample.kind == "ocr":
        eq = parse_equation(out)
        return eq is not None and eq == (f["equation"], "?")
    if sample.kind == "solve":
        eq = parse_equation(out)
        return eq is not None and eq[1] == str(f["answer"])
    if sample.kind == "arithmetic":
        m = re.search(r"-?\d+", out)
        return m is not None and int(m.group()) == f["answer"]
    if sample.kind == "cards":
        return parse_cards(out) == {int(d): s for d, s in f["cards"].items()}
    if sample.kind == "card_where":
        return f["slot"] in out
    if sample.kind == "objects":
        return sorted(find_objects(out)) == sorted(f["objects"])
    if sample.kind == "spatial":
        words = {"left": "left", "right": "right", "in front": "front", "front": "front", "behind": "behind"}
        said = [v for k, v in words.items() if k in out]
        return bool(said) and said[0] == f["relation"] and len(set(said)) == 1
    if sample.kind == "colour":
        return out.split()[:1] == [f["colour"]]
    if sample.kind == "count":
        from ..vlm.corpus import NUMBER_WORDS

        return out.split()[:1] == [NUMBER_WORDS[f["count"]]]
    if sample.kind in ("ground_card", "ground_toy"):
        boxes = parse_boxes(raw)
        return len(boxes) == 1 and box_hit(boxes[0], f["box"])
    if sample.kind == "affordance":
        boxes = parse_boxes(raw)
        return len(boxes) == 1 and placement_ok(boxes[0], f["target_xy"], f["direction"])
    raise ValueError(f"cannot score kind {sample.kind!r}")


def knowledge_samples(per_skill: int, seed: int = 1234, robustness: bool = True) -> list[Sample]:
    """The fixed held-out evaluation set: ``per_skill`` samples of each row (``sample.facts["row"]``): every
    kind of :data:`KNOWLEDGE_ROWS` and, with ``robustness``, OCR and solving under every condition."""
    from ..vlm.corpus import CONDITIONS

    out = []
    gen = CorpusGenerator("heldout", seed=seed)
    for kind in KNOWLEDGE_ROWS:
        for _ in range(per_skill):
            s = gen.sample(kind)
            s.facts["row"] = kind
            out.append(s)
    for condition in CONDITIONS if robustness else ():
        gen = CorpusGenerator("heldout", seed=seed, condition=condition)
        for kind in ROBUSTNESS_KINDS:
            for _ in range(per_skill):
                s = gen.sample(kind)
                s.facts["row"] = f"{kind} {condition}"
                out.append(s)
    return out


def evaluate_knowledge(model, processor, per_skill: int = 100, seed: int = 1234, progress: bool = True,
                       samples: list[Sample] | None = None, renderer: CorpusRenderer | None = None,
                       robustness: bool = True) -> dict:
    """Run the knowledge suite; returns ``{"rows": [{"skill", "key", "correct", "n", "accuracy", "ci"}...],
    "examples": [...]}``. Solving is also broken down per operator."""
    from ..vlm.api import ask

    samples = samples if samples is not None else knowledge_samples(per_skill, seed, robustness)
    own = renderer is None
    renderer = renderer or CorpusRenderer()
    tally: dict[str, list[int]] = {}
    examples = []
    for s in tqdm(samples, desc="knowledge", disable=not progress):
        out = ask(model, processor, renderer(s), s.question, max_new_tokens=64)
        ok = score(s, out)
        keys = [s.facts.get("row", s.kind)]
        if keys[0] == "solve":
            keys.append(f"solve {_op(s)}")
        for k in keys:
            c = tally.setdefault(k, [0, 0])
            c[0] += ok
            c[1] += 1
        if len(examples) < 60 and (not ok or len(examples) < 15):
            examples.append({"row": keys[0], "question": s.question, "expected": s.answer, "output": out, "ok": ok})
    if own:
        renderer.close()
    rows = [{"skill": row_label(k), "key": k, "correct": c, "n": n, "accuracy": c / n,
             "ci": wilson_interval(c, n)} for k, (c, n) in tally.items()]
    order = {k: i for i, k in enumerate(KNOWLEDGE_ROWS)}
    rows.sort(key=lambda r: (order.get(r["key"].split()[0], 99), len(r["key"].split()[-1]) == 1, r["key"]))
    return {"rows": rows, "examples": examples, "per_skill": per_skill, "seed": seed}


def _op(sample: Sample) -> str:
    """The operator of a board sample's equation (``"12-5"`` -> ``"-"``)."""
    return next(op for op in "+-×÷" if op in sample.facts["equation"])


LABELS = {"ocr": "OCR exact match", "solve": "Arithmetic on the board", "arithmetic": "Arithmetic, text",
          "cards": "Card reading + position", "objects": "Object recognition", "spatial": "Spatial relations",
          "colour": "Colour", "count": "Count", "ground_card": "Grounding: cards", "ground_toy": "Grounding: toys",
          "affordance": "Placement affordance"}
CONDITION_LABELS = {"no_frame": "no frame", "coloured_ink": "coloured ink", "tilted": "tilted",
                    "sketch": "mouse sketch",
                    "env": "caller's image via env", "raw": "caller's image at its own size",
                    "shape": "caller's image, not 2:1", "photo": "photo of the board on a wall"}


def row_label(key: str) -> str:
    """``"ocr sketch"`` -> ``"OCR exact match, mouse sketch"``; ``"solve +"`` -> ``"Arithmetic on the board (+)"``."""
    kind, _, rest = key.partition(" ")
    label = LABELS.get(kind, kind)
    if not rest:
        return label
    return f"{label} ({rest})" if len(rest) == 1 else f"{label}, {CONDITION_LABELS.get(rest, rest)}"


def format_table(result: dict, title: str = "Knowledge (held-out)") -> str:
    """A markdown table of a knowledge result: skill, accuracy, 95% Wilson interval, N."""
    w = max([36] + [len(r["skill"]) for r in result["rows"]])
    lines = [title, f"| {'skill':<{w}} | {'accuracy':>8} | {'95% CI':>13} | {'N':>5} |",
             f"|{'-' * (w + 2)}|{'-' * 10}|{'-' * 15}|{'-' * 7}|"]
    for r in result["rows"]:
        lo, hi = r.get("ci") or wilson_interval(r["correct"], r["n"])
        lines.append(f"| {r['skill']:<{w}} | {100 * r['accuracy']:>7.1f}% | {100 * lo:>5.1f}–{100 * hi:>5.1f}% | "
                     f"{r['n']:>5} |")
    return "\n".join(lines)


def load_backbone(path: str):
    """(VLM, processor) of a VLM checkpoint folder or of a policy folder (its MoE backbone)."""
    from ..vla.policy import is_policy_folder, load_policy
    from ..vlm.api import load_vlm

    if is_policy_folder(path):
        policy = load_policy(path)
        return policy.vlm, policy.processor
    return load_vlm(path)
