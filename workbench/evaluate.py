"""Evaluation. ``knowledge``: what a VLM knows, on held-out data (the analogue of the paper's Table 5);
``policy``: a ChatVLA-2 policy acting in the simulator (closed loop).

    python -m workbench.evaluate knowledge --model data_samples/vlm [--per-skill 100] [--out outputs/knowledge.json]
    python -m workbench.evaluate policy --policy data_samples/policy --task math_matching --split open_world \
        --episodes 50 [--videos 2] [--out outputs/policy_math_open.json]
    python -m workbench.evaluate keypoints --policy data_samples/policy --episodes 50
    python -m workbench.evaluate report --policy data_samples/policy --episodes 25 \\
        --out data_samples/policy/results.json

``keypoints``: where the policy's pick and place-reference keypoints land against the simulator's ground truth.
``report``: closed-loop results on both tasks and splits, with generated and then with true (oracle) reasoning,
the keypoints, and the knowledge table of the pretrained VLM beside the policy's backbone (what the README
shows). ``knowledge`` accepts a policy folder too: it then evaluates the policy's backbone (MoE layers
included).

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

KNOWLEDGE_ROWS = ("ocr", "solve", "arithmetic", "cards", "objects", "spatial", "colour", "count", "ground_card",
                  "ground_toy", "affordance")
#: whiteboard rows repeated under each robustness condition (``"ocr no_frame"``, ``"solve sketch"``, ...)
ROBUSTNESS_KINDS = ("ocr", "solve")


def parse_cards(text: str) -> dict[int, str]:
    """``"card 3 at the back left, card 7 at the front middle"`` -> {3: "back left", 7: "front middle"}."""
    return {int(d): slot for d, slot in re.findall(r"card (\d) at the ((?:front|back) (?:left|middle|right))",
                                                   text or "")}


def _box_hit(box, truth) -> bool:
    """A predicted box finds an object when its centre lies inside the true box or IoU >= 0.5."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]:
        return True
    ix = max(0.0, min(box[2], truth[2]) - max(box[0], truth[0]))
    iy = max(0.0, min(box[3], truth[3]) - max(box[1], truth[1]))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1]) - ix * iy
    return union > 0 and ix * iy / union >= 0.5


def score(sample: Sample, output: str) -> bool:
    """Whether ``output`` answers ``sample`` correctly (lenient parsing, strict facts)."""
    from .vlm.corpus import affordance_ok, parse_boxes, table_point

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
        from .vlm.corpus import NUMBER_WORDS

        return out.split()[:1] == [NUMBER_WORDS[f["count"]]]
    if sample.kind in ("ground_card", "ground_toy"):
        boxes = parse_boxes(raw)
        return len(boxes) == 1 and _box_hit(boxes[0], f["box"])
    if sample.kind == "affordance":
        boxes = parse_boxes(raw)
        if len(boxes) != 1:
            return False
        x1, y1, x2, y2 = boxes[0]
        return affordance_ok(table_point((x1 + x2) / 2, (y1 + y2) / 2), f["target_xy"], f["direction"])
    raise ValueError(f"cannot score kind {sample.kind!r}")


def knowledge_samples(per_skill: int, seed: int = 1234, robustness: bool = True) -> list[Sample]:
    """The fixed held-out evaluation set: ``per_skill`` samples of each row (``sample.facts["row"]``): every
    kind of :data:`KNOWLEDGE_ROWS` and, with ``robustness``, OCR and solving under every condition."""
    from .vlm.corpus import CONDITIONS

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
    from .vlm.api import ask

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
                    "env": "caller's image via env"}


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


# ---------------------------------------------------------------------------------------------- policy
#: first environment seed of closed-loop evaluation (training episodes use seeds drawn in [0, 2**31))
EVAL_SEED = 10_000


def reasoning_scores(facts, ground_truth: dict) -> dict:
    """The paper's reasoning scores for one episode, from the parsed reasoning ``facts``.

    Math matching: ``ocr`` (0-4) = first operand, operator, second operand read from the board and the
    answer card's slot read from the table; ``math`` (0-2) = the answer and the card chosen. Toy placement:
    ``recognition`` (0-1) = mean of object and target named correctly; ``spatial`` (0/1) = the side."""
    from .world.catalog import Equation

    if ground_truth["task"] == "math_matching":
        truth = Equation.parse(ground_truth["equation"])
        read = re.fullmatch(r"(\d+)([+\-×÷])(\d+)", facts.equation or "")
        a, op, b = (int(read[1]), read[2], int(read[3])) if read else (None, None, None)
        ocr = sum([a == truth.a, op == truth.op, b == truth.b, facts.card_slot == ground_truth["answer_card_slot"]])
        return {"ocr": ocr, "math": int(facts.answer == truth.answer) + int(facts.card == truth.answer)}
    return {"recognition": (int(facts.object == ground_truth["object"]) + int(facts.target == ground_truth["target"]))
            / 2, "spatial": int(facts.direction == ground_truth["direction"])}


def conclusion_right(facts, ground_truth: dict) -> bool:
    """Whether the reasoning's conclusion names what the robot must do: math matching, the answer card and
    its slot; toy placement, the object, the target and the side. Success without it is luck or a shortcut."""
    if ground_truth["task"] == "math_matching":
        from .world.catalog import Equation

        return facts.card == Equation.parse(ground_truth["equation"]).answer \
            and facts.card_slot == ground_truth["answer_card_slot"]
    return (facts.object, facts.target, facts.direction) == \
        (ground_truth["object"], ground_truth["target"], ground_truth["direction"])


def evaluate_policy(policy, task: str, split: str, episodes: int = 50, seed: int = EVAL_SEED, videos: int = 0,
                    video_dir: str | None = None, progress: bool = True, oracle_reasoning: bool = False) -> dict:
    """Closed-loop success of ``policy`` on ``episodes`` seeded episodes (seeds ``seed`` .. ``seed + episodes - 1``),
    with a Wilson 95% interval, the mean reasoning scores (:func:`reasoning_scores`), and success split by
    whether the reasoning's conclusion was right (:func:`conclusion_right`). The first ``videos``
    episodes are saved as GIFs in ``video_dir``. ``oracle_reasoning``: the policy is handed the ground-truth
    reasoning (as annotated in the datasets) instead of generating it, which measures the action side alone."""
    import numpy as np

    from .controllers import PolicyController
    from .viz import episode_frames, save_gif
    from .world.env import TabletopEnv
    from .world.language import ReasoningFacts, episode_reasoning
    from .world.rollout import rollout

    def truth(info, env_seed):  # the reasoning annotated in the datasets
        return episode_reasoning(info, np.random.default_rng(env_seed))

    controller = PolicyController(policy, reasoning=truth if oracle_reasoning else None)
    env = TabletopEnv(task, split)
    records = []
    for i in tqdm(range(episodes), desc=f"{task}/{split}", disable=not progress):
        env_seed = seed + i
        ep = rollout(env, controller, seed=env_seed, record_overview=i < videos)
        instruction = ep.ground_truth["instruction"]
        facts = policy.facts or ReasoningFacts()
        records.append({"seed": env_seed, "success": ep.success, "steps": len(ep), "error": ep.error,
                        "instruction": instruction, "reasoning": policy.reasoning, "facts": facts.to_dict(),
                        "scores": reasoning_scores(facts, ep.ground_truth),
                        "conclusion_right": conclusion_right(facts, ep.ground_truth)})
        if i < videos and video_dir:
            os.makedirs(video_dir, exist_ok=True)
            frames = episode_frames(ep, [policy.reasoning or ""] * len(ep))
            save_gif(frames, os.path.join(video_dir, f"{task}_{split}_{i}.gif"))
    env.close()
    wins = sum(r["success"] for r in records)
    lo, hi = wilson_interval(wins, len(records))
    keys = records[0]["scores"] if records else {}
    right = [r for r in records if r["conclusion_right"]]
    return {"task": task, "split": split, "oracle_reasoning": oracle_reasoning, "episodes": len(records),
            "successes": wins, "conclusion_right": len(right),
            "successes_when_right": sum(r["success"] for r in right),
            "success_rate": wins / max(1, len(records)), "ci95": [lo, hi],
            "scores": {k: float(np.mean([r["scores"][k] for r in records])) for k in keys},
            "mean_steps": float(np.mean([r["steps"] for r in records])) if records else 0.0, "records": records}


def evaluate_keypoints(policy, task: str, split: str, episodes: int = 50, seed: int = EVAL_SEED,
                       oracle_reasoning: bool = True, progress: bool = True) -> dict:
    """Where the policy's keypoints 0 (pick) and 1 (place reference) land at each episode's first step, against
    the simulator's ground truth projected into the table camera (:func:`~workbench.world.env.anchor_points`),
    in table-camera tokens (one token is about 3 cm of table). ``hits``: episodes whose pick keypoint is nearer
    the thing to pick than any other card or toy on the table. Seeds as in :func:`evaluate_policy`."""
    import numpy as np

    from .vla.policy import token_spacing
    from .world.env import CARD_SLOTS, TabletopEnv, anchor_points
    from .world.language import episode_reasoning

    if not policy.config.num_keypoints:
        raise ValueError("this policy has no keypoints (num_keypoints=0)")
    env = TabletopEnv(task, split)
    records = []
    for i in tqdm(range(episodes), desc=f"keypoints {task}/{split}", disable=not progress):
        env_seed = seed + i
        obs, _ = env.reset(seed=env_seed)
        gt = env.ground_truth()
        policy.reset(seed=env_seed)
        reasoning = episode_reasoning(gt, np.random.default_rng(env_seed)) if oracle_reasoning else None
        policy.predict_action_chunk(obs, gt["instruction"], reasoning=reasoning)
        feats = policy.last_features
        token = token_spacing(feats.coords).numpy()  # (2,) one token in grid units (row, col)
        found = feats.keypoints[0, :4].view(2, 2).numpy() / token
        wanted = policy.keypoint_targets(anchor_points(gt)).numpy() / token
        if task == "math_matching":  # every card on the table, and which one is the answer
            names, right = list(gt["cards"].values()), gt["answer_card_slot"]
            things = [CARD_SLOTS[slot] for slot in names]
        else:
            names, right = list(gt["toys"]), gt["object"]
            things = list(gt["toys"].values())
        places = policy.keypoint_targets(np.stack([things, things], 1))[:, 0].numpy() / token  # (M, 2)
        nearest = names[int(np.linalg.norm(places - found[0], axis=-1).argmin())]
        records.append({"seed": env_seed, "pick_error": float(np.linalg.norm(found[0] - wanted[0])),
                        "ref_error": float(np.linalg.norm(found[1] - wanted[1])), "hit": nearest == right})
    env.close()
    return {"task": task, "split": split, "oracle_reasoning": oracle_reasoning, "episodes": len(records),
            "pick_error_median": float(np.median([r["pick_error"] for r in records])),
            "ref_error_median": float(np.median([r["ref_error"] for r in records])),
            "hits": sum(r["hit"] for r in records), "records": records}


def format_keypoint_result(r: dict) -> str:
    oracle = " (oracle reasoning)" if r["oracle_reasoning"] else ""
    return (f"keypoints {r['task']} / {r['split']}{oracle}: pick error median {r['pick_error_median']:.2f} tokens, "
            f"nearest the right one in {r['hits']}/{r['episodes']}; place-reference error median "
            f"{r['ref_error_median']:.2f} tokens")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sensible at 0% and 100%)."""
    import numpy as np

    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def on_every_task_and_split(evaluate, format_result) -> list[dict]:
    """``evaluate(task, split)`` on both tasks and both splits, each result printed (``format_result``) as it
    comes."""
    from .world.catalog import SPLIT_NAMES, TASKS

    results = []
    for task in TASKS:
        for split in SPLIT_NAMES:
            results.append(evaluate(task, split))
            print(format_result(results[-1]))
    return results


def evaluate_policy_everywhere(policy, episodes: int, open_world_videos: int = 0, video_dir: str | None = None,
                               progress: bool = True, oracle_reasoning: bool = False) -> list[dict]:
    """:func:`evaluate_policy` on both tasks and both splits, each result printed as it comes."""
    return on_every_task_and_split(
        lambda task, split: evaluate_policy(
            policy, task, split, episodes, videos=open_world_videos if split == "open_world" else 0,
            video_dir=video_dir, progress=progress, oracle_reasoning=oracle_reasoning),
        format_policy_result)


def format_policy_result(r: dict) -> str:
    scores = ", ".join(f"{k} {v:.2f}" for k, v in r["scores"].items())
    oracle = " (oracle reasoning)" if r.get("oracle_reasoning") else ""
    return (f"{r['task']} / {r['split']}{oracle}: {r['successes']}/{r['episodes']} = {100 * r['success_rate']:.1f}% "
            f"(95% CI {100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}%); reasoning scores: {scores}; "
            f"mean steps {r['mean_steps']:.1f}; conclusion right in {r['conclusion_right']}, success "
            f"{r['successes_when_right']}/{r['conclusion_right']} when right, "
            f"{r['successes'] - r['successes_when_right']}/{r['episodes'] - r['conclusion_right']} when wrong")


def policy_report(policy_path: str, vlm_path: str, episodes: int = 25, per_skill: int = 25,
                  progress: bool = True, oracle: bool = True) -> dict:
    """What the README reports for a trained policy: closed-loop success on both tasks and splits with the
    reasoning it generates and, if ``oracle``, again with the true reasoning handed to it (the action side
    alone); where its keypoints land (:func:`evaluate_keypoints`, true reasoning); and the knowledge table of
    the pretrained VLM beside the policy's backbone (same held-out questions)."""
    from .vla.policy import load_policy
    from .vlm.api import load_vlm

    policy = load_policy(policy_path)
    closed = evaluate_policy_everywhere(policy, episodes, progress=progress)  # every episode's record kept
    if oracle:
        closed += evaluate_policy_everywhere(policy, episodes, progress=progress, oracle_reasoning=True)
    keypoints = on_every_task_and_split(
        lambda task, split: evaluate_keypoints(policy, task, split, episodes, progress=progress),
        format_keypoint_result) if policy.config.num_keypoints else []
    knowledge = {"pretrained": evaluate_knowledge(*load_vlm(vlm_path), per_skill, progress=progress)["rows"],
                 "policy": evaluate_knowledge(policy.vlm, policy.processor, per_skill, progress=progress)["rows"]}
    return {"policy": policy_path, "pretrained_vlm": vlm_path, "episodes_per_split": episodes,
            "eval_seeds": [EVAL_SEED, EVAL_SEED + episodes - 1], "knowledge_per_skill": per_skill,
            "closed_loop": closed, "keypoints": keypoints, "knowledge": knowledge}


def format_retention(knowledge: dict) -> str:
    """Knowledge table: pretrained VLM vs the policy's backbone, per row, with the difference."""
    before = {r["key"]: r for r in knowledge["pretrained"]}
    lines = [f"| {'skill':<32} | {'pretrained':>10} | {'ChatVLA-2':>9} | {'change':>7} | {'N':>4} |",
             f"|{'-' * 34}|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 6}|"]
    for r in knowledge["policy"]:
        b = before.get(r["key"])
        if b is not None:
            lines.append(f"| {r['skill']:<32} | {100 * b['accuracy']:>9.1f}% | {100 * r['accuracy']:>8.1f}% | "
                         f"{100 * (r['accuracy'] - b['accuracy']):>+6.1f} | {r['n']:>4} |")
    return "\n".join(lines)


def load_backbone(path: str):
    """(VLM, processor) of a VLM checkpoint folder or of a policy folder (its MoE backbone)."""
    from .vla.policy import is_policy_folder, load_policy
    from .vlm.api import load_vlm

    if is_policy_folder(path):
        policy = load_policy(path)
        return policy.vlm, policy.processor
    return load_vlm(path)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.evaluate", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("knowledge", help="knowledge suite of a VLM checkpoint")
    k.add_argument("--model", required=True, help="VLM checkpoint folder, or a policy folder (its backbone)")
    k.add_argument("--per-skill", type=int, default=100)
    k.add_argument("--seed", type=int, default=1234)
    k.add_argument("--out", default=None, help="JSON file for the table and examples")
    r = sub.add_parser("report", help="closed-loop results on both tasks/splits + knowledge retention (JSON)")
    r.add_argument("--policy", required=True)
    r.add_argument("--vlm", default="data_samples/vlm", help="the pretrained VLM the policy started from")
    r.add_argument("--episodes", type=int, default=25, help="episodes per task and split")
    r.add_argument("--per-skill", type=int, default=25)
    r.add_argument("--out", required=True, help="JSON file (e.g. POLICY/results.json)")
    r.add_argument("--no-oracle", action="store_true",
                   help="skip the second pass with the true reasoning handed to the policy")
    kp = sub.add_parser("keypoints", help="where a policy's keypoints land, on both tasks and splits")
    kp.add_argument("--policy", required=True, help="policy folder")
    kp.add_argument("--episodes", type=int, default=50)
    kp.add_argument("--generated-reasoning", action="store_true",
                    help="let the policy generate its reasoning (default: hand it the true reasoning)")
    kp.add_argument("--out", default=None, help="JSON file for the results and every episode's errors")
    p = sub.add_parser("policy", help="closed-loop evaluation of a policy in the simulator")
    p.add_argument("--policy", required=True, help="policy folder")
    p.add_argument("--task", required=True, choices=["math_matching", "toy_placement"])
    p.add_argument("--split", required=True, choices=["in_domain", "open_world"])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--videos", type=int, default=0, help="save this many episodes as GIFs next to --out")
    p.add_argument("--oracle-reasoning", action="store_true",
                   help="hand the policy the ground-truth reasoning (measures the action side alone)")
    p.add_argument("--out", default=None, help="JSON file for the result and every episode's reasoning")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.what == "policy":
        return _main_policy(ap, args)
    if args.what == "keypoints":
        return _main_keypoints(ap, args)
    if args.what == "report":
        result = policy_report(args.policy, args.vlm, args.episodes, args.per_skill, oracle=not args.no_oracle)
        print(format_retention(result["knowledge"]))
        return _write_json(args.out, result)
    if args.per_skill < 1:
        ap.error("--per-skill must be at least 1")
    model, processor = load_backbone(args.model)
    result = evaluate_knowledge(model, processor, args.per_skill, args.seed)
    result["model"] = args.model
    print(format_table(result, f"Knowledge of {args.model} (held-out, seed {args.seed})"))
    if args.out:
        _write_json(args.out, result)


def _main_policy(ap, args):
    from .vla.policy import load_policy

    if args.episodes < 1:
        ap.error("--episodes must be at least 1")
    policy = load_policy(args.policy)
    video_dir = os.path.splitext(args.out)[0] + "_videos" if args.out and args.videos else None
    result = evaluate_policy(policy, args.task, args.split, args.episodes, args.seed, args.videos, video_dir,
                             oracle_reasoning=args.oracle_reasoning)
    result["policy"] = args.policy
    print(format_policy_result(result))
    if args.out:
        _write_json(args.out, result)


def _main_keypoints(ap, args):
    from .vla.policy import load_policy

    if args.episodes < 1:
        ap.error("--episodes must be at least 1")
    policy = load_policy(args.policy)
    results = on_every_task_and_split(
        lambda task, split: evaluate_keypoints(policy, task, split, args.episodes,
                                               oracle_reasoning=not args.generated_reasoning),
        format_keypoint_result)
    if args.out:
        _write_json(args.out, {"policy": args.policy, "keypoints": results})


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
