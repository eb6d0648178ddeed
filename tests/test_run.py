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
    run.main(["--episodes", "2", "--policy-episodes", "1", "--policy", policy, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "math_matching" in printed and "open_world" in printed and "ChatVLA-2 policy" in printed
    results = json.load(open(tmp_path / "results.json"))
    assert len(results["expert"]) == 4 and all(r["episodes"] == 2 for r in results["expert"])
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
