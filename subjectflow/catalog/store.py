"""The catalog on disk: Parquet tables plus content-addressed blobs.

Two guarantees the rest of the pipeline leans on:
- a table is replaced atomically (write a hidden temp file, fsync, rename), so a crash
  or kill mid-write leaves yesterday's table, never half of today's; readers never lock;
- writers are serialised by a file lock on the catalog; a second writer waits up to a
  timeout and then fails with a message, it never interleaves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock, Timeout

from .atomic import atomic_write_bytes
from .layout import BLOB_KINDS, BLOBS_DIR, STAGE_DIRS, TABLES_DIR, WORK_DIR
from .schemas import TABLES, VERSION_KEY, TableSpec
from .tables import TableFiles

if TYPE_CHECKING:
    from .blobstore import BlobStore

MANIFEST = "catalog.json"
FORMAT = "subjectflow-catalog"
FORMAT_VERSION = 1
LOCK_FILE = ".lock"
# How long a writer waits for another one; an operational knob of the machine running
# the flows (like PREFECT_* settings), not a parameter of the data, so not in params.yaml.
LOCK_TIMEOUT_ENV = "SUBJECTFLOW_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 600.0


class CatalogError(RuntimeError):
    """A catalog problem the user can fix; the message says how."""


class CatalogNotFound(CatalogError):
    pass


class CatalogBusy(CatalogError):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Catalog:
    """A catalog directory. Open one with `Catalog.open`, make one with `Catalog.create`."""

    root: Path
    manifest: dict = field(default_factory=dict)
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    # A staging copy's rows by table (see `staging`): kept here, read back, never written.
    staged: dict[str, pa.Table] | None = None
    # A staging copy's blob store (blobstore.py), its cache in this process, and the blobs
    # put there, which the flow copies into the catalog folder when it commits the rows.
    store: BlobStore | None = None
    cache: Path | None = None
    made: list[str] = field(default_factory=list)

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, stage_file: Path, params_file: Path) -> "Catalog":
        """Lay out an empty catalog. Idempotent: an existing catalog is opened unchanged."""
        root = root.resolve()
        if (root / MANIFEST).exists():
            return cls.open(root)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": utcnow().isoformat(),
            # Where this catalog's DVC stages and params live, relative to the catalog:
            # inside a project that is the project's own dvc.yaml, else the catalog's.
            "stage_file": os.path.relpath(stage_file.resolve(), root),
            "params_file": os.path.relpath(params_file.resolve(), root),
        }
        catalog = cls(root, manifest)
        catalog.ensure_layout()
        atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return catalog

    @classmethod
    def open(cls, root: Path, lock_timeout_s: float | None = None) -> "Catalog":
        root = Path(root).resolve()
        if lock_timeout_s is None:
            lock_timeout_s = float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise CatalogNotFound(
                f"no catalog at {root} (missing {MANIFEST}); create one with "
                f"`subjectflow init {root}` or pass --catalog PATH"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CatalogError(
                f"{manifest_path} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                f"this subjectflow reads {FORMAT!r} up to v{FORMAT_VERSION}: upgrade subjectflow"
            )
        return cls(root, manifest, lock_timeout_s)

    def ensure_layout(self) -> None:
        """Make every table and blob directory exist, so each is a valid DVC output."""
        for spec in TABLES.values():
            if not self._files(spec.name).exists():
                self.write(spec.name, spec.schema.empty_table())
        for kind in BLOB_KINDS:
            (self.root / BLOBS_DIR / kind).mkdir(parents=True, exist_ok=True)
        for directory in STAGE_DIRS:
            (self.root / directory).mkdir(parents=True, exist_ok=True)

    @property
    def stage_file(self) -> Path:
        return (self.root / self.manifest["stage_file"]).resolve()

    @property
    def params_file(self) -> Path:
        return (self.root / self.manifest["params_file"]).resolve()

    # -- tables --------------------------------------------------------------------

    def table_dir(self, name: str) -> Path:
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; tables are {sorted(TABLES)}")
        return self.root / TABLES_DIR / name

    def _files(self, name: str) -> TableFiles:
        return TableFiles(self.table_dir(name), TABLES[name])

    def read(self, name: str) -> pa.Table:
        table = self._read_files(self._files(name))
        if self.staged and name in self.staged:
            return _with_rows(table, self.staged[name], TABLES[name])
        return table

    def _read_files(self, files: TableFiles, buckets: set[str] | None = None) -> pa.Table:
        spec = files.spec
        try:
            read = files.read(buckets)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CatalogError(f"table {spec.name!r}: cannot read {exc}; restore the catalog's files with "
                               "`dvc checkout`, or re-run the stage that writes the table") from None
        parts = []
        for path, table in read:
            found = int((table.schema.metadata or {}).get(VERSION_KEY, b"0"))
            if 0 < found < spec.version:
                table = _upgrade(table, found, spec, path)
            elif found != spec.version:
                raise CatalogError(
                    f"table {spec.name!r} at {path} has schema version {found}, this subjectflow "
                    f"reads version {spec.version}; use the subjectflow release that wrote it"
                )
            parts.append(table)
        return pa.concat_tables(parts) if parts else spec.schema.empty_table()

    def parts(self, name: str) -> dict[str, str] | None:
        """A partitioned table's part file per bucket (`tables.bucket_of`): a bucket whose rows
        changed has a new one, so comparing them finds what changed without reading rows.
        None when the table is one file on disk, or has rows staged on top."""
        files = self._files(name)
        if (self.staged and name in self.staged) or not files.partitioned:
            return None
        return files.parts()

    def write(self, name: str, table: pa.Table) -> None:
        """Replace a table atomically. Callers that read-modify-write hold `writer()`."""
        if self.staged is not None:
            raise CatalogError(f"table {name!r}: a staging catalog adds rows, it never replaces a table")
        self._files(name).replace(_conformed(table, TABLES[name]))

    def upsert(self, name: str, rows: pa.Table) -> None:
        """Insert `rows`, replacing existing rows with the same key (last one wins). A
        partitioned table reads and rewrites only the buckets the rows fall in."""
        if rows.num_rows == 0:
            return
        spec = TABLES[name]
        rows = rows.select(spec.schema.names).cast(spec.schema)
        if self.staged is not None:
            self.staged[name] = _with_rows(self.staged.get(name, spec.schema.empty_table()), rows, spec)
            return
        files = self._files(name)
        if not files.partitioned:
            self.write(name, _with_rows(self.read(name), rows, spec))
            return
        touched = set(files.buckets(rows))
        merged = _with_rows(self._read_files(files, touched), rows, spec)
        files.replace(_conformed(merged, spec), touched)

    # -- one writer ----------------------------------------------------------------

    def staging(self, store: BlobStore | None = None, cache: Path | None = None) -> "Catalog":
        """This catalog for a worker: table rows are kept in `staged` (and read back) for the
        flow to `commit`, so only the flow ever takes the lock. Blobs and checkpoints go to
        the catalog folder, or with a `store` there and to `cache` (this process's own copy
        by default), so the worker never writes the catalog folder."""
        if store is not None and cache is None:
            from .blobstore import process_cache

            cache = process_cache(store.uri)
        return Catalog(self.root, self.manifest, self.lock_timeout_s, staged={}, store=store, cache=cache)

    def commit(self, batches: list[dict[str, pa.Table]], blobs: list[str] = (), store: BlobStore | None = None) -> None:
        """Staged rows from workers, every table in one locked write, after the blobs they
        put to `store` are in the catalog folder: no committed row names a missing blob."""
        for rel in blobs:
            if not (self.root / rel).exists() and not store.fetch(rel, self.root / rel):
                raise CatalogError(f"{store.uri}/{rel}, made by a worker, is not in the blob store; "
                                   "check that nothing expires or deletes objects there, then re-run")
        merged: dict[str, pa.Table] = {}
        for batch in batches:
            for name, rows in batch.items():
                spec = TABLES[name]
                merged[name] = _with_rows(merged.get(name, spec.schema.empty_table()), rows.cast(spec.schema), spec)
        with self.writer():
            for name, rows in sorted(merged.items()):
                self.upsert(name, rows)

    @contextlib.contextmanager
    def writer(self) -> Iterator["Catalog"]:
        """Hold the catalog's write lock (re-entrant within one process); a staging
        catalog writes nothing, so it takes none."""
        if self.staged is not None:
            yield self
            return
        lock = self._lock()
        try:
            lock.acquire(timeout=self.lock_timeout_s)
        except Timeout:
            raise CatalogBusy(
                f"catalog {self.root} is locked by another writer ({self.root / LOCK_FILE}) "
                f"for over {self.lock_timeout_s:.0f}s; wait for that run to finish, or raise "
                f"{LOCK_TIMEOUT_ENV}"
            ) from None
        try:
            yield self
        finally:
            lock.release()

    def _lock(self) -> FileLock:
        if not hasattr(self, "_file_lock"):
            self._file_lock = FileLock(self.root / LOCK_FILE)
        return self._file_lock

    # -- blobs ---------------------------------------------------------------------

    def put_blob(self, kind: str, data: bytes, suffix: str) -> str:
        """Store bytes once under their sha256; returns the path relative to the catalog."""
        if kind not in BLOB_KINDS:
            raise KeyError(f"unknown blob kind {kind!r}; kinds are {list(BLOB_KINDS)}")
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{BLOBS_DIR}/{kind}/{digest[:2]}/{digest}{suffix}"
        if (self.root / rel).exists():
            return rel
        if self.store is None:
            atomic_write_bytes(self.root / rel, data)
            return rel
        if not (self.cache / rel).exists():  # a copy here was put to (or read from) the store first
            self.store.put(rel, data)
            atomic_write_bytes(self.cache / rel, data)
        # Listed even when another task here put it: that task's rows may never be committed.
        self.made.append(rel)
        return rel

    def blob_path(self, rel: str) -> Path:
        """Where to read a blob: the catalog folder, else (a worker with a store) this
        process's copy, fetched from the store once."""
        path = self.root / rel
        if self.store is None or path.exists():
            return path
        cached = self.cache / rel
        if cached.exists() or self.store.fetch(rel, cached):
            return cached
        return path  # in neither: the reader's error names the catalog's own path

    # -- resumable work ------------------------------------------------------------

    def work_dir(self, *parts: str) -> Path:
        """A resumable job's folder (`work/...`, checkpoints). With a store it is in this
        process's cache, holding what the store kept of it: a task retried here after its
        worker died resumes from the dead worker's last checkpoint."""
        rel = "/".join((WORK_DIR, *parts))
        if self.store is None:
            return self.root / rel
        local = self.cache / rel
        for name in self.store.names(rel):
            if not (local / name).exists():
                self.store.fetch(f"{rel}/{name}", local / name)
        return local

    def keep_work(self, finished: Path) -> None:
        """Mirror a work folder to the store once its sub-folder `finished` (a checkpoint)
        is complete: its files are put, and what the job pruned is deleted. Without a store
        the folder is already where a retry finds it."""
        if self.store is None:
            return
        folder = finished.parent
        rel = folder.relative_to(self.cache).as_posix()
        for path in sorted(p for p in finished.rglob("*") if p.is_file()):
            self.store.put_file(f"{rel}/{path.relative_to(folder).as_posix()}", path)
        pruned = [f"{rel}/{name}" for name in self.store.names(rel) if not (folder / name).exists()]
        if pruned:
            self.store.delete(pruned)


def _conformed(table: pa.Table, spec: TableSpec) -> pa.Table:
    try:
        table = table.select(spec.schema.names).cast(spec.schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise CatalogError(f"rows for table {spec.name!r} do not match its schema: {exc}") from exc
    return table.replace_schema_metadata(spec.schema.metadata)


def _upgrade(table: pa.Table, found: int, spec: TableSpec, path: Path) -> pa.Table:
    """A table written at schema version `found` < current, with the columns added since
    filled with nulls (see TableSpec.added); it is rewritten at the current version by the
    next write."""
    for column, since in spec.added:
        if since > found and column not in table.schema.names:
            field = spec.schema.field(column)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    try:
        table = table.select(spec.schema.names).cast(spec.schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise CatalogError(f"table {spec.name!r} at {path} has schema version {found} and cannot be read "
                           f"as version {spec.version}: {exc}") from exc
    return table.replace_schema_metadata(spec.schema.metadata)


def _with_rows(existing: pa.Table, rows: pa.Table, spec: TableSpec) -> pa.Table:
    """`existing` with `rows` added, replacing rows of the same key (last one wins)."""
    if existing.num_rows:
        keep = pc.invert(pc.is_in(_row_keys(existing, spec), value_set=_row_keys(rows, spec)))
        existing = existing.filter(keep)
    return pa.concat_tables([existing, rows])


def _row_keys(table: pa.Table, spec: TableSpec) -> pa.Array:
    if len(spec.key) == 1:
        return table.column(spec.key[0]).combine_chunks()
    # Composite keys compare as one joined string; \x1f never occurs in our key values.
    return pc.binary_join_element_wise(*[pc.cast(table.column(k), pa.string()) for k in spec.key], "\x1f")
