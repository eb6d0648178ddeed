"""The main job (README, first command): run the scripted expert on both tasks and both splits,
print success rates with 95% intervals, and write a GIF of one episode per task.

    python -m workbench.run [--episodes 25] [--out outputs]

Later work (the trained policy and the live demo) replaces the expert here.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from tqdm.auto import tqdm

from .dataset import annotate
from .viz import episode_frames, save_gif
from .world.catalog import SPLIT_NAMES, TASKS
from .world.env import TabletopEnv
from .world.expert import rollout


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sensible at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=25, help="episodes per task and split")
    ap.add_argument("--out", default="outputs", help="folder for GIFs and results.json")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.episodes < 1:
        ap.error("--episodes must be at least 1")
    os.makedirs(args.out, exist_ok=True)
    results = [evaluate_expert(t, s, args.episodes, args.seed) for t in TASKS for s in SPLIT_NAMES]
    print(f"\nScripted expert, {args.episodes} seeded episodes per row (seeds {args.seed}..."
          f"{args.seed + args.episodes - 1})")
    print(f"{'task':<15} {'split':<11} {'success':>9} {'95% CI':>15} {'steps':>6}")
    for r in results:
        print(f"{r['task']:<15} {r['split']:<11} {r['successes']:>4}/{r['episodes']:<4} "
              f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]  {r['mean_length']:>5.1f}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    for task in TASKS:
        path = record_gif(task, "open_world", os.path.join(args.out, f"{task}.gif"))
        print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
