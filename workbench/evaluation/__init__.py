"""Evaluation, one concept per module:

* :mod:`~workbench.evaluation.knowledge` -- the knowledge suite: what a VLM (or a policy's backbone) knows, on
  held-out data, row by row with Wilson intervals.
* :mod:`~workbench.evaluation.positions` -- does a VLM know where things are: linear probes of its image tokens'
  rows and columns, and the error of the boxes it writes.
* :mod:`~workbench.evaluation.closed_loop` -- a policy acting in the simulator; reasoning scores; counterfactual
  following.
* :mod:`~workbench.evaluation.report` -- the policy report the README shows (both of the above, before/after).

The command line is :mod:`workbench.evaluate` (``python -m workbench.evaluate
knowledge|positions|reasoning|policy|following|report``).
"""

from __future__ import annotations


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a success rate (sensible at 0% and 100%)."""
    import numpy as np

    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
