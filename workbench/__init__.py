"""ChatVLA-2 workbench: a miniature, CPU-sized reproduction of ChatVLA-2.

Notebooks do ``import workbench as wb``. Data flows one way:
sim (``wb.world``) -> dataset (``wb.dataset``) -> model -> trainer -> evaluation -> notebooks/demo.
"""

from . import viz, world
from .settings import FULL_RUN, set_seed
from .world import TabletopEnv, make_env, rollout

__all__ = ["FULL_RUN", "DemonstrationDataset", "TabletopEnv", "dataset", "generate_dataset", "load_meta",
           "make_env", "rollout", "set_seed", "viz", "world"]
__version__ = "0.1.0"

_LAZY = ("vlm", "vla", "evaluate", "train", "checkpoint", "bench", "run", "dataset", "introspect", "controllers")
_FROM_DATASET = ("DemonstrationDataset", "generate_dataset", "load_meta")


def __getattr__(name):
    """``wb.vlm``, ``wb.evaluate``, ``wb.dataset``, ... are imported on first use (they pull in transformers or
    datasets; and ``python -m workbench.<module>`` then runs a module not imported twice)."""
    import importlib

    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _FROM_DATASET:
        return getattr(importlib.import_module(".dataset", __name__), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
