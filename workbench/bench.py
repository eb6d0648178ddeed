"""Benchmarks that print a table. Speed targets live here, never in timed tests.

    python -m workbench.bench sim [--steps 200] [--episodes 6]
    python -m workbench.bench policy [--policy data_samples/policy] [--repeats 30] [--compile]
    python -m workbench.bench training [--logs data_samples/policy/training | data_samples/vlm/log.csv]
    python -m workbench.bench moe [--repeats 5]

``sim``: control steps per second (10 Hz control, 24 physics substeps each) with no cameras, with
the model's two cameras, and with the overview camera as well; and dataset generation throughput
(episodes per minute, both cameras rendered and PNG-encoded).

``policy``: ChatVLA-2 latency, p50 / p90 over repeated calls on real observations: reasoning generation
(greedy, KV cache; target <= 250 ms), one action chunk from an observation and already generated reasoning
(VLM forward + 10 DDIM steps; target <= 50 ms), its two parts, the action expert with fewer DDIM steps, and with
``--compile`` the action expert under ``torch.compile``.

``moe``: the project's MoE layer (8 experts, top-2) against ``transformers``' ``MixtralSparseMoeBlock`` on the same
shapes and against two dense MLPs, for the tiny width and a mid size (hidden 512), 256-4096 tokens, forward and
forward + backward (goal: no slower than the library's block, at most 1.3x two dense MLPs at the mid size).

``training``: the wall time of each training stage (or VLM pretraining phase), read from the per-step
timestamps of the ``log.csv`` files (the shipped policy's are in ``data_samples/policy/training/``, the VLM's six runs'
are ``data_samples/vlm/log*.csv``: ``--logs data_samples/vlm`` reads them all; their in-training evaluations fall
inside the phases that evaluate: *read*, *answer* and *scenes*). Pauses longer than
``--max-gap`` seconds between two logged steps (a run stopped and resumed later) are left out and counted.
Work done before a stage's first step (caching the frozen VLM's outputs) has no timestamp and is not included.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from .settings import use_all_cores


def _steps_per_second(cameras: tuple[str, ...], steps: int, overview: bool = False) -> float:
    from .world.env import TabletopEnv
    from .world.expert import ScriptedExpert
    from .world.rollout import steps as control_steps

    env = TabletopEnv("math_matching", "in_domain", cameras=cameras,
                      render_mode="rgb_array" if overview else None)
    done, elapsed, seed = 0, 0.0, 0
    while done < steps:
        obs, _ = env.reset(seed=seed)
        expert = ScriptedExpert(env)
        seed += 1
        t0 = time.perf_counter()
        for _ in control_steps(env, expert.act, obs):
            if overview:
                env.render()
            done += 1
            if done >= steps:
                break
        elapsed += time.perf_counter() - t0
    env.close()
    return done / elapsed


def bench_sim(steps: int = 200, episodes: int = 6) -> list[tuple[str, str]]:
    from .dataset import generate_dataset

    rows = [
        ("control steps/s, state only", f"{_steps_per_second((), steps):.1f}"),
        ("control steps/s, board + table cameras", f"{_steps_per_second(('board', 'table'), steps):.1f}"),
        ("control steps/s, all cameras + overview render",
         f"{_steps_per_second(('board', 'table'), steps, overview=True):.1f}"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        half = max(1, episodes // 2)
        info = generate_dataset(os.path.join(tmp, "d"), episodes=half, progress=False)
        dt = time.perf_counter() - t0
        rows.append(("dataset generation, episodes/min (both tasks, 2 cameras, PNG)",
                     f"{60 * info['total_episodes'] / dt:.1f}"))
        rows.append(("dataset generation, frames/s", f"{info['total_frames'] / dt:.1f}"))
    return rows


def bench_policy(path: str = "data_samples/policy", repeats: int = 30, ddim_steps: tuple[int, ...] = (10, 5, 3),
                 compile_expert: bool = False) -> list[tuple[str, str]]:
    """Policy latency rows (p50 / p90 ms): reasoning generation, a chunk and its two parts (the VLM forward on both
    cameras with the reasoning; the action expert at each of ``ddim_steps``, the policy's own count first) and, with
    ``compile_expert``, the action expert under ``torch.compile`` (after its compilation, which is timed once)."""
    import torch

    from .vla.observation import Observation
    from .vla.policy import load_policy
    from .world.env import TabletopEnv

    policy = load_policy(path)
    env = TabletopEnv("math_matching", "in_domain")
    obs, info = env.reset(seed=0)
    env.close()
    obs, instruction = Observation.coerce(obs), info["instruction"]

    def timed(fn) -> np.ndarray:
        fn()  # warm-up
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t0))
        return np.array(out)

    def p(ms):
        return f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 90):.1f}"

    reasoning = timed(lambda: policy.generate_reasoning(obs, instruction))
    policy.reset()
    policy.predict_action_chunk(obs, instruction)  # generates the episode's reasoning once
    chunk = timed(lambda: policy.predict_action_chunk(obs, instruction))

    @torch.no_grad()
    def vlm_forward():
        policy.features(policy.reasoning_batch(obs, instruction, policy.reasoning))

    vlm = timed(vlm_forward)
    f, expert = policy.last_features, policy.action_expert
    state = torch.from_numpy(obs.state)[None]
    sample = torch.no_grad()(lambda: expert.sample(f.obs, state, f.reasoning))
    own = expert.config.num_inference_steps
    tokens = len(policy.processor.tokenizer(policy.reasoning)["input_ids"])
    rows = [(f"reasoning generation, ms p50 / p90 ({tokens} tokens)", p(reasoning)),
            (f"action chunk from observation + reasoning ({own} DDIM steps), ms p50 / p90", p(chunk)),
            ("  of which VLM forward (both cameras, instruction, reasoning), ms p50 / p90", p(vlm))]
    try:
        for k in dict.fromkeys((own, *ddim_steps)):
            expert.config.num_inference_steps = k
            which = " (the policy's)" if k == own else ""
            rows.append((f"  action expert, {k} DDIM steps{which}, ms p50 / p90", p(timed(sample))))
        if compile_expert:
            expert.config.num_inference_steps = own
            plain = expert.forward
            expert.forward = torch.compile(plain, dynamic=False)
            t0 = time.perf_counter()
            sample()
            rows.append(("  torch.compile of the action expert, s (once)", f"{time.perf_counter() - t0:.0f}"))
            rows.append((f"  action expert, {own} DDIM steps, compiled, ms p50 / p90", p(timed(sample))))
            expert.forward = plain
    finally:
        expert.config.num_inference_steps = own
    return rows + [("torch threads", str(torch.get_num_threads()))]


def bench_training(logs: str = "data_samples/policy/training", max_gap: float = 120.0) -> list[tuple[str, str]]:
    import csv
    import glob

    if os.path.isfile(logs):
        files = [logs]
    else:
        files = sorted(glob.glob(os.path.join(logs, "*.csv"))) or sorted(glob.glob(os.path.join(logs, "*", "log.csv")))
    if not files:
        raise FileNotFoundError(f"no training logs in {logs!r}: expected a log.csv file (e.g. "
                                f"data_samples/vlm/log.csv), "
                                f"<stage>.csv files (a packaged policy's training/ folder) or <stage>.run/log.csv "
                                f"files (a train --out folder)")
    logs_by_start = []
    for path in files:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        if not records or "time" not in records[0] or "step" not in records[0]:
            raise ValueError(f"{path} is not a training log: expected a CSV with 'time' and 'step' columns")
        # VLM pretraining logs its phases (and evaluations) in one file: one row per phase
        phases = dict.fromkeys(r.get("phase") for r in records if r.get("phase") != "eval")
        for phase in phases:
            part = [r for r in records if r.get("phase") == phase]
            # a resumed run logs again the steps after its last checkpoint: keep each step's last record
            part = list({int(r["step"]): r for r in part}.values())
            name = f"{os.path.basename(path)} {phase}" if phase else None
            logs_by_start.append((float(part[0]["time"]), name or path, part))
    rows, total = [], 0.0
    for _, path, records in sorted(logs_by_start):
        times = np.array([float(r["time"]) for r in records])
        gaps = np.diff(times)
        paused = gaps > max_gap
        seconds = float(gaps[~paused].sum())
        total += seconds
        steps = int(records[-1]["step"])
        note = f", {int(paused.sum())} pause(s) left out" if paused.any() else ""
        rows.append((f"{records[-1].get('stage', os.path.basename(path))}: {steps:,} steps, min{note}",
                     f"{seconds / 60:.1f}"))
        rows.append(("  steps/s", f"{len(records) / max(seconds, 1e-9):.1f}"))
    rows.append(("all logged steps, min", f"{total / 60:.1f}"))
    return rows


def bench_moe(sizes=((128, 512), (512, 2048)), tokens=(256, 1024, 4096), repeats: int = 5) -> list[tuple[str, str]]:
    """The project's MoE layer (8 experts, top-2) against ``transformers``' ``MixtralSparseMoeBlock`` (same shapes,
    same top-2 routing) and against two dense MLPs (the compute every token needs with top-2), forward and
    forward + backward, median of ``repeats`` timings after a warm-up; milliseconds and ratios."""
    import torch
    from transformers import MixtralConfig, Qwen2Config
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from .vla.moe import MoEConfig, MoEMLP

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return 1000 * float(np.median(samples))

    rows = []
    torch.manual_seed(0)
    for hidden, inter in sizes:
        dense = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter))
        ours = MoEMLP(dense, MoEConfig(num_experts=8, top_k=2, router_init_std=0.02))
        mix = MixtralSparseMoeBlock(MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=8,
                                                  num_experts_per_tok=2))
        with torch.no_grad():
            for p in mix.parameters():
                p.normal_(0, 0.02)
        two = torch.nn.ModuleList(Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter)) for _ in range(2))
        for n in tokens:
            x = torch.randn(1, n, hidden)
            for kind, backward in (("fwd", False), ("fwd+bwd", True)):
                t_ours, t_mix, t_two = (timed(_moe_call(m, x, backward)) for m in (ours, mix, two))
                rows.append((f"hidden {hidden}, {n} tokens, {kind}: ours / Mixtral / 2 dense (ms)",
                             f"{t_ours:.1f} / {t_mix:.1f} / {t_two:.1f}"))
                rows.append(("  ours vs Mixtral, vs 2 dense", f"{t_ours / t_mix:.2f}x, {t_ours / t_two:.2f}x"))
    return rows


def _moe_call(module, x, backward: bool):
    """A timing closure: ``module(x)`` (a ModuleList: the sum of its modules' outputs), with a backward pass."""
    import torch

    def run():
        xr = x.clone().requires_grad_(backward)
        y = sum(m(xr) for m in module) if isinstance(module, torch.nn.ModuleList) else module(xr)
        if backward:
            y.sum().backward()

    return run


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}  ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numpy {np.__version__})")
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["sim", "policy", "training", "moe"])
    ap.add_argument("--policy", default="data_samples/policy", help="policy folder (policy benchmark)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per policy measurement")
    ap.add_argument("--compile", action="store_true", help="also time the action expert under torch.compile")
    ap.add_argument("--steps", type=int, default=200, help="control steps per speed measurement")
    ap.add_argument("--episodes", type=int, default=6, help="episodes for the dataset measurement")
    ap.add_argument("--logs", default="data_samples/policy/training",
                    help="folder of training logs (training benchmark)")
    ap.add_argument("--max-gap", type=float, default=120.0,
                    help="seconds between logged steps above which a pause is left out (training benchmark)")
    args = ap.parse_args(argv)
    if args.what == "sim":
        print_table("Simulation benchmark", bench_sim(args.steps, args.episodes))
    elif args.what == "moe":
        use_all_cores()
        repeats = args.repeats if args.repeats != 30 else 5
        print_table("MoE layer: 8 experts, top-2 (median ms)", bench_moe(repeats=repeats))
    elif args.what == "training":
        print_table(f"Training wall time ({args.logs})", bench_training(args.logs, args.max_gap))
    else:
        rows = bench_policy(args.policy, args.repeats, compile_expert=args.compile)
        print_table(f"Policy latency ({args.policy})", rows)


if __name__ == "__main__":
    from .settings import run_cli

    run_cli(main)
