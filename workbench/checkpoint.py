"""Resumable training state, saved safely: tensors in safetensors, everything else in JSON.

A training checkpoint is a folder ``<run>/checkpoints/step-000300/`` holding the model (whatever the
caller saves there, e.g. ``save_pretrained``), ``optimizer.safetensors`` (the optimizer's per-parameter
tensors), ``trainer_state.json`` (step, phase, optimizer hyper-parameters, any extra JSON) and, if given,
extra named tensors (``extra.safetensors``, e.g. a probe head). Folders are written under a temporary
name and renamed when complete, so a killed run never leaves a half-written checkpoint; loading never
unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` (an existing folder is
    swapped out, then deleted), on any exception it is deleted and ``path`` is left untouched."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old_", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (recorded beside saved weights, checked on load)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str, expected: str | None) -> None:
    """Raise ``ValueError`` if ``path``'s SHA-256 differs from ``expected`` (``None``: nothing recorded, no check)."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"{path} is corrupt: its SHA-256 is {actual[:12]}…, the folder recorded {expected[:12]}… "
                         "(a damaged or replaced file; pass verify=False to load it anyway)")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str, step: int, save_model: Callable[[str], None], optimizer=None,
                    state: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> str:
    """Write ``<run_dir>/checkpoints/step-XXXXXX`` atomically; keep the newest ``keep`` checkpoints."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    with atomic_folder(final) as tmp:
        save_model(tmp)
        meta = {"step": step, **(state or {})}
        if optimizer is not None:
            tensors, opt_meta = optimizer_to_tensors(optimizer)
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
            meta["optimizer"] = opt_meta
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()},
                      os.path.join(tmp, "extra.safetensors"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    for old in sorted(d for d in os.listdir(root) if d.startswith("step-"))[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step-")
                  and os.path.isfile(os.path.join(root, d, STATE_FILE)))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint_state(path: str, optimizer=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state dict, extra tensors) of a checkpoint; restores ``optimizer`` if given."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path!r} is not a training checkpoint: {STATE_FILE} is missing")
    with open(state_path) as f:
        meta = json.load(f)
    if optimizer is not None and "optimizer" in meta:
        optimizer_from_tensors(optimizer, load_file(os.path.join(path, "optimizer.safetensors")), meta["optimizer"])
    extra_path = os.path.join(path, "extra.safetensors")
    extra = load_file(extra_path) if os.path.isfile(extra_path) else {}
    return meta, extra
