"""The VLM: ``transformers``' Qwen2-VL (``Qwen2VLForConditionalGeneration``) with a config preset.

The presets differ from Qwen2-VL-2B in the config only (sizes, patch size); the architecture,
weights format and APIs (``save_pretrained`` / ``from_pretrained``, ``generate``) are the library's.

=========  ======  ======  =====  ========  ===========  ======  =====  ========
preset     hidden  layers  heads  kv heads  vision dim   depth   patch  params
=========  ======  ======  =====  ========  ===========  ======  =====  ========
``tiny``   128     4       4      2         96           4       8      ~1.8 M
``small``  128     4       4      2         192          6       8      ~4.5 M
``2b``     1536    28      12     2         1280         32      14     ~2.2 B
=========  ======  ======  =====  ========  ===========  ======  =====  ========

(``small`` is ``tiny`` with a wider, deeper vision tower: :mod:`workbench.vlm.probe` compares what the two read;
``tiny``'s count is with a ~1k-token vocabulary; ``2b`` is Qwen2-VL-2B's published config with its
151,936-token vocabulary, for GPU checks only.)
"""

from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from .processing import MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE

_TINY_TEXT = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048,
              # mrope_section (temporal, height, width) must sum to head_dim / 2 = 128 / 4 / 2
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}}

PRESETS: dict[str, dict] = {
    "tiny": {
        "text": _TINY_TEXT,
        "vision": {"depth": 4, "embed_dim": 96, "num_heads": 4, "mlp_ratio": 4, "patch_size": PATCH_SIZE},
    },
    "small": {
        "text": _TINY_TEXT,
        "vision": {"depth": 6, "embed_dim": 192, "num_heads": 6, "mlp_ratio": 4, "patch_size": PATCH_SIZE},
    },
    "2b": {
        "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "max_position_embeddings": 32768,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]}},
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14},
    },
}


def build_config(tokenizer, preset: str = "tiny", vocab_size: int | None = None) -> Qwen2VLConfig:
    """A ``Qwen2VLConfig`` for ``preset`` whose special-token ids match ``tokenizer`` (``vocab_size`` overrides the
    tokenizer's size, e.g. 151,936 to size the ``2b`` preset as Qwen2-VL-2B)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    p = PRESETS[preset]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|im_end|>", "<|pad|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks Qwen2-VL special tokens {missing}")
    return Qwen2VLConfig(
        text_config={**p["text"], "vocab_size": vocab_size or len(tokenizer), "bos_token_id": None,
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|pad|>"]},
        vision_config={**p["vision"], "hidden_size": p["text"]["hidden_size"],  # merger output = LM width
                       "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE,
                       "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, vision tower, language model (tied embeddings counted once)."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "vision": sum(p.numel() for p in model.model.visual.parameters()),
            "language": sum(p.numel() for p in model.model.language_model.parameters())}


def build_model(tokenizer, preset: str = "tiny", seed: int = 0, verbose: bool = True):
    """A freshly initialised ``Qwen2VLForConditionalGeneration``; prints its parameter count."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer, preset))
    if verbose:
        n = count_parameters(model)
        print(f"Qwen2-VL '{preset}': {n['total'] / 1e6:.2f} M parameters "
              f"(vision {n['vision'] / 1e6:.2f} M, language {n['language'] / 1e6:.2f} M)")
    return model


def training_memory_gib(parameters: int, trainable: int | None = None) -> dict[str, float]:
    """GiB for one bf16 mixed-precision AdamW step, without activations: bf16 weights (2 bytes per parameter),
    bf16 gradients and fp32 master weights + two Adam moments (2 + 12 bytes per *trainable* parameter). ZeRO-2
    over N GPUs divides the gradient and optimizer part by N."""
    trainable = parameters if trainable is None else trainable
    gib = 1024**3
    return {"weights": 2 * parameters / gib, "gradients": 2 * trainable / gib, "optimizer": 12 * trainable / gib,
            "total": (2 * parameters + 14 * trainable) / gib}
