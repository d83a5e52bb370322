"""Decoding and normalising single photos: modes, orientation, fit, and every rejection."""

import io

import numpy as np
import pytest
from PIL import Image

from subjectflow.ingest.photo import PhotoRejected, normalise
from tests.photos import encode, jpeg_with_orientation, product

LIMIT = 10_000_000


def norm(data, suffix=".png", resolution=32, fit="crop", max_pixels=LIMIT):
    return normalise(data, suffix, resolution, fit, max_pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F"])
def test_any_mode_becomes_8_bit_rgb(mode):
    im = product((40, 30)).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        im = Image.fromarray(np.full((30, 40), 32768, np.uint16))
    elif mode in ("I", "F"):
        im = Image.fromarray(np.linspace(0, 1000, 1200, dtype=np.int32 if mode == "I" else np.float32).reshape(30, 40))
    fmt, suffix = ("JPEG", ".jpg") if mode == "CMYK" else ("TIFF", ".tif") if mode in ("I", "F") else ("PNG", ".png")
    out = norm(encode(im, fmt), suffix)
    assert out.image.mode == "RGB" and out.image.size == (32, 32)
    if mode == "I;16":  # half of 16-bit full scale is mid-grey, not clipped white
        assert 120 <= np.asarray(out.image).mean() <= 136


def test_transparency_is_composited_onto_white():
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    out = norm(encode(im, "PNG"))
    assert np.asarray(out.image).min() >= 250


def test_exif_orientation_is_applied_and_reported():
    im = Image.new("RGB", (60, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 40))  # red band on the left
    out = norm(jpeg_with_orientation(im, 6), ".jpg", fit="pad")  # 6 = rotate 90 deg clockwise to view
    assert (out.width, out.height) == (40, 60)
    top = np.asarray(out.image)[2, 16]
    assert top[0] > 200 and top[2] < 80  # the left band is now on top


def test_crop_and_pad_boxes_are_recorded_in_original_pixels():
    data = encode(product((100, 50)), "PNG")
    assert norm(data, fit="crop").box == (25, 0, 75, 50)
    assert norm(data, fit="pad").box == (0, -25, 100, 75)


def test_large_jpegs_decode_at_reduced_size_to_the_same_result():
    big = product((1600, 1200), seed=3)
    out = norm(encode(big, "JPEG", quality=95), ".jpg", resolution=128)
    reference = big.crop((200, 0, 1400, 1200)).resize((128, 128), Image.Resampling.LANCZOS)
    diff = np.abs(np.asarray(out.image, float) - np.asarray(reference, float)).mean()
    assert diff < 4.0


def truncated():
    data = encode(product((200, 150)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize("data, suffix, reason", [
    (b"", ".jpg", "empty file"),
    (b"this is not a photo at all", ".jpg", "not an image"),
    (bytes(range(256)) * 40, ".png", "not an image"),
    (encode(product(), "PNG"), ".jpg", "mislabelled: named '.jpg' but the content is PNG"),
    (encode(product(), "JPEG"), ".txt", "mislabelled"),
    (encode(Image.new("1", (5000, 4000)), "PNG"), ".png", "too many pixels: 5000x4000"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ".png", "not an image|corrupt"),
])
def test_bad_files_are_rejected_with_a_reason(data, suffix, reason):
    with pytest.raises(PhotoRejected, match=reason):
        norm(data, suffix)


def test_truncated_jpeg_is_rejected_not_decoded_grey():
    with pytest.raises(PhotoRejected, match="truncated|corrupt"):
        norm(truncated(), ".jpg")


def test_pillows_own_bomb_guard_is_reported_as_a_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PhotoRejected, match="decompression bomb"):
        norm(encode(product((100, 100)), "PNG"), max_pixels=10**12)


def test_a_camera_mpo_named_jpg_is_a_jpeg_not_mislabelled():
    frames = [product((64, 48), seed=1), product((64, 48), seed=2)]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    out = norm(buf.getvalue(), ".jpg")
    assert out.format == "MPO" and out.image.size == (32, 32)
