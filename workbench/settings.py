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
