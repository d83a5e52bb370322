from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from subjectflow.catalog import version_catalog
from subjectflow.catalog.schemas import METRICS
from subjectflow.dashboard import DashboardError, build_dashboard, make_thumbnails, save_thumbnails, thumbnails_to_make
from subjectflow.dashboard import site as site_module
from subjectflow.dashboard.plots import line_plot
from subjectflow.dashboard.site import latest_scores, metric_trends, subject_href

from .conftest import ODD_NAME, metric_row

LINK = re.compile(r'(?:href|src)="([^"]*)"')
ALL_IMAGES_LOADED = ("return Array.from(document.images)"
                     ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")


def full_page_screenshot(browser, path: Path) -> bool:
    chrome = browser.execute_script("return window.outerHeight - window.innerHeight")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + chrome)
    return browser.save_screenshot(str(path))


def html_files(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


# -- the pieces ---------------------------------------------------------------------------


def test_metric_trends_average_each_method_per_catalog_version_and_skip_unversioned_rows():
    rows = [metric_row("a", "sft", "dino", 0.2, 1), metric_row("b", "sft", "dino", 0.4, 1),
            metric_row("a", "sft", "dino", 0.5, 2), metric_row("a", "sfo", "dino", 0.9, 2, kind="proxy"),
            metric_row("a", "sft", "clip_t", 0.1, None),
            {**metric_row("a", "jedi", "dino", 0.8, 2), "split": "heldout"},
            {**metric_row("b", "jedi", "dino", 0.6, 2), "split": "in-catalog"}]
    trends = metric_trends(pa.Table.from_pylist(rows, schema=METRICS.schema))
    assert [t.metric for t in trends] == ["dino"]
    assert trends[0].series["sft"] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    assert trends[0].series["sfo"] == [(2, pytest.approx(0.9))]
    # A shared model's scores on subjects it trained on never average into its zero-shot line.
    assert trends[0].series["jedi"] == [(2, pytest.approx(0.8))]
    assert trends[0].series["jedi (in-catalog)"] == [(2, pytest.approx(0.6))]
    assert trends[0].flags == {"sft": [], "sfo": ["proxy"], "jedi": [], "jedi (in-catalog)": []}


def test_latest_scores_use_each_methods_newest_version_and_newest_evaluation():
    old = metric_row("a", "sft", "dino", 0.1, 2)
    newer = {**metric_row("a", "sft", "dino", 0.2, 2), "evaluated_at": old["evaluated_at"] + timedelta(hours=1)}
    rows = [metric_row("a", "sft", "dino", 0.9, 1), newer, old, metric_row("a", "sfo", "dino", 0.7, 1)]
    scores = latest_scores(rows)
    assert scores["sft"]["dino"]["value"] == 0.2
    assert scores["sfo"]["dino"]["value"] == 0.7


def test_line_plot_draws_one_polyline_per_series_and_escapes_labels():
    svg = line_plot("dino", {"sft": [(1, 0.2), (2, 0.4), (3, 0.3)], "<i>x</i>": [(1, 0.5)]})
    assert len(re.findall(r"<polyline", svg)) == 2
    assert re.search(r'data-series="sft" points="(\S+ ){2}\S+"', svg)
    assert "<i>" not in svg and "&lt;i&gt;x&lt;/i&gt;" in svg


def test_subject_pages_get_safe_file_names():
    assert subject_href("teapot") == "subject/teapot.html"
    odd = subject_href(ODD_NAME)
    assert re.fullmatch(r"subject/[a-z0-9._-]+\.html", odd), odd
    assert odd != subject_href(ODD_NAME.upper())


# -- the site on disk ---------------------------------------------------------------------


def test_site_is_self_contained_relative_and_escaped(filled_catalog, tmp_path):
    site = build_dashboard(filled_catalog.catalog, tmp_path / "site", page_size=2)
    assert [p.name for p in site.pages] == ["index.html", "subjects-2.html"]
    assert site.subjects == 3 and len(site.subject_pages) == 3
    for page in html_files(tmp_path / "site"):
        text = page.read_text()
        assert "<script" not in text and ODD_NAME not in text
        for link in LINK.findall(text):
            assert not re.match(r"[a-z]+:|/", link), f"{page.name} links outside the site: {link}"
            assert (page.parent / link).exists(), f"{page.name} links to a missing {link}"
    escaped = "&lt;b&gt;Tom &amp; Jerry&#x27;s&lt;/b&gt; &quot;mug&quot;"
    assert escaped in site.index.read_text()
    assert escaped in (tmp_path / "site" / subject_href("tom_and_jerry")).read_text()


def test_only_scores_from_non_pretrained_scorers_are_flagged(filled_catalog, tmp_path):
    build_dashboard(filled_catalog.catalog, tmp_path / "site")
    flag = "random-test scorer: not a real score"

    def flags(page: str) -> int:
        return (tmp_path / "site" / page).read_text().count(flag)

    assert flags("index.html") == 2  # teapot's headline, and the clip_i trend
    assert flags(subject_href("teapot")) == 1
    assert flags(subject_href("tom_and_jerry")) == 0


def test_a_subject_page_lists_the_weakest_prompts_of_the_latest_evaluation(filled_catalog, tmp_path):
    build_dashboard(filled_catalog.catalog, tmp_path / "site")
    page = (tmp_path / "site" / subject_href("teapot")).read_text()
    weakest = page[page.index("Weakest prompts"):]
    assert weakest.index("in the snow") < weakest.index("on a beach")  # lowest first
    assert "under the sea" not in page  # an older evaluation's prompts are not today's


def test_a_shared_models_score_on_a_subject_it_trained_on_is_badged_in_catalog(filled_catalog, tmp_path):
    build_dashboard(filled_catalog.catalog, tmp_path / "site")
    assert "in-catalog</span>" in (tmp_path / "site" / subject_href("vase")).read_text()
    assert "in-catalog</span>" not in (tmp_path / "site" / subject_href("teapot")).read_text()


def test_missing_and_unreadable_blobs_become_placeholders_and_are_reported(filled_catalog, tmp_path):
    catalog = filled_catalog.catalog
    negative = catalog.read("negatives").to_pylist()[0]["file"]
    catalog.blob_path(negative).write_bytes(b"not an image")
    shard = catalog.read("jointsets").to_pylist()[0]["shard"]
    catalog.blob_path(shard).unlink()

    site = build_dashboard(catalog, tmp_path / "site")

    assert sorted(site.missing) == sorted([
        "blobs/masks/00/gone.png: file missing", f"{negative}: unreadable (UnidentifiedImageError)",
        f"{shard}#set-a/0: file missing", f"{shard}#set-a/1: file missing"])
    assert "image unavailable: file missing" in (tmp_path / "site" / "subject" / "vase.html").read_text()
    teapot = (tmp_path / "site" / "subject" / "teapot.html").read_text()
    assert "image unavailable: unreadable" in teapot and teapot.count("image unavailable: file missing") == 2
    assert "4 image(s) missing or unreadable" in site.index.read_text()


def test_thumbnails_made_elsewhere_in_batches_give_the_same_site_and_the_build_makes_none(
        filled_catalog, tmp_path, monkeypatch):
    catalog = filled_catalog.catalog
    catalog.blob_path(catalog.read("negatives").to_pylist()[0]["file"]).write_bytes(b"not an image")
    here = build_dashboard(catalog, tmp_path / "here")

    keys = thumbnails_to_make(catalog, tmp_path / "there")
    made = tmp_path / "made"
    for start in range(0, len(keys), 3):  # as engine tasks make them, a batch each
        save_thumbnails(made, make_thumbnails(catalog, keys[start:start + 3]))
    monkeypatch.setattr(site_module, "shrink", lambda source: pytest.fail(f"the build made {source} itself"))
    there = build_dashboard(catalog, tmp_path / "there", made=made)

    assert sorted(there.missing) == sorted(here.missing) and len(here.missing) == 2
    assert there.thumbs_written == here.thumbs_written > 5
    for page in here.subject_pages:
        assert (tmp_path / "there" / page.relative_to(tmp_path / "here")).read_text() == page.read_text()
    thumbs = sorted(p.name for p in (tmp_path / "here" / "thumbs").iterdir())
    assert thumbs == sorted(p.name for p in (tmp_path / "there" / "thumbs").iterdir())
    assert all((tmp_path / "there" / "thumbs" / t).read_bytes() == (tmp_path / "here" / "thumbs" / t).read_bytes()
               for t in thumbs)
    # what is left to make for that site: only the sources that cannot be read
    assert set(thumbnails_to_make(catalog, tmp_path / "there")) == {m.split(": ")[0] for m in here.missing}


def test_a_failed_rebuild_leaves_the_previous_site_whole(filled_catalog, tmp_path, monkeypatch):
    out = tmp_path / "site"
    build_dashboard(filled_catalog.catalog, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(site_module.pages, "subject_page", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_dashboard(filled_catalog.catalog, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog", "site"]  # no staging folder left


def test_refuses_to_replace_a_folder_it_did_not_write(filled_catalog, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(DashboardError, match="not a subjectflow dashboard"):
        build_dashboard(filled_catalog.catalog, precious)
    assert (precious / "todo.txt").read_text() == "keep me"


def _files(site: Path) -> dict[str, bytes]:
    return {str(f.relative_to(site)): f.read_bytes() for f in sorted(site.rglob("*")) if f.is_file()}


def test_a_rebuild_keeps_the_pages_nothing_changed_on_and_equals_a_fresh_build(filled_catalog, tmp_path):
    catalog = filled_catalog.catalog
    assert build_dashboard(catalog, tmp_path / "site").pages_reused == 0
    # vase shows a placeholder (its mask blob is lost), so its page is made again each time
    assert build_dashboard(catalog, tmp_path / "site").pages_reused == 2
    with catalog.writer():  # teapot gets a newer score; tom_and_jerry's rows stay as they were
        catalog.upsert("metrics", pa.Table.from_pylist([metric_row("teapot", "sfo", "dino", 0.91, 4)],
                                                       schema=METRICS.schema))
    again = build_dashboard(catalog, tmp_path / "site")
    assert again.pages_reused == 1 and ">0.91<" in (tmp_path / "site" / subject_href("teapot")).read_text()
    build_dashboard(catalog, tmp_path / "fresh")
    assert _files(tmp_path / "site") == _files(tmp_path / "fresh")
    kept = tmp_path / "fresh" / site_module.PAGES_FILE
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "teapot": {"key": 1}, "vase": []}))
    assert build_dashboard(catalog, tmp_path / "fresh").pages_reused == 1  # damaged entries: those pages are made


def test_a_thousand_subjects_build_in_seconds_and_a_rebuild_reuses_thumbnails(bulk_catalog, tmp_path):
    started = time.perf_counter()
    first = build_dashboard(bulk_catalog, tmp_path / "site")
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    again = build_dashboard(bulk_catalog, tmp_path / "site")
    again_s = time.perf_counter() - started
    print(f"1,000 subjects: first build {first_s:.2f}s, rebuild {again_s:.2f}s")

    assert first.subjects == 1000 and len(first.pages) == 20 and first.missing == []
    assert first.thumbs_written == 6000  # a photo thumbnail and a mask for each of 3,000 photos
    assert (again.thumbs_written, again.thumbs_reused, again.pages_reused) == (0, 6000, 1000)
    assert len(list((tmp_path / "site" / "thumbs").iterdir())) == 6000
    assert first_s < 60 and again_s < 60


# -- in a real browser ----------------------------------------------------------------------


def test_the_site_renders_and_navigates_in_headless_chromium(filled_catalog, tmp_path, browser):
    from selenium.webdriver.common.by import By

    version_catalog(filled_catalog.catalog, "dashboard test data")
    site = build_dashboard(filled_catalog.catalog, tmp_path / "site", page_size=2)

    browser.get(site.index.as_uri())
    assert browser.find_element(By.ID, "latest-version").text.startswith("v1 ")
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.subject-link")] == list(filled_catalog.names[:2])
    assert browser.execute_script(ALL_IMAGES_LOADED) == []
    assert browser.find_element(By.XPATH, "//*[text()='random-test scorer: not a real score']").is_displayed()
    failure = browser.find_element(By.CSS_SELECTOR, "#runs .failures")
    assert failure.is_displayed() and filled_catalog.failure in failure.text
    plots = {p.get_attribute("data-metric"): p for p in browser.find_elements(By.CSS_SELECTOR, "#trends figure.trend")}
    assert sorted(plots) == ["clip_i", "clip_t", "dino"]
    # Three versions of sft and sfo; the shared model's score on a subject it saw is its own line.
    for metric, expected in (("dino", {"sfo": 3, "sft": 3, "jedi (in-catalog)": 1}), ("clip_t", {"sfo": 3, "sft": 3})):
        lines = plots[metric].find_elements(By.CSS_SELECTOR, "svg polyline")
        assert {line.get_attribute("data-series"): len(line.get_attribute("points").split()) for line in lines} == expected
        # (A one-point line has no extent; its point is a marker like every other.)
        assert all(line.is_displayed() for line in lines if len(line.get_attribute("points").split()) > 1)
        markers = plots[metric].find_elements(By.CSS_SELECTOR, "svg circle")
        assert len(markers) == sum(expected.values()) and all(m.is_displayed() for m in markers)

    screenshot = tmp_path / "index.png"
    assert full_page_screenshot(browser, screenshot)
    with Image.open(screenshot) as shot:
        assert shot.format == "PNG" and shot.width >= 800
        low, high = shot.convert("L").getextrema()
        assert high - low > 100 and len(shot.convert("L").getcolors(256 * 256) or []) > 20

    browser.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
    assert browser.current_url.endswith("/subjects-2.html")
    assert [a.text for a in browser.find_elements(By.CSS_SELECTOR, "a.subject-link")] == [filled_catalog.names[2]]
    assert browser.execute_script(ALL_IMAGES_LOADED) == []
    browser.find_element(By.CSS_SELECTOR, "a[rel=prev]").click()
    assert browser.current_url.endswith("/index.html")

    browser.find_element(By.LINK_TEXT, "teapot").click()
    assert browser.current_url.endswith("/subject/teapot.html")
    assert browser.find_element(By.TAG_NAME, "h1").text == "teapot"
    assert browser.execute_script(ALL_IMAGES_LOADED) == []
    photos = browser.find_elements(By.CSS_SELECTOR, "#photos figure.photo")
    assert len(photos) == 2 and all(len(p.find_elements(By.TAG_NAME, "img")) == 2 for p in photos)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#negatives img")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#jointsets img")) == 2
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#samples th")]
    assert header == ["prompt", "sfo", "sft"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#samples td img")) == 4
    assert browser.find_element(By.CSS_SELECTOR, "#scores .flag").is_displayed()
    full_page_screenshot(browser, tmp_path / "teapot.png")  # kept beside the test's files for a look

    browser.back()
    browser.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
    browser.find_element(By.LINK_TEXT, "vase").click()
    assert browser.find_element(By.CSS_SELECTOR, "#photos .missing").text == "image unavailable: file missing"
