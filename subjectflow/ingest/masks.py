"""Subject masks: which pixels of a normalised photo belong to the product.

A segmenter is any callable `(rgb uint8 HxWx3) -> bool HxW`. The default, GrabCut
seeded with the image border as background, needs no weights. `mask.method` may name a
factory `package.module:make` instead; it is called once per worker process with the
`MaskConfig` and returns a segmenter (e.g. one wrapping a transformers segmentation model).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from ..config import MaskConfig

Segmenter = Callable[[np.ndarray], np.ndarray]

# GrabCut treats everything outside this inset rectangle as certain background.
_BORDER_FRACTION = 1 / 16


def grabcut(rgb: np.ndarray, iterations: int = 3) -> np.ndarray:
    height, width = rgb.shape[:2]
    inset_x, inset_y = max(1, int(width * _BORDER_FRACTION)), max(1, int(height * _BORDER_FRACTION))
    rect = (inset_x, inset_y, width - 2 * inset_x, height - 2 * inset_y)
    labels = np.zeros((height, width), np.uint8)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # GrabCut wants BGR; the model only sees colours, but keep OpenCV's convention.
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    cv2.setRNGSeed(0)  # its GMM initialisation is random; masks must be reproducible
    cv2.grabCut(bgr, labels, rect, background, foreground, iterations, cv2.GC_INIT_WITH_RECT)
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


@functools.lru_cache(maxsize=4)
def load_segmenter(config: MaskConfig) -> Segmenter:
    if config.method == "grabcut":
        return functools.partial(grabcut, iterations=config.iterations)
    module_name, _, attr = config.method.partition(":")
    if not attr:
        raise ValueError(
            f"ingest.mask.method {config.method!r} is neither 'grabcut' nor 'package.module:factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load mask segmenter {config.method!r}: {exc}") from exc
    return factory(config)


def subject_mask(image: Image.Image, config: MaskConfig) -> tuple[Image.Image, float]:
    """Mask at the image's resolution (L mode, 0/255) and the share of subject pixels.

    Segmentation runs at `config.size` (cost grows with pixels) and is scaled back up;
    bilinear upsampling then a threshold keeps edges smooth instead of blocky.
    """
    small = np.asarray(image.resize((config.size, config.size), Image.Resampling.BILINEAR))
    try:
        mask = np.asarray(load_segmenter(config)(small), dtype=bool)
    except cv2.error:
        # GrabCut fails on images with no colour variety (e.g. a blank frame); an
        # empty mask says "no subject found" honestly and is visible as coverage 0.
        mask = np.zeros(small.shape[:2], dtype=bool)
    if mask.shape != small.shape[:2]:
        raise ValueError(f"segmenter {config.method!r} returned a {mask.shape} mask for a {small.shape[:2]} image")
    up = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(image.size, Image.Resampling.BILINEAR)
    full = up.point(lambda v: 255 if v >= 128 else 0)
    return full, float(mask.mean())
