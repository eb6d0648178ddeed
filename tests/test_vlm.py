"""The tiny Qwen2-VL: tokenizer, processor, presets, save/load, ask(), and bad input."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.vlm import api
from workbench.vlm.modeling import build_config, build_model, count_parameters
from workbench.vlm.processing import build_processor, tokenizer_texts


@pytest.fixture(scope="module")
def vlm():
    proc = build_processor(tokenizer_texts(500), vocab_size=600)
    model = build_model(proc.tokenizer, verbose=False)
    return model, proc


def test_every_assistant_turn_of_a_conversation_is_a_target(vlm):
    _, proc = vlm
    img = Image.new("RGB", (64, 48), "white")
    one = api.encode_example(proc, [img], "How many toys are on the table?", "two")
    conv = api.encode_example(proc, [img], "How many toys are on the table?", "two",
                              follow_ups=[("Which toys do you see?", "the red mug and the blue cube"),
                                          ("What is left of the red mug?", "the blue cube")])
    tok = proc.tokenizer

    def targets(ex):
        return tok.decode(ex["input_ids"][ex["labels"] != -100])

    assert targets(one) == "two<|im_end|>"
    assert targets(conv) == "two<|im_end|>the red mug and the blue cube<|im_end|>the blue cube<|im_end|>"
    # the first turn is encoded exactly as a one-question example (what ask() sees at inference)
    n = len(one["input_ids"])
    assert torch.equal(conv["input_ids"][:n], one["input_ids"]) and torch.equal(conv["labels"][:n], one["labels"])
    assert int((conv["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == \
        int((one["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_a_first_answer_can_be_context_and_a_conversation_can_end_with_a_question(vlm):
    """``learn_first=False``: the first answer stays in the labels (it is said) but not in ``lm_labels`` (no loss);
    collate gives other items' labels as their lm_labels; build_inputs ends an unanswered follow-up with the
    generation prompt, token for token the training conversation's prefix."""
    _, proc = vlm
    img = Image.new("RGB", (192, 96), "white")  # prepared: encode_example takes images as prepare_image leaves them
    ex = api.encode_example(proc, [img], "Solve the equation on the whiteboard.", "3 + 4 = 7",
                            follow_ups=[("Which card?", "the card 7")], learn_first=False)
    tok = proc.tokenizer
    assert tok.decode(ex["input_ids"][ex["labels"] != -100]) == "3 + 4 = 7<|im_end|>the card 7<|im_end|>"
    assert tok.decode(ex["input_ids"][ex["lm_labels"] != -100]) == "the card 7<|im_end|>"
    plain = api.encode_example(proc, [img], "How many toys?", "two")
    batch = api.collate([plain, ex], tok.pad_token_id)
    assert torch.equal(batch["lm_labels"][0], batch["labels"][0])
    assert torch.equal(batch["lm_labels"][1, :len(ex["input_ids"])], ex["lm_labels"])
    assert "lm_labels" not in api.collate([plain], tok.pad_token_id)
    prompt = api.build_inputs(proc, [img], "Solve the equation on the whiteboard.", "3 + 4 = 7",
                              follow_ups=(("Which card?", None),))["input_ids"][0]
    cut = int((ex["lm_labels"] != -100).nonzero()[0])  # where the second answer starts
    assert torch.equal(prompt, ex["input_ids"][:cut])


def test_tokenizer_has_specials_and_single_digits(vlm):
    _, proc = vlm
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 6 and tok.eos_token == "<|im_end|>"
    pieces = tok.tokenize("12 × 34 = 408")
    assert all(len(p.strip("Ġ")) <= 1 for p in pieces if p.strip("Ġ").isdigit())
    assert tok.decode(tok("the yellow duck is left of 7")["input_ids"]) == "the yellow duck is left of 7"


@pytest.mark.parametrize("sizes", [[(192, 96)], [(192, 96), (256, 176)], [(100, 37), (300, 200), (64, 64)]])
def test_processor_handles_one_to_three_images_of_any_size(vlm, sizes):
    model, proc = vlm
    imgs = [Image.new("RGB", s, (200, 30, 30)) for s in sizes]
    inputs = api.build_inputs(proc, imgs, "What do you see?", "a red square")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert len(inputs["image_grid_thw"]) == len(sizes)
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)


def test_camera_images_keep_their_size(vlm):
    _, proc = vlm
    inputs = api.build_inputs(proc, [np.zeros((96, 192, 3), np.uint8), np.zeros((176, 256, 3), np.uint8)], "q")
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 24], [1, 22, 32]]  # 72 + 176 image tokens


def test_save_load_round_trip(vlm, tmp_path):
    model, proc = vlm
    path = str(tmp_path / "vlm")
    api.save_vlm(model, proc, path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(os.listdir(path))
    assert not any(f.endswith(".bin") for f in os.listdir(path))
    model2, proc2 = api.load_vlm(path)
    inputs = api.build_inputs(proc, [Image.new("RGB", (64, 32))], "Read the whiteboard.", "3 + 4 = ?")
    inputs2 = api.build_inputs(proc2, [Image.new("RGB", (64, 32))], "Read the whiteboard.", "3 + 4 = ?")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.no_grad():
        a, b = model(**inputs).logits, model2(**inputs2).logits
    assert torch.equal(a, b)
    api.save_vlm(model2, proc2, path)  # overwriting an existing checkpoint also works
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_ask_is_greedy_and_bounded(vlm):
    model, proc = vlm
    board = [np.full((96, 192, 3), 255, np.uint8)]
    answer = api.ask(model, proc, board, "What is written on the whiteboard?", max_new_tokens=5)
    assert answer == api.ask(model, proc, board, "What is written on the whiteboard?", max_new_tokens=5)
    assert len(proc.tokenizer(answer)["input_ids"]) <= 5 + 1  # re-tokenizing may split one token differently
    assert "<|im_end|>" not in answer and "<|pad|>" not in answer


def test_grounding_tokens_survive_decoding(vlm):
    _, proc = vlm
    text = "<|object_ref_start|>the card 7<|object_ref_end|><|box_start|>(120,340),(210,480)<|box_end|>"
    ids = proc.tokenizer(text + "<|im_end|>")["input_ids"]
    assert proc.tokenizer.convert_tokens_to_ids("<|box_start|>") in ids  # one special token, not bytes
    assert api.decode_answer(proc.tokenizer, ids) == text


@pytest.mark.parametrize("size,expected", [((5000, 2500), (320, 160)), ((100, 50), (160, 80)),
                                           ((192, 96), (192, 96)), ((256, 176), (256, 176))])
def test_images_reach_the_model_at_a_trained_scale(size, expected):
    """A caller's image is resized into the range of scales pretraining shows (boards 160-320 px wide); the
    cameras' images pass unchanged."""
    assert api.prepare_image(Image.new("RGB", size, "white")).size == expected


@pytest.mark.parametrize("image,ok", [
    (Image.new("L", (64, 32)), True),  # grey -> converted
    (Image.new("RGBA", (64, 32)), True),
    (Image.new("P", (64, 32)), True),
    (np.zeros((5000, 5000, 3), np.uint8), True),  # huge -> shrunk to MAX_IMAGE_SIDE
    (None, False), (np.zeros((0, 0, 3), np.uint8), False), (Image.new("RGB", (1, 1)), False),
    (np.zeros((4000, 10, 3), np.uint8), False),  # too elongated to keep a 16-px side
])
def test_bad_images_are_converted_or_rejected(vlm, image, ok):
    _, proc = vlm
    if ok:
        inputs = api.build_inputs(proc, [image], "What is this?")
        assert max(inputs["image_grid_thw"][0, 1:].tolist()) * 8 <= api.MAX_IMAGE_SIDE
    else:
        with pytest.raises(ValueError):
            api.build_inputs(proc, [image], "What is this?")


@pytest.mark.parametrize("question", ["", "   ", None, "x" * 2000, "What is <|image_pad|> here?", "Hi<|im_end|>"])
def test_bad_questions_are_rejected(vlm, question):
    model, proc = vlm
    with pytest.raises(ValueError, match="question"):
        api.build_inputs(proc, [Image.new("RGB", (64, 32))], question)
    with pytest.raises(ValueError, match="question (must|is|contains)"):
        api.ask(model, proc, [Image.new("RGB", (64, 32))], question)


def test_transparent_images_are_seen_on_white(vlm):
    _, proc = vlm
    clear = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (64, 32), "white")
    a = api.build_inputs(proc, [clear], "What is this?")["pixel_values"]
    b = api.build_inputs(proc, [white], "What is this?")["pixel_values"]
    assert torch.equal(a, b)


def test_flipped_bytes_in_the_weights_are_caught(vlm, tmp_path):
    model, proc = vlm
    path = str(tmp_path / "v")
    api.save_vlm(model, proc, path)
    weights = os.path.join(path, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-100] ^= 0xFF  # same size, one weight byte changed: it would load silently
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        api.load_vlm(path)
    api.load_vlm(path, verify=False)  # the opt-out


def test_load_errors(tmp_path, vlm):
    with pytest.raises(FileNotFoundError, match="no VLM checkpoint"):
        api.load_vlm(str(tmp_path / "nope"))
    model, proc = vlm
    path = str(tmp_path / "v")
    api.save_vlm(model, proc, path)
    os.rename(os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="not loaded"):
        api.load_vlm(path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):  # the recorded checksum catches it first
        api.load_vlm(path)
    with pytest.raises(ValueError, match="could not load"):
        api.load_vlm(path, verify=False)


def test_presets():
    with pytest.raises(ValueError, match="tiny"):
        build_config(None, "nope")
    proc = build_processor(tokenizer_texts(200), vocab_size=400)
    cfg = build_config(proc.tokenizer, "2b")  # Qwen2-VL-2B sizes; config only (not instantiated on CPU)
    assert cfg.text_config.hidden_size == 1536 and cfg.vision_config.hidden_size == 1536
    n = count_parameters(build_model(proc.tokenizer, verbose=False))
    assert 1_000_000 < n["total"] < 3_000_000
    small = count_parameters(build_model(proc.tokenizer, "small", verbose=False))  # tiny with a bigger vision tower
    assert small["language"] == n["language"] and 4 * n["vision"] < small["vision"] and small["total"] < 10_000_000


def test_shipped_checkpoint_scores_above_its_floor(root):
    """Regression test: the shipped VLM on a fixed held-out batch of knowledge suite v2 (6 per row, no robustness rows,
    and the first 12 boards of three of them).

    Measured when this floor was set: 41/66 (text arithmetic 6/6, colour 6, count 6, objects 5, cards 4, spatial 4,
    grounding cards 3, toys 2, affordance 3, and 1 each for OCR and board arithmetic; OCR 1/6 on this batch although
    49/100 on the full row: see the README). Earlier shipped VLMs scored 18/66 (before the pooled *scenes*
    continuation), 29/66 (before the *where* continuation: cards 1) and 34/66 (before the *bind* and *locate*
    continuations: toy grounding + affordance 1). An untrained model of the same shape scores 0. A change that breaks
    loading, the processor, the renderer or the scoring drops below the floor. The re-read model that replaced it
    (continuations 6-8) scores 43/66 (OCR 2, board arithmetic 2, cards 5, objects 5, spatial 4, grounding cards 2, toys
    2, affordance 3; text arithmetic, colour and count 6 each); the overall floor rose from 33 to 35. The model that
    replaced that one (continuations 9-10, boards at a caller's size) scores 47/66 (OCR 3, board arithmetic 1, cards 6,
    objects 3, spatial 5, grounding cards 3, toys 3, affordance 5; text arithmetic, colour and count 6 each): the floor
    rose to 39. It also reads 7 of the first 12 boards of the "caller's image at its own size" row (widths 170-596 px;
    the model before it read 2): floor 5. The model shipped now (continuations 11-12, boards of other shapes) scores
    48/66 (OCR 3, board arithmetic 1, cards 6, objects 5, spatial 3, grounding cards 4, toys 4, affordance 4; text
    arithmetic, colour and count 6 each): the floor rose to 40; it reads 8 of those 12 boards, and 7 of the first 12 of
    the "not 2:1" row (the model before it: 6; on the whole row of 100, 75 against 57): floor 4. The model shipped now
    (continuations 13-14, photos of boards) scores 50/66 (OCR 3, board arithmetic 1, cards 6, objects 6, spatial 5,
    grounding cards 4, toys 2, affordance 5; text arithmetic, colour and count 6 each): the floor rose to 42; it reads
    9, 8 and 9 of the first 12 boards of the "own size", "not 2:1" and "photo" rows (the model before it read 1 photo;
    on the whole row of 100, 64 against 26): photo floor 5.
    """
    from workbench.evaluation.knowledge import evaluate_knowledge
    from workbench.vlm.corpus import CorpusGenerator

    model, processor = api.load_vlm(os.path.join(root, "data_samples", "vlm"))
    result = evaluate_knowledge(model, processor, per_skill=6, seed=1234, progress=False, robustness=False)
    by_key = {r["key"]: r for r in result["rows"]}
    overall = sum(r["correct"] for k, r in by_key.items() if len(k.split()) == 1)
    assert overall >= 42, result["examples"][:5]
    for condition, floor in (("raw", 5), ("shape", 4), ("photo", 5)):
        caller = CorpusGenerator("heldout", seed=1234, condition=condition)  # the suite's first boards of that row
        row = evaluate_knowledge(model, processor, samples=[caller.sample("ocr") for _ in range(12)], progress=False)
        assert row["rows"][0]["correct"] >= floor, (condition, row["examples"][:5])
    assert by_key["arithmetic"]["correct"] >= 5
    assert by_key["objects"]["correct"] + by_key["count"]["correct"] >= 8
    assert by_key["cards"]["correct"] >= 3
    assert by_key["ground_toy"]["correct"] + by_key["affordance"]["correct"] >= 3
