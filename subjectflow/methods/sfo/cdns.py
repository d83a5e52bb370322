"""CDNS: Condition-Degradation Negative Sampling, the pure parts (METHODS.md section 1).

Shin et al., arXiv 2506.03621: SFO's negatives are sampled by the subject-conditioned model
itself with BOTH conditions degraded: the reference image Gaussian-blurred (radius 5 px at
512 px) and the rich prompt replaced by "a photo of {class noun}". Degrading only one of the
two was much weaker. This module builds the degraded conditions and the record stored with
every negative; sampling itself lives with the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter

BLUR_RADIUS_AT_512 = 5.0
# METHODS.md quotes the paper's generic prompt literally; no article is inserted, so the
# prompt is a pure function of the stored class noun and never guesses "a" vs "an".
GENERIC_PROMPT_TEMPLATE = "a photo of {class_noun}"

# Modes PIL's GaussianBlur rejects or would blur as palette indices rather than colours.
_BLUR_MODE = {"P": "RGB", "PA": "RGBA", "1": "L"}


def blur_radius(resolution: int, radius_at_512: float = BLUR_RADIUS_AT_512) -> float:
    """Blur radius in pixels for a reference of side `resolution`: 5 px per 512 px, linear."""
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if radius_at_512 < 0:
        raise ValueError(f"radius_at_512 must be >= 0, got {radius_at_512}")
    return float(radius_at_512) * resolution / 512


def degrade_reference(image: Image.Image, radius: float) -> Image.Image:
    """A Gaussian-blurred copy of the reference image (CDNS image degradation).

    Always returns a new image; the input is never modified.
    """
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    source = image.convert(_BLUR_MODE[image.mode]) if image.mode in _BLUR_MODE else image
    if radius == 0:
        return source.copy()
    return source.filter(ImageFilter.GaussianBlur(radius))


def generic_prompt(class_name: str) -> str:
    """CDNS text degradation: "a photo of {class noun}", e.g. "a photo of backpack"."""
    class_noun = " ".join(class_name.split())  # stray whitespace from folder names or CSVs
    if not class_noun:
        raise ValueError("generic_prompt needs a class noun, got an empty string")
    return GENERIC_PROMPT_TEMPLATE.format(class_noun=class_noun)


@dataclass(frozen=True, kw_only=True)
class Degradation:
    """Every parameter that made a CDNS negative, stored with it in the catalog.

    `strength` is the img2img (SDEdit) strength used when the negative is sampled by the SFT
    adapter starting from the blurred reference; steps and guidance follow the paper (28, 3.5).
    """

    blur_radius: float
    generic_prompt: str
    seed: int
    strength: float = 0.6
    steps: int = 28
    guidance: float = 3.5

    def __post_init__(self) -> None:
        # Store plain floats so records compare and serialise the same whatever was passed.
        for name in ("blur_radius", "strength", "guidance"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.blur_radius < 0:
            raise ValueError(f"Degradation.blur_radius must be >= 0, got {self.blur_radius}")
        if not self.generic_prompt.strip():
            raise ValueError("Degradation.generic_prompt must not be empty")
        if not 0 < self.strength <= 1:
            raise ValueError(f"Degradation.strength (img2img) must be in (0, 1], got {self.strength}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Degradation.steps must be an integer >= 1, got {self.steps!r}")
        if self.guidance < 0:
            raise ValueError(f"Degradation.guidance must be >= 0, got {self.guidance}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Degradation.seed must be an integer >= 0, got {self.seed!r}")

    def as_record(self) -> dict[str, Any]:
        """Plain-typed fields for catalog storage; `Degradation(**record)` rebuilds it. Every
        field is a scalar, so no deep copy (`dataclasses.asdict`, a third of the time a
        1,000-subject refresh spends finding SFO's stale subjects)."""
        return dict(vars(self))

    def degrade(self, image: Image.Image) -> Image.Image:
        """The blurred reference this degradation conditions on."""
        return degrade_reference(image, self.blur_radius)

    @classmethod
    def for_photo(
        cls,
        class_name: str,
        resolution: int,
        seed: int,
        strength: float = 0.6,
        steps: int = 28,
        guidance: float = 3.5,
        radius_at_512: float = BLUR_RADIUS_AT_512,
    ) -> Degradation:
        """The paper's degradation for a reference of side `resolution` of a `class_name`."""
        return cls(
            blur_radius=blur_radius(resolution, radius_at_512),
            generic_prompt=generic_prompt(class_name),
            seed=seed,
            strength=strength,
            steps=steps,
            guidance=guidance,
        )
