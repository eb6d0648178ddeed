"""The pretrained VLM: a tiny ``transformers`` Qwen2-VL, its tokenizer/processor, corpus and pretraining.

Importing this package registers the processor with ``AutoProcessor``.
"""

from . import processing

_MODULES = ("api", "boards", "corpus", "modeling", "pretrain")
_NAMES = {"ask": "api", "load_vlm": "api", "save_vlm": "api", "PRESETS": "modeling", "build_model": "modeling",
          "count_parameters": "modeling"}


def __getattr__(name):
    """Submodules and their main names are imported on first use (``python -m workbench.vlm.api`` then runs a
    module that was not imported already)."""
    import importlib

    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'workbench.vlm' has no attribute {name!r}")


__all__ = ["PRESETS", "api", "ask", "boards", "build_model", "corpus", "count_parameters", "load_vlm", "modeling",
           "pretrain", "processing", "save_vlm"]
