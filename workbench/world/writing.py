"""Render what is written in the world: whiteboard equations (printed or hand-written) and number cards.

Printed styles use TrueType fonts shipped inside matplotlib (so no system fonts are needed);
hand-written styles draw Hershey stroke fonts (the ``hershey-fonts`` package) with per-point
jitter, slant and per-character wobble, seeded, so each rendering is a different "hand".

All functions return RGB :class:`PIL.Image.Image` objects.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .catalog import WRITING_STYLES, WritingStyle

#: Whiteboard texture size (width, height) in pixels; the board is 2:1.
BOARD_TEXTURE_SIZE = (512, 256)
#: Character cap height on the board, as a fraction of the board height. With the board camera
#: (see ``scene.CAMERAS``) this makes digits about 24-26 px tall: three 8-px patches.
BOARD_TEXT_HEIGHT = 0.30
CARD_TEXTURE_SIZE = 128
BOARD_RGB = (246, 246, 242)
INK_RGB = {"black": (20, 20, 25), "blue": (20, 40, 150), "red": (160, 20, 20), "green": (20, 110, 40)}
_SUPERSAMPLE = 3


@functools.cache
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    """A font file (absolute path, or a file name among matplotlib's fonts) at ``px`` pixels."""
    return ImageFont.truetype(os.path.join(_mpl_fonts(), path), px)


@functools.cache
def _hershey(name: str):
    from HersheyFonts import HersheyFonts

    font = HersheyFonts()
    font.load_default_font(name)
    font.normalize_rendering(100)
    return font


def _glyph_strokes(style: WritingStyle, ch: str) -> list[np.ndarray]:
    """Strokes of one character, each an (N, 2) array with y=0 at the baseline and y=1 at cap height
    (y up), x starting at 0."""
    if ch == "×":
        return [np.array([[0.0, 0.15], [0.55, 0.7]]), np.array([[0.0, 0.7], [0.55, 0.15]])]
    if ch == "÷":
        dot = lambda cx, cy: np.array([[cx + 0.05 * np.cos(t), cy + 0.05 * np.sin(t)]
                                       for t in np.linspace(0, 2 * np.pi, 7)])  # noqa: E731
        return [np.array([[0.0, 0.42], [0.6, 0.42]]), dot(0.3, 0.72), dot(0.3, 0.12)]
    font = _hershey(style.source)
    opts = font.render_options
    base = opts["yofs"] + opts["scaley"] * opts["base_line"]
    cap = opts["yofs"] + opts["scaley"] * opts["cap_line"]
    strokes = [np.asarray(s, dtype=float) for s in font.strokes_for_text(ch) if len(s) > 1]
    if not strokes:
        raise ValueError(f"writing style {style.name!r} cannot draw {ch!r}")
    x0 = min(s[:, 0].min() for s in strokes)
    out = []
    for s in strokes:
        s = s.copy()
        s[:, 0] = (s[:, 0] - x0) / (cap - base)
        s[:, 1] = (s[:, 1] - base) / (cap - base)
        out.append(s)
    return out


def _draw_hand(draw: ImageDraw.ImageDraw, text: str, style: WritingStyle, origin, height, ink, rng,
               spacing: float = 0.0) -> list:
    """Draw ``text`` with a jittered stroke font; ``origin`` is the (x, y) of the baseline start.
    Returns each character's cell ``(char, x0, y0, x1, y1)``."""
    x, y0 = origin
    width = max(1, int(round(style.stroke * height)))
    cells = []
    for ch in text:
        x_start = x
        scale = height * rng.uniform(0.92, 1.08)
        dy = rng.normal(0, 0.03) * height
        for stroke in _glyph_strokes(style, ch):
            pts = stroke.copy()
            # smooth jitter: noise at each point, averaged with its neighbours
            noise = rng.normal(0, style.jitter, size=pts.shape)
            if len(pts) > 2:
                noise[1:-1] = (noise[:-2] + noise[1:-1] + noise[2:]) / 3
            pts = pts + noise
            px = x + (pts[:, 0] + style.slant * pts[:, 1]) * scale
            py = y0 + dy - pts[:, 1] * scale
            draw.line(list(zip(px.tolist(), py.tolist())), fill=ink, width=width, joint="curve")
        glyph_w = max(s[:, 0].max() for s in _glyph_strokes(style, ch))
        x += (glyph_w + 0.28 + rng.uniform(-0.04, 0.06)) * scale + spacing * height
        cells.append((ch, x_start, y0 + dy - scale, x, y0 + dy))
    return cells


def _text_width_hand(text: str, style: WritingStyle, height: float) -> float:
    return sum((max(s[:, 0].max() for s in _glyph_strokes(style, ch)) + 0.3) * height for ch in text)


def _has_glyphs(path: str, chars: str) -> bool:
    return all(ord(c) in _cmap(path) for c in chars)


@functools.cache
def _cmap(path: str) -> frozenset:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(path, lazy=True).getBestCmap())


def render_text(
    text: str,
    style: str | WritingStyle,
    size: tuple[int, int] = BOARD_TEXTURE_SIZE,
    text_height: float = BOARD_TEXT_HEIGHT,
    seed: int = 0,
    ink="black",
    background=BOARD_RGB,
    frame=True,
    return_boxes: bool = False,
    *,
    frame_width: float = 0.025,
    offset: tuple[float, float] | None = None,
    spacing: float = 0.0,
    boldness: float = 0.0,
    rotation: float = 0.0,
    supersample: int = _SUPERSAMPLE,
):
    """Render ``text`` (e.g. ``"3+4=?"``) centred on a board-coloured image.

    Args:
        text: what to write; ``-`` is drawn as a minus sign, ``×`` and ``÷`` are supported (a font that
            lacks one borrows it from DejaVu Sans).
        style: a name from :data:`~workbench.world.catalog.WRITING_STYLES` or a style (a font file path
            or a Hershey font name as ``source``).
        size: (width, height) in pixels.
        text_height: cap height as a fraction of the image height.
        seed: random seed for the hand-writing jitter and the small placement offsets.
        ink: a name from :data:`INK_RGB` or an RGB tuple. ``frame``: ``True`` (grey), ``False`` or an RGB
            tuple, ``frame_width`` a fraction of the height.
        offset: (dx, dy) of the text's centre as fractions of (width, height); default a small random one.
            With an offset the text is also kept on the board (made smaller if too wide, moved inside).
        spacing: extra space between characters, as a fraction of the cap height.
        boldness: extra stroke width of printed fonts, as a fraction of the cap height.
        rotation: degrees, counter-clockwise; the cells returned are *before* the rotation.
        supersample: drawing scale before the final downsampling (1 = draw at ``size``: fastest).
        return_boxes: also return each character's cell ``(char, x0, y0, x1, y1)`` in output pixels
            (from the character's start to the next one's, baseline to cap height), for dense labels.

    Returns:
        the image, or ``(image, cells)`` with ``return_boxes=True``.
    """
    if isinstance(style, str):
        if style not in WRITING_STYLES:
            raise ValueError(f"unknown writing style {style!r}; expected one of {list(WRITING_STYLES)}")
        style = WRITING_STYLES[style]
    if isinstance(ink, str):
        if ink not in INK_RGB:
            raise ValueError(f"unknown ink {ink!r}; expected one of {list(INK_RGB)} or an RGB tuple")
        ink = INK_RGB[ink]
    ink = tuple(int(v) for v in ink)
    fit_args = dict(text=text, style=style, size=size, seed=seed, ink=ink, background=background, frame=frame,
                    return_boxes=return_boxes, frame_width=frame_width, offset=offset, spacing=spacing,
                    boldness=boldness, rotation=rotation, supersample=supersample)
    rng = np.random.default_rng(seed)
    fit = offset is not None  # a caller-placed text is kept on the board (the world's own boards are as they were)
    ss = int(supersample)
    W, H = size[0] * ss, size[1] * ss
    img = Image.new("RGB", (W, H), tuple(background))
    draw = ImageDraw.Draw(img)
    if frame is not False and frame is not None:
        b = max(1, int(frame_width * H))
        draw.rectangle([0, 0, W - 1, H - 1], outline=(120, 120, 125) if frame is True else tuple(frame), width=b)
    cap = text_height * H
    jitter_xy = (rng.uniform(-0.04, 0.04, size=2) if offset is None else np.asarray(offset, float)) * np.array([W, H])
    if style.kind == "font":
        shown = text.replace("-", "\u2212")
        path = os.path.join(_mpl_fonts(), style.source)
        # size the font so that a digit's cap height is ``cap`` pixels
        probe = _font(path, 100)
        _, top, _, bottom = probe.getbbox("8")
        px = max(4, int(round(100 * cap / (bottom - top))))
        font = _font(path, px)
        fallback = _font(os.path.join(_mpl_fonts(), "DejaVuSans.ttf"), px)
        stroke = int(round(boldness * cap))
        if spacing == 0 and _has_glyphs(path, shown):
            faces, advances = [font] * len(shown), None
        else:
            faces = [font if _has_glyphs(path, ch) else fallback for ch in shown]
            if shown != text:  # a missing minus sign falls back to the font's own hyphen
                faces = [f if ch != "\u2212" or f is font else font for f, ch in zip(faces, shown)]
                shown = "".join("-" if ch == "\u2212" and not _has_glyphs(path, ch) else ch for ch in shown)
            advances = [f.getlength(ch) + spacing * cap for f, ch in zip(faces, shown)]
        if advances is None:
            left, _, right, _ = font.getbbox(shown)
            total, x = right - left, None
        else:
            total, left = sum(advances) - spacing * cap, 0
        if fit and total > _MAX_TEXT_WIDTH * W:  # too wide for the board: write it smaller
            return render_text(**{**fit_args, "text_height": text_height * _MAX_TEXT_WIDTH * 0.97 * W / total})
        x = _clamp((W - total) / 2 + jitter_xy[0], W, total, fit) - left
        y_top = _clamp((H - cap) / 2 + jitter_xy[1], H, cap, fit)
        _, t8, _, _ = font.getbbox("8")
        if advances is None:
            draw.text((x, y_top - t8), shown, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)
            starts = [x + font.getlength(shown[:i]) for i in range(len(shown) + 1)]
        else:
            starts = [x + sum(advances[:i]) for i in range(len(shown) + 1)]
            for ch, f, x0 in zip(shown, faces, starts):
                draw.text((x0, y_top - t8), ch, font=f, fill=ink, stroke_width=stroke, stroke_fill=ink)
        # a cell runs from its glyph's start to its end (extra spacing after a glyph is nobody's)
        ends = starts[1:] if advances is None else [x0 + f.getlength(ch) for x0, f, ch in zip(starts, faces, shown)]
        cells = [(ch, starts[i], y_top, ends[i], y_top + cap) for i, ch in enumerate(text)]
    else:
        width = _text_width_hand(text, style, cap) + spacing * cap * (len(text) - 1)
        if fit and width > _MAX_TEXT_WIDTH * W:
            return render_text(**{**fit_args, "text_height": text_height * _MAX_TEXT_WIDTH * 0.97 * W / width})
        x = _clamp((W - width) / 2 + jitter_xy[0], W, width, fit)
        y_base = _clamp((H - cap) / 2 + jitter_xy[1], H, cap, fit) + cap
        cells = _draw_hand(draw, text, style, (x, y_base), cap, ink, rng, spacing)
    if rotation:
        img = img.rotate(rotation, resample=Image.Resampling.BICUBIC, fillcolor=tuple(background))
    out = img.resize(size, Image.Resampling.LANCZOS) if ss != 1 else img
    if return_boxes:
        return out, [(ch, *(float(v) / ss for v in box)) for ch, *box in cells]
    return out


_MAX_TEXT_WIDTH = 0.96  # of the board's width


def _clamp(start: float, extent: float, size: float, fit: bool, margin: float = 0.04) -> float:
    """``start`` moved so that ``[start, start + size]`` stays ``margin`` (a fraction) inside ``[0, extent]``."""
    if not fit:
        return start
    return float(np.clip(start, margin * extent, max(margin * extent, (1 - margin) * extent - size)))


@functools.cache
def _mpl_fonts() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def render_card(digit: int) -> Image.Image:
    """A number card texture: a bold digit on white, underlined for 6 and 9 (so they differ)."""
    if not (isinstance(digit, (int, np.integer)) and 0 <= digit <= 9):
        raise ValueError(f"cards carry the digits 0-9, got {digit!r}")
    S = CARD_TEXTURE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (S, S), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, S - 1, S - 1], outline=(40, 40, 40), width=int(0.04 * S))
    font = _font("DejaVuSans-Bold.ttf", int(0.8 * S))
    left, top, right, bottom = font.getbbox(str(digit))
    draw.text(((S - (right - left)) / 2 - left, (S - (bottom - top)) / 2 - top - 0.03 * S), str(digit), font=font,
              fill=(15, 15, 15))
    if digit in (6, 9):
        draw.rectangle([0.35 * S, 0.86 * S, 0.65 * S, 0.9 * S], fill=(15, 15, 15))
    return img.resize((CARD_TEXTURE_SIZE, CARD_TEXTURE_SIZE), Image.Resampling.LANCZOS)


def as_rgb_image(image, what: str = "image", min_size: int = 8, max_size: int = 4096) -> Image.Image:
    """Validate and convert a caller's image (PIL image or HxW / HxWx{1,3,4} array) to RGB PIL.
    Transparent parts of an image with alpha are composited on white.

    Raises ``ValueError`` saying what was expected for ``None``, empty, tiny or huge images and
    arrays of the wrong shape or dtype.
    """
    if image is None:
        raise ValueError(f"{what} is None; expected a PIL image or an HxWx3 uint8 array")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise ValueError(f"{what} array has shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and 0 <= arr.min() and arr.max() <= 1:
                arr = (arr * 255).round().astype(np.uint8)
            else:
                raise ValueError(f"{what} array has dtype {arr.dtype}; expected uint8 (0-255) "
                                 "or float in [0, 1]")
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} is a {type(image).__name__}; expected a PIL image or a numpy array")
    w, h = image.size
    if min(w, h) < min_size or max(w, h) > max_size:
        raise ValueError(f"{what} is {w}x{h} pixels; expected each side between {min_size} and "
                         f"{max_size}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels (a drawing on a transparent canvas) become white, not black
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
