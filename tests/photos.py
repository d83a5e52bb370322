"""Small photo files made on the fly, including every kind of bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def product(size=(96, 64), body=(200, 30, 30), background=(235, 235, 235), seed=0) -> Image.Image:
    """A coloured block on a plain background: enough structure for GrabCut."""
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = background
    h, w = size[1], size[0]
    arr[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = body
    arr = np.clip(arr.astype(int) + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def jpeg_with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def photo_set(root: Path, subjects=("red_mug", "blue_box"), per_subject=3) -> Path:
    for s, name in enumerate(subjects):
        for i in range(per_subject):
            write(root / name / f"{i:02d}.jpg", encode(product(body=(40 + 60 * s, 30 * i, 200 - 50 * s), seed=i + 10 * s)))
    return root
