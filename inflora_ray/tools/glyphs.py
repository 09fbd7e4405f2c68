"""An offline image source: glyphs rendered with Pillow from the TrueType fonts that ship inside matplotlib.

Used to pre-train the quickstart's small ViT (:mod:`inflora_ray.tools.pretrain`), so it must share nothing with
the quickstart's continual tasks (handwritten digits): the classes are letters (Latin, Greek, Cyrillic) and
symbols, **never the digits 0-9 nor any glyph that looks like one** (see :data:`EXCLUDED`, with the reason
for each exclusion). Glyphs whose shape duplicates another class (Latin/Greek/Cyrillic homoglyphs,
lower/upper case pairs that only differ in size, e.g. ``c``/``C``) are left out too, since every glyph is
scaled to fill the frame and they would be indistinguishable.

Fonts: the DejaVu Sans, Sans Mono and Serif families and STIX General, four styles each (regular, bold,
italic/oblique, bold italic): 16 faces. A class is drawn only from the faces that contain its glyph.

Every image is a pure function of ``(seed, index)`` (its own NumPy generator), so a source of any size can be
rendered lazily, in any order, on any worker, and gives the same pixels. The style of each image is random:
face, stroke width (thickening), scale (largest side 60-100% of the frame), aspect jitter, rotation, shear,
offset, a low-resolution pass (downsample to 8-20 px, then bilinear back up: the look of the quickstart's
8x8 digits upsampled to 32 px), Gaussian blur, ink level, additive noise and, rarely, inversion.
Images are bright ink on a dark background, greyscale replicated to 3 channels, uint8 ``(3, H, W)``.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..storage import file_digest

# ---------------------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------------------

LATIN_UPPER = "ACDEFHJKLMNPRTUVWXY"
LATIN_LOWER = "adefhkmnrty"
GREEK_UPPER = "ΓΔΛΞΠΣΦΨΩ"
GREEK_LOWER = "αγηλμξπτφψω"
CYRILLIC_UPPER = "ЖЯДИЮШЩЦЫЪ"
SYMBOLS = "#%@+=*<>~±÷≈≠≤≥∀∃∇√←→↔♠♣♥♦"

#: The glyph classes, in label order (86 classes).
GLYPH_CLASSES: tuple[str, ...] = tuple(LATIN_UPPER + LATIN_LOWER + GREEK_UPPER + GREEK_LOWER + CYRILLIC_UPPER
                                       + SYMBOLS)

#: Glyphs deliberately left out, with the reason: digits and digit look-alikes (the pre-training data must be
#: disjoint from the quickstart's handwritten digits), and homoglyphs of a kept class.
EXCLUDED: dict[str, str] = {
    **{c: "digit" for c in "0123456789"},
    **{c: "looks like 0" for c in "OoQΟοΘθσ○●□■◇⊕⊗Øø"},
    **{c: "looks like 1" for c in "Iilj|!ıιΙ/\\()[]{}↑↓∫"},
    **{c: "looks like 2" for c in "Zzζ?Ζ"},
    **{c: "looks like 3" for c in "ЗзЭэεϵ∈Ʒʒ"},
    **{c: "looks like 4" for c in "Чч"},
    **{c: "looks like 5" for c in "Ss$§"},
    **{c: "looks like 6" for c in "bGδ∂бБЬь"},
    **{c: "looks like 8" for c in "BßβΒ&∞"},
    **{c: "looks like 9" for c in "gqɡ"},
    **{c: "lower-case twin of a kept capital (same shape once scaled to the frame)" for c in "cpuvwx"},
    **{c: "homoglyph of a kept class" for c in "ΑΕΗΚΜΝΡΤΥΧνρυχκАВЕКМНОРСТХГПФЛ×∧∨∪∩⊂⊃△▽^"},
}


#: Font faces, relative to matplotlib's ``fonts/ttf`` folder: (file, family, bold, italic).
FONT_FACES: tuple[tuple[str, str, bool, bool], ...] = (
    ("DejaVuSans.ttf", "sans", False, False),
    ("DejaVuSans-Bold.ttf", "sans", True, False),
    ("DejaVuSans-Oblique.ttf", "sans", False, True),
    ("DejaVuSans-BoldOblique.ttf", "sans", True, True),
    ("DejaVuSerif.ttf", "serif", False, False),
    ("DejaVuSerif-Bold.ttf", "serif", True, False),
    ("DejaVuSerif-Italic.ttf", "serif", False, True),
    ("DejaVuSerif-BoldItalic.ttf", "serif", True, True),
    ("DejaVuSansMono.ttf", "mono", False, False),
    ("DejaVuSansMono-Bold.ttf", "mono", True, False),
    ("DejaVuSansMono-Oblique.ttf", "mono", False, True),
    ("DejaVuSansMono-BoldOblique.ttf", "mono", True, True),
    ("STIXGeneral.ttf", "stix", False, False),
    ("STIXGeneralBol.ttf", "stix", True, False),
    ("STIXGeneralItalic.ttf", "stix", False, True),
    ("STIXGeneralBolIta.ttf", "stix", True, True),
)
FAMILIES = ("sans", "serif", "mono", "stix")


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def class_faces() -> tuple[tuple[int, ...], ...]:
    """For each class, the indices into :data:`FONT_FACES` of the faces that contain its glyph."""
    from matplotlib.ft2font import FT2Font

    fonts = [FT2Font(str(font_dir() / f)) for f, *_ in FONT_FACES]
    out = []
    for ch in GLYPH_CLASSES:
        faces = tuple(i for i, ft in enumerate(fonts) if ft.get_char_index(ord(ch)) != 0)
        if len(faces) < 4:
            raise RuntimeError(f"glyph {ch!r} is in fewer than 4 bundled faces ({len(faces)}); "
                               "matplotlib's fonts changed?")
        out.append(faces)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Style
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GlyphStyle:
    """Ranges of the random rendering parameters (each image draws its own)."""
    scale: tuple[float, float] = (0.6, 1.0)         # largest side of the glyph, as a fraction of the frame
    aspect: tuple[float, float] = (0.6, 1.4)        # extra x/y stretch, log-uniform
    rotation: float = 12.0                          # degrees, uniform in [-rotation, rotation]
    shear: float = 0.2                              # x shear, uniform in [-shear, shear]
    offset: float = 0.08                            # centre offset, fraction of the frame, per axis
    stroke: tuple[int, ...] = (0, 1, 2, 3, 4)       # stroke width at the 64-px base rendering, uniform choice
    lowres_prob: float = 0.5                        # probability of the low-resolution pass
    lowres: tuple[int, int] = (8, 20)               # its intermediate size (inclusive)
    blur_prob: float = 0.3
    blur: tuple[float, float] = (0.3, 1.0)          # Gaussian radius in output pixels
    ink: tuple[float, float] = (0.7, 1.0)           # peak brightness of the ink
    noise_prob: float = 0.3
    noise: tuple[float, float] = (0.0, 0.06)        # std of additive Gaussian noise (fraction of 255)
    invert_prob: float = 0.05                       # dark ink on a bright background

    def to_dict(self) -> dict:
        return asdict(self)

    def with_geometry(self, strength: float) -> "GlyphStyle":
        """This style with its geometric jitter (scale, aspect, rotation, shear, offset) scaled towards
        :data:`EASY_GEOMETRY` (``strength=0``) from the full ranges (``strength=1``); photometric parameters
        are unchanged. Used as a curriculum: a ViT from scratch learns upright, centred, frame-filling glyphs
        quickly, and stalls near chance when shown the full geometric variation from the start."""
        t = min(1.0, max(0.0, float(strength)))
        lerp = lambda easy, full: easy + t * (full - easy)  # noqa: E731
        return replace(
            self,
            scale=(lerp(EASY_GEOMETRY["scale"][0], self.scale[0]), lerp(EASY_GEOMETRY["scale"][1], self.scale[1])),
            aspect=(lerp(EASY_GEOMETRY["aspect"][0], self.aspect[0]),
                    lerp(EASY_GEOMETRY["aspect"][1], self.aspect[1])),
            rotation=lerp(EASY_GEOMETRY["rotation"], self.rotation),
            shear=lerp(EASY_GEOMETRY["shear"], self.shear),
            offset=lerp(EASY_GEOMETRY["offset"], self.offset),
        )


#: The geometry at curriculum strength 0: near-upright, centred glyphs filling most of the frame.
EASY_GEOMETRY = {"scale": (0.85, 1.0), "aspect": (0.9, 1.1), "rotation": 3.0, "shear": 0.0, "offset": 0.03}


_BASE_FONT_PX = 64  # glyphs are rasterised once per (class, face, stroke) at this size, then transformed


@functools.lru_cache(maxsize=8192)
def _base_glyph(ch: str, face: int, stroke: int):
    """The glyph's tightly cropped greyscale mask (PIL image, mode L) at the base size."""
    from PIL import Image, ImageDraw

    font = _font(face)
    pad = 8 + stroke
    left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    img = Image.new("L", (max(w, 1), max(h, 1)), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), ch, fill=255, font=font, stroke_width=stroke,
                             stroke_fill=255)
    box = img.getbbox()
    if box is None:
        raise RuntimeError(f"glyph {ch!r} renders empty in {FONT_FACES[face][0]}")
    return img.crop(box)


@functools.lru_cache(maxsize=None)
def _font(face: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / FONT_FACES[face][0]), size=_BASE_FONT_PX)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def render_glyph(ch: str, face: int, rng: np.random.Generator, img_size: int = 32,
                 style: GlyphStyle = GlyphStyle()) -> np.ndarray:
    """Render one glyph with random style parameters drawn from ``rng``: uint8 ``(img_size, img_size)``."""
    from PIL import Image, ImageFilter

    stroke = int(rng.choice(style.stroke))
    base = _base_glyph(ch, face, stroke)
    bw, bh = base.size
    # Output is rendered at 2x and box-downsampled (antialiasing), then optionally degraded.
    big = 2 * img_size
    scale = rng.uniform(*style.scale) * big / max(bw, bh)
    aspect = _log_uniform(rng, *style.aspect)
    sx, sy = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
    theta = np.deg2rad(rng.uniform(-style.rotation, style.rotation))
    shear = rng.uniform(-style.shear, style.shear)
    # Forward map (glyph coords centred at its middle -> output): M = R @ Shear @ S.
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    # Keep the transformed glyph inside the frame: shrink if its box exceeds 98% of the frame.
    corners = m @ (np.array([[-1, -1, 1, 1], [-1, 1, -1, 1]]) * np.array([[bw / 2], [bh / 2]]))
    extent = corners.max(axis=1) - corners.min(axis=1)
    fit = min(1.0, 0.98 * big / float(extent.max()))
    m = m * fit
    extent = extent * fit
    slack = np.maximum(0.0, (big - extent) / 2)
    off = rng.uniform(-1, 1, size=2) * np.minimum(style.offset * big, slack)
    centre_out = np.array([big / 2, big / 2]) + off
    inv = np.linalg.inv(m)
    # PIL's AFFINE takes the inverse map output (x, y) -> input: in = inv @ (out - centre_out) + centre_in.
    centre_in = np.array([bw / 2, bh / 2])
    t = centre_in - inv @ centre_out
    data = (inv[0, 0], inv[0, 1], t[0], inv[1, 0], inv[1, 1], t[1])
    img = base.transform((big, big), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR,
                         fillcolor=0)
    img = img.resize((img_size, img_size), Image.Resampling.BOX)
    if rng.random() < style.lowres_prob:
        r = int(rng.integers(style.lowres[0], style.lowres[1] + 1))
        img = img.resize((r, r), Image.Resampling.BOX).resize((img_size, img_size), Image.Resampling.BILINEAR)
    if rng.random() < style.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*style.blur))))
    x = np.asarray(img, dtype=np.float32) / 255.0
    peak = float(x.max())
    if peak > 0:
        x = x / peak
    x = x * rng.uniform(*style.ink)
    if rng.random() < style.noise_prob:
        x = x + rng.normal(0.0, rng.uniform(*style.noise), size=x.shape).astype(np.float32)
    if rng.random() < style.invert_prob:
        x = 1.0 - x
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------

class GlyphSource:
    """``num_images`` rendered glyphs (an :class:`~inflora_ray.data.base.ImageSource`), lazily, deterministically.

    Image ``i`` depends only on ``(seed, i)``: its class is a balanced, seeded assignment (every class appears
    ``num_images // K`` or one more times), its face and style come from ``np.random.default_rng([seed, i])``.
    ``classes`` restricts the source to a subset of :data:`GLYPH_CLASSES` (labels are then 0..len-1 in the
    given order).
    """

    def __init__(self, num_images: int, seed: int = 0, img_size: int = 32, style: GlyphStyle = GlyphStyle(),
                 classes: Optional[Sequence[str]] = None):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.img_size = int(img_size)
        self.style = style
        self.classes = tuple(classes) if classes is not None else GLYPH_CLASSES
        bad = [c for c in self.classes if c not in GLYPH_CLASSES]
        if bad:
            raise ValueError(f"unknown glyph classes {bad}; choose from GLYPH_CLASSES")
        k = len(self.classes)
        balanced = np.arange(self.num_images, dtype=np.int64) % k
        self.labels = np.random.default_rng([self.seed, 0x61797068]).permutation(balanced)
        faces = class_faces()
        self._class_faces = [faces[GLYPH_CLASSES.index(c)] for c in self.classes]

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_images

    def face_of(self, index: int) -> int:
        """Index into :data:`FONT_FACES` of image ``index``'s face (the first draw of its generator)."""
        rng = np.random.default_rng([self.seed, int(index)])
        faces = self._class_faces[int(self.labels[index])]
        return int(faces[rng.integers(len(faces))])

    def load_gray(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``(H, W)``."""
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(self.labels[index])
        faces = self._class_faces[label]
        face = int(faces[rng.integers(len(faces))])
        return render_glyph(self.classes[label], face, rng, self.img_size, self.style)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 ``(3, H, W)`` (grey replicated)."""
        g = torch.from_numpy(self.load_gray(index))
        return g.unsqueeze(0).expand(3, -1, -1).contiguous()

    def render(self, indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Many images at once as uint8 ``(N, 1, H, W)`` (one channel; expand to 3 where needed)."""
        idx = range(self.num_images) if indices is None else indices
        return torch.from_numpy(np.stack([self.load_gray(int(i)) for i in idx]))[:, None]

    def manifest(self) -> dict:
        """Provenance: generator parameters and the font files' checksums."""
        return {
            "source": "inflora_ray.tools.glyphs (matplotlib-bundled TrueType fonts, Pillow)",
            "num_images": self.num_images, "seed": self.seed, "img_size": self.img_size,
            "classes": "".join(self.classes), "style": self.style.to_dict(), "fonts": font_checksums(),
        }


@functools.lru_cache(maxsize=None)
def font_checksums() -> dict[str, str]:
    """SHA-256 of each face used (the rendering depends on these exact files)."""
    return {f: file_digest(str(font_dir() / f)) for f, *_ in FONT_FACES}


