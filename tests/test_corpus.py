"""The VLM pretraining corpus: determinism, held-out disjointness, the general subset's rule."""

import dataclasses

import numpy as np
import pytest

from workbench.vlm import corpus as C
from workbench.world import grounding as G
from workbench.world.catalog import SPLITS as ROBOT_SPLITS


def test_deterministic_under_seed():
    a = C.CorpusGenerator("train", seed=3).samples(40)
    b = C.CorpusGenerator("train", seed=3).samples(40)
    assert a == b
    assert a != C.CorpusGenerator("train", seed=4).samples(40)


def test_heldout_never_overlaps_training():
    from workbench.vlm.boards import FAMILIES

    assert set(C.HELDOUT_EQUATIONS).isdisjoint(C.TRAIN_BOARD_EQUATIONS)
    assert set(C.HELDOUT_STYLES).isdisjoint(C.TRAIN_STYLES)
    assert set(FAMILIES["train"]).isdisjoint(FAMILIES["heldout"])
    # held-out styles are no robot split's styles either
    assert not {s for sp in ROBOT_SPLITS.values() for s in sp.writing_styles} & set(C.HELDOUT_STYLES)
    train = C.CorpusGenerator("train", seed=0).samples(600, kinds=("ocr", "solve", "answer_card"))
    held = C.CorpusGenerator("heldout", seed=0).samples(300, kinds=("ocr", "solve", "answer_card"))
    assert all(s.board["style"] in C.TRAIN_STYLES if "style" in s.board else s.board["look"]["family"]
               in FAMILIES["train"] for s in train)
    assert all(s.board["look"]["family"] in FAMILIES["heldout"] for s in held)
    assert {s.board["text"] for s in train}.isdisjoint({s.board["text"] for s in held})
    assert all(s.board["seed"] < 2**30 for s in train) and all(s.board["seed"] >= 2**30 for s in held)
    # training shows the world's own boards, augmented looks and raw images; the held-out set varies too
    assert {"style" in s.board for s in train} == {True, False}
    assert {s.board["view"] for s in train} == {"camera", "raw"}
    assert {s.board["width"] for s in train if s.board["view"] == "raw"} == set(C.RAW_WIDTHS)
    assert len({s.board["look"]["family"] for s in held}) == len(FAMILIES["heldout"])
    # arithmetic of held-out board equations is still taught as text
    assert set(C.HELDOUT_EQUATIONS) <= set(C.ARITHMETIC_FACTS)


@pytest.mark.parametrize("condition", C.CONDITIONS)
def test_robustness_conditions_force_their_property(condition):
    g = C.CorpusGenerator("heldout", seed=5, condition=condition)
    looks = [g.sample("ocr").board for _ in range(30)]
    if condition == "no_frame":
        assert all(b["look"]["frame"] is None for b in looks)
    if condition == "coloured_ink":
        assert all(max(b["look"]["ink"]) - min(b["look"]["ink"]) > 30 for b in looks)
    if condition == "tilted":
        assert all(abs(b["look"]["rotation"]) >= 6 for b in looks)
    if condition == "sketch":
        assert all(b["look"]["kind"] == "hand" and b["look"]["stroke"] >= 0.12 for b in looks)
    if condition == "env":
        assert all(b["view"] == "env" for b in looks)
    if condition == "raw":  # the board image at a caller's size, well beyond what training shows
        widths = [b["width"] for b in looks]
        assert all(b["view"] == "raw" for b in looks) and max(widths) > max(C.RAW_WIDTHS) >= min(widths)
    if condition == "shape":  # and at another width : height than the 2 : 1 every other row shows
        aspects = [b["aspect"] for b in looks]
        assert all(b["view"] == "raw" for b in looks) and min(aspects) < 1.5 and max(aspects) > 2.3
        assert all(abs(np.log(a / 2)) > np.log(1.15) and C.OTHER_ASPECTS[0] <= a <= C.OTHER_ASPECTS[1] for a in aspects)
    if condition == "photo":  # a photo of the board on a wall, at a caller's size and a photo's shape
        assert all(b["view"] == "photo" and "aspect" not in b and 1.0 <= b["photo_aspect"] <= 1.8 for b in looks)
    with pytest.raises(ValueError, match="held-out"):
        C.CorpusGenerator("train", condition=condition)


def test_other_shapes_draw_boards_of_other_shapes_with_labels_on_their_characters():
    """``other_shapes`` (training only) shows some raw board images at another width : height; the image is drawn at
    that shape (the text fitted to it), in whole merged tokens, and the dense labels follow its characters."""
    assert all("aspect" not in s.board for s in C.CorpusGenerator("train", seed=3).samples(200, kinds=("ocr",)))
    g = C.CorpusGenerator("train", seed=3, other_shapes=1.0)
    shaped = [s for s in g.samples(200, kinds=("ocr",)) if "aspect" in s.board]
    assert shaped and all(s.board["view"] == "raw" for s in shaped)
    r = C.CorpusRenderer()
    for s in shaped[:6]:
        (img,), (lab,) = r(s, labels=True)
        h, w = img.shape[:2]
        assert w == s.board["width"] and h % C.TOKEN_PX == 0 and lab.shape == (h // C.TOKEN_PX, w // C.TOKEN_PX)
        assert abs(w / h - s.board["aspect"]) < 0.6  # the height is rounded to whole tokens
        digits = {C.TOKEN_CLASSES[i] for i in np.unique(lab)} & set("0123456789")
        assert digits and digits <= set(s.board["text"])  # labels name characters that are written
    with pytest.raises(ValueError, match="another shape"):  # only a board image itself has a shape of its own
        r(dataclasses.replace(shaped[0], board={**shaped[0].board, "view": "camera"}))
    r.close()
    with pytest.raises(ValueError, match="other_shapes"):
        C.CorpusGenerator("heldout", other_shapes=0.5)
    with pytest.raises(ValueError, match="other_shapes"):
        C.CorpusGenerator("train", other_shapes=1.5)


def test_photos_of_boards_keep_labels_on_their_characters():
    """The ``photo`` row shows the board inside a wider picture in perspective; the labels (photo pixel -> texture
    pixel through the homography) still name the written characters, and only where the board is."""
    from workbench.vlm.boards import apply_homography, homography

    src, dst = np.array([[3, 4], [90, 10], [80, 60], [5, 50]]), np.array([[0, 0], [512, 0], [512, 256], [0, 256]])
    assert np.allclose(apply_homography(homography(src, dst), src), dst)
    g, r = C.CorpusGenerator("heldout", seed=7, condition="photo"), C.CorpusRenderer()
    for s in [g.sample("ocr") for _ in range(4)]:
        (img,), (lab,), (own,) = r(s, labels=True, owners=True)
        h, w = img.shape[:2]
        assert w == s.board["width"] and abs(w / h - s.board["photo_aspect"]) < 0.3
        written = {C.TOKEN_CLASSES[i] for i in np.unique(lab)} - {C.TOKEN_CLASSES[0]}
        assert written and written <= set(s.board["text"].replace(" ", ""))
        assert 0 < (own >= 0).mean() < 0.5  # the board is part of the picture, not all of it
    r.close()
    # training shows them with ``photos`` only (default 0 leaves the random streams, and so earlier runs, unchanged)
    assert all(s.board["view"] != "photo" for s in C.CorpusGenerator("train", seed=3).samples(200, kinds=("ocr",)))
    views = [s.board["view"] for s in C.CorpusGenerator("train", seed=3, photos=1.0).samples(200, kinds=("ocr",))]
    assert 0 < views.count("photo") < len(views) and "raw" not in views
    with pytest.raises(ValueError, match="photos"):
        C.CorpusGenerator("heldout", photos=0.5)


def test_grounding_boxes_hold_their_object():
    """The answer's box parses back, lies inside the image, and the object's token labels fall inside it."""
    r = C.CorpusRenderer()
    g = C.CorpusGenerator("heldout", seed=6)
    for kind in ("ground_card", "ground_toy"):
        for _ in range(4):
            s = g.sample(kind)
            (box,) = G.parse_boxes(s.answer)
            assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1000
            _, (lab,) = r(s, labels=True)
            name = str(s.facts.get("card", s.facts.get("object")))
            rows, cols = np.nonzero(lab == C.TOKEN_CLASSES.index(name))
            assert len(rows), name
            u, v = (cols + 0.5) * 1000 / lab.shape[1], (rows + 0.5) * 1000 / lab.shape[0]
            assert ((u >= box[0] - 40) & (u <= box[2] + 40) & (v >= box[1] - 40) & (v <= box[3] + 40)).all()
    r.close()


def test_affordance_box_is_a_valid_placement():
    g = C.CorpusGenerator("train", seed=7)
    for _ in range(20):
        s = g.sample("affordance")
        (x1, y1, x2, y2), = G.parse_boxes(s.answer)
        f = s.facts
        assert G.affordance_ok(G.table_point((x1 + x2) / 2, (y1 + y2) / 2), f["target_xy"], f["direction"])
        other = {"left": "right", "right": "left", "front": "behind", "behind": "front"}[f["direction"]]
        assert not G.affordance_ok(G.table_point((x1 + x2) / 2, (y1 + y2) / 2), f["target_xy"], other)
        assert s.answer.startswith("<|object_ref_start|>") and f"the {f['target']}" in s.answer


@pytest.mark.parametrize("kind", C.GENERAL_KINDS)
def test_general_subset_has_no_digits_or_arithmetic(kind):
    g = C.CorpusGenerator("train", seed=1)
    assert all(C.check_general(g.sample(kind)) for _ in range(100))


def test_answers_match_facts():
    g = C.CorpusGenerator("train", seed=2)
    for s in g.samples(200):
        if s.kind == "solve":
            assert s.answer.endswith(f"= {s.facts['answer']}")
        if s.kind == "spatial":
            a, b = s.table["toys"][s.facts["a"]], s.table["toys"][s.facts["b"]]
            assert C.spatial_relation(a[:2], b[:2]) == s.facts["relation"]
        if s.kind == "cards":
            for d, slot in s.facts["cards"].items():
                assert f"card {d} at the {slot}" in s.answer
        if s.kind == "arithmetic":
            assert int(s.answer) == s.facts["answer"]


def test_free_boards_are_copied_never_held_out_and_never_solved():
    """``free_boards``: a share of training ``ocr`` boards show any numbers below 100 (so the language side learns to
    copy, not to recall the world's 251 training equations); none is a held-out equation, no ``solve`` follows one,
    and ``free_boards=0`` leaves the seeded stream as it was."""
    g = C.CorpusGenerator("train", seed=3, free_boards=0.5)
    convs = [g.conversation("ocr", 4, {"ocr": 1, "solve": 1}) for _ in range(300)]
    free = [c for c in convs if c[0].facts["answer"] is None]
    assert 100 < len(free) < 200
    shown = {c[0].board["text"] for c in free}
    assert shown.isdisjoint(e.text for e in C.HELDOUT_EQUATIONS) and len(shown - {e.text for e in C.ALL_EQUATIONS}) > 90
    assert all(s.kind == "ocr" for c in free for s in c)
    assert all(c[0].answer.replace(" ", "") == c[0].board["text"] for c in free)
    again = g.conversation("ocr", 4, {"ocr": 1, "solve": 1}, about=free[0][0])  # a free board as a pooled scene
    assert again[0].board is free[0][0].board and all(s.kind == "ocr" for s in again)
    assert any(s.kind == "solve" for c in convs if c not in free for s in c)  # world boards are still solved
    plain, zero = C.CorpusGenerator("train", seed=3), C.CorpusGenerator("train", seed=3, free_boards=0.0)
    assert [plain.sample("ocr").board for _ in range(20)] == [zero.sample("ocr").board for _ in range(20)]
    with pytest.raises(ValueError, match="free_boards"):
        C.CorpusGenerator("heldout", free_boards=0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="train"):
        C.CorpusGenerator("validation")
    with pytest.raises(ValueError, match="unknown kind"):
        C.CorpusGenerator().sample("poetry")


def test_renderer_images():
    r = C.CorpusRenderer()
    g = C.CorpusGenerator("heldout", seed=0)
    s = g.sample("answer_card")
    board, table = r(s)
    assert board.shape == (96, 192, 3) and table.shape == (176, 256, 3)
    assert board.std() > 10 and table.std() > 10
    assert r(g.sample("arithmetic")) == []
    r.close()


def test_token_labels_match_the_scene():
    r = C.CorpusRenderer()
    g = C.CorpusGenerator("train", seed=4)
    cls = C.TOKEN_CLASSES
    for _ in range(8):
        s = g.sample("answer_card")
        (board, table), (lb, lt) = r(s, labels=True)
        width = s.board["width"] if s.board["view"] == "raw" else 192  # a board image itself, or the camera's
        assert board.shape[:2] == (width // 2, width) and lb.shape == (width // 32, width // 16)
        assert lt.shape == (176 // 16, 256 // 16)
        written = {cls[c] for c in np.unique(lb) if c}
        assert written <= set(s.board["text"]) and len(written) >= len(set(s.board["text"])) - 1
        if "style" in s.board:  # the world's own boards: every character is under some token
            assert written == set(s.board["text"])
        assert {cls[c] for c in np.unique(lt) if c} == {str(d) for d in s.table["cards"]}
    s = g.sample("objects")
    (_,), (lt,) = r(s, labels=True)
    assert {cls[c] for c in np.unique(lt) if c} == set(s.facts["objects"])
    r.close()


def test_upsampled_boards_label_every_character_and_name_its_owner(monkeypatch):
    import torch
    import torch.nn.functional as F

    from workbench.vlm import pretrain
    from workbench.vlm.pretrain import read_boards

    g, cls = C.CorpusGenerator("heldout", seed=2), C.TOKEN_CLASSES
    one, two = C.CorpusRenderer(), C.CorpusRenderer(board_scale=2)
    boards = []
    for _ in range(3):
        s = g.sample("ocr")
        chars = s.board["text"].replace(" ", "")
        (b1,), (l1,), (o1,) = one(s, labels=True, owners=True)
        (b2,), (l2,), (o2,) = two(s, labels=True, owners=True)
        assert b2.shape == (192, 384, 3) and l2.shape == o2.shape == (12, 24) and l1.shape == (6, 12)
        for labels, owners in ((l1, o1), (l2, o2)):  # each token's class is that of the character it lies in
            assert all(cls[c] == (chars[i] if i >= 0 else "background") for c, i in zip(labels.ravel(), owners.ravel()))
        assert set(np.unique(o2[o2 >= 0])) >= set(np.unique(o1[o1 >= 0]))  # a finer grid misses no character
        assert len(set(np.unique(o2[o2 >= 0]))) == len(chars)
        boards.append((b2, l2, o2, s.board["text"]))
    one.close()
    two.close()
    with pytest.raises(ValueError, match="board_scale must be an int >= 1"):
        C.CorpusRenderer(board_scale=0)
    # the probe's reading: a probe that outputs each token's label reads every board; one that says "background"
    # everywhere reads none
    truth = torch.from_numpy(np.concatenate([b[1].ravel() for b in boards]))
    monkeypatch.setattr(pretrain, "vision_tokens", lambda visual, ip, images: (truth, [288] * len(images)))
    right = read_boards(None, lambda feats, emb: F.one_hot(feats, len(cls)).float(), None, None, boards)
    wrong = read_boards(None, lambda feats, emb: F.one_hot(feats * 0, len(cls)).float(), None, None, boards)
    assert right["char_accuracy"] == right["board_accuracy"] == right["token_accuracy"] == 1.0
    assert wrong["char_accuracy"] == wrong["board_accuracy"] == wrong["token_accuracy"] == 0.0


@pytest.mark.parametrize("kind, family", [("ocr", ("ocr", "solve")), ("ground_card", C.CARD_KINDS),
                                          ("spatial", C.TOY_KINDS), ("count", C.TOY_KINDS)])
def test_conversations_ask_several_questions_about_one_scene(kind, family):
    weights = {k: 1 for k in C.KINDS}
    g = C.CorpusGenerator("train", seed=11)
    lengths = []
    for _ in range(30):
        conv = g.conversation(kind, 4, weights)
        lengths.append(len(conv))
        assert conv[0].kind == kind and {s.kind for s in conv} <= set(family)
        # one scene: every follow-up asks about the first sample's board or table (same object, one render)
        assert all(s.board is conv[0].board and s.table is conv[0].table for s in conv)
        assert len({s.answer for s in conv}) == len(conv)  # no answer repeated (it would be copied)
    assert max(lengths) > 1 and max(lengths) <= 4
    if kind == "ocr":  # a reused board keeps its equation: the solve answer completes the OCR answer
        conv = next(c for c in (g.conversation("ocr", 4, weights) for _ in range(20)) if len(c) > 1)
        assert conv[1].answer.startswith(conv[0].answer[:-1])


def test_two_image_questions_and_single_turns_stay_alone():
    g = C.CorpusGenerator("train", seed=2)
    assert all(len(g.conversation("answer_card", 4, {k: 1 for k in C.KINDS})) == 1 for _ in range(5))
    assert all(len(g.conversation("objects", 1, {k: 1 for k in C.KINDS})) == 1 for _ in range(5))
    # follow-ups only of kinds with weight: none left -> one question
    assert len(C.CorpusGenerator("train", seed=2).conversation("cards", 4, {"cards": 1})) == 1


@pytest.mark.parametrize("first, then", [("ocr", "solve"), ("cards", "ground_card"), ("objects", "ground_toy")])
def test_a_conversation_can_be_about_an_earlier_samples_scene(first, then):
    g = C.CorpusGenerator("train", seed=4)
    scene = g.sample(first)
    g.samples(5)  # other scenes in between
    conv = g.conversation(then, 3, {k: 1 for k in C.KINDS}, about=scene)
    assert all(s.board is scene.board and s.table is scene.table for s in conv)
    assert conv[0].kind == then
    with pytest.raises(ValueError, match="cannot be asked about"):
        g.conversation("count", 3, {k: 1 for k in C.KINDS}, about=g.sample("ocr"))
