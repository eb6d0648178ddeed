"""Inside the model (workbench/introspect.py): pixel patches as the processor makes them, attention maps that are
distributions, routing maps that are the MoE's own choices, Integrated Gradients' completeness, and occlusion that
finds the digits."""

import os

import numpy as np
import pytest
import torch

from workbench import introspect as I
from workbench.vlm.api import load_vlm
from workbench.vlm.corpus import TOKEN_CLASSES, CorpusGenerator, CorpusRenderer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm(root):
    return load_vlm(os.path.join(root, "data_samples", "vlm"))


@pytest.fixture(scope="module")
def board_probe(vlm):
    """A held-out board the shipped VLM solves, with its token labels."""
    renderer = CorpusRenderer()
    gen = CorpusGenerator("heldout", seed=21)
    try:
        for _ in range(40):
            s = gen.sample("solve")
            (img,), (labels,) = renderer(s, labels=True)
            probe = I.Probe(*vlm, [img], s.question)
            if probe.answer.replace(" ", "").endswith(f"={s.facts['answer']}"):
                return probe, labels
    finally:
        renderer.close()
    pytest.fail("the shipped VLM solved none of 40 held-out boards")


def test_patchify_is_the_processors_layout(vlm):
    _, processor = vlm
    rng = np.random.default_rng(0)
    for shape in ((96, 192, 3), (176, 256, 3)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        expected = processor.image_processor([img], return_tensors="pt")["pixel_values"]
        ours = I.patchify(torch.from_numpy(img).permute(2, 0, 1).float())
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiples of 16"):
        I.patchify(torch.zeros(3, 20, 40))


def test_attention_maps_are_distributions_over_the_prompt(board_probe):
    probe, _ = board_probe
    att = I.attention(probe)
    L, H, A, T = att.weights.shape
    assert A == len(probe.answer_ids) == len(att.tokens) and T == probe.inputs["input_ids"].shape[1]
    np.testing.assert_allclose(att.weights.sum(-1), 1.0, atol=1e-4)  # every row of softmax attention
    rows, cols = probe.grids[0]
    assert att.images[0].shape == (L, H, A, rows, cols) == (L, H, A, 6, 12)
    assert (att.images[0] >= 0).all() and (att.images[0].sum((-2, -1)) <= 1 + 1e-5).all()
    assert att.rollout[0].shape == (A, rows, cols) and (att.rollout[0].sum((-2, -1)) <= 1 + 1e-5).all()


def test_integrated_gradients_is_complete(board_probe):
    probe, _ = board_probe
    # the first answer token is the first character read off the board (the answer digit after "=" follows from the
    # text before it, by arithmetic the model knows: the board hardly moves it)
    ig = I.attributions(probe, "integrated_gradients", target=0, n_steps=256)
    change = ig.output[0] - ig.output[1]
    # the board makes that character likelier than a blank board does (the shipped model: +2.57 on this board)
    assert abs(change) > 0.2
    assert abs(ig.delta) < 0.05 * abs(change) + 0.05, (ig.delta, change)  # sum(attr) = f(x) - f(baseline)
    assert ig.cells.shape == (6, 12) and np.abs(ig.normalised).max() == pytest.approx(1.0)
    gxi = I.attributions(probe, "gradient_x_input", target="answer digit")
    assert gxi.pixels.shape == (96, 192) and np.isfinite(gxi.cells).all() and np.abs(gxi.cells).sum() > 0


def test_occluding_the_writing_matters_more_than_blank_board(board_probe):
    probe, labels = board_probe
    occ = I.attributions(probe, "occlusion", target="answer digit")
    written = labels > 0  # cells under a character of the equation
    digits = np.isin(labels, [TOKEN_CLASSES.index(d) for d in "0123456789"])
    assert digits.any() and (~written).any()
    assert np.abs(occ.cells[digits]).mean() > 3 * np.abs(occ.cells[~written]).mean()


def test_routing_maps_are_the_moes_own_choices(vlm):
    import copy

    from workbench.vla.moe import MoEConfig, routing, upcycle

    model, processor = copy.deepcopy(vlm[0]), vlm[1]
    upcycle(model, MoEConfig(num_experts=4, top_k=2, router_init_std=0.5))
    board = np.full((96, 192, 3), 240, np.uint8)
    probe = I.Probe(model, processor, [board], "What is written on the whiteboard?", answer="3 + 4 = ?", data_type=0)
    maps = I.routing(probe)
    records = routing(model)
    L, T, k = maps.experts.shape
    assert (L, k) == (len(records), 2) and T == probe.inputs["input_ids"].shape[1]
    for layer, rec in enumerate(records):
        assert np.array_equal(maps.experts[layer], rec.experts[0].numpy())
        top1 = rec.experts[0, probe.image_positions[0], 0].numpy().reshape(probe.grids[0])
        assert np.array_equal(maps.image_top1[0][layer], top1)
    np.testing.assert_allclose(maps.load.sum(1), k)  # each token counts once per chosen expert
    assert (maps.entropy <= np.log(4) + 1e-6).all() and (maps.entropy > 0).all()
    assert np.array_equal(maps.coactivation, maps.coactivation.transpose(0, 2, 1))
    np.testing.assert_allclose(maps.coactivation.sum((1, 2)), T * k * (k - 1))  # every pair, counted both ways
    groups = I.token_groups(maps.tokens)
    assert groups["image"].sum() == 72 and groups["digit"].sum() >= 2 and groups["operator"].sum() >= 2
    with pytest.raises(ValueError, match="no MoE layers"):
        I.routing(I.Probe(*vlm, [board], "What is written on the whiteboard?", answer="3 + 4 = ?"))


def test_bad_requests_say_what_is_allowed(board_probe):
    probe, _ = board_probe
    with pytest.raises(ValueError, match="integrated_gradients"):
        I.attributions(probe, "saliency")
    with pytest.raises(ValueError, match="image_index"):
        I.attributions(probe, image_index=3)
    with pytest.raises(ValueError, match="out of range"):
        probe.target_index(99)
