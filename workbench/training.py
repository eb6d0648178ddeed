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

    def rewind(self, keep) -> int:
        """Drop the rows for which ``keep(row)`` is false (rows are dicts of strings), atomically; returns how many
        were dropped. A resumed run rewinds its log to its checkpoint, so no step is logged twice."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if keep(r)]
        if len(kept) < len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(kept)
            os.replace(tmp, self.path)
        return len(rows) - len(kept)

    def __repr__(self) -> str:
        return f"CsvLog({self.path!r}, fields={self.fields})"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def refuse_changed_config(path: str, config: dict, what: str = "run") -> None:
    """Write ``config`` (JSON-able) to ``path`` on a fresh run; on a resumed one, raise ``ValueError`` naming every
    key whose value differs from the saved one (a changed run must not silently continue an old checkpoint)."""
    import json

    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
        return
    with open(path) as f:
        saved = _flatten(json.load(f))
    mine = _flatten(json.loads(json.dumps(config)))  # tuples -> lists, as saved; nested keys as "stage.steps"
    diff = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
    if diff:
        said = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{os.path.dirname(path) or '.'} holds a {what} with a different config ({said}); use a new "
                         "output folder, or the same settings to resume it")
