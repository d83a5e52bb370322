"""Ingest as three plain steps: plan what changed, process those photos, record the result.

    listing = list_source(source)                      # source.py
    plan = plan_ingest(listing, catalog, settings)     # the ledger says what is unchanged
    outcomes = process_photos(plan.todo, ...)          # decode, normalise, mask, store blobs
    report = record_ingest(catalog, listing, plan, outcomes, ...)   # tables, accounting

Processing is the only expensive step; it runs in worker processes and writes only
content-addressed blobs (safe to repeat), so the tables change in one locked step at the end.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import multiprocessing
import os
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
from PIL import Image

from ..catalog import Catalog
from ..catalog.blobstore import BlobStore
from ..catalog.schemas import IMAGES, QUARANTINE, SOURCE_FILES, SUBJECTS
from ..catalog.store import utcnow
from ..config import IngestConfig
from .masks import subject_mask
from .photo import PhotoRejected, encode_jpeg, encode_png, normalise
from .source import Listing, SourceFile, read_bytes

Outcome = Literal["ingested", "duplicate", "quarantined"]


@dataclass(frozen=True)
class PhotoResult:
    file: SourceFile
    sha256: str | None
    reason: str | None  # set when the photo was rejected
    image: dict | None  # an `images` row when it was not
    retry: bool = False  # unreadable for now (I/O), not bad: do not remember the verdict

    def blob_paths(self) -> list[str]:
        if self.image is None:
            return []
        return [self.image[k] for k in ("photo_file", "normalised_file", "mask_file", "thumbnail_file")]


@dataclass
class IngestPlan:
    todo: list[SourceFile]
    unchanged: dict[str, dict]  # source_uri -> its ledger row, for files already handled


@dataclass
class IngestReport:
    source: str
    seen: int = 0
    ingested_new: int = 0
    ingested_before: int = 0
    duplicates: int = 0
    quarantined: int = 0
    ignored: int = 0
    subjects: int = 0
    new_quarantine: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    new_duplicates: list[tuple[str, str]] = field(default_factory=list)  # (uri, image_id)
    changed: bool = False

    @property
    def ingested(self) -> int:
        return self.ingested_new + self.ingested_before

    @property
    def balanced(self) -> bool:
        return self.ingested + self.duplicates + self.quarantined + self.ignored == self.seen

    def summary(self) -> str:
        lines = [
            f"ingest {self.source}: {self.seen} files seen = {self.ingested} ingested "
            f"({self.ingested_new} new, {self.ingested_before} already in the catalog) + "
            f"{self.duplicates} duplicates + {self.quarantined} quarantined + {self.ignored} ignored; "
            f"{self.subjects} subjects"
        ]
        lines += [f"  quarantined {uri}: {reason}" for uri, reason in self.new_quarantine]
        lines += [f"  duplicate   {uri}: same bytes as image {image_id[:12]}" for uri, image_id in self.new_duplicates]
        return "\n".join(lines)


# -- plan --------------------------------------------------------------------------

def plan_ingest(listing: Listing, catalog: Catalog, settings: str) -> IngestPlan:
    ledger = {row["source_uri"]: row for row in catalog.read(SOURCE_FILES.name).to_pylist()}
    todo, unchanged = [], {}
    for photo in listing.photos:
        row = ledger.get(photo.uri)
        if row and row["fingerprint"] == photo.fingerprint and row["settings"] == settings:
            unchanged[photo.uri] = row
        else:
            todo.append(photo)
    return IngestPlan(todo, unchanged)


# -- process -----------------------------------------------------------------------

def process_photo(photo: SourceFile, catalog_root: Path, config: IngestConfig, store: str = "") -> PhotoResult:
    """Everything one photo needs, start to finish. Runs in a worker process; its blobs go
    to the catalog folder, or to the engine workers' blob `store` (execution.blob_store)."""
    try:
        data = read_bytes(photo.uri)
    except Exception as exc:  # noqa: BLE001 - any read failure is reported, never fatal
        return PhotoResult(photo, None, f"unreadable: {type(exc).__name__}: {exc}", None, retry=True)
    sha = hashlib.sha256(data).hexdigest()
    if len(data) > config.max_file_mb * 1e6:
        return PhotoResult(photo, sha, f"file too large: {len(data) / 1e6:.1f} MB exceeds ingest.max_file_mb ({config.max_file_mb} MB)", None)
    try:
        photo_out = normalise(data, photo.suffix, config.resolution, config.fit, config.max_pixels)
    except PhotoRejected as exc:
        return PhotoResult(photo, sha, str(exc), None)
    except MemoryError:
        return PhotoResult(photo, sha, "image too large to decode in memory; lower its size or ingest.max_pixels", None)

    catalog = Catalog(catalog_root).staging(BlobStore(store)) if store else Catalog(catalog_root)
    mask, coverage = subject_mask(photo_out.image, config.mask)
    thumbnail = photo_out.image.resize((config.thumbnail_side,) * 2, Image.Resampling.BICUBIC)
    image = {
        "image_id": sha,
        "subject_id": subject_id(photo.subject),
        "source_uri": photo.uri,
        "format": photo_out.format,
        "width": photo_out.width,
        "height": photo_out.height,
        "photo_file": catalog.put_blob("photos", data, photo.suffix or ".img"),
        "normalised_file": catalog.put_blob("normalised", encode_jpeg(photo_out.image, 95), ".jpg"),
        "mask_file": catalog.put_blob("masks", encode_png(mask), ".png"),
        "thumbnail_file": catalog.put_blob("thumbnails", encode_jpeg(thumbnail, 85), ".jpg"),
        "resolution": config.resolution,
        "fit": config.fit,
        "box": list(photo_out.box),
        "mask_method": config.mask.method,
        "mask_coverage": coverage,
    }
    return PhotoResult(photo, sha, None, image)


def subject_id(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _worker_count(config: IngestConfig) -> int:
    return config.workers or os.cpu_count() or 1


@functools.lru_cache(maxsize=2)
def worker_pool(workers: int) -> Executor:
    """One pool per process, reused across batches. Spawned, not forked: the parent
    runs Prefect's threads and event loop, which a fork would copy mid-flight."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    atexit.register(pool.shutdown, cancel_futures=True)
    return pool


def process_photos(photos: list[SourceFile], catalog_root: Path, config: IngestConfig,
                   store: str = "") -> Iterator[PhotoResult]:
    """Yield results in input order, in worker processes when there is more than one."""
    work = functools.partial(process_photo, catalog_root=catalog_root, config=config, store=store)
    workers = min(_worker_count(config), len(photos))
    if workers <= 1:
        yield from map(work, photos)
    else:
        yield from worker_pool(_worker_count(config)).map(work, photos, chunksize=2)


# -- record ------------------------------------------------------------------------

def _table(spec, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=spec.schema)


def record_ingest(
    catalog: Catalog, listing: Listing, plan: IngestPlan, results: Iterable[PhotoResult], settings: str
) -> IngestReport:
    """Write the run into the tables in one locked step and account for every file."""
    now = utcnow()
    report = IngestReport(listing.source, seen=listing.seen, ignored=len(listing.ignored))
    with catalog.writer():
        existing = catalog.read(IMAGES.name)
        owner_of = dict(zip(existing.column("image_id").to_pylist(), existing.column("source_uri").to_pylist()))
        taken_now: set[str] = set()
        images, quarantine, ledger = [], [], []

        # A file still failing the same way (a dangling link retried nightly) is old news:
        # re-recording it would mint a new catalog version every run.
        known_verdicts = {(q["source_uri"], q["fingerprint"], q["reason"])
                          for q in catalog.read(QUARANTINE.name).to_pylist()}

        def quarantine_row(uri, subject, reason, sha=None, size=None):
            fingerprint = fingerprints.get(uri, "")
            if (uri, fingerprint, reason) in known_verdicts:
                return
            quarantine.append({"source_uri": uri, "fingerprint": fingerprint, "subject": subject,
                               "reason": reason, "sha256": sha, "size_bytes": size, "detected_at": now})
            report.new_quarantine.append((uri, reason))

        fingerprints = {p.uri: p.fingerprint for p in listing.photos}
        for uri, subject, reason in listing.rejected:
            quarantine_row(uri, subject, reason)
        report.quarantined += len(listing.rejected)

        for row in plan.unchanged.values():
            outcome = row["outcome"]
            if outcome == "ingested":
                report.ingested_before += 1
            elif outcome == "duplicate":
                report.duplicates += 1
            else:
                report.quarantined += 1

        for result in results:
            photo = result.file
            ledger_row = {"source_uri": photo.uri, "fingerprint": photo.fingerprint, "settings": settings,
                          "sha256": result.sha256, "image_id": None, "detail": None, "seen_at": now}
            if result.image is None:
                quarantine_row(photo.uri, photo.subject, result.reason, result.sha256, photo.size)
                report.quarantined += 1
                if not result.retry:
                    ledger.append({**ledger_row, "outcome": "quarantined", "detail": result.reason})
                continue
            image_id = result.sha256
            # The same bytes from the same file (touched, or new settings) are re-derived;
            # the same bytes under another name are a duplicate of the first.
            if image_id not in taken_now and owner_of.get(image_id, photo.uri) == photo.uri:
                taken_now.add(image_id)
                images.append({**result.image, "ingested_at": now})
                ledger.append({**ledger_row, "outcome": "ingested", "image_id": image_id})
                if image_id in owner_of:
                    report.ingested_before += 1
                else:
                    report.ingested_new += 1
            else:
                ledger.append({**ledger_row, "outcome": "duplicate", "image_id": image_id,
                               "detail": f"same bytes as image {image_id}"})
                report.new_duplicates.append((photo.uri, image_id))
                report.duplicates += 1

        catalog.upsert(IMAGES.name, _table(IMAGES, images))
        catalog.upsert(QUARANTINE.name, _table(QUARANTINE, quarantine))
        catalog.upsert(SOURCE_FILES.name, _table(SOURCE_FILES, ledger))
        _refresh_subjects(catalog, listing, now)
        report.subjects = catalog.read(SUBJECTS.name).num_rows
    report.changed = bool(images or quarantine or ledger)
    return report


def _refresh_subjects(catalog: Catalog, listing: Listing, now) -> None:
    images = catalog.read(IMAGES.name)
    counts = Counter(images.column("subject_id").to_pylist())
    rows = [
        {"subject_id": subject_id(name), "name": name, "class_name": class_name,
         "n_images": counts.get(subject_id(name), 0), "source": listing.source, "updated_at": now}
        for name, class_name in listing.classes.items()
    ]
    existing = catalog.read(SUBJECTS.name)
    if existing.num_rows:
        # Only rewrite subjects whose count or class changed, so updated_at means something.
        old = {r["subject_id"]: r for r in existing.to_pylist()}
        rows = [r for r in rows if (o := old.get(r["subject_id"])) is None
                or (o["n_images"], o["class_name"]) != (r["n_images"], r["class_name"])]
    catalog.upsert(SUBJECTS.name, _table(SUBJECTS, rows))



def with_blobs_present(results: list[PhotoResult], catalog_root: Path, config: IngestConfig,
                       store: str = "") -> list[PhotoResult]:
    """Results whose blobs are all on disk, copied in from the engine workers' blob `store`
    (execution.blob_store) or else re-processed.

    Cached results (e.g. from Prefect's task cache) outlive the files they point at
    when a catalog is checked out at an older version; never record a dangling path.
    """
    blobs = BlobStore(store) if store else None

    def present(result: PhotoResult) -> bool:
        missing = [p for p in result.blob_paths() if not (catalog_root / p).exists()]
        return all(blobs is not None and blobs.fetch(p, catalog_root / p) for p in missing)

    return [r if present(r) else next(process_photos([r.file], catalog_root, config)) for r in results]
