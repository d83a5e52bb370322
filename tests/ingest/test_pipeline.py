"""Ingest of whole sources through the plain library functions (no Prefect)."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from subjectflow.config import IngestConfig
from subjectflow.ingest import SourceError, list_source
from subjectflow.ingest.source import class_from_folder
from tests.ingest.helpers import ingest
from tests.photos import encode, photo_set, product, write

SMALL = dict(workers=1, resolution=64, thumbnail_size=32, mask={"size": 32})


def tree_digest(root):
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def messy_source(tmp_path):
    root = photo_set(tmp_path / "src", per_subject=2)  # 4 good photos in 2 subjects
    good = (root / "red_mug" / "00.jpg").read_bytes()
    write(root / "red_mug" / "copy-of-00.jpg", good)                    # duplicate within the subject
    write(root / "red_mug" / "from-blue.jpg", (root / "blue_box" / "00.jpg").read_bytes())  # across subjects
    write(root / "red_mug" / "empty.jpg", b"")                          # zero-byte
    write(root / "red_mug" / "notes.txt", b"bought 2024")               # not an image
    data = encode(product((200, 150)), "JPEG")
    write(root / "red_mug" / "cut.jpg", data[: len(data) // 2])         # truncated
    write(root / "red_mug" / "really-a.png.jpg", encode(product(), "PNG"))  # mislabelled
    write(root / "red_mug" / "huge.png", encode(Image.new("1", (4000, 3000)), "PNG"))  # over the pixel limit
    write(root / "red_mug" / ".DS_Store", b"\0\0\0\1Bud1")              # ignored
    write(root / "blue_box" / "._00.jpg", b"AppleDouble")               # ignored
    write(root / "stray.jpg", good)                                     # not in a subject folder
    (root / "blue_box" / "gone.jpg").symlink_to(root / "missing.jpg")   # unreadable
    write(root / "subjects.csv", b"subject,class\nred_mug,coffee mug\n")
    write(root / "blue_box" / "subject.json", json.dumps({"class": "storage box"}).encode())
    return root


def test_every_file_is_accounted_for_and_bad_ones_are_quarantined_with_reasons(messy_source, catalog):
    report = ingest(messy_source, catalog, IngestConfig(max_pixels=5_000_000, **SMALL))
    assert report.balanced
    assert (report.seen, report.ingested, report.duplicates, report.quarantined, report.ignored) == (17, 4, 2, 7, 4)
    reasons = {os.path.basename(r["source_uri"]): r["reason"] for r in catalog.read("quarantine").to_pylist()}
    assert reasons.keys() == {"empty.jpg", "notes.txt", "cut.jpg", "really-a.png.jpg", "huge.png", "stray.jpg", "gone.jpg"}
    assert "empty file" in reasons["empty.jpg"] and "truncated" in reasons["cut.jpg"]
    assert "mislabelled" in reasons["really-a.png.jpg"] and "too many pixels" in reasons["huge.png"]
    assert "not inside a subject folder" in reasons["stray.jpg"] and "unreadable" in reasons["gone.jpg"]
    assert {os.path.basename(u) for u, _ in report.new_duplicates} == {"copy-of-00.jpg", "from-blue.jpg"}


def test_images_table_rows_point_at_real_blobs(messy_source, catalog):
    ingest(messy_source, catalog, IngestConfig(max_pixels=5_000_000, **SMALL))
    images = catalog.read("images").to_pylist()
    assert len(images) == 4 == len({r["image_id"] for r in images})
    for row in images:
        original = catalog.blob_path(row["photo_file"]).read_bytes()
        assert hashlib.sha256(original).hexdigest() == row["image_id"] == hashlib.sha256(open(row["source_uri"], "rb").read()).hexdigest()
        assert Image.open(catalog.blob_path(row["normalised_file"])).size == (64, 64)
        mask = np.asarray(Image.open(catalog.blob_path(row["mask_file"])))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(catalog.blob_path(row["thumbnail_file"])).size == (32, 32)
        assert 0.05 < row["mask_coverage"] < 0.8  # the block, not the whole frame


def test_class_nouns_come_from_subject_json_then_csv_then_folder_name(messy_source, catalog):
    ingest(messy_source, catalog, IngestConfig(max_pixels=5_000_000, **SMALL))
    classes = {r["name"]: (r["class_name"], r["n_images"]) for r in catalog.read("subjects").to_pylist()}
    assert classes == {"red_mug": ("coffee mug", 2), "blue_box": ("storage box", 2)}
    assert [class_from_folder(n) for n in ("duck_toy", "dog2", "teapot", "pink-sunglasses")] == ["toy", "dog", "teapot", "sunglasses"]


def test_source_photos_are_never_modified(messy_source, catalog):
    before = tree_digest(messy_source)
    ingest(messy_source, catalog, IngestConfig(max_pixels=5_000_000, **SMALL))
    assert tree_digest(messy_source) == before


def test_rerun_on_an_unchanged_source_changes_nothing(messy_source, catalog):
    config = IngestConfig(max_pixels=5_000_000, **SMALL)
    ingest(messy_source, catalog, config)
    tables = tree_digest(catalog.root / "tables")
    again = ingest(messy_source, catalog, config)
    assert again.balanced and not again.changed and again.ingested_new == 0
    # the unreadable file is retried each run (I/O trouble may pass), everything else is remembered
    assert again.quarantined == 7 and again.ingested_before == 4 and again.duplicates == 2
    assert {k: v for k, v in tree_digest(catalog.root / "tables").items() if "quarantine" not in k} == \
        {k: v for k, v in tables.items() if "quarantine" not in k}
    assert catalog.read("quarantine").num_rows == 7  # upserted, not appended again


def test_adding_one_photo_processes_only_that_photo(tmp_path, catalog, monkeypatch):
    source = photo_set(tmp_path / "src")
    ingest(source, catalog)
    write(source / "red_mug" / "new.jpg", encode(product(seed=99)))
    import subjectflow.ingest.pipeline as pipeline

    processed = []
    real = pipeline.process_photo
    monkeypatch.setattr(pipeline, "process_photo", lambda photo, **kw: processed.append(photo.uri) or real(photo, **kw))
    report = ingest(source, catalog)
    assert [os.path.basename(u) for u in processed] == ["new.jpg"]
    assert report.ingested_new == 1 and report.ingested_before == 6
    assert {r["name"]: r["n_images"] for r in catalog.read("subjects").to_pylist()}["red_mug"] == 4


def test_changing_normalisation_settings_rederives_every_photo(tmp_path, catalog):
    source = photo_set(tmp_path / "src")
    ingest(source, catalog)
    report = ingest(source, catalog, IngestConfig(**{**SMALL, "resolution": 48}))
    assert report.ingested_before == 6 and report.changed
    assert {r["resolution"] for r in catalog.read("images").to_pylist()} == {48}
    assert catalog.read("images").num_rows == 6


def test_a_missing_source_is_an_error_that_says_what_to_fix(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_source(str(tmp_path / "nope"))


def test_a_broken_subject_json_is_quarantined_and_the_folder_name_used(tmp_path, catalog):
    source = photo_set(tmp_path / "src", subjects=("duck_toy",))
    write(source / "duck_toy" / "subject.json", b"{not json")
    report = ingest(source, catalog)
    assert report.balanced and report.quarantined == 1
    assert catalog.read("subjects").to_pylist()[0]["class_name"] == "toy"


def half_frame(config):
    """A plug-in segmenter: the left half of every photo is the subject."""
    def segment(rgb):
        mask = np.zeros(rgb.shape[:2], bool)
        mask[:, : rgb.shape[1] // 2] = True
        return mask
    return segment


def test_a_segmenter_can_be_plugged_in_by_dotted_path(tmp_path, catalog):
    source = photo_set(tmp_path / "src", subjects=("vase",), per_subject=1)
    ingest(source, catalog, IngestConfig(**{**SMALL, "mask": {"size": 32, "method": "tests.ingest.test_pipeline:half_frame"}}))
    row = catalog.read("images").to_pylist()[0]
    assert row["mask_method"] == "tests.ingest.test_pipeline:half_frame" and row["mask_coverage"] == pytest.approx(0.5)


def test_worker_processes_give_the_same_catalog_as_one_process(tmp_path):
    from subjectflow.catalog import init_catalog
    from subjectflow.config import Config

    source = photo_set(tmp_path / "src")
    one, two = init_catalog(tmp_path / "one", Config()), init_catalog(tmp_path / "two", Config())
    ingest(source, one)
    ingest(source, two, IngestConfig(**{**SMALL, "workers": 2}))
    def key(row):
        return {k: v for k, v in row.items() if k != "ingested_at"}
    assert sorted(map(key, one.read("images").to_pylist()), key=str) == sorted(map(key, two.read("images").to_pylist()), key=str)
