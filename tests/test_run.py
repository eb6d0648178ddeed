"""The main job, the benchmark table and small helpers."""

import json
import os

import pytest
from PIL import Image

from workbench import bench, run


def test_wilson_interval():
    assert run.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = run.wilson_interval(50, 50)
    assert hi == 1.0 and 0.9 < lo < 0.95
    lo, hi = run.wilson_interval(5, 10)
    assert lo < 0.5 < hi


def test_main_job_writes_results_and_gifs(tmp_path, capsys, root):
    policy = os.path.join(root, "data_samples", "policy")
    run.main(["--episodes", "1", "--policy-episodes", "1", "--policy", policy, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "math_matching" in printed and "open_world" in printed and "ChatVLA-2 policy" in printed
    results = json.load(open(tmp_path / "results.json"))
    assert len(results["expert"]) == 4 and all(r["episodes"] == 1 for r in results["expert"])
    assert all(r["errors"] == 0 for r in results["expert"])
    assert len(results["policy"]) == 4 and all(r["records"][0]["reasoning"] for r in results["policy"])
    for task in ("math_matching", "toy_placement"):
        gif = Image.open(tmp_path / f"expert_{task}.gif")
        assert gif.n_frames > 20 and gif.size[0] >= 500
        assert Image.open(tmp_path / f"{task}_open_world_0.gif").n_frames > 5


def test_main_job_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        run.main(["--episodes", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run.main(["--policy", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_bench_table_prints(capsys):
    bench.print_table("t", [("a", "1.0"), ("bb", "2")])
    out = capsys.readouterr().out
    assert "| a " in out and "| bb" in out and os.linesep in out


def test_bench_policy_times_each_part_and_fewer_ddim_steps(root):
    from workbench.vla.policy import load_policy

    path = os.path.join(root, "data_samples", "policy")
    rows = dict(bench.bench_policy(path, repeats=1, ddim_steps=(2,)))
    own = load_policy(path).action_expert.config.num_inference_steps
    assert f"  action expert, {own} DDIM steps (the policy's), ms p50 / p90" in rows
    assert "  action expert, 2 DDIM steps, ms p50 / p90" in rows
    p50 = {k.split(",")[1].strip(): float(v.split(" / ")[0]) for k, v in rows.items() if "action expert" in k}
    assert 0 < p50["2 DDIM steps"] < p50[f"{own} DDIM steps (the policy's)"]


def test_bench_training_leaves_out_pauses_and_resumed_repeats(tmp_path):
    rows = ["time,stage,step,loss"]
    rows += [f"{1000 + 2 * s},action_finetuning,{s},0.1" for s in range(1, 11)]      # steps 1-10, 2 s apart
    rows += [f"{5000 + 2 * (s - 8)},action_finetuning,{s},0.1" for s in range(9, 21)]  # resumed at 8, an hour later
    (tmp_path / "action_finetuning.csv").write_text("\n".join(rows) + "\n")
    table = dict(bench.bench_training(str(tmp_path)))
    # steps 1-8 of the first run (7 gaps) and steps 9-20 of the second (11 gaps): 18 gaps of 2 s
    assert table["action_finetuning: 20 steps, min, 1 pause(s) left out"] == f"{36 / 60:.1f}"
    (tmp_path / "action_finetuning.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="'time' and 'step'"):
        bench.bench_training(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no training logs"):
        bench.bench_training(str(tmp_path / "nothing"))
