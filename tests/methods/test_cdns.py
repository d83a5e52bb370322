"""CDNS condition degradation (METHODS.md section 1): blur scale, blur, prompt, records."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from subjectflow.methods.sfo.cdns import (
    BLUR_RADIUS_AT_512,
    Degradation,
    blur_radius,
    degrade_reference,
    generic_prompt,
)


def high_frequency_energy(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
    return float(laplacian.var())


@pytest.fixture
def detailed_photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("resolution,expected", [(512, 5.0), (1024, 10.0), (64, 0.625), (768, 7.5)])
def test_blur_radius_scales_with_resolution(resolution, expected):
    assert blur_radius(resolution) == expected
    assert BLUR_RADIUS_AT_512 == 5.0
    assert blur_radius(resolution, radius_at_512=2.5) == expected / 2


def test_blur_radius_rejects_nonsense():
    with pytest.raises(ValueError, match="resolution"):
        blur_radius(0)
    with pytest.raises(ValueError, match="radius_at_512"):
        blur_radius(512, radius_at_512=-1)


def test_degrade_reference_blurs_a_copy(detailed_photo):
    before = detailed_photo.tobytes()
    blurred = degrade_reference(detailed_photo, blur_radius(96))
    assert blurred is not detailed_photo
    assert detailed_photo.tobytes() == before
    assert blurred.size == detailed_photo.size and blurred.mode == "RGB"
    assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(detailed_photo)
    # a larger radius removes more detail
    assert high_frequency_energy(degrade_reference(detailed_photo, 5.0)) < high_frequency_energy(blurred)


def test_zero_radius_is_an_unblurred_copy(detailed_photo):
    copy = degrade_reference(detailed_photo, 0.0)
    assert copy is not detailed_photo and copy.tobytes() == detailed_photo.tobytes()
    with pytest.raises(ValueError, match="radius"):
        degrade_reference(detailed_photo, -1.0)


def test_palette_images_blur_as_colours(detailed_photo):
    palette = detailed_photo.quantize(16)
    blurred = degrade_reference(palette, 2.0)
    assert palette.mode == "P" and blurred.mode == "RGB"
    assert high_frequency_energy(blurred) < high_frequency_energy(palette)


def test_generic_prompt_is_the_literal_template():
    assert generic_prompt("backpack") == "a photo of backpack"
    assert generic_prompt("  stuffed   animal ") == "a photo of stuffed animal"
    with pytest.raises(ValueError, match="class noun"):
        generic_prompt("  ")


def test_for_photo_uses_the_paper_degradation(detailed_photo):
    degradation = Degradation.for_photo("teapot", resolution=1024, seed=7)
    assert degradation == Degradation(blur_radius=10.0, generic_prompt="a photo of teapot", seed=7,
                                      strength=0.6, steps=28, guidance=3.5)
    small = Degradation.for_photo("teapot", resolution=96, seed=7)
    assert small.degrade(detailed_photo).tobytes() == degrade_reference(detailed_photo, 0.9375).tobytes()


def test_record_round_trips_every_parameter():
    degradation = Degradation.for_photo("dog", resolution=768, seed=3, strength=0.45, steps=12,
                                        guidance=5.0, radius_at_512=2.5)
    record = degradation.as_record()
    assert set(record) == {f.name for f in dataclasses.fields(Degradation)}
    assert record == {"blur_radius": 3.75, "generic_prompt": "a photo of dog", "seed": 3,
                      "strength": 0.45, "steps": 12, "guidance": 5.0}
    assert Degradation(**record) == degradation
    assert Degradation(**json.loads(json.dumps(record))) == degradation  # survives catalog storage


def test_integer_inputs_are_stored_as_floats():
    record = Degradation(blur_radius=5, generic_prompt="a photo of can", seed=0, guidance=4).as_record()
    assert isinstance(record["blur_radius"], float) and isinstance(record["guidance"], float)


@pytest.mark.parametrize("bad", [
    {"blur_radius": -1.0}, {"generic_prompt": " "}, {"strength": 0.0}, {"strength": 1.5},
    {"steps": 0}, {"steps": 2.5}, {"guidance": -1.0}, {"seed": -1},
])
def test_degradation_rejects_invalid_parameters(bad):
    params = dict(blur_radius=5.0, generic_prompt="a photo of can", seed=0) | bad
    with pytest.raises(ValueError, match=f"Degradation.{next(iter(bad))}"):
        Degradation(**params)
