"""Knowledge-suite scoring: right answers count, wrong or unparseable ones do not."""

import pytest

from workbench import evaluate as E
from workbench.vlm.corpus import CorpusGenerator


@pytest.fixture(scope="module")
def samples():
    return E.knowledge_samples(per_skill=15, seed=7)


def test_eval_set_is_fixed_and_heldout(samples):
    assert samples == E.knowledge_samples(per_skill=15, seed=7)
    assert {s.kind for s in samples} == set(E.KNOWLEDGE_ROWS)
    train_boards = {s.board["text"] for s in CorpusGenerator("train", 0).samples(500, kinds=["ocr", "solve"])}
    assert train_boards.isdisjoint({s.board["text"] for s in samples if s.board})


def test_true_answers_score_and_junk_does_not(samples):
    for s in samples:
        assert E.score(s, s.answer), (s.kind, s.answer)
        assert not E.score(s, ""), s.kind
        assert not E.score(s, "I don't know"), s.kind


def test_lenient_formats():
    g = CorpusGenerator("heldout", seed=3)
    s = next(x for x in iter(lambda: g.sample("solve"), None) if "×" in x.facts["equation"])
    a, b = s.facts["equation"].split("×")
    assert E.score(s, f"{a}x{b}={s.facts['answer']}") and E.score(s, f"{a} * {b} = {s.facts['answer']}")
    assert not E.score(s, f"{a} × {b} = {s.facts['answer'] + 1}")
    assert E.parse_equation("12 − 5 = ?") == ("12-5", "?") and E.parse_equation("nothing") is None
    assert E.parse_cards("card 3 at the back left, card 7 at the front middle") == {3: "back left", 7: "front middle"}


def test_wrong_facts_fail(samples):
    for s in samples:
        if s.kind == "cards":
            d = next(iter(s.facts["cards"]))
            assert not E.score(s, s.answer.replace(f"card {d} ", f"card {(int(d) + 1) % 10} ", 1))
        if s.kind == "spatial":
            other = {"left": "right", "right": "left", "in front": "behind", "behind": "in front"}[s.answer]
            assert not E.score(s, other)
        if s.kind == "objects":
            assert not E.score(s, s.answer + " and the soccer ball" if "soccer" not in s.answer else "the red cube")
