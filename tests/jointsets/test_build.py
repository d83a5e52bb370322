"""Joint-set builder: balance, provenance, reproducibility, incremental rebuilds, streaming."""

import collections
import io
import json
import random

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from subjectflow.config import AugmentConfig
from subjectflow.jointsets import build_jointsets, make_jointsets, read_sets, record_jointsets
from subjectflow.jointsets.augment import Augmentation, apply_augmentation, draw_augmentation
from tests.ingest.helpers import ingest
from tests.photos import photo_set
from tests.training.conftest import ingested_catalog, tiny_config

SETS = {"resolution": 32, "sets_per_subject": 5, "shard_rows": 7}


def config(**extra):
    return tiny_config(jointsets={**SETS, **extra}).jointsets


def test_sets_are_balanced_within_and_across_subjects(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug", "blue_box"), per_subject=4)
    cfg = config()
    report = build_jointsets(catalog, cfg, say=lambda _: None)
    rows = catalog.read("jointsets").to_pylist()

    sets = collections.defaultdict(list)
    for r in rows:
        sets[r["set_id"]].append(r)
    per_subject = collections.Counter(members[0]["subject_id"] for members in sets.values())
    assert per_subject == {"red_mug": 5, "blue_box": 5} and report.made == {"red_mug": 5, "blue_box": 5}
    for members in sets.values():
        assert sorted(m["member"] for m in members) == [0, 1, 2] and {m["set_size"] for m in members} == {3}
        assert len({m["image_id"] for m in members}) == 3  # 4 photos >= 3 members: no photo twice in a set
        assert len({m["subject_id"] for m in members}) == 1
    for subject in ("red_mug", "blue_box"):
        uses = collections.Counter(r["image_id"] for r in rows if r["subject_id"] == subject)
        assert len(uses) == 4 and max(uses.values()) - min(uses.values()) <= 1  # 15 draws over 4 photos


def _members(catalog) -> list[tuple]:
    return sorted((r["set_id"], r["member"], r["image_id"], r["augmentation"]) for r in catalog.read("jointsets").to_pylist())


def test_batches_made_apart_on_workers_and_recorded_together_equal_one_build(tmp_path):
    subjects = ("red_mug", "blue_box")
    apart = ingested_catalog(tmp_path / "apart", subjects=subjects, per_subject=2)
    whole = ingested_catalog(tmp_path / "whole", subjects=subjects, per_subject=2)
    batches = [make_jointsets(apart.staging(), config(), [name], say=lambda _: None) for name in subjects]
    assert apart.read("jointsets").num_rows == 0  # a worker's batch writes shards, never the table
    report = record_jointsets(apart, batches)
    assert report.made == build_jointsets(whole, config(), say=lambda _: None).made == {"red_mug": 5, "blue_box": 5}
    assert _members(apart) == _members(whole) and len(_members(whole)) == 30

    # New settings (so new set ids): each batch re-plans only its own subject, and the one
    # record drops both subjects' stale sets.
    fewer = [make_jointsets(apart.staging(), config(sets_per_subject=2), [name], say=lambda _: None)
             for name in subjects]
    again = record_jointsets(apart, fewer)
    assert again.removed == 10 and again.made == {"red_mug": 2, "blue_box": 2}
    build_jointsets(whole, config(sets_per_subject=2), say=lambda _: None)
    assert _members(apart) == _members(whole) and len(_members(whole)) == 12


def test_every_member_records_its_provenance_and_can_be_rebuilt_from_it(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=2)
    cfg = config(augment={"background": 1.0})
    build_jointsets(catalog, cfg, say=lambda _: None)
    rows = {(r["set_id"], r["member"]): r for r in catalog.read("jointsets").to_pylist()}
    images = {r["image_id"]: r for r in catalog.read("images").to_pylist()}
    shards = sorted({r["shard"] for r in rows.values()})
    assert len(shards) == 3  # 5 sets of 3 members, at most 7 members (2 sets) per shard

    for joint_set in read_sets(catalog, shards):
        for i, (image, caption) in enumerate(zip(joint_set.images, joint_set.captions)):
            row = rows[(joint_set.set_id, i)]
            assert row["origin"] == "photo" and row["caption"] == caption == "a photo of a mug on a plain background"
            record = json.loads(row["augmentation"])
            augmentation = Augmentation(**{**record, "crop": tuple(record["crop"]),
                                           "background": tuple(map(tuple, record["background"]))})
            photo = images[row["image_id"]]
            rebuilt = apply_augmentation(Image.open(catalog.blob_path(photo["normalised_file"])),
                                         Image.open(catalog.blob_path(photo["mask_file"])), augmentation, 32)
            assert np.array_equal(np.asarray(rebuilt), np.asarray(image))


def test_augmentations_stay_within_their_limits():
    cfg = AugmentConfig(min_crop=0.8, brightness=0.1, hue=0.01, background=0.0, flip=False)
    rng = random.Random(0)
    for _ in range(200):
        a = draw_augmentation(rng, cfg)
        left, top, right, bottom = a.crop
        assert 0 <= left and 0 <= top and right <= 1 and bottom <= 1
        assert right - left >= 0.8 - 1e-3 and abs((right - left) - (bottom - top)) < 1e-3
        assert 0.9 <= a.brightness <= 1.1 and abs(a.hue) <= 0.01 and a.background is None and not a.flip


def test_the_background_outside_the_mask_is_replaced_and_the_subject_kept():
    photo = Image.new("RGB", (32, 32), (255, 255, 255))
    photo.paste((200, 0, 0), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    identity = Augmentation((0.0, 0.0, 1.0, 1.0), False, 1.0, 1.0, 1.0, 0.0, ((0, 0, 255), (0, 0, 255)))
    out = np.asarray(apply_augmentation(photo, mask, identity, 32))
    assert tuple(out[2, 2]) == (0, 0, 255) and tuple(out[16, 16]) == (200, 0, 0)


def test_rebuilds_skip_unchanged_subjects_and_replan_only_a_changed_one(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug", "blue_box"), per_subject=3)
    cfg = config()
    build_jointsets(catalog, cfg, say=lambda _: None)
    before = catalog.read("jointsets")
    again = build_jointsets(catalog, cfg, say=lambda _: None)
    assert sum(again.made.values()) == 0 and again.removed == 0
    assert catalog.read("jointsets").equals(before)

    # A fourth red_mug photo: red_mug's sets are re-planned, blue_box's stay as they were.
    src = photo_set(tmp_path / "more", subjects=("red_mug",), per_subject=4)
    ingest(src, catalog, tiny_config().ingest)
    third = build_jointsets(catalog, cfg, say=lambda _: None)
    assert third.made == {"red_mug": 5, "blue_box": 0} and third.removed == 5
    blue = lambda t: sorted(r["set_id"] for r in t.to_pylist() if r["subject_id"] == "blue_box")  # noqa: E731
    assert blue(catalog.read("jointsets")) == blue(before)
    assert catalog.read("jointsets").num_rows == before.num_rows


def test_shards_are_plain_parquet_with_whole_sets(tmp_path):
    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=3)
    build_jointsets(catalog, config(), say=lambda _: None)
    for shard in {r["shard"] for r in catalog.read("jointsets").to_pylist()}:
        table = pq.read_table(catalog.blob_path(shard))
        counts = collections.Counter(table.column("set_id").to_pylist())
        assert set(counts.values()) == {3}
        assert Image.open(io.BytesIO(table.column("image")[0].as_py())).size == (32, 32)


def test_synthetic_collages_are_split_filtered_and_recorded(tmp_path):
    from subjectflow.jointsets.synthetic import synthetic_planner
    from subjectflow.training.artefacts import open_model

    catalog = ingested_catalog(tmp_path, subjects=("red_mug",), per_subject=2)
    keep_all = tiny_config(jointsets={**SETS, "sets_per_subject": 1,
                                      "synthetic": {"enabled": True, "per_subject": 2, "steps": 2,
                                                    "min_coverage": 0.0, "min_similarity": 0.0}})
    parts, base = open_model(catalog, keep_all)
    report = build_jointsets(catalog, keep_all.jointsets, extra=synthetic_planner(parts, base, keep_all),
                             say=lambda _: None)
    synthetic = [r for r in catalog.read("jointsets").to_pylist() if r["origin"] == "synthetic"]
    assert report.made == {"red_mug": 3} and len(synthetic) == 6 and not report.discarded
    records = [json.loads(r["augmentation"]) for r in synthetic]
    assert {r["panel"] for r in records} == {0, 1, 2} and all(r["image_id"] is None for r in synthetic)
    assert all("collage" in r["prompt"] and r["base_model"] == base for r in records)

    # Unchanged: the accepted collages are reused without drawing them again.
    again = build_jointsets(catalog, keep_all.jointsets, extra=synthetic_planner(parts, base, keep_all),
                            say=lambda _: None)
    assert again.made == {"red_mug": 0} and again.removed == 0

    strict = tiny_config(jointsets={**SETS, "sets_per_subject": 1, "seed": 1,
                                    "synthetic": {"enabled": True, "per_subject": 2, "steps": 2, "min_coverage": 1.0}})
    rejected = build_jointsets(catalog, strict.jointsets, extra=synthetic_planner(parts, base, strict),
                               say=lambda _: None)
    assert rejected.discarded == {"red_mug": 2} and rejected.made == {"red_mug": 1}
