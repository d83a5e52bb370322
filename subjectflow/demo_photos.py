"""Procedurally drawn synthetic product photo sets for offline demos.

Each subject is one object (fixed silhouette, colour and brand label) shown in a
few "photos" that vary background, placement, scale, rotation and brightness.
"""

from __future__ import annotations

import colorsys
import csv
import io
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoSubject:
    """One demo product: its folder name and the class noun it belongs to."""

    name: str
    class_name: str


DEMO_SUBJECTS: tuple[DemoSubject, ...] = (
    DemoSubject("red_mug", "mug"),
    DemoSubject("blue_bottle", "bottle"),
    DemoSubject("green_box", "box"),
    DemoSubject("yellow_lamp", "lamp"),
)

_COLOUR_WORDS = {
    "red": (200, 35, 40), "blue": (30, 80, 200), "green": (40, 150, 60),
    "yellow": (240, 200, 30), "orange": (235, 120, 25), "purple": (120, 50, 170),
    "black": (35, 35, 40), "white": (235, 235, 230),
}
_MARGIN = 0.12  # GrabCut seeds its background model from the border, so keep it object-free

RGB = tuple[int, int, int]


def _seed(*parts: object) -> int:
    # crc32 rather than hash(): Python salts str hashes per process.
    return zlib.crc32(":".join(map(str, parts)).encode("utf-8"))


def _body_colour(subject: DemoSubject) -> RGB:
    for word in subject.name.lower().split("_"):
        if word in _COLOUR_WORDS:
            return _COLOUR_WORDS[word]
    r, g, b = colorsys.hsv_to_rgb((_seed(subject.name) % 360) / 360, 0.75, 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def _brand(subject: DemoSubject) -> str:
    # A made-up pronounceable word per subject: fixed identity, rarely shared.
    rng = random.Random(_seed("brand", subject.name))
    return "".join(rng.choice("BDKLMNRSTVZ") + rng.choice("AEIOU") for _ in range(2))


def _tint(colour: RGB, factor: float) -> RGB:
    return tuple(max(0, min(255, int(c * factor))) for c in colour)  # type: ignore[return-value]


def _label(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], text: str,
           paper: RGB | None = (245, 245, 240), ink: RGB = (25, 25, 30)) -> None:
    """Draw `text` centred in `box`, optionally on a paper band, sized to fit."""
    x0, y0, x1, y1 = box
    if paper is not None:
        draw.rectangle(box, fill=paper)
    size = max(8, int(min((y1 - y0) * 0.7, (x1 - x0) / (0.7 * len(text)))))
    font = ImageFont.load_default(size=size)
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=ink, font=font, anchor="mm")


# Shape painters work in fractions of the layer side L, so one design fits any size.
# They return the x-span of a round body to shade as a cylinder (None: flat faces).
def _mug(d: ImageDraw.ImageDraw, L: int, c: RGB, brand: str) -> tuple[float, float]:
    # Handle first so the body hides its inner half.
    d.ellipse((0.56 * L, 0.32 * L, 0.88 * L, 0.74 * L), outline=c, width=int(0.07 * L))
    d.rounded_rectangle((0.14 * L, 0.2 * L, 0.68 * L, 0.94 * L), radius=0.06 * L, fill=c)
    d.ellipse((0.14 * L, 0.15 * L, 0.68 * L, 0.25 * L), fill=_tint(c, 1.15))
    d.ellipse((0.17 * L, 0.165 * L, 0.65 * L, 0.235 * L), fill=_tint(c, 0.45))
    _label(d, (0.14 * L, 0.45 * L, 0.68 * L, 0.63 * L), brand)
    return 0.14 * L, 0.68 * L


def _bottle(d: ImageDraw.ImageDraw, L: int, c: RGB, brand: str) -> tuple[float, float]:
    d.rounded_rectangle((0.28 * L, 0.36 * L, 0.72 * L, 0.96 * L), radius=0.07 * L, fill=c)
    d.polygon([(0.28 * L, 0.42 * L), (0.42 * L, 0.22 * L), (0.58 * L, 0.22 * L),
               (0.72 * L, 0.42 * L)], fill=c)
    d.rectangle((0.42 * L, 0.12 * L, 0.58 * L, 0.26 * L), fill=c)
    cap = (0.4 * L, 0.03 * L, 0.6 * L, 0.14 * L)
    d.rounded_rectangle(cap, radius=0.02 * L, fill=(235, 235, 235))
    _label(d, (0.28 * L, 0.56 * L, 0.72 * L, 0.76 * L), brand)
    return 0.28 * L, 0.72 * L


def _box(d: ImageDraw.ImageDraw, L: int, c: RGB, brand: str) -> None:
    # Three faces at different brightness read as a lit 3-D box; no cylinder shading.
    d.polygon([(0.08 * L, 0.34 * L), (0.66 * L, 0.34 * L), (0.92 * L, 0.1 * L),
               (0.34 * L, 0.1 * L)], fill=_tint(c, 1.3))
    d.polygon([(0.66 * L, 0.34 * L), (0.92 * L, 0.1 * L), (0.92 * L, 0.71 * L),
               (0.66 * L, 0.95 * L)], fill=_tint(c, 0.65))
    d.rectangle((0.08 * L, 0.34 * L, 0.66 * L, 0.95 * L), fill=c)
    _label(d, (0.14 * L, 0.52 * L, 0.6 * L, 0.7 * L), brand, paper=None, ink=(250, 250, 245))


def _lamp(d: ImageDraw.ImageDraw, L: int, c: RGB, brand: str) -> tuple[float, float]:
    metal = (70, 70, 78)
    d.ellipse((0.26 * L, 0.86 * L, 0.74 * L, 0.97 * L), fill=metal)
    d.rectangle((0.47 * L, 0.4 * L, 0.53 * L, 0.92 * L), fill=metal)
    d.polygon([(0.34 * L, 0.04 * L), (0.66 * L, 0.04 * L), (0.84 * L, 0.44 * L),
               (0.16 * L, 0.44 * L)], fill=c)
    d.ellipse((0.16 * L, 0.41 * L, 0.84 * L, 0.47 * L), fill=_tint(c, 0.6))
    _label(d, (0.32 * L, 0.18 * L, 0.68 * L, 0.32 * L), brand, paper=None, ink=(60, 45, 20))
    return 0.16 * L, 0.84 * L


_SHAPES: dict[str, Callable[..., tuple[float, float] | None]] = {
    "mug": _mug, "bottle": _bottle, "box": _box, "lamp": _lamp,
}


def _object_layer(subject: DemoSubject, side: int) -> Image.Image:
    """The subject on a transparent square layer; only the size differs between photos."""
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    # Unknown classes fall back to a box so custom subjects still render.
    span = _SHAPES.get(subject.class_name, _box)(draw, side, _body_colour(subject), _brand(subject))
    if span is None:
        return layer
    # Cylindrical shading with an off-centre highlight sells the round body.
    x0, x1 = span
    u = np.clip((np.arange(side) - x0) / max(1.0, x1 - x0), 0.0, 1.0)
    profile = 0.62 + 0.5 * np.exp(-(((u - 0.35) / 0.28) ** 2))
    arr = np.asarray(layer).astype(np.float32)
    arr[..., :3] *= profile[None, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGBA")


def _background(rng: random.Random, size: int, avoid: RGB, base: int) -> np.ndarray:
    def colour(near: np.ndarray | None = None) -> np.ndarray:
        # Muted tones far from the body colour keep the object separable, and a
        # gentle gradient keeps the border a good model of the whole background.
        for _ in range(20):
            centre = np.full(3, rng.uniform(90, 235)) if near is None else near
            spread = 25 if near is None else 45
            col = np.clip(centre + [rng.uniform(-spread, spread) for _ in range(3)], 0, 255)
            if np.linalg.norm(col - np.array(avoid)) > 120:
                break
        return col

    a = colour()
    b = colour(near=a)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = t[:, None] if rng.random() < 0.6 else t[None, :]
    bg = np.broadcast_to(t[..., None], (size, size, 1)) * (b - a) + a
    bg = np.array(bg, dtype=np.float32)
    if rng.random() < 0.75:  # a table edge behind the object so it appears to stand on it
        edge = int(base - size * rng.uniform(0.06, 0.16))
        bg[edge:] *= rng.uniform(0.72, 0.88)
    return bg


def draw_photo(subject: DemoSubject, index: int, size: int = 384) -> Image.Image:
    """One RGB photo of the subject: same object identity across indices, varied view."""
    return draw_with_mask(subject, index, size)[0]


def drawn_mask(photo: bytes, source_uri: str) -> Image.Image | None:
    """The exact subject mask ("L", 255 = subject) of a photo `write_photo_sets` drew, found
    by redrawing it from its folder and file name and comparing bytes; None for any other
    photo (a real one, or one drawn at other settings)."""
    path = Path(source_uri.split("://", 1)[-1])
    subject = next((s for s in DEMO_SUBJECTS if s.name == path.parent.name), None)
    if subject is None or not (path.stem.isdigit() and path.suffix == ".jpg"):
        return None
    data, mask = drawn_jpeg(subject, int(path.stem), Image.open(io.BytesIO(photo)).width)
    return mask if data == photo else None


def drawn_jpeg(subject: DemoSubject, index: int, size: int = 384) -> tuple[bytes, Image.Image]:
    """The photo's file bytes, as `write_photo_sets` writes them, and its exact mask."""
    image, mask = draw_with_mask(subject, index, size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), mask


def draw_with_mask(subject: DemoSubject, index: int, size: int = 384) -> tuple[Image.Image, Image.Image]:
    """`draw_photo`'s photo and its exact subject mask ("L", 255 = subject)."""
    rng = random.Random(_seed(subject.name, index))
    noise_rng = np.random.default_rng(_seed("noise", subject.name, index))

    # Draw at 2x and downsample: ImageDraw has no anti-aliasing.
    height = int(size * rng.uniform(0.5, 0.66))
    obj = _object_layer(subject, 2 * height)
    width = max(1, int(height * rng.uniform(0.9, 1.08)))  # slight change of viewpoint
    obj = obj.resize((width, height), Image.Resampling.LANCZOS)
    obj = obj.rotate(rng.uniform(-12, 12), Image.Resampling.BICUBIC, expand=True)
    obj = obj.crop(obj.getbbox())
    limit = int(size * (1 - 2 * _MARGIN))
    if max(obj.size) > limit:
        obj.thumbnail((limit, limit), Image.Resampling.LANCZOS)

    # Roughly centred with a small jitter, clamped to stay inside the margin.
    w, h = obj.size
    lo, hi = int(size * _MARGIN), int(size * (1 - _MARGIN))
    jitter = size * 0.06
    x = int(min(max((size - w) / 2 + rng.uniform(-jitter, jitter), lo), hi - w))
    y = int(min(max((size - h) / 2 + rng.uniform(-jitter, jitter), lo), hi - h))

    bg = _background(rng, size, _body_colour(subject), base=y + h)
    # A soft contact shadow grounds the object on the surface.
    shadow = Image.new("L", (size, size), 0)
    sh = max(4, h // 10)
    ellipse = (x + w * 0.1, y + h - sh * 0.6, x + w * 0.95, y + h + sh * 0.5)
    ImageDraw.Draw(shadow).ellipse(ellipse, fill=70)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(2, size // 60)))
    bg *= 1 - np.asarray(shadow, dtype=np.float32)[..., None] / 255

    photo = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    photo.paste(obj, (x, y), obj)
    mask = Image.new("L", (size, size), 0)
    mask.paste(obj.getchannel("A"), (x, y))
    arr = np.asarray(photo, dtype=np.float32) * rng.uniform(0.85, 1.15)
    arr += noise_rng.normal(0.0, 3.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), mask


def write_photo_sets(root: Path, subjects: Sequence[DemoSubject] = DEMO_SUBJECTS,
                     photos_per_subject: int = 4, size: int = 384) -> Path:
    """Write root/<subject.name>/NN.jpg for each subject and a root/subjects.csv with
    header `subject,class` and one row per subject. Returns root.

    Deterministic: same arguments -> byte-identical files. Idempotent (overwrites).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        folder = root / subject.name
        folder.mkdir(parents=True, exist_ok=True)
        written = set()
        for i in range(photos_per_subject):
            path = folder / f"{i:02d}.jpg"
            path.write_bytes(drawn_jpeg(subject, i, size)[0])
            written.add(path.name)
        # Drop leftovers from an earlier, larger run so reruns give the same set.
        for stale in folder.glob("[0-9][0-9].jpg"):
            if stale.name not in written:
                stale.unlink()
    with open(root / "subjects.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["subject", "class"])
        writer.writerows([s.name, s.class_name] for s in subjects)
    return root
