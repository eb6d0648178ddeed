"""Evaluation. ``knowledge``: what a VLM knows, on held-out data (the analogue of the paper's Table 5);
``policy``: a ChatVLA-2 policy acting in the simulator (closed loop). This module is the command line; the code is
in :mod:`workbench.evaluation`.

    python -m workbench.evaluate knowledge --model data_samples/vlm [--per-skill 100] [--rows "ocr shape,solve shape"] \
        [--out outputs/knowledge.json]
    python -m workbench.evaluate policy --policy data_samples/policy --task math_matching --split open_world \
        --episodes 50 [--videos 2] [--out outputs/policy_math_open.json]
    python -m workbench.evaluate following --policy data_samples/policy --episodes 50 [--out outputs/following.json]
    python -m workbench.evaluate reasoning --policy runs/s2 [--episodes 10] [--per-skill 12] [--out outputs/s2.json]
    python -m workbench.evaluate report --policy data_samples/policy --episodes 25 \\
        --out data_samples/policy/results.json
    python -m workbench.evaluate positions --model data_samples/vlm [--images 120] [--boxes 30] [--out F]

``reasoning``: the reasoning a policy (or a stage-2 checkpoint) generates at the first frame of held-out episodes,
scored without acting, and a slice of the knowledge suite (no robustness rows): a check in a few minutes.
``following``: counterfactual following on held-out (open-world) scenes of both tasks: the policy is handed the
reasoning of another task in the same scene (another card; another side or another toy), the episode ends when that
task is done, and the robot's outcome is checked against what that text says.
``positions``: does a VLM know where things are (:mod:`workbench.evaluation.positions`): linear probes of each
image token's row and column and of the card digit or toy it lies on, the error of the boxes it writes against always
answering the mean box, and whether any attention head looks at the named card or toy more than at the others when
it writes the box.
``report``: closed-loop results on both tasks and splits, with generated and then with true (oracle) reasoning,
counterfactual following, and the knowledge table of the pretrained VLM beside the policy's backbone (what the README
shows). ``knowledge`` accepts a policy folder too: it then evaluates the policy's backbone (MoE layers
included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from .evaluation.closed_loop import (
    EVAL_SEED,
    evaluate_following,
    evaluate_policy,
    evaluate_reasoning,
    format_following_result,
    format_policy_result,
    format_reasoning_result,
    on_every_task_and_split,
)
from .evaluation.knowledge import evaluate_knowledge, format_table, load_backbone
from .evaluation.report import format_retention, policy_report
from .settings import use_all_cores


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.evaluate", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("knowledge", help="knowledge suite of a VLM checkpoint")
    k.add_argument("--model", required=True, help="VLM checkpoint folder, or a policy folder (its backbone)")
    k.add_argument("--per-skill", type=int, default=100)
    k.add_argument("--seed", type=int, default=1234)
    k.add_argument("--rows", default=None, help="only these rows, comma-separated keys (e.g. 'ocr shape,solve shape'); "
                   "the same questions as in the whole suite")
    k.add_argument("--out", default=None, help="JSON file for the table and examples")
    r = sub.add_parser("report", help="closed-loop results on both tasks/splits + knowledge retention (JSON)")
    r.add_argument("--policy", required=True)
    r.add_argument("--vlm", default="data_samples/vlm", help="the pretrained VLM the policy started from")
    r.add_argument("--episodes", type=int, default=25, help="episodes per task and split")
    r.add_argument("--per-skill", type=int, default=25)
    r.add_argument("--out", required=True, help="JSON file (e.g. POLICY/results.json)")
    r.add_argument("--no-oracle", action="store_true",
                   help="skip the second pass with the true reasoning handed to the policy")
    fo = sub.add_parser("following", help="counterfactual following: hand the policy another task's reasoning")
    fo.add_argument("--policy", required=True, help="policy folder")
    fo.add_argument("--episodes", type=int, default=50, help="episodes per task")
    fo.add_argument("--split", default="open_world", choices=["in_domain", "open_world"])
    fo.add_argument("--out", default=None, help="JSON file for the results and every episode")
    rs = sub.add_parser("reasoning", help="first-frame reasoning scores (no acting) + a knowledge slice")
    rs.add_argument("--policy", required=True, help="policy folder (any stage)")
    rs.add_argument("--episodes", type=int, default=10, help="episodes per task and split")
    rs.add_argument("--per-skill", type=int, default=12, help="knowledge questions per skill (OCR, solving, "
                    "text arithmetic, cards with positions, objects)")
    rs.add_argument("--out", default=None, help="JSON file for the results and every reasoning")
    po = sub.add_parser("positions", help="does a VLM know where (and what) things are: probes, box "
                                                 "errors, attention on the named object")
    po.add_argument("--model", required=True, help="VLM checkpoint folder, or a policy folder (its backbone)")
    po.add_argument("--images", type=int, default=120, help="held-out tables (and as many boards) for the probe")
    po.add_argument("--boxes", type=int, default=30, help="held-out grounding questions per kind")
    po.add_argument("--out", default=None, help="JSON file for the figures")
    p = sub.add_parser("policy", help="closed-loop evaluation of a policy in the simulator")
    p.add_argument("--policy", required=True, help="policy folder")
    p.add_argument("--task", required=True, choices=["math_matching", "toy_placement"])
    p.add_argument("--split", required=True, choices=["in_domain", "open_world"])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--videos", type=int, default=0, help="save this many episodes as GIFs next to --out")
    p.add_argument("--oracle-reasoning", action="store_true",
                   help="hand the policy the ground-truth reasoning (measures the action side alone)")
    p.add_argument("--ddim-steps", type=int, default=None,
                   help="denoising steps per action chunk (default: the policy's own, usually 10)")
    p.add_argument("--out", default=None, help="JSON file for the result and every episode's reasoning")
    args = ap.parse_args(argv)
    use_all_cores()
    if args.what == "policy":
        return _main_policy(ap, args)
    if args.what == "following":
        return _main_following(ap, args)
    if args.what == "reasoning":
        return _main_reasoning(ap, args)
    if args.what == "positions":
        return _main_positions(ap, args)
    if args.what == "report":
        result = policy_report(args.policy, args.vlm, args.episodes, args.per_skill, oracle=not args.no_oracle)
        print(format_retention(result["knowledge"]))
        return _write_json(args.out, result)
    if args.per_skill < 1:
        ap.error("--per-skill must be at least 1")
    samples = None
    if args.rows:
        from .evaluation.knowledge import knowledge_samples

        samples, wanted = knowledge_samples(args.per_skill, args.seed), [r.strip() for r in args.rows.split(",")]
        known = list(dict.fromkeys(s.facts["row"] for s in samples))
        if unknown := [r for r in wanted if r not in known]:
            ap.error(f"unknown --rows {unknown}; expected keys among {known}")
        samples = [s for s in samples if s.facts["row"] in wanted]
    model, processor = load_backbone(args.model)
    result = evaluate_knowledge(model, processor, args.per_skill, args.seed, samples=samples)
    result["model"] = args.model
    print(format_table(result, f"Knowledge of {args.model} (held-out, seed {args.seed})"))
    if args.out:
        _write_json(args.out, result)


def _main_policy(ap, args):
    from .vla.policy import load_policy

    if args.episodes < 1:
        ap.error("--episodes must be at least 1")
    policy = load_policy(args.policy)
    if args.ddim_steps is not None:
        expert = policy.action_expert
        expert.config = dataclasses.replace(expert.config, num_inference_steps=args.ddim_steps)  # validated
    video_dir = os.path.splitext(args.out)[0] + "_videos" if args.out and args.videos else None
    result = evaluate_policy(policy, args.task, args.split, args.episodes, args.seed, args.videos, video_dir,
                             oracle_reasoning=args.oracle_reasoning)
    result["policy"] = args.policy
    result["ddim_steps"] = policy.action_expert.config.num_inference_steps
    print(format_policy_result(result))
    if args.out:
        _write_json(args.out, result)


def _main_following(ap, args):
    from .vla.policy import load_policy
    from .world.catalog import TASKS

    if args.episodes < 1:
        ap.error("--episodes must be at least 1")
    policy = load_policy(args.policy)
    results = []
    for task in TASKS:
        results.append(evaluate_following(policy, task, args.split, args.episodes))
        print(format_following_result(results[-1]))
    if args.out:
        _write_json(args.out, {"policy": args.policy, "following": results})


#: the knowledge rows of ``evaluate reasoning``: what co-training is most likely to erase
REASONING_CHECK_ROWS = ("ocr", "solve", "arithmetic", "cards", "objects")


def _main_reasoning(ap, args):
    from .evaluation.knowledge import knowledge_samples
    from .vla.policy import load_policy

    if args.episodes < 1 or args.per_skill < 1:
        ap.error("--episodes and --per-skill must be at least 1")
    policy = load_policy(args.policy)
    policy.eval()
    results = on_every_task_and_split(lambda task, split: evaluate_reasoning(policy, task, split, args.episodes),
                                      format_reasoning_result)
    samples = [s for s in knowledge_samples(args.per_skill, robustness=False) if s.kind in REASONING_CHECK_ROWS]
    knowledge = evaluate_knowledge(policy.vlm, policy.processor, samples=samples)
    print(format_table(knowledge, f"Knowledge slice of {args.policy} (held-out)"))
    if args.out:
        _write_json(args.out, {"policy": args.policy, "reasoning": results, "knowledge": knowledge})


def _main_positions(ap, args):
    from .evaluation.positions import (
        binding_attention,
        box_errors,
        format_positions,
        identity_probe,
        position_probe,
    )

    if args.images < 4 or args.boxes < 1:
        ap.error("--images must be at least 4 and --boxes at least 1")
    model, processor = load_backbone(args.model)
    model.eval()
    result = {"model": args.model, "probe": position_probe(model, processor, args.images),
              "identity": identity_probe(model, processor, args.images),
              "boxes": box_errors(model, processor, args.boxes),
              "binding": binding_attention(model, processor, args.boxes)}
    print(format_positions(result, f"Where things are, for {args.model} (held-out)"))
    if args.out:
        _write_json(args.out, result)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
