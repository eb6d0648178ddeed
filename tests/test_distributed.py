"""Data-parallel training with an existing engine: ``accelerate launch --num_processes 2 --cpu`` (gloo) runs a policy
stage and the VLM pretraining and follows the single-process run with the same global batch
(:mod:`workbench.training`: each process keeps its share of the batch; gradients are averaged)."""

import dataclasses
import os
import subprocess
import sys

import pandas as pd
import torch

from workbench.vla.policy import load_policy
from workbench.vla.stages import STAGES, StageTrainer

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--cpu",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(args: list[str], root: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=600, env=env, cwd=root,
                          start_new_session=True)  # the launcher signals its process group when it ends
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_train_a_stage_as_one_process_does(root, tmp_path):
    """Stage 3 (diffusion loss, equal shares of the batch, the noise of the global batch): the two-process run
    logs the single-process losses and ends with the same weights, up to float rounding."""
    demos, vlm = (os.path.join(root, "data_samples", d) for d in ("demos", "vlm"))
    s1 = str(tmp_path / "s1")
    StageTrainer(STAGES["knowledge_freezing"], vlm, demos, s1, progress=False).run()
    stage = dataclasses.replace(STAGES["action_finetuning"], steps=3, batch_size=8, checkpoint_every=3)
    one = StageTrainer(stage, s1, demos, str(tmp_path / "one"), progress=False).run()
    script = tmp_path / "stage.py"
    script.write_text(f"""
import dataclasses
from workbench.vla.stages import STAGES, StageTrainer
stage = dataclasses.replace(STAGES["action_finetuning"], steps=3, batch_size=8, checkpoint_every=3)
StageTrainer(stage, {s1!r}, {demos!r}, {str(tmp_path / "two")!r}, progress=False).run()
""")
    launch([str(script)], root)
    la, lb = (pd.read_csv(tmp_path / f"{d}.run" / "log.csv") for d in ("one", "two"))
    assert list(lb.step) == [1, 2, 3]  # one log, written by the main process only
    assert (la.diffusion - lb.diffusion).abs().max() < 1e-4, (la.diffusion, lb.diffusion)
    a, b = one.state_dict(), load_policy(str(tmp_path / "two")).state_dict()
    moved = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved < 1e-4
    # and the check can fail: one process with half the batch does not give these losses
    StageTrainer(dataclasses.replace(stage, batch_size=4), s1, demos, str(tmp_path / "half"), progress=False).run()
    lh = pd.read_csv(tmp_path / "half.run" / "log.csv")
    assert (la.diffusion - lh.diffusion).abs().max() > 1e-3


def test_two_processes_pretrain_the_vlm_as_one_process_does(root, tmp_path):
    """VLM pretraining (fast sizes): every process draws the same fresh batch and renders its half; the losses
    logged are the mean over the processes and stay within a few percent of one process's (the halves have
    different numbers of tokens, so token-weighted means differ slightly)."""
    from workbench import train

    args = ["vlm", "--fast", "--see-steps", "2", "--read-steps", "1", "--answer-steps", "2", "--see-batch-size", "8",
            "--read-batch-size", "4", "--batch-size", "4", "--text-batch", "4"]
    train.main([*args, "--work", str(tmp_path / "one"), "--out", str(tmp_path / "one_vlm")])
    launch(["-m", "workbench.train", *args, "--work", str(tmp_path / "two"), "--out", str(tmp_path / "two_vlm")],
           root)
    la, lb = (pd.read_csv(tmp_path / d / "log.csv") for d in ("one", "two"))
    la, lb = (x[x.phase != "eval"].reset_index(drop=True) for x in (la, lb))
    assert list(la.phase) == list(lb.phase) and list(la.step) == list(lb.step)
    assert ((la.loss - lb.loss).abs() / la.loss).max() < 0.1, pd.concat([la.loss, lb.loss], axis=1)
    assert os.path.isfile(tmp_path / "two_vlm" / "model.safetensors")
    torch.testing.assert_close(la.loss.iloc[0], lb.loss.iloc[0], rtol=0.05, atol=0)  # same weights, same batch
