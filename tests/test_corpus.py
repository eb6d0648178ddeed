"""The VLM pretraining corpus: determinism, held-out disjointness, the general subset's rule."""

import numpy as np
import pytest

from workbench.vlm import corpus as C
from workbench.world.catalog import SPLITS as ROBOT_SPLITS


def test_deterministic_under_seed():
    a = C.CorpusGenerator("train", seed=3).samples(40)
    b = C.CorpusGenerator("train", seed=3).samples(40)
    assert a == b
    assert a != C.CorpusGenerator("train", seed=4).samples(40)


def test_heldout_never_overlaps_training():
    assert set(C.HELDOUT_EQUATIONS).isdisjoint(C.TRAIN_BOARD_EQUATIONS)
    assert set(C.HELDOUT_STYLES).isdisjoint(C.TRAIN_STYLES)
    # held-out styles are no robot split's styles either
    assert not {s for sp in ROBOT_SPLITS.values() for s in sp.writing_styles} & set(C.HELDOUT_STYLES)
    train = C.CorpusGenerator("train", seed=0).samples(600, kinds=("ocr", "solve", "answer_card"))
    held = C.CorpusGenerator("heldout", seed=0).samples(300, kinds=("ocr", "solve", "answer_card"))
    assert all(s.board["style"] in C.TRAIN_STYLES for s in train)
    assert {s.board["text"] for s in train}.isdisjoint({s.board["text"] for s in held})
    assert all(s.board["seed"] < 2**30 for s in train) and all(s.board["seed"] >= 2**30 for s in held)
    assert any(s.board["style"] in C.HELDOUT_STYLES for s in held)
    # arithmetic of held-out board equations is still taught as text
    assert set(C.HELDOUT_EQUATIONS) <= set(C.ARITHMETIC_FACTS)


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
    assert np.isfinite(board).all()


def test_token_labels_match_the_scene():
    r = C.CorpusRenderer()
    g = C.CorpusGenerator("train", seed=4)
    cls = C.TOKEN_CLASSES
    for _ in range(3):
        s = g.sample("answer_card")
        (board, table), (lb, lt) = r(s, labels=True)
        assert lb.shape == (96 // 16, 192 // 16) and lt.shape == (176 // 16, 256 // 16)
        written = {cls[c] for c in np.unique(lb) if c}
        assert written == set(s.board["text"])  # every character is under some token, nothing else
        assert {cls[c] for c in np.unique(lt) if c} == {str(d) for d in s.table["cards"]}
    s = g.sample("objects")
    (_,), (lt,) = r(s, labels=True)
    assert {cls[c] for c in np.unique(lt) if c} == set(s.facts["objects"])
    r.close()
