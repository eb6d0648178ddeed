"""Run-wide settings shared by notebooks, scripts and tests.

``FULL_RUN``: notebooks and scripts run their small, fast CI-sized setting unless the environment
variable ``WORKBENCH_FULL_RUN=1`` is set (then they use the full sizes documented in each notebook).
"""

from __future__ import annotations

import os
import random

import numpy as np

FULL_RUN: bool = os.environ.get("WORKBENCH_FULL_RUN", "0") == "1"


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and (if installed) PyTorch."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def use_all_cores() -> int:
    """Give torch this machine's cores, shared evenly among the processes of a multi-process launch
    (``accelerate launch`` sets ``LOCAL_WORLD_SIZE``), and never more than ``OMP_NUM_THREADS`` when that is set
    (e.g. by parallel test workers); returns the thread count."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    torch.set_num_threads(threads)
    return threads


def run_cli(main, argv=None) -> None:
    """Run a command-line ``main`` so that a bad argument, file or value ends with one line on stderr
    (``error: ...``, exit status 2) instead of a traceback. Set ``WORKBENCH_TRACEBACK=1`` to see the traceback."""
    import sys

    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("WORKBENCH_TRACEBACK") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
