"""What every trainer of the project shares: the learning-rate schedule, one optimizer update, data-parallel
helpers, and the append-only ``log.csv``. Used by VLM pretraining (:mod:`workbench.vlm.pretrain`) and the ChatVLA-2
stages (:mod:`workbench.vla.stages`).

**Several processes** (``accelerate launch --num_processes 2 --cpu -m workbench.train ...``, gloo on CPU, NCCL on
GPUs): every process draws the same global batch (batches depend only on the seed and the step), keeps its share
(:func:`shard`) and averages its gradients with the others before the update (:func:`optimizer_step`), so the
run follows the single-process one with the same global batch; only the main process logs and checkpoints.
The models are not wrapped in ``DistributedDataParallel``: the trainers call sub-modules directly (the vision
tower, the action expert), which DDP's forward hooks would not see."""

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
    (through ``accelerator``), average the gradients over processes, clip the gradient norm, step."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    optimizer.zero_grad()
    accelerator.backward(loss)
    if accelerator.num_processes > 1:
        average_gradients(params, accelerator.num_processes)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def average_gradients(params, processes: int) -> None:
    """All-reduce every parameter's gradient (a missing one counts as zero) to the mean over ``processes``, in
    one flat buffer (one collective call per step)."""
    import torch.distributed as dist

    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= processes
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)  # views of one buffer, used once by this step
        offset += n


def shard(items, accelerator):
    """This process's share of a global batch: items ``rank, rank + P, rank + 2P, ...`` of ``P`` processes (the
    whole batch in a single process). Works on lists, arrays and tensors."""
    return items[accelerator.process_index::accelerator.num_processes]


def process_mean(accelerator, value: torch.Tensor) -> float:
    """A scalar averaged over processes: what one process with the whole batch logs (for per-sample means over
    equal shares, exactly)."""
    value = value.detach().reshape(1).float()
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, "mean")
    return float(value.item())


class CsvLog:
    """Rows appended to ``path`` (header written once; a resumed run keeps appending). Each row gets a
    ``time`` stamp; ``fields`` names the columns."""

    def __init__(self, path: str, fields: list[str], enabled: bool = True):
        self.path, self.fields, self.enabled = path, ["time", *fields], enabled  # disabled: not the main process

    def __call__(self, **row) -> None:
        if not self.enabled:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({"time": round(time.time(), 1), **row})

    def rewind(self, keep) -> int:
        """Drop the rows for which ``keep(row)`` is false (rows are dicts of strings), atomically; returns how many
        were dropped. A resumed run rewinds its log to its checkpoint, so no step is logged twice."""
        if not self.enabled or not os.path.exists(self.path):
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
