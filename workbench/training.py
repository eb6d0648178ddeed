"""What every trainer of the project shares: the learning-rate schedule, one optimizer update, and the
append-only ``log.csv``. Used by VLM pretraining (:mod:`workbench.vlm.pretrain`) and the ChatVLA-2 stages
(:mod:`workbench.vla.stages`)."""

from __future__ import annotations

import csv
import math
import os
import time

import torch


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up then cosine decay to 5% of ``peak`` (a pure function of the step: resumable)."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(accelerator, loss: torch.Tensor, optimizer, params, lr: float, max_norm: float = 1.0) -> None:
    """One update at learning rate ``lr`` (times a param group's ``lr_scale``, if it has one): backward
    (through ``accelerator``), clip the gradient norm, step."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    optimizer.zero_grad()
    accelerator.backward(loss)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


class CsvLog:
    """Rows appended to ``path`` (header written once; a resumed run keeps appending). Each row gets a
    ``time`` stamp; ``fields`` names the columns."""

    def __init__(self, path: str, fields: list[str]):
        self.path, self.fields = path, ["time", *fields]

    def __call__(self, **row) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({"time": round(time.time(), 1), **row})

    def __repr__(self) -> str:
        return f"CsvLog({self.path!r}, fields={self.fields})"
