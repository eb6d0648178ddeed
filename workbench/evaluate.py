"""Evaluation. ``knowledge``: what a VLM knows, on held-out data (the analogue of the paper's Table 5).

    python -m workbench.evaluate knowledge --model data_samples/vlm [--per-skill 100] [--out outputs/knowledge.json]

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

Answers come from greedy ``generate()`` with a KV cache and are parsed leniently (spacing, ``x``/``*``
for ×, ``/`` for ÷); output that cannot be parsed counts as wrong. Works on any Qwen2-VL checkpoint of
the project, including later ones with MoE layers.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from tqdm.auto import tqdm

from .vlm.corpus import CorpusGenerator, CorpusRenderer, Sample
from .world.language import find_objects, parse_equation

KNOWLEDGE_ROWS = ("ocr", "solve", "arithmetic", "cards", "objects", "spatial", "colour", "count")


def parse_cards(text: str) -> dict[int, str]:
    """``"card 3 at the back left, card 7 at the front middle"`` -> {3: "back left", 7: "front middle"}."""
    return {int(d): slot for d, slot in re.findall(r"card (\d) at the ((?:front|back) (?:left|middle|right))",
                                                   text or "")}


def score(sample: Sample, output: str) -> bool:
    """Whether ``output`` answers ``sample`` correctly (lenient parsing, strict facts)."""
    f, out = sample.facts, (output or "").strip().lower()
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
        from .vlm.corpus import NUMBER_WORDS

        return out.split()[:1] == [NUMBER_WORDS[f["count"]]]
    raise ValueError(f"cannot score kind {sample.kind!r}")


def knowledge_samples(per_skill: int, seed: int = 1234) -> list[Sample]:
    """The fixed held-out evaluation set: ``per_skill`` samples of each row's kind."""
    gen = CorpusGenerator("heldout", seed=seed)
    return [gen.sample(kind) for kind in KNOWLEDGE_ROWS for _ in range(per_skill)]


def evaluate_knowledge(model, processor, per_skill: int = 100, seed: int = 1234, progress: bool = True,
                       samples: list[Sample] | None = None, renderer: CorpusRenderer | None = None) -> dict:
    """Run the knowledge suite; returns ``{"rows": [{"skill", "correct", "n", "accuracy"}...],
    "examples": [...]}``. Arithmetic is also broken down per operator."""
    from .vlm.api import ask

    samples = samples if samples is not None else knowledge_samples(per_skill, seed)
    own = renderer is None
    renderer = renderer or CorpusRenderer()
    tally: dict[str, list[int]] = {}
    examples = []
    for s in tqdm(samples, desc="knowledge", disable=not progress):
        out = ask(model, processor, renderer(s), s.question, max_new_tokens=64)
        ok = score(s, out)
        keys = [s.kind]
        if s.kind == "solve":
            keys.append(f"solve {_op(s)}")
        for k in keys:
            c = tally.setdefault(k, [0, 0])
            c[0] += ok
            c[1] += 1
        if len(examples) < 40 and (not ok or len(examples) < 10):
            examples.append({"kind": s.kind, "question": s.question, "expected": s.answer, "output": out, "ok": ok})
    if own:
        renderer.close()
    rows = [{"skill": LABELS.get(k.split()[0], k) + (f" ({k.split()[1]})" if " " in k else ""), "key": k,
             "correct": c, "n": n, "accuracy": c / n} for k, (c, n) in tally.items()]
    order = {k: i for i, k in enumerate(KNOWLEDGE_ROWS)}
    rows.sort(key=lambda r: (order.get(r["key"].split()[0], 99), r["key"]))
    return {"rows": rows, "examples": examples, "per_skill": per_skill, "seed": seed}


def _op(sample: Sample) -> str:
    """The operator of a board sample's equation (``"12-5"`` -> ``"-"``)."""
    return next(op for op in "+-×÷" if op in sample.facts["equation"])


LABELS = {"ocr": "OCR exact match", "solve": "Arithmetic on the board", "arithmetic": "Arithmetic, text",
          "cards": "Card reading + position", "objects": "Object recognition", "spatial": "Spatial relations",
          "colour": "Colour", "count": "Count"}


def format_table(result: dict, title: str = "Knowledge (held-out)") -> str:
    lines = [title, f"| {'skill':<32} | {'accuracy':>8} | {'N':>5} |", f"|{'-' * 34}|{'-' * 10}|{'-' * 7}|"]
    for r in result["rows"]:
        lines.append(f"| {r['skill']:<32} | {100 * r['accuracy']:>7.1f}% | {r['n']:>5} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.evaluate", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("knowledge", help="knowledge suite of a VLM checkpoint")
    k.add_argument("--model", required=True, help="VLM checkpoint folder")
    k.add_argument("--per-skill", type=int, default=100)
    k.add_argument("--seed", type=int, default=1234)
    k.add_argument("--out", default=None, help="JSON file for the table and examples")
    args = ap.parse_args(argv)
    if args.per_skill < 1:
        ap.error("--per-skill must be at least 1")
    import torch

    from .vlm.api import load_vlm

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, processor = load_vlm(args.model)
    result = evaluate_knowledge(model, processor, args.per_skill, args.seed)
    result["model"] = args.model
    print(format_table(result, f"Knowledge of {args.model} (held-out, seed {args.seed})"))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
