"""The concepts page: a learned set's EM masks, a strip per concept, linked from the index."""

from __future__ import annotations

import re
from html import escape

import pyarrow as pa
import pytest

from subjectflow.catalog import TABLES
from subjectflow.dashboard import build_dashboard
from subjectflow.methods import registry
from tests.training.conftest import context, ingested_catalog, tiny_config

CONCEPTS = {"steps": 4, "e_step_every": 2, "learning_rate": 1e-2, "refine": "otsu"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """This test trains the tiny model, which the dashboard folder's no-op fixture assumes
    nothing does: two cores' worth of OpenMP threads only slow it down."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_concept_gets_a_strip_of_its_masks_per_photo_and_e_step(tmp_path):
    catalog = ingested_catalog(tmp_path, per_subject=2)
    box = next(r["image_id"] for r in catalog.read("images").to_pylist() if r["subject_id"] == "blue_box")
    registry.learn(context(catalog, tiny_config(concepts=CONCEPTS)), "scene",
                   ["subject:red_mug", f"image:{box[:10]}:background=beach"])
    masks = catalog.read("concept_masks").to_pylist()
    # The tiny photos are not the demo's drawn ones, so no mask has an exact IoU: give one one.
    masks[-1]["iou_exact"] = 0.5
    with catalog.writer():
        catalog.upsert("concept_masks", pa.Table.from_pylist(masks[-1:], schema=TABLES["concept_masks"].schema))

    build_dashboard(catalog, tmp_path / "site")
    site = tmp_path / "site"
    assert 'href="concepts.html#set-' in (site / "index.html").read_text()
    page = (site / "concepts.html").read_text()
    strips = dict(re.findall(
        r'<div class="concept" data-concept="([^"]+)">(.*?)</div>(?=<div class="concept"|</section>)', page))
    assert sorted(strips) == [escape("<beach>"), escape("<red_mug>")]
    for token, photos in (("<red_mug>", 2), ("<beach>", 1)):
        strip = strips[escape(token)]
        rows = [r for r in masks if r["concept"] == token]
        assert len(rows) == photos * 3  # the initial masks, then E-steps after steps 2 and 4
        assert strip.count("mask, iteration") == len(rows)
        for r in rows:
            assert f"it {r['iteration']} &middot; step {r['step']}<br>IoU {r['iou_ingest']:.3g}" in strip
    assert page.count("&middot; exact 0.5<") == 1
    images = re.findall(r'src="([^"]+)"', page)
    assert len(images) == len(masks) + 3  # and each of the three photos once
    assert all((site / src).is_file() for src in images)
