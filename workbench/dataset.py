"""Demonstration datasets: the scripted expert's episodes on disk, and a loader of action chunks.

Layout (LeRobot-like; the parquet files load with ``datasets.Dataset.from_parquet``)::

    root/
      data/file-000.parquet, ...     # one row per control step (10 Hz)
      meta/info.json                 # fps, features with shapes/units, cameras, counts, how it was made
      meta/stats.json                # mean/std/min/max of observation.state and action
      meta/episodes.jsonl            # one line per episode: ground truth, instruction, reasoning

Row columns: ``episode_index``, ``frame_index``, ``timestamp`` (s), ``observation.images.<camera>``
(PNG), ``observation.state`` (4,), ``action`` (4,), ``task``, ``split``, ``instruction``,
``reasoning`` (the episode's reasoning: what is seen and concluded), ``phase`` and
``step_reasoning`` (what the robot is doing at this step).

Regenerate the shipped sample with::

    python -m workbench.dataset --out data_samples/demos --tasks math_matching toy_placement \\
        --splits in_domain --episodes 2 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .checkpoint import atomic_folder
from .world import language
from .world.catalog import SPLIT_NAMES, TASKS
from .world.env import ACTION_DIM, MAX_STEP, STATE_DIM, TabletopEnv, commanded_targets
from .world.rollout import Episode, rollout
from .world.scene import CAMERAS, CONTROL_HZ

#: default action chunk length: 16 steps = 1.6 s at 10 Hz
CHUNK_SIZE = 16
EPISODES_PER_FILE = 50


def _features(cameras):
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    f = {
        "episode_index": Value("int32"), "frame_index": Value("int32"), "timestamp": Value("float32"),
        **{f"observation.images.{c}": HFImage() for c in cameras},
        "observation.state": Sequence(Value("float32"), length=STATE_DIM),
        "action": Sequence(Value("float32"), length=ACTION_DIM),
        "task": Value("string"), "split": Value("string"), "instruction": Value("string"),
        "reasoning": Value("string"), "phase": Value("string"), "step_reasoning": Value("string"),
    }
    return Features(f)


def _png(arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return {"bytes": buf.getvalue(), "path": None}


def annotate(episode: Episode, seed: int) -> tuple[str, list[str]]:
    """Episode reasoning and per-step reasoning (one phrasing per phase, fixed within an episode)."""
    rng = np.random.default_rng(seed)
    reasoning = language.episode_reasoning(episode.ground_truth, rng)
    per_phase = {ph: language.step_reasoning(ph, episode.ground_truth, rng) for ph in language.PHASES}
    return reasoning, [per_phase[ph] for ph in episode.phases]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def generate_dataset(out: str, tasks=TASKS, splits=("in_domain",), episodes: int = 10, seed: int = 0,
                     cameras=tuple(CAMERAS), progress: bool = True, overwrite: bool = False) -> dict:
    """Run the scripted expert and write ``episodes`` successful episodes per task/split to ``out``.

    Failed expert episodes are not written (they are counted in ``meta/info.json``). The folder is
    built in a temporary sibling and moved into place at the end, so an interrupted run never
    leaves a half-written dataset. Returns the ``info`` dict.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected one of {list(TASKS)}")
    for s in splits:
        if s not in SPLIT_NAMES:
            raise ValueError(f"unknown split {s!r}; expected one of {list(SPLIT_NAMES)}")
    if not (isinstance(episodes, int) and episodes > 0):
        raise ValueError(f"episodes must be a positive int, got {episodes!r}")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_folder(out) as tmp:
        return _write_dataset(tmp, tasks, splits, episodes, seed, cameras, progress)


def _write_dataset(tmp, tasks, splits, episodes, seed, cameras, progress) -> dict:
    """Fill folder ``tmp`` with a dataset (see :func:`generate_dataset`)."""
    import datasets
    from datasets import Dataset
    from tqdm.auto import tqdm

    datasets.disable_progress_bars()
    os.makedirs(os.path.join(tmp, "data"))
    os.makedirs(os.path.join(tmp, "meta"))
    features = _features(cameras)
    rows, ep_lines, failures = [], [], 0
    states, actions = [], []
    file_idx, ep_index = 0, 0
    bar = tqdm(total=episodes * len(tasks) * len(splits), desc="episodes", disable=not progress)

    def flush():
        nonlocal rows, file_idx
        if rows:
            Dataset.from_list(rows, features=features).to_parquet(
                os.path.join(tmp, "data", f"file-{file_idx:03d}.parquet"))
            rows, file_idx = [], file_idx + 1

    for task in tasks:
        for split in splits:
            env = TabletopEnv(task, split, cameras=tuple(cameras))
            seeds = np.random.default_rng([seed, TASKS.index(task), SPLIT_NAMES.index(split)]).integers(
                0, 2**31 - 1, size=10 * episodes + 10)
            done = 0
            for ep_seed in seeds:
                if done == episodes:
                    break
                ep = rollout(env, seed=int(ep_seed))
                if not ep.success:
                    failures += 1
                    continue
                reasoning, steps = annotate(ep, int(ep_seed))
                gt = ep.ground_truth
                for i in range(len(ep)):
                    rows.append({
                        "episode_index": ep_index, "frame_index": i, "timestamp": i / CONTROL_HZ,
                        **{f"observation.images.{c}": _png(ep.frames[c][i]) for c in cameras},
                        "observation.state": ep.states[i].tolist(), "action": ep.actions[i].tolist(),
                        "task": task, "split": split, "instruction": gt["instruction"],
                        "reasoning": reasoning, "phase": ep.phases[i], "step_reasoning": steps[i],
                    })
                states.append(ep.states)
                actions.append(ep.actions)
                ep_lines.append(_json_safe({
                    "episode_index": ep_index, "task": task, "split": split, "seed": int(ep_seed),
                    "length": len(ep), "instruction": gt["instruction"], "reasoning": reasoning,
                    "ground_truth": {k: v for k, v in gt.items() if k not in ("is_success", "step")},
                }))
                ep_index += 1
                done += 1
                bar.update(1)
                if ep_index % EPISODES_PER_FILE == 0:
                    flush()
            env.close()
            if done < episodes:
                raise RuntimeError(f"the expert solved only {done} of {len(seeds)} {task}/{split} episodes")
    flush()
    bar.close()
    s, a = np.concatenate(states), np.concatenate(actions)
    stats = {k: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "min": v.min(0).tolist(),
                 "max": v.max(0).tolist()} for k, v in (("observation.state", s), ("action", a))}
    info = {
        "format": "workbench demonstrations v1 (parquet rows + meta/, LeRobot-like)",
        "fps": CONTROL_HZ, "total_episodes": ep_index, "total_frames": int(len(s)),
        "failed_expert_episodes_skipped": failures, "tasks": list(tasks), "splits": list(splits),
        "seed": seed, "chunk_size_hint": CHUNK_SIZE,
        "cameras": {c: {"height": CAMERAS[c].height, "width": CAMERAS[c].width} for c in cameras},
        "features": {
            "observation.state": {"shape": [STATE_DIM], "names": ["ee_x", "ee_y", "ee_z", "gripper_width"],
                                  "units": "metres (robot frame)"},
            "action": {"shape": [ACTION_DIM], "names": ["dx", "dy", "dz", "grip"],
                       "units": f"dx,dy,dz metres per step in [-{MAX_STEP}, {MAX_STEP}]; grip in [0, 1], "
                                ">= 0.5 closes"},
            **{f"observation.images.{c}": {"shape": [CAMERAS[c].height, CAMERAS[c].width, 3],
                                           "dtype": "uint8 PNG"} for c in cameras},
        },
    }
    with open(os.path.join(tmp, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(tmp, "meta", "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    with open(os.path.join(tmp, "meta", "episodes.jsonl"), "w") as f:
        for line in ep_lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return info


@dataclass
class DatasetMeta:
    info: dict
    stats: dict
    episodes: list[dict]


def load_meta(root: str) -> DatasetMeta:
    """Read ``meta/`` of a dataset folder, with a clear error if it is not one."""
    paths = {n: os.path.join(root, "meta", n) for n in ("info.json", "stats.json", "episodes.jsonl")}
    missing = [n for n, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{root} is not a workbench dataset: meta/{missing[0]} is missing "
                                "(make one with `python -m workbench.dataset --out DIR`)")
    with open(paths["info.json"]) as f:
        info = json.load(f)
    with open(paths["stats.json"]) as f:
        stats = json.load(f)
    with open(paths["episodes.jsonl"]) as f:
        episodes = [json.loads(line) for line in f if line.strip()]
    return DatasetMeta(info, stats, episodes)


class DemonstrationDataset:
    """Training samples with action chunks, as a map-style (``torch.utils.data``-compatible) dataset.

    ``ds[i]`` for frame i of some episode returns::

        {"observation.images.<camera>": (3, H, W) uint8 tensor,
         "observation.state": (4,) float32,
         "action": (chunk_size, 4) float32   # actions t .. t+chunk_size-1
         "action_is_pad": (chunk_size,) bool # True past the episode's end (padded: no motion,
                                             # last gripper command)
         "instruction", "reasoning", "step_reasoning", "phase", "task", "split": str,
         "episode_index", "frame_index": int}

    Args:
        root: a folder written by :func:`generate_dataset`.
        chunk_size: action chunk length (default 16 = 1.6 s).
        tasks / splits: keep only these (default: all in the folder).
    """

    def __init__(self, root: str, chunk_size: int = CHUNK_SIZE, tasks=None, splits=None):
        import datasets

        if not (isinstance(chunk_size, int) and chunk_size > 0):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.root, self.chunk_size = root, chunk_size
        self.meta = load_meta(root)
        files = sorted(os.path.join(root, "data", f) for f in os.listdir(os.path.join(root, "data"))
                       if f.endswith(".parquet"))
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_parquet(files, keep_in_memory=True)
        if tasks is not None or splits is not None:
            keep_t, keep_s = set(tasks or TASKS), set(splits or SPLIT_NAMES)
            ds = ds.filter(lambda t, s: t in keep_t and s in keep_s, input_columns=["task", "split"])
        self.hf = ds
        self.cameras = [c[len("observation.images."):] for c in ds.column_names
                        if c.startswith("observation.images.")]
        ep = np.asarray(ds["episode_index"])
        self._actions = np.asarray(ds["action"], dtype=np.float32).reshape(-1, ACTION_DIM)
        # per frame: the commanded end-effector target after its action (episodes start at the home pose), and
        # the index of its episode's end (exclusive), for chunking
        self._targets = np.empty_like(self._actions)
        self._ep_end = np.zeros(len(ep), dtype=np.int64)
        for e in np.unique(ep):
            idx = np.nonzero(ep == e)[0]
            self._targets[idx] = commanded_targets(self._actions[idx])
            self._ep_end[idx] = idx.max() + 1

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def num_episodes(self) -> int:
        return len(set(self.hf["episode_index"]))

    def _chunk(self, values: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk_size, 4) rows of ``values`` from frame i on, padded past the episode's end by repeating its
        last row, and the (chunk_size,) padding mask."""
        rows = values[i:min(i + self.chunk_size, self._ep_end[i])]
        n_pad = self.chunk_size - len(rows)
        return np.concatenate([rows, np.tile(rows[-1], (n_pad, 1))]), np.arange(self.chunk_size) >= len(rows)

    def action_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk_size, 4) actions from frame i and the (chunk_size,) padding mask."""
        chunk, is_pad = self._chunk(self._actions, i)
        chunk[is_pad, :3] = 0.0  # padding: no motion, the last gripper command held
        return chunk, is_pad

    def target_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk_size, 4) commanded targets [x, y, z, grip] after actions i .. i + chunk_size - 1 (absolute,
        metres; :func:`~workbench.world.env.commanded_targets`), padded with the last one, and the padding
        mask. What the policy's action expert predicts; :func:`~workbench.world.env.actions_towards` turns
        them back into env actions."""
        return self._chunk(self._targets, i)

    def __getitem__(self, i: int) -> dict:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} frames")
        i = i % len(self)
        row = self.hf[i]
        chunk, is_pad = self.action_chunk(i)
        out = {f"observation.images.{c}": torch.from_numpy(
            np.array(row[f"observation.images.{c}"].convert("RGB"))).permute(2, 0, 1).contiguous()
            for c in self.cameras}
        out.update({
            "observation.state": torch.tensor(row["observation.state"], dtype=torch.float32),
            "action": torch.from_numpy(chunk), "action_is_pad": torch.from_numpy(is_pad),
            **{k: row[k] for k in ("instruction", "reasoning", "step_reasoning", "phase", "task", "split",
                                   "episode_index", "frame_index")},
        })
        return out

    def __repr__(self) -> str:
        return (f"DemonstrationDataset(root={self.root!r}, episodes={self.num_episodes}, frames={len(self)}, "
                f"cameras={self.cameras}, chunk_size={self.chunk_size})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.dataset",
                                 description="Write scripted-expert demonstrations to a dataset folder.")
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--splits", nargs="+", default=["in_domain"], choices=SPLIT_NAMES)
    ap.add_argument("--episodes", type=int, default=10, help="successful episodes per task and split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    info = generate_dataset(args.out, args.tasks, args.splits, args.episodes, args.seed,
                            overwrite=args.overwrite)
    print(f"wrote {info['total_episodes']} episodes, {info['total_frames']} frames to {args.out}")


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
