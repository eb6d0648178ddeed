"""Whiteboards for VLM pretraining: a large pool of type faces, whole families held out, and the
augmentations that stop a model from learning the renderer instead of the characters.

The first VLM read boards only when they carried the grey frame the project's renderer always drew (0/16
without it) and 1/96 boards in printed fonts it had never seen (``shared/DESIGN.md`` §4). The cure is
variety: every pretraining board is drawn fresh, with a face drawn from :data:`FAMILIES` and a random
:class:`BoardLook` (frame or none, ink, background tint and ghosting, size, position, spacing, rotation,
blur, noise), and some are *sketches* as a person draws with a mouse (thick round strokes, wobble).

Families (``split`` ``"train"`` or ``"heldout"``; a held-out family is never drawn in training)::

    train    DejaVu Sans / Serif / Mono, Computer Modern, Lato, Manrope, Red Hat Display, Source Sans Pro,
             Source Serif Pro, Hanken Grotesk, Fjalla One, Fredoka One, Amatic SC (hand-lettered),
             Hershey stroke fonts (futura, roman, script, cursive) drawn with jitter as hand-writing
    heldout  STIX, Roboto, Caladea, Intuitive (hand-lettered), Hershey Times (stroke)

Printed faces ship with matplotlib and the ``font-*`` packages of ``requirements.txt``; stroke faces with
``hershey-fonts``. The robot world's own writing styles (``catalog.WRITING_STYLES``) are all in train
families except ``stix``, which is held out here as in the world's catalogue.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

from ..world.catalog import WritingStyle
from ..world.writing import BOARD_TEXTURE_SIZE, render_text

SPLITS = ("train", "heldout")


def _package_faces(package: str, pattern: str = "*.ttf") -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"font package {package!r} is not installed; `pip install -r requirements.txt` "
                                  f"installs it (pip name {package.replace('_', '-')!r})")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "files", pattern)))
    return [f for f in files if "Variable" not in f]


def _mpl(*names: str) -> list[str]:
    import matplotlib

    return [os.path.join(matplotlib.get_data_path(), "fonts", "ttf", n) for n in names]


#: family -> (split, kind, loader of its faces). ``kind`` "font" = TrueType/OpenType files, "hand" = Hershey
#: stroke fonts drawn with hand-writing jitter.
_FAMILY_SPECS = {
    "dejavu_sans": ("train", "font", lambda: _mpl("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
                                                  "DejaVuSans-BoldOblique.ttf")),
    "dejavu_serif": ("train", "font", lambda: _mpl("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
                                                   "DejaVuSerif-BoldItalic.ttf")),
    "dejavu_mono": ("train", "font", lambda: _mpl("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
                                                  "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf")),
    "computer_modern": ("train", "font", lambda: _mpl("cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf")),
    "lato": ("train", "font", lambda: _package_faces("font_lato")),
    "manrope": ("train", "font", lambda: _package_faces("font_manrope")),
    "red_hat_display": ("train", "font", lambda: _package_faces("font_rhd")),
    "source_sans": ("train", "font", lambda: _package_faces("font_source_sans_pro")),
    "source_serif": ("train", "font", lambda: _package_faces("font_source_serif_pro")),
    "hanken_grotesk": ("train", "font", lambda: _package_faces("font_hanken_grotesk", "*.otf")),
    "fjalla_one": ("train", "font", lambda: _package_faces("font_fjallaone")),
    "fredoka_one": ("train", "font", lambda: _package_faces("font_fredoka_one")),
    "amatic_sc": ("train", "font", lambda: _package_faces("font_amatic_sc")),
    "hershey_futura": ("train", "hand", lambda: ["futural", "futuram"]),
    "hershey_roman": ("train", "hand", lambda: ["rowmans", "rowmand", "rowmant"]),
    "hershey_script": ("train", "hand", lambda: ["scripts", "scriptc", "cursive"]),
    # held out: never drawn in pretraining
    "stix": ("heldout", "font", lambda: _mpl("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
                                             "STIXGeneralBolIta.ttf")),
    "roboto": ("heldout", "font", lambda: _package_faces("font_roboto")),
    "caladea": ("heldout", "font", lambda: _package_faces("font_caladea")),
    "intuitive": ("heldout", "font", lambda: _package_faces("font_intuitive")),
    "hershey_times": ("heldout", "hand", lambda: ["timesr", "timesi", "timesib", "timesrb"]),
}
FAMILIES = {split: tuple(n for n, (s, _, _) in _FAMILY_SPECS.items() if s == split) for split in SPLITS}


@functools.cache
def family_faces(family: str) -> tuple[str, ...]:
    """The faces of ``family``: font file paths, or Hershey font names for stroke families."""
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown font family {family!r}; expected one of {list(_FAMILY_SPECS)}")
    faces = tuple(_FAMILY_SPECS[family][2]())
    if not faces:
        raise FileNotFoundError(f"font family {family!r} has no faces installed")
    return faces


#: Eval-time conditions that force one property of the look (the knowledge suite's robustness rows).
CONDITIONS = ("no_frame", "coloured_ink", "tilted", "sketch")

_INKS = np.array([(20, 20, 25), (25, 45, 160), (170, 25, 25), (20, 115, 45), (90, 30, 120), (100, 60, 20),
                  (60, 60, 70), (0, 90, 110)], float)
_COLOURED = _INKS[_INKS.max(1) - _INKS.min(1) > 60]  # the inks that are clearly not black or grey


@dataclass(frozen=True)
class BoardLook:
    """Everything about how a board is drawn, besides the text (JSON-able, so a sample replays exactly).

    ``face`` is a font path or Hershey name; ``kind`` "font" or "hand"; sizes are fractions of the board.
    """

    family: str
    face: str
    kind: str
    text_height: float = 0.3
    offset: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0
    spacing: float = 0.0
    ink: tuple[int, int, int] = (20, 20, 25)
    background: tuple[int, int, int] = (246, 246, 242)
    frame: tuple[int, int, int] | None = None
    frame_width: float = 0.025
    boldness: float = 0.0
    jitter: float = 0.04
    slant: float = 0.1
    stroke: float = 0.1
    ghosts: int = 0
    blur: float = 0.0
    noise: float = 0.0

    def style(self) -> WritingStyle:
        return WritingStyle(f"{self.family}:{os.path.basename(self.face)}", self.kind, self.face,
                            jitter=self.jitter, slant=self.slant, stroke=self.stroke)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BoardLook:
        d = dict(d)
        for k in ("offset", "ink", "background"):
            d[k] = tuple(d[k])
        d["frame"] = tuple(d["frame"]) if d["frame"] is not None else None
        return cls(**d)


def sample_look(rng: np.random.Generator, split: str = "train", condition: str | None = None,
                family: str | None = None) -> BoardLook:
    """A random :class:`BoardLook` from ``split``'s families. ``condition`` (one of :data:`CONDITIONS`)
    forces a property: no frame; coloured ink; a tilt of 6-12 degrees; a mouse sketch."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if condition is not None and condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {list(CONDITIONS)} or None")
    sketch = condition == "sketch" or (condition is None and split == "train" and rng.random() < 0.12)
    if family is None:
        fams = [f for f in FAMILIES[split] if not sketch or _FAMILY_SPECS[f][1] == "hand"]
        family = fams[rng.integers(len(fams))]
    faces = family_faces(family)
    face, kind = faces[rng.integers(len(faces))], _FAMILY_SPECS[family][1]
    tint = rng.uniform(-6, 4, 3) + rng.uniform(-14, 6)
    background = tuple(int(v) for v in np.clip(np.array([246, 246, 242]) + tint, 200, 255))
    if sketch:
        ink = tuple(int(v) for v in _INKS[rng.integers(3)])
        return BoardLook(family, face, "hand", text_height=float(rng.uniform(0.28, 0.55)),
                         offset=tuple(float(v) for v in rng.uniform(-0.08, 0.08, 2)),
                         rotation=float(rng.normal(0, 4)), spacing=float(rng.uniform(0.0, 0.4)), ink=ink,
                         background=(255, 255, 255) if rng.random() < 0.7 else background, frame=None,
                         jitter=float(rng.uniform(0.05, 0.1)), slant=float(rng.uniform(-0.15, 0.25)),
                         stroke=float(rng.uniform(0.12, 0.22)), blur=float(rng.uniform(0, 0.6)))
    if condition == "coloured_ink" or rng.random() < 0.5:
        pool = _COLOURED if condition == "coloured_ink" else _INKS
        ink = pool[rng.integers(len(pool))]
    else:
        ink = _INKS[0]
    ink = tuple(int(v) for v in np.clip(ink * rng.uniform(0.7, 1.5) + rng.normal(0, 12, 3), 0, 200))
    framed = condition != "no_frame" and rng.random() < 0.5
    frame = tuple(int(v) for v in (rng.uniform(60, 200, 3) if rng.random() < 0.4 else np.full(3, rng.uniform(60, 190))))
    rotation = float(rng.choice([-1, 1]) * rng.uniform(6, 12)) if condition == "tilted" else float(
        np.clip(rng.normal(0, 3), -8, 8))
    return BoardLook(family, face, kind, text_height=float(rng.uniform(0.2, 0.4)),
                     offset=tuple(float(v) for v in rng.uniform(-0.1, 0.1, 2)), rotation=rotation,
                     spacing=float(rng.uniform(-0.04, 0.25)), ink=ink, background=background,
                     frame=frame if framed else None, frame_width=float(rng.uniform(0.01, 0.05)),
                     boldness=float(rng.choice([0.0, rng.uniform(0, 0.06)])),
                     jitter=float(rng.uniform(0.02, 0.07)), slant=float(rng.uniform(-0.15, 0.3)),
                     stroke=float(rng.uniform(0.06, 0.14)), ghosts=int(rng.integers(0, 4)) if rng.random() < 0.4 else 0,
                     blur=float(rng.uniform(0, 1.0)) if rng.random() < 0.5 else 0.0,
                     noise=float(rng.uniform(0, 8)) if rng.random() < 0.5 else 0.0)


def render_board(text: str, look: BoardLook, seed: int = 0, size=BOARD_TEXTURE_SIZE):
    """A whiteboard texture of ``text`` drawn in ``look``: ``(image, cells)`` where ``cells`` are each
    character's box ``(char, x0, y0, x1, y1)`` in texture pixels *before* the look's rotation (rotate
    query points by ``-look.rotation`` about the centre to test them: :func:`unrotate`)."""
    rng = np.random.default_rng(seed)
    img, cells = render_text(text, look.style(), size=size, text_height=look.text_height, seed=seed, ink=look.ink,
                             background=look.background, frame=look.frame, frame_width=look.frame_width,
                             offset=look.offset, spacing=look.spacing, boldness=look.boldness, supersample=1,
                             rotation=look.rotation, return_boxes=True)
    if look.ghosts:  # faint traces of earlier, half-erased writing
        from PIL import ImageDraw

        d = ImageDraw.Draw(img)
        W, H = img.size
        for _ in range(look.ghosts):
            pts = [(float(rng.uniform(0, W)), float(rng.uniform(0, H))) for _ in range(3)]
            shade = tuple(int(v) for v in np.array(look.background) - rng.uniform(15, 40))
            d.line(pts, fill=shade, width=int(rng.integers(2, 8)), joint="curve")
    if look.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(look.blur * size[1] / 96))
    if look.noise > 0:
        arr = np.asarray(img, np.float32) + rng.normal(0, look.noise, (size[1], size[0], 1))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img, cells


def unrotate(points: np.ndarray, rotation: float, size=BOARD_TEXTURE_SIZE) -> np.ndarray:
    """Texture points (N, 2) after a rotation by ``rotation`` degrees (PIL's convention: counter-clockwise
    on screen) mapped back to where they were before it."""
    if not rotation:
        return np.asarray(points, float)
    c = np.array(size, float) / 2
    t = np.deg2rad(rotation)
    # PIL rotates the picture counter-clockwise on screen (y down): undo with the opposite rotation
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (np.asarray(points, float) - c) @ R.T + c


def photometric(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Camera-level jitter of an (H, W, 3) uint8 image: brightness, contrast, colour gains, noise."""
    x = image.astype(np.float32)
    gain = rng.uniform(1 - 0.15 * strength, 1 + 0.1 * strength) * rng.uniform(1 - 0.06 * strength,
                                                                             1 + 0.06 * strength, 3)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - 0.2 * strength, 1 + 0.15 * strength) + mean
    x = x * gain + rng.normal(0, rng.uniform(0, 4 * strength), x.shape)
    return x.clip(0, 255).astype(np.uint8)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 8 coefficients ``(a, b, c, d, e, f, g, h)`` of the projective map taking the four points ``src`` (4, 2)
    onto ``dst`` (4, 2): ``x' = (a x + b y + c) / (g x + h y + 1)``, ``y' = (d x + e y + f) / (g x + h y + 1)``
    (PIL's ``Image.PERSPECTIVE`` data when ``src`` are output pixels and ``dst`` input pixels)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float)):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.array(rows), np.array(rhs))


def apply_homography(coeffs: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) mapped by :func:`homography`'s coefficients."""
    a, b, c, d, e, f, g, h = coeffs
    x, y = np.asarray(points, float).T
    w = g * x + h * y + 1
    return np.stack([(a * x + b * y + c) / w, (d * x + e * y + f) / w], 1)


def photograph(texture: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A photo of size ``(W, H)`` of the whiteboard ``texture`` hanging on a wall, as a user snaps one: the board
    fills 45-85% of the width, seen in perspective (each corner moved by up to 7% of the board) and turned a little,
    in an aluminium or dark mount on a wall of some colour, sometimes above a floor or desk, under uneven light,
    with sensor noise. Returns ``(image (H, W, 3) uint8, coeffs)``: ``coeffs`` map photo pixels to texture pixels
    (:func:`apply_homography`), so labels can follow the characters."""
    from PIL import ImageDraw

    W, H = size
    tw, th = texture.size
    bw = rng.uniform(0.45, 0.85) * W
    bw = min(bw, 0.85 * H * tw / th)  # the board's height fits too
    bh = bw * th / tw
    centre = np.array([rng.uniform(bw / 2 + 0.04 * W, W - bw / 2 - 0.04 * W) if W - bw > 0.08 * W else W / 2,
                       rng.uniform(bh / 2 + 0.04 * H, H - bh / 2 - 0.04 * H) if H - bh > 0.08 * H else H / 2])
    quad = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]]) / 2
    quad += rng.uniform(-0.07, 0.07, (4, 2)) * [bw, bh]  # perspective
    t = np.deg2rad(rng.normal(0, 3))
    quad = quad @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) + centre
    wall = np.clip(rng.choice([rng.uniform(150, 235, 3), np.full(3, rng.uniform(120, 230))]) + rng.normal(0, 8, 3),
                   40, 250)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    bg = np.broadcast_to(wall, (H, W, 3)).astype(np.float32).copy()
    if rng.random() < 0.5:  # a floor or desk across the bottom
        edge = rng.uniform(0.75, 0.95) * H
        bg[ys >= edge] = np.clip(rng.uniform(60, 200, 3), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    if rng.random() < 0.8:  # the board's mount
        mount = tuple(int(v) for v in (np.full(3, rng.uniform(150, 210)) if rng.random() < 0.6 else
                                       np.full(3, rng.uniform(20, 70))))
        m = centre + (quad - centre) * (1 + rng.uniform(0.02, 0.05))
        ImageDraw.Draw(img).polygon([tuple(p) for p in m], fill=mount)
    corners = np.array([[0, 0], [tw, 0], [tw, th], [0, th]], float)
    coeffs = homography(quad, corners)
    warped = texture.convert("RGB").transform((W, H), Image.Transform.PERSPECTIVE, tuple(coeffs),
                                              Image.Resampling.BICUBIC)
    mask = Image.new("L", (tw, th), 255).transform((W, H), Image.Transform.PERSPECTIVE, tuple(coeffs),
                                                  Image.Resampling.BILINEAR)
    img.paste(warped, mask=mask)
    # uneven light: a smooth gradient in a random direction, then sensor noise
    d = rng.normal(size=2)
    d /= np.linalg.norm(d)
    ramp = ((xs / W - 0.5) * d[0] + (ys / H - 0.5) * d[1]) * rng.uniform(0, 0.35)
    out = np.asarray(img, np.float32) * (rng.uniform(0.85, 1.05) + ramp)[..., None]
    out += rng.normal(0, rng.uniform(1, 5), out.shape)
    return out.clip(0, 255).astype(np.uint8), coeffs
