"""A catalog with a little of everything the dashboard shows, and a headless Chromium."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from subjectflow.catalog import TABLES, Catalog

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
ODD_NAME = '<b>Tom & Jerry\'s</b> "mug"'  # a user's folder name that is also markup


# The dashboard is library code: the suite's Prefect server and torch set-up would only
# cost this folder time (a server start, a torch import), so these autouse fixtures do nothing here.
@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    yield


@pytest.fixture(autouse=True)
def prefect_console_follows_capture():
    yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    yield


def png(colour: tuple[int, int, int], size: int = 24, mode: str = "RGB", tag: int = 0) -> bytes:
    """A flat image whose first pixels spell `tag`, so differently tagged images never share a blob."""
    image = Image.new(mode, (size, size), colour if mode == "RGB" else colour[0])
    for x, byte in enumerate(tag.to_bytes(3, "big")):
        image.putpixel((x, 0), (byte,) * 3 if mode == "RGB" else byte)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def subject_rows(catalog: Catalog, sid: str, name: str, photos: int, seed: int) -> tuple[dict, list[dict]]:
    images = []
    for i in range(photos):
        colour, tag = ((seed * 37) % 256, 80 * i, 120), seed * 8 + i
        images.append({
            "image_id": f"{seed:06d}{i:02d}" + "0" * 56, "subject_id": sid, "source_uri": f"/photos/{name}/{i}.png",
            "format": "PNG", "width": 24, "height": 24,
            # The dashboard shows only thumbnails and masks; leaving the full-size blobs
            # unwritten halves the set-up time of the 1,000-subject catalog.
            "photo_file": f"blobs/photos/unwritten/{tag}.png",
            "normalised_file": f"blobs/normalised/unwritten/{tag}.png",
            "mask_file": catalog.put_blob("masks", png((255 - i * 40,) * 3, mode="L", tag=tag), ".png"),
            "thumbnail_file": catalog.put_blob("thumbnails", png(colour, 16, tag=tag), ".png"),
            "resolution": 24, "fit": "pad", "box": [0, 0, 24, 24], "mask_method": "threshold",
            "mask_coverage": 0.5, "ingested_at": T0,
        })
    subject = {"subject_id": sid, "name": name, "class_name": "object", "n_images": photos,
               "source": "/photos", "updated_at": T0}
    return subject, images


def upsert(catalog: Catalog, name: str, rows: list[dict]) -> None:
    catalog.upsert(name, pa.Table.from_pylist(rows, schema=TABLES[name].schema))


def metric_row(sid: str, method: str, metric: str, value: float, version: int | None, kind: str = "pretrained") -> dict:
    return {"evaluation_id": f"{sid}-{method}-{version}", "subject_id": sid, "method": method, "model_ref": None,
            "base_model": "tiny-sd@1", "metric": metric, "value": value, "prompt_set": "dev@1", "seeds": [0],
            "n_images": 1, "scorer": "dinov2@1" if kind == "pretrained" else "random@0", "scorer_kind": kind,
            "catalog_version": version, "evaluated_at": T0 + timedelta(days=version or 0)}


@dataclass(frozen=True)
class Filled:
    catalog: Catalog
    names: tuple[str, ...]  # subject names in the order the dashboard lists them
    failure: str  # the error text of the failed run


@pytest.fixture
def filled_catalog(catalog: Catalog) -> Filled:
    """Three subjects (one named like markup, one with a missing mask blob), negatives,
    a joint set in a Parquet shard, samples of two methods, three catalog versions of
    metrics with one random-test scorer, and a run history with one failure."""
    with catalog.writer():
        made = [subject_rows(catalog, "teapot", "teapot", 2, 1),
                subject_rows(catalog, "tom_and_jerry", ODD_NAME, 1, 2),
                subject_rows(catalog, "vase", "vase", 1, 3)]
        made[2][1][0]["mask_file"] = "blobs/masks/00/gone.png"  # recorded, but the blob is lost
        upsert(catalog, "subjects", [s for s, _ in made])
        upsert(catalog, "images", [i for _, images in made for i in images])

        teapot_image = made[0][1][0]["image_id"]
        upsert(catalog, "negatives", [{
            "negative_id": "neg1", "image_id": teapot_image, "subject_id": "teapot",
            "file": catalog.put_blob("negatives", png((90, 90, 90)), ".png"), "generator": "sft-img2img",
            "generator_adapter_id": "ad-sft", "base_model": "tiny-sd@1", "prompt": "a photo of a teapot",
            "blur_radius": 4.0, "strength": 0.6, "steps": 2, "guidance": 1.0, "seed": 0, "resolution": 24,
            "created_at": T0}])
        shard = pa.table({"set_id": ["set-a", "set-a"], "member": pa.array([0, 1], pa.int32()),
                          "image": [png((200, 0, 0)), png((0, 200, 0))]})
        buf = io.BytesIO()
        pq.write_table(shard, buf)
        shard_rel = catalog.put_blob("jointsets", buf.getvalue(), ".parquet")
        upsert(catalog, "jointsets", [{
            "set_id": "set-a", "member": m, "set_size": 2, "subject_id": "teapot", "origin": "photo",
            "image_id": teapot_image, "augmentation": "{}", "caption": f"teapot view {m}", "shard": shard_rel,
            "builder": "b1", "created_at": T0} for m in (0, 1)])
        upsert(catalog, "adapters", [{
            "adapter_id": f"ad-{method}", "subject_id": "teapot", "method": method, "base_model": "tiny-sd@1",
            "parent_adapter_id": None, "file": f"blobs/adapters/{method}.safetensors", "params": "{}",
            "inputs_hash": "h", "steps": 2, "final_loss": 0.25, "trained_on_version": 1, "created_at": T0}
            for method in ("sft", "sfo")])
        upsert(catalog, "samples", [{
            "sample_id": f"s-{method}-{p}", "subject_id": "teapot", "adapter_id": f"ad-{method}", "method": method,
            "prompt": prompt, "seed": 0, "steps": 2, "guidance": 1.0, "resolution": 24, "base_model": "tiny-sd@1",
            "file": catalog.put_blob("samples", png((40 * p, 100, 40 if method == "sft" else 220)), ".png"),
            "created_at": T0} for method in ("sft", "sfo") for p, prompt in enumerate(("on a beach", "in snow"))])

        metrics = [metric_row(sid, method, metric, 0.3 + 0.1 * version + (0.05 if method == "sfo" else 0), version)
                   for sid in ("teapot", "tom_and_jerry") for method in ("sft", "sfo")
                   for metric in ("dino", "clip_t") for version in (1, 2, 3)]
        metrics.append(metric_row("teapot", "sfo", "clip_i", 0.123, 3, kind="random-test"))
        metrics.append({**metric_row("vase", "jedi", "dino", 0.61, 3), "split": "in-catalog"})  # the shared model saw vase
        upsert(catalog, "metrics", metrics)
        upsert(catalog, "prompt_metrics", [  # teapot/sfo per prompt: the latest evaluation and an old one
            {"evaluation_id": f"teapot-sfo-{version}", "subject_id": "teapot", "method": "sfo", "metric": "dino",
             "prompt": prompt, "value": value, "n_images": 1}
            for version, prompt, value in ((3, "a {subject} in the snow", 0.11), (3, "a {subject} on a beach", 0.52),
                                           (1, "a {subject} under the sea", 0.01))])

        failure = "CUDA out of memory <while tuning> & gave up"
        upsert(catalog, "runs", [
            {"run_id": "r1", "flow": "refresh", "started_at": T0, "finished_at": T0 + timedelta(minutes=5),
             "status": "completed", "ran": ["ingest", "tune"], "reused": [], "failures": "[]",
             "catalog_version": 1, "summary": "first refresh"},
            {"run_id": "r2", "flow": "tune", "started_at": T0 + timedelta(days=1),
             "finished_at": T0 + timedelta(days=1, minutes=3), "status": "failed", "ran": ["tune:vase"],
             "reused": ["ingest"], "failures": json.dumps([{"item": "vase", "error": failure}]),
             "catalog_version": None, "summary": "tune vase"},
        ])
    return Filled(catalog, (ODD_NAME, "teapot", "vase"), failure)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through its own chromedriver; Selenium Manager never runs
    because both paths are given, so nothing is downloaded."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `make browser` "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def bulk_catalog(tmp_path) -> Catalog:
    """1,000 subjects with three distinct photos (and masks) each; no git/DVC needed."""
    catalog = Catalog.create(tmp_path / "bulk", tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    subjects, images = [], []
    # A throwaway catalog needs no durability, and 6,000 blob fsyncs would be most of
    # this folder's time on a busy machine.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        for n in range(1000):
            subject, rows = subject_rows(catalog, f"subject-{n:04d}", f"Subject {n:04d}", 3, n)
            subjects.append(subject)
            images += rows
    with catalog.writer():
        upsert(catalog, "subjects", subjects)
        upsert(catalog, "images", images)
    return catalog

