"""Augmentations that turn a subject's few photos into many joint-set members.

Each augmentation is drawn once from a seeded RNG and recorded as plain numbers, so a
member can be rebuilt exactly from its photo and its `augmentation` JSON. The subject must
stay recognisable: crops keep at least `min_crop` of the photo's side (the normalised
photos are already centred on the product), colour jitter stays within small limits, and
the background (found with the subject mask) becomes a two-colour gradient rather than
anything with structure the model could mistake for part of the subject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from ..config import AugmentConfig

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Augmentation:
    crop: tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the side
    flip: bool
    brightness: float  # enhancement factors; 1.0 leaves the image unchanged
    contrast: float
    saturation: float
    hue: float  # shift as a fraction of the hue circle
    background: tuple[Colour, Colour] | None  # gradient top and bottom colours, or kept

    def as_record(self) -> dict[str, Any]:
        # Fields are scalars and tuples of them: no deep copy (`dataclasses.asdict` was half
        # of planning a 1,000-subject catalog's joint sets).
        return dict(vars(self))

    @property
    def replaced_background(self) -> bool:
        return self.background is not None


IDENTITY = Augmentation((0.0, 0.0, 1.0, 1.0), False, 1.0, 1.0, 1.0, 0.0, None)


def draw_augmentation(rng: random.Random, config: AugmentConfig) -> Augmentation:
    side = rng.uniform(config.min_crop, 1.0)
    left, top = rng.uniform(0, 1 - side), rng.uniform(0, 1 - side)
    background = None
    if rng.random() < config.background:
        background = (_colour(rng), _colour(rng))
    return Augmentation(
        crop=(round(left, 4), round(top, 4), round(left + side, 4), round(top + side, 4)),
        flip=config.flip and rng.random() < 0.5,
        brightness=round(rng.uniform(1 - config.brightness, 1 + config.brightness), 4),
        contrast=round(rng.uniform(1 - config.contrast, 1 + config.contrast), 4),
        saturation=round(rng.uniform(1 - config.saturation, 1 + config.saturation), 4),
        hue=round(rng.uniform(-config.hue, config.hue), 4),
        background=background,
    )


def _colour(rng: random.Random) -> Colour:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def gradient(size: tuple[int, int], top: Colour, bottom: Colour) -> Image.Image:
    width, height = size
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = (1 - ramp) * np.asarray(top, np.float32) + ramp * np.asarray(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(rows, (height, width, 3)).round().astype(np.uint8), "RGB")


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(shift * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def apply_augmentation(photo: Image.Image, mask: Image.Image, augmentation: Augmentation,
                       resolution: int) -> Image.Image:
    """The augmented member at `resolution` x `resolution` (RGB)."""
    image = photo.convert("RGB")
    if augmentation.background is not None:
        subject = mask.convert("L").resize(image.size, Image.Resampling.BILINEAR)
        image = Image.composite(image, gradient(image.size, *augmentation.background), subject)
    width, height = image.size
    left, top, right, bottom = augmentation.crop
    image = image.crop((round(left * width), round(top * height), round(right * width), round(bottom * height)))
    if augmentation.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(augmentation.brightness)
    image = ImageEnhance.Contrast(image).enhance(augmentation.contrast)
    image = ImageEnhance.Color(image).enhance(augmentation.saturation)
    if augmentation.hue:
        image = _shift_hue(image, augmentation.hue)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
