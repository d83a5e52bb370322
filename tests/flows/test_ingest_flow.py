"""The real flows under the Prefect test harness, against a real S3 endpoint and real DVC."""

import subprocess
import sys

import boto3
import pytest

from flows.ingest import ingest_flow
from subjectflow.catalog import Catalog, init_catalog, list_versions
from subjectflow.config import load_config
from tests.photos import encode, photo_set, product

FAST = {"ingest": {"workers": 1, "resolution": 64, "thumbnail_size": 32, "mask": {"size": 32}}}


def upload_tree(bucket: str, prefix: str, root) -> int:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    return len(files)


def test_ingest_from_s3_pushes_to_a_dvc_remote_and_a_fresh_clone_pulls_identical_tables(s3_endpoint, tmp_path):
    source = photo_set(tmp_path / "src", subjects=("red_mug", "blue_box", "teapot"), per_subject=2)
    (source / "teapot" / "broken.jpg").write_bytes(encode(product())[:300])
    (source / "teapot" / ".DS_Store").write_bytes(b"junk")
    assert upload_tree("photos", "sets/2026", source) == 8
    boto3.client("s3").create_bucket(Bucket="dvc-store")

    catalog = init_catalog(tmp_path / "catalog", load_config(overrides=FAST), remote="s3://dvc-store/catalog")
    run = ingest_flow("s3://photos/sets/2026", str(catalog.root), load_config(overrides=FAST))

    report = run.report
    assert report.balanced and (report.seen, report.ingested, report.quarantined, report.ignored) == (8, 6, 1, 1)
    assert run.version.number == 1
    assert {r["source_uri"] for r in catalog.read("images").to_pylist()} == {
        f"s3://photos/sets/2026/{s}/{i:02d}.jpg" for s in ("red_mug", "blue_box", "teapot") for i in range(2)}
    pushed = boto3.client("s3").list_objects_v2(Bucket="dvc-store", Prefix="catalog/")
    assert pushed["KeyCount"] >= 6 * 4  # every blob of every photo is on the remote

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(catalog.root), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone, check=True)
    for name in ("subjects", "images", "quarantine", "source_files"):
        assert Catalog.open(clone).read(name).equals(catalog.read(name)), name
    for row in Catalog.open(clone).read("images").to_pylist():
        assert (clone / row["mask_file"]).read_bytes() == (catalog.root / row["mask_file"]).read_bytes()


def test_rerunning_the_flow_on_an_unchanged_source_records_no_new_version(tmp_path):
    source = photo_set(tmp_path / "src")
    catalog = init_catalog(tmp_path / "catalog", load_config(overrides=FAST))
    first = ingest_flow(str(source), str(catalog.root), load_config(overrides=FAST))
    second = ingest_flow(str(source), str(catalog.root), load_config(overrides=FAST))
    assert first.version.number == 1 and second.version is None
    assert second.report.ingested_before == 6 and len(list_versions(catalog)) == 1


def test_an_unreachable_bucket_fails_with_advice(s3_endpoint, tmp_path):
    from subjectflow.ingest import SourceError

    catalog = init_catalog(tmp_path / "catalog", load_config(overrides=FAST))
    with pytest.raises(SourceError, match="does not exist"):
        ingest_flow("s3://no-such-bucket/x", str(catalog.root), load_config(overrides=FAST))


def test_dreambench_photo_sets_ingest_cleanly(dreambench, tmp_path):
    catalog = init_catalog(tmp_path / "catalog", load_config(overrides=FAST))
    run = ingest_flow(str(dreambench), str(catalog.root), load_config(overrides={"ingest": {"resolution": 128, "thumbnail_size": 64}}))
    photos = sorted(p for p in dreambench.glob("*/*.jpg"))
    assert run.report.balanced and run.report.quarantined == 0
    assert run.report.ingested == len(photos) and run.report.subjects == 10
    images = catalog.read("images").to_pylist()
    sneakers = [r for r in images if r["subject_id"] == "colorful_sneaker"]
    assert sneakers and all(max(r["width"], r["height"]) == 2048 for r in sneakers)
    coverages = sorted(r["mask_coverage"] for r in images)
    assert coverages[len(coverages) // 2] > 0.1  # GrabCut finds a product in a typical photo
    classes = {r["subject_id"]: r["class_name"] for r in catalog.read("subjects").to_pylist()}
    assert classes["colorful_sneaker"] == "sneaker" and classes["duck_toy"] == "toy"  # prompts_and_classes.txt
