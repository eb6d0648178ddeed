"""Ask the VLM anything about images, and save / load it safely.

    >>> model, processor = load_vlm("data_samples/vlm")
    >>> ask(model, processor, [board_image, table_image], "Which card answers the equation on the board?")
    '3 + 4 = 7. The card 7 is at the back left.'

CLI (image files, one ``--image`` per camera, in order)::

    python -m workbench.vlm.api --model data_samples/vlm --image board.png "What is written on the whiteboard?"
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

from ..world.writing import as_rgb_image
from .processing import TinyQwen2VLProcessor, messages

CHECKSUMS = "checksums.json"  # {"model.safetensors": sha256}, written by save_vlm, checked by load_vlm
#: larger images are shrunk (keeping aspect) before the processor sees them: the widest image pretraining shows
#: (``corpus.RAW_WIDTHS``), so that a caller's board reaches the model at a scale it learned to read
MAX_IMAGE_SIDE = 320
#: smaller images are enlarged (keeping aspect) to this longer side: the narrowest board pretraining shows
MIN_SCALED_SIDE = 160
MIN_IMAGE_SIDE = 16  # one merged token


def prepare_image(image, what: str = "image") -> Image.Image:
    """RGB PIL image ready for the processor. Converts grey/RGBA/palette images and arrays; resizes (keeping
    aspect) an image whose longer side is above ``MAX_IMAGE_SIDE`` or below ``MIN_SCALED_SIDE`` to that side, the
    range of scales pretraining shows (the cameras' images are inside it and pass unchanged); rejects ``None``,
    empty and tiny (< 16 px) images with a ``ValueError`` saying what was expected."""
    img = as_rgb_image(image, what, min_size=MIN_IMAGE_SIDE, max_size=20000)
    longest = max(img.size)
    if not MIN_SCALED_SIDE <= longest <= MAX_IMAGE_SIDE:
        side = min(max(longest, MIN_SCALED_SIDE), MAX_IMAGE_SIDE)
        img = img.resize((max(1, round(img.width * side / longest)), max(1, round(img.height * side / longest))),
                         Image.Resampling.LANCZOS)
        if min(img.size) < MIN_IMAGE_SIDE:
            raise ValueError(f"{what} is too elongated: at {side} px on its longer side its short side is "
                             f"{min(img.size)} px (< {MIN_IMAGE_SIDE})")
    return img


def _check_question(question, what: str = "question") -> str:
    from ..world.language import check_text

    return check_text(question, what, max_chars=1000, example="What is written on the whiteboard?")


def build_inputs(processor: TinyQwen2VLProcessor, images, question: str, answer: str | None = None,
                 follow_ups: tuple[tuple[str, str | None], ...] = ()) -> dict:
    """Processor outputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
    ``image_grid_thw``) for one conversation about ``images``: ``question``, its ``answer`` and ``follow_ups``
    (see :func:`~workbench.vlm.processing.messages`). When the conversation ends with an unanswered question
    (``answer`` None and no follow-ups, or a last follow-up answered None) it ends with the generation prompt."""
    if images is None or isinstance(images, (Image.Image, np.ndarray)):
        images = [] if images is None else [images]
    imgs = [prepare_image(im, f"image {i}") for i, im in enumerate(images)]
    follow_ups = tuple((_check_question(q), a) for q, a in follow_ups)
    last = follow_ups[-1][1] if follow_ups else answer
    text = processor.apply_chat_template(messages(len(imgs), _check_question(question), answer, follow_ups),
                                         tokenize=False, add_generation_prompt=last is None)
    return processor(text=[text], images=imgs or None, return_tensors="pt")


def answer_labels(processor: TinyQwen2VLProcessor, ids: torch.Tensor) -> torch.Tensor:
    """Labels (L,) for token ids (L,) of a conversation: -100 except every assistant turn's answer tokens and its
    ``<|im_end|>`` (the training targets)."""
    tok = processor.tokenizer
    start_id, end_id = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    role = torch.tensor(tok("assistant\n")["input_ids"])
    labels = torch.full_like(ids, -100)
    ends = (ids == end_id).nonzero().flatten()
    for s in (ids == start_id).nonzero().flatten().tolist():
        a = s + 1 + len(role)
        if a <= len(ids) and torch.equal(ids[s + 1:a], role):
            after = ends[ends >= a]
            e = int(after[0]) if len(after) else len(ids) - 1
            labels[a:e + 1] = ids[a:e + 1]
    return labels


def encode_example(processor: TinyQwen2VLProcessor, images, question: str, answer: str,
                   follow_ups: tuple[tuple[str, str], ...] = (), learn_first: bool = True) -> dict:
    """One training example as 1-D tensors: ``input_ids`` (L,), ``labels`` (L,) (-100 except the answer
    tokens and ``<|im_end|>`` of every assistant turn), ``mm_token_type_ids`` (L,), and ``image_grid_thw``
    (n_images, 3) or None. ``follow_ups``: more (question, answer) turns about the same images. ``images`` are
    already-prepared RGB images (their pixels are not kept: vision features come from a cache or from a
    separate ``pixel_values`` call). ``learn_first=False``: the first answer is context, not a target: the item
    also has ``lm_labels`` (L,), ``labels`` without that answer (the LM loss's targets; see :func:`collate`)."""
    full = processor.apply_chat_template(messages(len(images), question, answer, tuple(follow_ups)), tokenize=False)
    enc = processor(text=[full], images=list(images) or None, return_tensors="pt")
    ids = enc["input_ids"][0]
    labels = answer_labels(processor, ids)
    item = {"input_ids": ids, "labels": labels, "mm_token_type_ids": enc["mm_token_type_ids"][0],
            "image_grid_thw": enc.get("image_grid_thw")}
    if not learn_first:
        labelled = (labels != -100).long()
        first_turn = labelled.cumsum(0) > 0  # from the first answer token ...
        first_turn &= (labelled.diff(prepend=labelled[:1]) == 1).long().cumsum(0) <= 1  # ... to the end of its run
        item["lm_labels"] = labels.masked_fill(first_turn, -100)
    return item


def vision_tokens(visual, image_processor, images) -> tuple[torch.Tensor, list[int]]:
    """Merged vision tokens of ``images`` (a list of RGB images) concatenated: (sum of tokens, hidden), and
    the number of tokens of each image (``visual`` = ``model.model.visual``)."""
    v = image_processor(images, return_tensors="pt")
    device = next(visual.parameters()).device
    feats = visual(v["pixel_values"].to(device), grid_thw=v["image_grid_thw"].to(device)).pooler_output
    return feats, (v["image_grid_thw"].prod(-1) // visual.spatial_merge_size**2).tolist()


def collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-padded model inputs for a batch of :func:`encode_example` outputs. Items may carry ``feats``
    (one (tokens, hidden) tensor of merged vision tokens per image, e.g. from a cache): they are passed
    as ``mm_encoder_outputs`` so the vision tower is not run. Returns ``input_ids``, ``attention_mask``,
    ``labels``, ``mm_token_type_ids`` (batch, L), ``lm_labels`` (batch, L) if an item has them (the others'
    are their labels) and, if there are images, ``image_grid_thw``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    length = max(len(it["input_ids"]) for it in items)

    def stack(key, value):
        return torch.stack([torch.nn.functional.pad(it[key], (0, length - len(it[key])), value=value)
                            for it in items])

    lengths = torch.tensor([len(it["input_ids"]) for it in items])
    batch = {"input_ids": stack("input_ids", pad_token_id), "labels": stack("labels", -100),
             "attention_mask": (torch.arange(length)[None] < lengths[:, None]).long(),
             "mm_token_type_ids": stack("mm_token_type_ids", 0)}
    if any("lm_labels" in it for it in items):  # the LM loss's targets, where some differ from the labels
        items = [it if "lm_labels" in it else {**it, "lm_labels": it["labels"]} for it in items]
        batch["lm_labels"] = stack("lm_labels", -100)
    grids = [it["image_grid_thw"] for it in items if it["image_grid_thw"] is not None]
    if grids:
        batch["image_grid_thw"] = torch.cat(grids)
        feats = tuple(f for it in items for f in it.get("feats", ()))
        if feats:
            batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return batch


@torch.no_grad()
def ask(model, processor: TinyQwen2VLProcessor, images, question: str, max_new_tokens: int = 48,
        what: str = "question", streamer=None, before: tuple[tuple[str, str], ...] = ()) -> str:
    """Greedy answer (KV-cached ``generate``) to ``question`` about ``images`` (a list, one per camera:
    PIL images or HxWx3 uint8 arrays; may be empty for text-only questions). ``what`` names the text in
    error messages (a policy passes its "instruction"). ``streamer``: a ``transformers`` streamer that
    receives the tokens as they are generated (see :func:`ask_stream`). ``before``: earlier (question, answer)
    turns of the conversation, the first one with the images."""
    question = _check_question(question, what)
    inputs = (build_inputs(processor, images, before[0][0], before[0][1], (*before[1:], (question, None)))
              if before else build_inputs(processor, images, question))
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=processor.tokenizer.pad_token_id, streamer=streamer)
    model.train(was_training)
    return decode_answer(processor.tokenizer, out[0, inputs["input_ids"].shape[1]:])


def ask_stream(generate_answer, tokenizer):
    """Generator of the growing answer text while ``generate_answer(streamer)`` (e.g.
    ``lambda st: ask(model, processor, images, question, streamer=st)``) runs in a background thread; yields
    partial texts, and last the function's own return value (the exact answer)."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=120)
    result: dict = {}

    def work():
        try:
            result["answer"] = generate_answer(streamer)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"]


def decode_answer(tokenizer, ids) -> str:
    """Generated ids -> text, keeping Qwen2-VL's grounding tokens (``<|box_start|>`` ...) and dropping the
    other special tokens (end of turn, padding)."""
    from .processing import GROUNDING_TOKENS

    keep = {tokenizer.convert_tokens_to_ids(t) for t in GROUNDING_TOKENS} - {None, tokenizer.unk_token_id}
    drop = set(tokenizer.all_special_ids) - keep
    return tokenizer.decode([int(i) for i in ids if int(i) not in drop]).strip()


def save_vlm(model, processor, path: str) -> str:
    """Write model + processor to ``path`` (safetensors), atomically: a temporary sibling folder is
    filled and then renamed, so an interrupted save never leaves a broken checkpoint."""
    from ..checkpoint import atomic_folder, file_sha256

    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, CHECKSUMS), "w") as f:
            json.dump({"model.safetensors": file_sha256(os.path.join(tmp, "model.safetensors"))}, f, indent=1)
    return path


def load_vlm(path: str, device: str = "cpu", verify: bool = True):
    """(model, processor) from a folder written by :func:`save_vlm` / ``save_pretrained``.

    Loads weights only from safetensors (never unpickles); raises ``FileNotFoundError`` /
    ``ValueError`` naming what is missing or wrong. ``verify``: check the weights against the SHA-256 that
    :func:`save_vlm` records in ``checksums.json`` (a folder without one loads unchecked)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no VLM checkpoint folder at {path!r}")
    files = set(os.listdir(path))
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        if needed not in files:
            hint = " (pickled .bin weights are not loaded)" if needed == "model.safetensors" and any(
                f.endswith(".bin") for f in files) else ""
            raise FileNotFoundError(f"{path!r} is not a VLM checkpoint: {needed} is missing{hint}")
    if verify and CHECKSUMS in files:
        from ..checkpoint import verify_checksum

        try:
            with open(os.path.join(path, CHECKSUMS)) as f:
                expected = json.load(f)["model.safetensors"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}/{CHECKSUMS} is unreadable ({type(exc).__name__}: {exc}); expected "
                             '{"model.safetensors": "<sha256>"}') from exc
        verify_checksum(os.path.join(path, "model.safetensors"), expected)
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, use_safetensors=True).to(device)
    except Exception as exc:  # corrupt or mismatched files
        raise ValueError(f"could not load the VLM checkpoint at {path!r}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return model, processor


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m workbench.vlm.api", description="Ask the VLM about image files.")
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several cameras)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("question")
    args = ap.parse_args(argv)
    images = []
    for f in args.image:
        if not os.path.isfile(f):
            ap.error(f"image file not found: {f}")
        images.append(Image.open(f))
    model, processor = load_vlm(args.model)
    print(ask(model, processor, images, args.question, args.max_new_tokens))


if __name__ == "__main__":
    from ..settings import run_cli

    run_cli(main)
