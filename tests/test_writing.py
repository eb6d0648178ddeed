"""Whiteboard and card rendering, and validation of callers' images."""

import numpy as np
import pytest
from PIL import Image

from workbench.world.catalog import WRITING_STYLES
from workbench.world.writing import BOARD_TEXTURE_SIZE, as_rgb_image, render_card, render_text


@pytest.mark.parametrize("style", list(WRITING_STYLES))
def test_every_style_writes_every_symbol(style):
    img = render_text("0123456789+-×÷=?", style, text_height=0.12, seed=1)
    assert img.size == BOARD_TEXTURE_SIZE and img.mode == "RGB"
    ink = (np.asarray(img.convert("L")) < 120).mean()
    assert 0.005 < ink < 0.3  # something was written, not a blot


def test_handwriting_differs_by_seed_fonts_do_not_jitter_strokes():
    a, b = (np.asarray(render_text("3+4=?", "hand_print", seed=s)) for s in (1, 2))
    assert np.abs(a.astype(int) - b).mean() > 1
    c, d = (np.asarray(render_text("3+4=?", "sans", seed=5)) for _ in range(2))
    np.testing.assert_array_equal(c, d)


def test_cards():
    imgs = [np.asarray(render_card(d)) for d in range(10)]
    assert all(i.shape == (128, 128, 3) for i in imgs)
    assert np.abs(imgs[6].astype(int) - np.rot90(imgs[9], 2)).mean() > 1  # 6 and 9 differ
    for bad in (-1, 10, "3", 2.5):
        with pytest.raises(ValueError, match="0-9"):
            render_card(bad)


def test_unknown_style_and_ink():
    with pytest.raises(ValueError, match="unknown writing style"):
        render_text("1+1=?", "comic")
    with pytest.raises(ValueError, match="unknown ink"):
        render_text("1+1=?", "sans", ink="purple")


def test_as_rgb_image_converts_sensible_input():
    assert as_rgb_image(Image.new("L", (32, 16))).mode == "RGB"
    assert as_rgb_image(Image.new("RGBA", (32, 16))).mode == "RGB"
    assert as_rgb_image(np.zeros((16, 32), np.uint8)).size == (32, 16)
    assert as_rgb_image(np.ones((16, 32, 1), np.float32) * 0.5).getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("bad,match", [
    (None, "None"), (np.zeros((0, 0, 3), np.uint8), "shape|0x0|pixels"), (np.zeros((1, 1, 3), np.uint8), "1x1"),
    (np.zeros((5000, 10, 3), np.uint8), "5000"), (np.zeros((16, 16, 3), np.int64), "dtype"),
    (np.zeros((16, 16, 2), np.uint8), "shape"), ([[1, 2]], "list"),
])
def test_as_rgb_image_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        as_rgb_image(bad)


def test_fast_board_view_matches_the_renderer():
    from workbench.world.board_view import BoardView
    from workbench.world.scene import TabletopScene

    scene = TabletopScene()
    view = BoardView(scene)
    for text, style in (("12-5=?", "hand_script"), ("3×3=?", "serif")):
        board = render_text(text, style, seed=2)
        scene.set_whiteboard(board)
        real = scene.render(["board"])["board"].astype(float)
        fast = view(board).astype(float)
        assert fast.shape == real.shape == (96, 192, 3)
        assert np.abs(fast - real).mean() < 12  # edges differ a little; layout and lighting match
        blank = view(Image.new("RGB", (64, 32), "white")).astype(float)
        assert np.abs(blank - real).mean() > np.abs(fast - real).mean() + 2  # the writing is there
    scene.close()


def test_transparent_images_become_white_not_black():
    drawing = np.zeros((32, 64, 4), np.uint8)  # a transparent canvas ...
    drawing[10:20, 10:50] = (0, 0, 0, 255)  # ... with one opaque black stroke
    rgb = np.asarray(as_rgb_image(drawing))
    assert (rgb[0, 0] == 255).all() and (rgb[15, 20] == 0).all()
    la = Image.fromarray(drawing[..., 3]).convert("LA")
    assert np.asarray(as_rgb_image(la)).mean() > 0  # grey + alpha: composited too


def test_augmented_boards_keep_the_text_on_the_board_and_world_boards_unchanged():
    from workbench.vlm.boards import BoardLook, family_faces

    face = family_faces("lato")[0]
    look = BoardLook("lato", face, "font", text_height=0.6, offset=(0.3, 0.3), spacing=0.5, rotation=0.0)
    img, cells = render_text("12-7=?", BoardLook.style(look), text_height=look.text_height, offset=look.offset,
                             spacing=look.spacing, supersample=1, return_boxes=True)
    w, h = img.size
    assert all(0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h for _, x0, y0, x1, y1 in cells)  # shrunk and moved in
    # the robot world's own boards are drawn exactly as before the VLM's augmentations existed (pixel hashes
    # recorded from the earlier renderer): demonstrations and evaluation scenes keep their meaning
    import hashlib

    recorded = {("3+4=?", "sans"): "b8a7a55e29792e4a", ("12-7=?", "hand_script"): "22b80c5775ad9874"}
    for (text, style), digest in recorded.items():
        pixels = np.asarray(render_text(text, style, seed=1)).tobytes()
        assert hashlib.sha256(pixels).hexdigest()[:16] == digest, (text, style)
