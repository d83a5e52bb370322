"""Decode, validate and normalise one photo. Pure: bytes in, images out, no I/O.

Every way a file can be unusable raises `PhotoRejected` with a reason a person can act
on; the caller quarantines it and carries on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never decode as a grey-bottomed photo.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Formats a suffix may honestly hold. MPO is the multi-picture JPEG many cameras write
# (its first frame is the photo), so a .jpg holding one is not mislabelled.
_JPEG = frozenset({"JPEG", "MPO"})
FORMATS_BY_SUFFIX = {
    ".jpg": _JPEG, ".jpeg": _JPEG, ".png": frozenset({"PNG"}), ".webp": frozenset({"WEBP"}),
    ".tif": frozenset({"TIFF"}), ".tiff": frozenset({"TIFF"}), ".bmp": frozenset({"BMP"}), ".gif": frozenset({"GIF"}),
}
# EXIF orientations 5-8 rotate by 90 degrees, swapping width and height.
_SWAPS_AXES = {5, 6, 7, 8}
_BACKGROUND = (255, 255, 255)  # product-photo convention for transparency and padding


class PhotoRejected(ValueError):
    """The file cannot become a training photo; `str(exc)` is the quarantine reason."""


@dataclass(frozen=True)
class NormalisedPhoto:
    format: str
    width: int  # of the original, after EXIF orientation
    height: int
    image: Image.Image  # RGB, resolution x resolution
    box: tuple[int, int, int, int]  # region of the oriented original shown in `image`


def _open(data: bytes, suffix: str, max_pixels: int) -> Image.Image:
    if not data:
        raise PhotoRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise PhotoRejected("not an image: no decoder recognises the content") from None
        raise PhotoRejected(f"decompression bomb guard: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PhotoRejected(f"corrupt header: {exc}") from None
    if suffix and im.format not in FORMATS_BY_SUFFIX.get(suffix, ()):
        raise PhotoRejected(f"mislabelled: named {suffix!r} but the content is {im.format}")
    width, height = im.size
    if width * height > max_pixels:
        raise PhotoRejected(
            f"too many pixels: {width}x{height} = {width * height / 1e6:.1f} MP exceeds "
            f"ingest.max_pixels ({max_pixels / 1e6:.1f} MP); a decompression bomb or an oversized scan"
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, compositing transparency onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("L") clips 16-bit data to 255; rescale by the type's full range instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB") if im.mode != "RGB" else im


def _fit_box(width: int, height: int, fit: str) -> tuple[int, int, int, int]:
    side = min(width, height) if fit == "crop" else max(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def normalise(data: bytes, suffix: str, resolution: int, fit: str, max_pixels: int) -> NormalisedPhoto:
    """Decode under a pixel limit, orient, convert to RGB and fit into a square."""
    im = _open(data, suffix, max_pixels)
    fmt = im.format
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the photo
        orientation = 1
    width, height = im.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    try:
        # JPEG only: decode at a reduced DCT scale still >= the output size on both
        # sides. This is most of the ingest speed-up on 12+ MP photos.
        im.draft("RGB", (resolution, resolution))
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PhotoRejected(f"corrupt or truncated image data: {exc}") from None
    im = _to_rgb(im)

    box = _fit_box(width, height, fit)
    scale = im.width / width  # < 1 when draft() decoded at a reduced size
    if fit == "crop":
        scaled = tuple(v * scale for v in box)
        out = im.resize((resolution, resolution), Image.Resampling.LANCZOS, box=scaled, reducing_gap=3.0)
    else:
        side = box[2] - box[0]
        inner = (max(1, round(width * resolution / side)), max(1, round(height * resolution / side)))
        out = Image.new("RGB", (resolution, resolution), _BACKGROUND)
        out.paste(im.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0),
                  ((resolution - inner[0]) // 2, (resolution - inner[1]) // 2))
    return NormalisedPhoto(fmt, width, height, out, box)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 keeps thin coloured edges (labels, logos) that 4:2:0 smears.
    im.save(buf, "JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=6)
    return buf.getvalue()
