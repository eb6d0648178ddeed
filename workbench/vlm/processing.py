"""Tokenizer, chat template and processor for the tiny Qwen2-VL, all HF-native.

* The tokenizer is a byte-level BPE trained with HF ``tokenizers`` on the project's own text (corpus
  questions and answers, instructions, reasoning), with Qwen2's pre-tokenizer (every digit is its own
  token, which arithmetic needs) and Qwen2-VL's special tokens; it is wrapped as ``Qwen2Tokenizer``.
* The image processor is ``Qwen2VLImageProcessorPil`` (the PIL backend: there is no CPU torchvision
  here) with 8-px patches and 2x2 merging. Images whose sides are multiples of 16 are not resized:
  the board camera (192x96) becomes 72 image tokens, the table camera (256x176) 176.
* ``TinyQwen2VLProcessor`` is ``Qwen2VLProcessor`` without a video processor: the stock class insists
  on building one, which needs torchvision. Importing this module registers it with ``AutoProcessor``,
  so a saved folder loads with ``AutoProcessor.from_pretrained(folder)``.

Prompts follow Qwen2-VL's chat format; each camera image is its own ``<|vision_start|><|image_pad|>
<|vision_end|>`` block in one user turn, as in the paper.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from transformers import AutoProcessor, Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLImageProcessorPil, Qwen2VLProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                  # Qwen2-VL's grounding tokens:
                  # <|object_ref_start|>the duck<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
                  "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
#: special tokens that carry meaning in an answer (kept when decoding)
GROUNDING_TOKENS = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")
# Qwen2's pre-tokenizer pattern: contractions, letters, single digits, punctuation runs, spaces.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2-VL-style chat template without a default system prompt (it would cost tokens on every sample).
# {% generation %} marks assistant tokens, so return_assistant_tokens_mask=True gives the loss mask.
# HF renders with trim_blocks=True: a newline right after a tag is dropped, hence {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}"
    "{% else %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>{% endgeneration %}"
    "{% else %}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>"
    "{% endif %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2  # as Qwen2-VL-2B; still images are repeated along time by the processor


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for still images only (no video processor, hence no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


AutoProcessor.register(Qwen2VLConfig, TinyQwen2VLProcessor, exist_ok=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``Qwen2Tokenizer`` with Qwen2-VL's
    special tokens (ids 0-11 in :data:`SPECIAL_TOKENS` order), eos ``<|im_end|>`` and pad ``<|pad|>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return Qwen2Tokenizer(vocab=tok.get_vocab(), merges=merges, unk_token=None, bos_token=None,
                          eos_token="<|im_end|>", pad_token="<|pad|>", extra_special_tokens=SPECIAL_TOKENS,
                          model_max_length=4096)


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """8-px patches, 2x2 merge; images keep their size when sides are multiples of 16 and the pixel
    count is within [16*16, 320*320]; pixels are scaled to [-1, 1]."""
    return Qwen2VLImageProcessorPil(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                                    temporal_patch_size=TEMPORAL_PATCH_SIZE, min_pixels=16 * 16,
                                    max_pixels=320 * 320, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def build_processor(texts: Iterable[str], vocab_size: int = 1024) -> TinyQwen2VLProcessor:
    """Tokenizer trained on ``texts`` + image processor + chat template, as one HF processor."""
    return TinyQwen2VLProcessor(image_processor=build_image_processor(),
                                tokenizer=train_tokenizer(texts, vocab_size), chat_template=CHAT_TEMPLATE)


def tokenizer_texts(n_samples: int = 4000, seed: int = 0) -> list[str]:
    """The text the tokenizer is trained on: corpus questions and answers (train split), every
    instruction and reasoning template of the robot world, and the names of all objects."""
    import numpy as np

    from ..world import language
    from ..world.catalog import OBJECTS
    from .corpus import CorpusGenerator

    gen = CorpusGenerator("train", seed=seed)
    texts = []
    for s in gen.samples(n_samples):
        texts += [s.question, s.answer]
    rng = np.random.default_rng(seed)
    names = sorted(OBJECTS)
    for i in range(400):
        o, t = names[i % len(names)], names[(i * 7 + 3) % len(names)]
        if o == t:
            continue
        d = ("left", "right", "front", "behind")[i % 4]
        gt_toy = {"task": "toy_placement", "object": o, "target": t, "direction": d,
                  "toys": {o: [0.45 + 0.002 * (i % 50), 0.12], t: [0.55, -0.1]}}
        texts.append(language.toy_instruction(o, t, d, rng))
        texts.append(language.episode_reasoning(gt_toy, rng))
        for ph in language.PHASES:
            texts.append(language.step_reasoning(ph, gt_toy, rng))
    texts += list(language.MATH_INSTRUCTIONS) + [f"the {n}" for n in names]
    return texts


def messages(num_images: int, question: str, answer: str | None = None,
             follow_ups: tuple[tuple[str, str | None], ...] = ()) -> list[dict]:
    """Chat messages: one user turn with ``num_images`` images then the question (and the answer), then
    ``follow_ups``, more (question, answer) turns about the same images (training conversations). The last
    follow-up's answer may be None: the conversation then ends with that question (generation)."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    for q, a in follow_ups:
        msgs.append({"role": "user", "content": [{"type": "text", "text": q}]})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs
