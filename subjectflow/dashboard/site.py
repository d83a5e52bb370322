"""Build the dashboard: a static site of one catalog, readable offline from disk.

The site is plain files with relative links (index.html, subjects-N.html,
subject/<id>.html, concepts.html once a concept set is learned, thumbs/, style.css), so it
opens from file://, and can be moved or zipped. A build is written into a hidden staging
folder beside `out_dir` and swapped in at the end: a crash leaves the previous site, never
a half-written one.

A subject page is kept from the previous site when nothing it shows changed: its key
hashes the subject's row, its list page, the part files of its bucket in every
per-subject table (named by their bytes), the models table and this package's code.
`PAGES_FILE` records each page's key and thumbnails for the next build.

Thumbnails are named after what they shrink (a blob path, or a shard path plus member;
blobs are content-addressed, so the name pins the pixels) and a rebuild hard-links
them from the previous site instead of decoding every photo again. The ones a build
still has to make (`thumbnails_to_make`) can be made elsewhere first, e.g. spread over an
engine's workers (`make_thumbnails`), and handed to `build_dashboard`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..catalog import TABLES, Catalog, CatalogError, list_versions
from ..catalog.tables import bucket_of
from ..config import stable_hash
from ..training.subjects import scored_as
from . import pages
from .pages import ConceptSet, Entry, Thumb, Trend

THUMBS_DIR = "thumbs"
SUBJECTS_DIR = "subject"
THUMB_PX = 128
THUMB_QUALITY = 85
# Part of every thumbnail's name, so changing how thumbnails are made remakes them all.
THUMB_RECIPE = f"{THUMB_PX}px-jpeg-q{THUMB_QUALITY}"
UNREADABLE = "unreadable.json"  # in a `made` folder: key -> why its source could not be read
MARKER = ".subjectflow-dashboard"  # what lets a rebuild replace the folder safely
PAGES_FILE = ".subjectflow-pages.json"  # subject_id -> its page's key, cover and thumbnails
# Part of every page's key: a change to how pages are made (or to how scores are labelled,
# training/subjects.py) remakes them all.
CODE = stable_hash([(Path(__file__).parent / name).read_text()
                    for name in ("site.py", "pages.py", "plots.py", "../training/subjects.py")])
# Tables whose rows belong to one subject, grouped once so no page scans a whole table.
PER_SUBJECT = ("images", "negatives", "jointsets", "samples", "adapters", "metrics", "prompt_metrics")
SAFE_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
# What an unreadable image or shard raises; anything else (e.g. a full disk while
# writing the site) is a real error and stops the build.
LOAD_ERRORS = (OSError, ValueError, KeyError, pa.ArrowException, Image.DecompressionBombError)


class DashboardError(CatalogError):
    pass


@dataclass(frozen=True)
class DashboardSite:
    index: Path
    pages: list[Path]  # the paged subject list, index.html first
    subject_pages: list[Path]
    subjects: int
    thumbs_written: int
    thumbs_reused: int
    missing: list[str]  # images shown as placeholders, each with the reason
    pages_reused: int = 0  # subject pages kept from the previous site, nothing on them changed


def build_dashboard(catalog: Catalog, out_dir: Path, page_size: int = 50, made: Path | None = None) -> DashboardSite:
    """Write the catalog's dashboard to `out_dir`, replacing an earlier build there.
    `made`: a folder of thumbnails already made (`save_thumbnails`); the build makes the rest."""
    if page_size < 1:
        raise DashboardError(f"page_size must be at least 1, got {page_size}")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not _replaceable(out_dir):
        raise DashboardError(f"{out_dir} exists and is not a subjectflow dashboard; refusing to replace it. "
                             "Pass a new or empty folder, or one an earlier `subjectflow dashboard` wrote")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        thumbs = Thumbnails(catalog, staging, previous=out_dir if out_dir.exists() else None, made=made)
        list_pages, subject_pages, pages_reused = _write_site(catalog, staging, thumbs, page_size)
        _swap(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DashboardSite(
        index=out_dir / list_pages[0],
        pages=[out_dir / p for p in list_pages],
        subject_pages=[out_dir / p for p in subject_pages],
        subjects=len(subject_pages),
        thumbs_written=thumbs.written,
        thumbs_reused=thumbs.reused,
        missing=thumbs.missing,
        pages_reused=pages_reused,
    )


def _replaceable(out_dir: Path) -> bool:
    return out_dir.is_dir() and ((out_dir / MARKER).exists() or not any(out_dir.iterdir()))


def _swap(staging: Path, out_dir: Path) -> None:
    """Put the new site in place; between the two renames no `out_dir` exists, which a
    reader sees as a missing site rather than a mix of two builds."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
    os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


# -- thumbnails ----------------------------------------------------------------------


def shrink(source: Path | bytes) -> bytes:
    """A JPEG at most THUMB_PX on its longer side; transparency goes onto white."""
    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
        image.draft("RGB", (THUMB_PX, THUMB_PX))  # a JPEG then decodes at a fraction of its size
        image.thumbnail((THUMB_PX, THUMB_PX))
        if image.mode not in ("RGB", "L"):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, "white")
            image.paste(rgba, mask=rgba.getchannel("A"))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file missing"
    if isinstance(exc, KeyError):
        return "member missing from its shard"
    return f"unreadable ({type(exc).__name__})"


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _link_or_copy(src: str | Path, dest: str | Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # a filesystem without hard links still gets the file
        shutil.copyfile(src, dest)


class Thumbnails:
    """Makes each thumbnail once per site, unless the previous site or the `made` folder has
    it; unreadable sources become placeholders."""

    def __init__(self, catalog: Catalog, site: Path, previous: Path | None, made: Path | None = None) -> None:
        self.catalog = catalog
        self.site = site
        self.previous = previous
        self.made = made
        self.unreadable = _unreadable(made) if made else {}
        self.written = 0
        self.reused = 0
        self.missing: list[str] = []
        self.used: set[str | None] = set()  # what the page being made shows (None: a placeholder)
        self._made: dict[str, Thumb] = {}
        self._in_site: set[str] = set()
        # Listed once: a stat per thumbnail and folder cost 0.5 s of a 1,000-subject build.
        self._there = {folder: set(_names(folder / THUMBS_DIR)) for folder in (made, previous) if folder}
        (site / THUMBS_DIR).mkdir()

    def blob(self, rel: str) -> Thumb:
        return self._thumb(rel, lambda: self.catalog.blob_path(rel))

    def shard_members(self, shard: str, members: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Thumb]:
        """Thumbnails of joint-set members; the shard is read only if one is not made yet."""
        keys = {m: _member_key(shard, *m) for m in members}
        pixels: dict[tuple[str, int], bytes] = {}
        failure: BaseException | None = None
        if not all(self._ready(key) for key in keys.values()):
            try:
                pixels = _read_shard(self.catalog.blob_path(shard), {set_id for set_id, _ in keys})
            except LOAD_ERRORS as exc:
                failure = exc

        def load(member: tuple[str, int]) -> bytes:
            if failure is not None:
                raise failure
            return pixels[member]

        return {m: self._thumb(key, lambda m=m: load(m)) for m, key in keys.items()}

    @staticmethod
    def _name(key: str) -> str:
        return f"{THUMBS_DIR}/{hashlib.sha256(f'{THUMB_RECIPE}:{key}'.encode()).hexdigest()[:32]}.jpg"

    def _ready(self, key: str) -> bool:
        return key in self._made or key in self.unreadable or self._found(key) is not None

    def _found(self, key: str, name: str | None = None) -> tuple[str, bool] | None:
        """Where a thumbnail made before this build is, and whether it was made for it."""
        name = name or self._name(key)
        for folder, fresh in ((self.made, True), (self.previous, False)):
            if folder is not None and name.removeprefix(f"{THUMBS_DIR}/") in self._there[folder]:
                # os.path, not pathlib: joining 18,000 Paths cost 0.3 s of a 1,000-subject rebuild
                return os.path.join(folder, name), fresh
        return None

    def have(self, names: list[str]) -> bool:
        """Whether the previous site has all these thumbnails."""
        there = self._there.get(self.previous, set()) if self.previous else set()
        return all(name.removeprefix(f"{THUMBS_DIR}/") in there for name in names)

    def reuse(self, names: list[str]) -> None:
        """Link a kept page's thumbnails (`have`) from the previous site."""
        for name in names:
            self._link(os.path.join(self.previous, name), name, fresh=False)

    def _link(self, found: str, name: str, fresh: bool) -> None:
        if name in self._in_site:  # a thumbnail two pages show
            return
        _link_or_copy(found, os.path.join(self.site, name))
        self._in_site.add(name)
        self.written += fresh
        self.reused += not fresh

    def _thumb(self, key: str, load: Callable[[], Path | bytes]) -> Thumb:
        thumb = self._made[key] if key in self._made else self._make(key, load)
        self.used.add(thumb.src)
        return thumb

    def _make(self, key: str, load: Callable[[], Path | bytes]) -> Thumb:
        name = self._name(key)
        found = self._found(key, name)
        if found is not None:
            self._link(found[0], name, fresh=found[1])
            thumb = Thumb(name)
        else:
            made = self.unreadable.get(key) or _shrunk(load)
            if isinstance(made, str):
                thumb = Thumb(None, made)
                self.missing.append(f"{key}: {made}")
            else:
                (self.site / name).write_bytes(made)
                self._in_site.add(name)
                self.written += 1
                thumb = Thumb(name)
        self._made[key] = thumb
        return thumb


# What the pages show, by table: the blob columns, and every joint-set member.
IMAGE_COLUMNS = {"images": ("thumbnail_file", "mask_file"), "negatives": ("file",), "samples": ("file",),
                 "concept_masks": ("file",)}


def thumbnails_to_make(catalog: Catalog, out_dir: Path) -> list[str]:
    """The keys of the thumbnails a build into `out_dir` would make: what the pages show and
    the site there does not have yet."""
    keys = {row[column] for table, columns in IMAGE_COLUMNS.items()
            for row in catalog.read(table).select(list(columns)).to_pylist() for column in columns}
    keys |= {_member_key(r["shard"], r["set_id"], r["member"])
             for r in catalog.read("jointsets").select(["shard", "set_id", "member"]).to_pylist()}
    return sorted(k for k in keys if not (out_dir / Thumbnails._name(k)).exists())


def make_thumbnails(catalog: Catalog, keys: list[str]) -> dict[str, bytes | str]:
    """Each key's thumbnail, or why its source could not be read; a shard is read once."""
    made: dict[str, bytes | str] = {}
    members: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for key in keys:
        shard, _, member = key.partition("#")
        if member:
            set_id, _, index = member.rpartition("/")
            members[shard][key] = (set_id, int(index))
            continue
        made[key] = _shrunk(lambda key=key: catalog.blob_path(key))
    for shard, wanted in members.items():
        try:
            pixels = _read_shard(catalog.blob_path(shard), {set_id for set_id, _ in wanted.values()})
        except LOAD_ERRORS as exc:
            made.update({key: _reason(exc) for key in wanted})
            continue
        made.update({key: _shrunk(lambda member=member: pixels[member]) for key, member in wanted.items()})
    return made


def _shrunk(load: Callable[[], Path | bytes]) -> bytes | str:
    """A thumbnail, or why its source could not be read."""
    try:
        return shrink(load())
    except LOAD_ERRORS as exc:
        return _reason(exc)


def save_thumbnails(folder: Path, made: dict[str, bytes | str]) -> None:
    """Add `make_thumbnails`' output to a `made` folder for `build_dashboard`."""
    (folder / THUMBS_DIR).mkdir(parents=True, exist_ok=True)
    unreadable = {key: why for key, why in made.items() if isinstance(why, str)}
    for key, data in made.items():
        if not isinstance(data, str):
            (folder / Thumbnails._name(key)).write_bytes(data)
    if unreadable:
        (folder / UNREADABLE).write_text(json.dumps(_unreadable(folder) | unreadable))


def _unreadable(folder: Path) -> dict[str, str]:
    path = folder / UNREADABLE
    return json.loads(path.read_text()) if path.exists() else {}


def _member_key(shard: str, set_id: str, member: int) -> str:
    return f"{shard}#{set_id}/{member}"


def _read_shard(path: Path, set_ids: set[str]) -> dict[tuple[str, int], bytes]:
    table = pq.read_table(path, columns=["set_id", "member", "image"])
    wanted = pa.array(sorted(set_ids), table.schema.field("set_id").type)  # string or large_string
    table = table.filter(pc.is_in(table["set_id"], value_set=wanted))
    return {(r["set_id"], r["member"]): r["image"] for r in table.to_pylist()}


# -- the catalog, grouped once ---------------------------------------------------------


def group_by(rows: Iterable[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return groups


def latest_scores(rows: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """method as scored (`scored_as`) -> metric -> row, from each one's newest catalog version; at one
    version a later evaluation replaces an earlier one."""
    def version(row: dict) -> int:
        return -1 if row["catalog_version"] is None else row["catalog_version"]

    rows = sorted(rows, key=lambda r: (version(r), r["evaluated_at"]))
    newest = {scored_as(r): version(r) for r in rows}
    scores: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if version(row) == newest[scored_as(row)]:
            scores[scored_as(row)][row["metric"]] = row
    return dict(scores)


def metric_trends(metrics: pa.Table) -> list[Trend]:
    """Each metric's value averaged per (method, split, catalog version), a shared model's
    in-catalog scores as a line of their own; unversioned rows are left out."""
    versioned = metrics.filter(pc.is_valid(metrics["catalog_version"]))
    grouped = versioned.group_by(["metric", "method", "split", "variant", "catalog_version"]).aggregate(
        [("value", "mean"), ("scorer_kind", "distinct")])
    series: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    flags: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in grouped.to_pylist():
        series[row["metric"]][scored_as(row)].append((row["catalog_version"], row["value_mean"]))
        flags[row["metric"]][scored_as(row)].update(k for k in row["scorer_kind_distinct"] if k != "pretrained")
    return [Trend(metric, {m: sorted(p) for m, p in sorted(series[metric].items())},
                  {m: sorted(k) for m, k in flags[metric].items()}) for metric in sorted(series)]


def subject_href(subject_id: str) -> str:
    """Its page's path; ids that are not plain lowercase file names get a slug plus a
    hash, so the site survives case-insensitive filesystems, zips and URL parsing."""
    if SAFE_ID.fullmatch(subject_id):
        stem = subject_id
    else:
        slug = re.sub(r"[^a-z0-9._-]+", "-", subject_id.lower()).strip("-._")[:60] or "subject"
        stem = f"{slug}-{hashlib.sha256(subject_id.encode()).hexdigest()[:10]}"
    return f"{SUBJECTS_DIR}/{stem}.html"


def list_href(number: int) -> str:
    return "index.html" if number == 1 else f"subjects-{number}.html"


def _write_site(catalog: Catalog, site: Path, thumbs: Thumbnails,
                page_size: int) -> tuple[list[str], list[str], int]:
    # Part files before rows: a commit in between then leaves pages under their old keys,
    # which the next build makes again, never new keys on old rows.
    parts = {name: catalog.parts(name) for name in PER_SUBJECT}
    tables = {name: catalog.read(name) for name in TABLES}
    subjects = sorted(tables["subjects"].to_pylist(), key=lambda r: (r["name"].casefold(), r["subject_id"]))
    hrefs = [list_href(n) for n in range(1, max(1, -(-len(subjects) // page_size)) + 1)]
    list_pages = [hrefs[i // page_size] for i in range(len(subjects))]
    entries, reused = _subject_pages(site, tables, parts, subjects, list_pages, thumbs)

    (site / pages.STYLESHEET).write_text(pages.CSS, encoding="utf-8")
    for number, href in enumerate(hrefs[1:], start=2):
        chunk = entries[(number - 1) * page_size:number * page_size]
        (site / href).write_text(pages.list_page(chunk, len(entries), number, hrefs), encoding="utf-8")
    concept_sets = _concept_sets(tables, thumbs)
    if concept_sets:
        (site / pages.CONCEPTS_PAGE).write_text(pages.concepts_page(concept_sets), encoding="utf-8")
    # The index comes after every other page: its list of placeholders must be complete.
    versions = list_versions(catalog)
    summary = pages.summary(str(catalog.root), versions[0] if versions else None,
                            {name: t.num_rows for name, t in tables.items()}, thumbs.missing)
    runs = sorted(tables["runs"].to_pylist(), key=lambda r: r["started_at"], reverse=True)
    index = pages.index_page(summary, pages.subject_list(entries[:page_size], len(entries), 1, hrefs),
                             metric_trends(tables["metrics"]), runs, concept_sets)
    (site / hrefs[0]).write_text(index, encoding="utf-8")
    (site / MARKER).write_text("written by `subjectflow dashboard`; rebuilding replaces this folder\n")
    return hrefs, [e.href for e in entries], reused


def _subject_pages(site: Path, tables: dict[str, pa.Table], parts: dict[str, dict[str, str] | None],
                   subjects: list[dict], list_pages: list[str], thumbs: Thumbnails) -> tuple[list[Entry], int]:
    """Each subject's page, and its entry in the list; a page nothing on which changed is
    kept from the previous site. Returns the entries and how many pages were kept."""
    page_key, before = _page_keys(parts, tables), _kept_pages(thumbs.previous)
    keys = [page_key(subject, page) for subject, page in zip(subjects, list_pages)]
    kept = {s["subject_id"]: before[s["subject_id"]] for s, key in zip(subjects, keys)
            if key is not None and before.get(s["subject_id"], {}).get("key") == key
            and os.path.exists(os.path.join(thumbs.previous, subject_href(s["subject_id"])))
            and thumbs.have(before[s["subject_id"]]["thumbs"])}
    # Rows only for the pages made again (a third of a 1,000-subject rebuild was turning
    # every row into a dict); a kept page's list entry needs just its scores.
    remade = [s["subject_id"] for s in subjects if s["subject_id"] not in kept]
    by_table = {name: group_by(_rows_of(tables[name], None if name == "metrics" else remade), "subject_id")
                for name in PER_SUBJECT}
    models = {r["model_id"]: r for r in tables["models"].to_pylist()}

    (site / SUBJECTS_DIR).mkdir()
    entries, made = [], {}
    for subject, list_page, key in zip(subjects, list_pages, keys):
        sid = subject["subject_id"]
        rows = {name: groups.get(sid, []) for name, groups in by_table.items()}
        if sid in kept:
            thumbs.reuse(kept[sid]["thumbs"])
            entry = Entry(subject, subject_href(sid), Thumb(*kept[sid]["cover"]), latest_scores(rows["metrics"]))
            _link_or_copy(os.path.join(thumbs.previous, entry.href), os.path.join(site, entry.href))
            made[sid] = kept[sid]
        else:
            thumbs.used = set()
            entry, html = _subject(subject, rows, models, thumbs, list_page)
            (site / entry.href).write_text(html, encoding="utf-8")
            if key is not None and None not in thumbs.used:  # a placeholder is tried again next build
                made[sid] = {"key": key, "cover": [entry.cover.src, entry.cover.note], "thumbs": sorted(thumbs.used)}
        entries.append(entry)
    (site / PAGES_FILE).write_text(json.dumps(made, sort_keys=True), encoding="utf-8")
    return entries, len(kept)


def _rows_of(table: pa.Table, subject_ids: list[str] | None) -> list[dict]:
    if subject_ids is None:
        return table.to_pylist()
    return table.filter(pc.is_in(table["subject_id"], value_set=pa.array(subject_ids, pa.string()))).to_pylist()


def _page_keys(parts: dict[str, dict[str, str] | None],
               tables: dict[str, pa.Table]) -> Callable[[dict, str], str | None]:
    """A subject page's key, from what it shows (see the module's docstring); None for
    every page when a per-subject table is not partitioned by subject on disk. The tables'
    schema versions count too: reading an older part upgrades its rows, same file name."""
    if any(p is None or TABLES[name].partition_by != "subject_id" for name, p in parts.items()):
        return lambda subject, list_page: None
    shared = stable_hash([CODE, tables["models"].to_pylist(), [TABLES[name].version for name in PER_SUBJECT]])

    def key(subject: dict, list_page: str) -> str:
        bucket = bucket_of(subject["subject_id"])
        return stable_hash([shared, subject, list_page, [parts[name].get(bucket) for name in PER_SUBJECT]])
    return key


def _kept_pages(previous: Path | None) -> dict[str, dict]:
    """The previous site's `PAGES_FILE`, its well-formed entries; none from a site that has
    no readable one (a damaged file costs a full rebuild, never the build)."""
    try:
        found = json.loads((previous / PAGES_FILE).read_text(encoding="utf-8")) if previous else {}
    except (OSError, ValueError):
        return {}
    shape = {"key": str, "cover": list, "thumbs": list}
    return {sid: page for sid, page in found.items() if isinstance(page, dict)
            and all(isinstance(page.get(field), kind) for field, kind in shape.items())
            and len(page["cover"]) == 2} if isinstance(found, dict) else {}


def _subject(subject: dict, rows: dict[str, list[dict]], models: dict[str, dict], thumbs: Thumbnails,
             list_page: str) -> tuple[Entry, str]:
    """A subject's page, and its entry in the paged list."""
    photos = [(r, thumbs.blob(r["thumbnail_file"]), thumbs.blob(r["mask_file"]))
              for r in sorted(rows["images"], key=lambda r: r["image_id"])]
    scores = latest_scores(rows["metrics"])
    latest = {row["evaluation_id"] for by_metric in scores.values() for row in by_metric.values()}
    html = pages.subject_page(
        subject, list_page, photos,
        negatives=[(r, thumbs.blob(r["file"])) for r in sorted(rows["negatives"], key=lambda r: r["negative_id"])],
        jointsets=_jointset_thumbs(rows["jointsets"], thumbs),
        samples=[(r, thumbs.blob(r["file"])) for r in rows["samples"]],
        adapters=sorted(rows["adapters"], key=lambda r: (r["method"], r["created_at"])),
        models=_models_used(rows, models),
        scores=scores, prompt_rows=[r for r in rows["prompt_metrics"] if r["evaluation_id"] in latest])
    cover = photos[0][1] if photos else Thumb(None, "no photos")
    return Entry(subject, subject_href(subject["subject_id"]), cover, scores), html


def _concept_sets(tables: dict[str, pa.Table], thumbs: Thumbnails) -> list[ConceptSet]:
    """Every learned concept set, its masks by concept in photo then E-step order."""
    masks = group_by(tables["concept_masks"].to_pylist(), "model_id")
    if not masks:  # then the photos need not be listed (0.4 s at 1,000 subjects)
        return []
    # a concept set is the model its masks belong to: the site need not know the method's name
    models = [(r, json.loads(r["params"])) for r in tables["models"].to_pylist() if r["model_id"] in masks]
    photos = {r["image_id"]: r["thumbnail_file"] for r in tables["images"].to_pylist()}
    made = []
    for model, params in sorted(models, key=lambda m: (m[1]["set"], m[0]["created_at"])):
        rows = sorted(masks.get(model["model_id"], []), key=lambda r: (r["image_id"], r["iteration"]))
        # A photo removed since the set was learned still has its masks to show.
        shown = {i: thumbs.blob(photos[i]) if i in photos else Thumb(None, "photo no longer in the catalog")
                 for i in {r["image_id"] for r in rows}}
        by_concept = {c: [(r, thumbs.blob(r["file"])) for r in group] for c, group in group_by(rows, "concept").items()}
        made.append(ConceptSet(model, params, by_concept, shown))
    return made


def _jointset_thumbs(rows: list[dict], thumbs: Thumbnails) -> dict[str, list[tuple[dict, Thumb]]]:
    made: dict[tuple[str, int], Thumb] = {}
    for shard, members in group_by(rows, "shard").items():
        made.update(thumbs.shard_members(shard, [(r["set_id"], r["member"]) for r in members]))
    sets = group_by(sorted(rows, key=lambda r: (r["set_id"], r["member"])), "set_id")
    return {set_id: [(r, made[(r["set_id"], r["member"])]) for r in members] for set_id, members in sets.items()}


def _models_used(grouped: dict[str, list[dict]], models: dict[str, dict]) -> list[dict]:
    """Shared models this subject's scores and samples came from."""
    refs = {r["model_ref"] for r in grouped["metrics"]} | {r["adapter_id"] for r in grouped["samples"]}
    return sorted((models[ref] for ref in refs if ref in models), key=lambda r: (r["method"], r["created_at"]))
