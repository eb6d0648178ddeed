"""The pretrained VLM: a tiny ``transformers`` Qwen2-VL, its tokenizer/processor, corpus and pretraining.

Importing this package registers the processor with ``AutoProcessor``.
"""

from . import api, corpus, modeling, processing
from .api import ask, load_vlm, save_vlm
from .modeling import PRESETS, build_model, count_parameters

__all__ = ["PRESETS", "api", "ask", "build_model", "corpus", "count_parameters", "load_vlm", "modeling",
           "processing", "save_vlm"]
