"""The main job (README, first command): the shipped ChatVLA-2 policy acting in the simulator on both tasks
and both splits (its reasoning scored against the ground truth), beside the scripted expert that made its
training data; success rates with 95% intervals and a GIF of one open-world episode per task.

    python -m workbench.run [--episodes 25] [--policy-episodes 5] [--policy data_samples/policy] [--out outputs]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm.auto import tqdm

from .dataset import annotate
from .evaluation import wilson_interval
from .evaluation.closed_loop import evaluate_policy_everywhere
from .viz import episode_frames, save_gif
from .world.catalog import SPLIT_NAMES, TASKS
from .world.env import TabletopEnv
from .world.rollout import rollout


def evaluate_expert(task: str, split: str, episodes: int, seed: int = 1000, progress: bool = True) -> dict:
    """Success of the scripted expert on ``episodes`` seeded episodes (state-only, no cameras)."""
    env = TabletopEnv(task, split, cameras=())
    wins, errors, lengths = 0, 0, []
    for i in tqdm(range(episodes), desc=f"{task}/{split}", disable=not progress, leave=False):
        ep = rollout(env, seed=seed + i)
        wins += ep.success
        errors += ep.error is not None
        lengths.append(len(ep))
    env.close()
    lo, hi = wilson_interval(wins, episodes)
    return {"task": task, "split": split, "episodes": episodes, "successes": wins, "rate": wins / episodes,
            "ci95": [lo, hi], "errors": errors, "mean_length": float(np.mean(lengths)), "seed": seed}


def record_gif(task: str, split: str, path: str, seed: int = 0) -> str:
    env = TabletopEnv(task, split)
    ep = rollout(env, seed=seed, record_overview=True)
    env.close()
    _, steps = annotate(ep, seed)
    return save_gif(episode_frames(ep, steps), path)


def run_policy(path: str, episodes: int, out: str) -> list[dict]:
    """The shipped policy on every task and split (closed loop), and one open-world GIF per task."""
    from .vla.policy import load_policy

    print(f"\nChatVLA-2 policy {path}, {episodes} seeded episodes per row (evaluation seeds, never trained on)")
    return evaluate_policy_everywhere(load_policy(path), episodes, open_world_videos=1, video_dir=out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=25, help="scripted-expert episodes per task and split")
    ap.add_argument("--policy", default="data_samples/policy", help="policy folder ('' to skip the policy)")
    ap.add_argument("--policy-episodes", type=int, default=5, help="policy episodes per task and split")
    ap.add_argument("--out", default="outputs", help="folder for GIFs and results.json")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.episodes < 1 or args.policy_episodes < 1:
        ap.error("--episodes and --policy-episodes must be at least 1")
    if args.policy and not os.path.isdir(args.policy):
        ap.error(f"no policy folder at {args.policy!r} (pass --policy '' to run only the scripted expert)")
    os.makedirs(args.out, exist_ok=True)
    results = [evaluate_expert(t, s, args.episodes, args.seed) for t in TASKS for s in SPLIT_NAMES]
    print(f"\nScripted expert, {args.episodes} seeded episodes per row (seeds {args.seed}..."
          f"{args.seed + args.episodes - 1})")
    print(f"{'task':<15} {'split':<11} {'success':>9} {'95% CI':>15} {'steps':>6}")
    for r in results:
        print(f"{r['task']:<15} {r['split']:<11} {r['successes']:>4}/{r['episodes']:<4} "
              f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]  {r['mean_length']:>5.1f}")
    for task in TASKS:
        path = record_gif(task, "open_world", os.path.join(args.out, f"expert_{task}.gif"))
        print(f"wrote {path}")
    policy = run_policy(args.policy, args.policy_episodes, args.out) if args.policy else []
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"expert": results, "policy": policy}, f, indent=2, ensure_ascii=False)
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
