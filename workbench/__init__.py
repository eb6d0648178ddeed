"""ChatVLA-2 workbench: a miniature, CPU-sized reproduction of ChatVLA-2.

Notebooks do ``import workbench as wb``. Data flows one way:
sim (``wb.world``) -> dataset (``wb.dataset``) -> model -> trainer -> evaluation -> notebooks/demo.
"""

from . import dataset, viz, world
from .dataset import DemonstrationDataset, generate_dataset, load_meta
from .settings import FULL_RUN, set_seed
from .world import TabletopEnv, make_env, rollout

__all__ = ["FULL_RUN", "DemonstrationDataset", "TabletopEnv", "dataset", "generate_dataset", "load_meta",
           "make_env", "rollout", "set_seed", "viz", "world"]
__version__ = "0.1.0"

_LAZY = ("vlm", "vla", "evaluate", "train", "checkpoint", "bench", "run")


def __getattr__(name):
    """``wb.vlm``, ``wb.evaluate``, ... are imported on first use (they pull in transformers)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
