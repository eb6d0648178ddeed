"""The report the README shows for a trained policy: closed-loop results with generated and with true reasoning,
counterfactual following, and the knowledge table of the pretrained VLM beside the
policy's backbone."""

from __future__ import annotations

from .closed_loop import (
    EVAL_SEED,
    evaluate_following,
    evaluate_policy_everywhere,
    format_following_result,
)
from .knowledge import evaluate_knowledge


def policy_report(policy_path: str, vlm_path: str, episodes: int = 25, per_skill: int = 25,
                  progress: bool = True, oracle: bool = True) -> dict:
    """What the README reports for a trained policy: closed-loop success on both tasks and splits with the
    reasoning it generates and, if ``oracle``, again with the true reasoning handed to it (the action side
    alone); counterfactual following on open-world scenes of both tasks (:func:`evaluate_following`); and the
    knowledge table of the pretrained VLM beside the policy's backbone (same held-out questions)."""
    from ..vla.policy import load_policy
    from ..vlm.api import load_vlm
    from ..world.catalog import TASKS

    policy = load_policy(policy_path)
    closed = evaluate_policy_everywhere(policy, episodes, progress=progress)  # every episode's record kept
    if oracle:
        closed += evaluate_policy_everywhere(policy, episodes, progress=progress, oracle_reasoning=True)
    following = []
    for task in TASKS:
        following.append(evaluate_following(policy, task, "open_world", episodes, progress=progress))
        print(format_following_result(following[-1]))
    knowledge = {"pretrained": evaluate_knowledge(*load_vlm(vlm_path), per_skill, progress=progress)["rows"],
                 "policy": evaluate_knowledge(policy.vlm, policy.processor, per_skill, progress=progress)["rows"]}
    return {"policy": policy_path, "pretrained_vlm": vlm_path, "episodes_per_split": episodes,
            "eval_seeds": [EVAL_SEED, EVAL_SEED + episodes - 1], "knowledge_per_skill": per_skill,
            "closed_loop": closed, "following": following, "knowledge": knowledge}


def format_retention(knowledge: dict) -> str:
    """Knowledge table: pretrained VLM vs the policy's backbone, per row, with the difference."""
    before = {r["key"]: r for r in knowledge["pretrained"]}
    lines = [f"| {'skill':<32} | {'pretrained':>10} | {'policy':>9} | {'change':>7} | {'N':>4} |",
             f"|{'-' * 34}|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 6}|"]
    for r in knowledge["policy"]:
        b = before.get(r["key"])
        if b is not None:
            lines.append(f"| {r['skill']:<32} | {100 * b['accuracy']:>9.1f}% | {100 * r['accuracy']:>8.1f}% | "
                         f"{100 * (r['accuracy'] - b['accuracy']):>+6.1f} | {r['n']:>4} |")
    return "\n".join(lines)
