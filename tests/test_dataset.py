"""Demonstration datasets: round trip, chunks, stats, atomic writes, the shipped sample."""

import json
import os
import shlex

import numpy as np
import pyarrow.parquet as pq
import pytest

from workbench import dataset as wds
from workbench.world.env import MAX_STEP


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ds") / "demos")
    info = wds.generate_dataset(out, episodes=1, seed=3, progress=False)
    return out, info


def test_round_trip(small):
    out, info = small
    assert info["total_episodes"] == 2 and sorted(os.listdir(os.path.join(out, "meta"))) == [
        "episodes.jsonl", "info.json", "stats.json"]
    ds = wds.DemonstrationDataset(out, chunk_size=8)
    assert len(ds) == info["total_frames"] and ds.num_episodes == 2
    x = ds[0]
    assert x["observation.images.board"].shape == (3, 96, 192)
    assert x["observation.images.table"].shape == (3, 176, 256)
    assert x["action"].shape == (8, 4) and x["action_is_pad"].shape == (8,)
    assert x["frame_index"] == 0 and x["instruction"] and x["reasoning"] and x["step_reasoning"]
    meta = wds.load_meta(out)
    ep0 = meta.episodes[0]
    # actions on disk are exactly those the expert produced, and respect the action bounds
    table = pq.read_table(os.path.join(out, "data", "file-000.parquet"))
    actions = np.array(table.column("action").to_pylist())
    assert np.abs(actions[:, :3]).max() <= MAX_STEP + 1e-6 and set(np.unique(actions[:, 3])) <= {0.0, 1.0}
    assert len(actions) == info["total_frames"] and ep0["length"] == (np.array(
        table.column("episode_index").to_pylist()) == 0).sum()
    stats = meta.stats["action"]
    np.testing.assert_allclose(stats["mean"], actions.mean(0), atol=1e-5)


def test_chunks_pad_at_episode_end(small):
    out, _ = small
    ds = wds.DemonstrationDataset(out, chunk_size=16)
    ep_end = [i for i in range(len(ds) - 1) if ds.hf[i]["episode_index"] != ds.hf[i + 1]["episode_index"]][0]
    x = ds[ep_end - 2]  # 3 real actions left in this episode
    assert x["action_is_pad"].tolist() == [False] * 3 + [True] * 13
    assert (x["action"][3:, :3] == 0).all()
    y = ds[ep_end + 1]
    assert y["frame_index"] == 0 and not y["action_is_pad"].any()
    np.testing.assert_allclose(y["action"][0].numpy(), ds._actions[ep_end + 1])


def test_target_chunks_replay_the_demonstration(small):
    """Commanded targets, turned back into actions from the home pose, are the demonstrated actions; and the
    env really ends where the targets say (the commanded target, not the lagging measured hand)."""
    from workbench.world.env import TabletopEnv, actions_towards, commanded_targets
    from workbench.world.scene import HOME_EE

    out, _ = small
    ds = wds.DemonstrationDataset(out, chunk_size=16)
    meta = wds.load_meta(out)
    n = meta.episodes[0]["length"]
    targets = np.concatenate([ds.target_chunk(i)[0][:1] for i in range(n)])  # (T, 4): the target after each step
    np.testing.assert_allclose(actions_towards(HOME_EE, targets), ds._actions[:n], atol=1e-6)
    np.testing.assert_allclose(commanded_targets(ds._actions[:n]), targets, atol=1e-6)
    chunk, pad = ds.target_chunk(n - 3)
    assert pad.tolist() == [False] * 3 + [True] * 13 and (chunk[3:] == chunk[2]).all()
    env = TabletopEnv(meta.episodes[0]["task"], cameras=())
    env.reset(seed=meta.episodes[0]["seed"])
    for a in ds._actions[: n // 2]:
        env.step(a)
    np.testing.assert_allclose(env.scene.ee_target, targets[n // 2 - 1, :3], atol=1e-6)
    env.close()


def test_filtering_and_errors(small, tmp_path):
    out, _ = small
    assert wds.DemonstrationDataset(out, tasks=["toy_placement"]).num_episodes == 1
    with pytest.raises(FileExistsError, match="overwrite"):
        wds.generate_dataset(out, episodes=1, progress=False)
    with pytest.raises(FileNotFoundError, match="not a workbench dataset"):
        wds.DemonstrationDataset(str(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        wds.generate_dataset(str(tmp_path / "x"), tasks=["cooking"], progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        wds.DemonstrationDataset(out, chunk_size=0)
    with pytest.raises(IndexError):
        wds.DemonstrationDataset(out)[10**6]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(wds, "annotate", boom)
    with pytest.raises(KeyboardInterrupt):
        wds.generate_dataset(str(tmp_path / "d"), episodes=1, progress=False)
    assert os.listdir(tmp_path) == []


def test_shipped_sample_matches_its_documented_command(root, tmp_path):
    """data_samples/demos is exactly what the command in dataset.py's docstring regenerates."""
    shipped = os.path.join(root, "data_samples", "demos")
    doc = wds.__doc__.split("Regenerate the shipped sample with::")[1]
    cmd = " ".join(doc.strip().replace("\\\n", " ").split("\n\n")[0].split())
    argv = shlex.split(cmd)[3:]  # drop "python -m workbench.dataset"
    out = str(tmp_path / "demos")
    argv[argv.index("--out") + 1] = out
    wds.main(argv)
    a, b = wds.load_meta(shipped), wds.load_meta(out)
    assert a.episodes == b.episodes
    with open(os.path.join(shipped, "meta", "stats.json")) as f:
        np.testing.assert_allclose(json.load(f)["action"]["mean"], b.stats["action"]["mean"], atol=1e-6)
    ta = pq.read_table(os.path.join(shipped, "data", "file-000.parquet"))
    tb = pq.read_table(os.path.join(out, "data", "file-000.parquet"))
    np.testing.assert_allclose(np.array(ta.column("observation.state").to_pylist()),
                               np.array(tb.column("observation.state").to_pylist()), atol=1e-5)
