"""How a table lies on disk: one Parquet file, or partitions under a manifest.

The tables that grow with the catalog (`TableSpec.partition_by`) keep their rows in up to
PARTITIONS buckets by a hash of that column, one part file per bucket, named by the hash
of its bytes and listed in the table's `_manifest.json`. An upsert reads and rewrites only
the buckets its rows fall in: a stage committing 32 subjects' metrics at 10,000 subjects
rewrites about 12% of the table, not all of it, and DVC, which hashes and pushes per file,
sees only the new parts. Parts are write-once and the manifest is replaced last and
atomically, so a crash leaves the previous table whole; the next write removes the parts
no manifest lists. A table written before partitioning (one `data.parquet`) is read as it
is and partitioned by its next write.

Because a part's name is its content hash, a process keeps the parts it read or wrote in
memory (PART_CACHE_BYTES) and reads the rest in parallel: a planner reads the same tables
many times, and after the first read only the manifest is opened again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_write_bytes, fsync_dir
from .layout import TABLE_FILE
from .schemas import TableSpec

BUCKET_DIGITS = 2  # hex digits of the hash that name a bucket
PARTITIONS = 16**BUCKET_DIGITS  # 256: enough that one batch touches few, few enough to read fast
PART_MANIFEST = "_manifest.json"  # "_": pyarrow.dataset and Spark skip it, and read the parts as one table
NULL_BUCKET = "none"  # rows whose partition column is null (e.g. base-model samples)
EMPTY = "empty"  # never a bucket of rows: the one part of a table without any
PART_CACHE_BYTES = 512 * 2**20
READERS = 8  # parallel part reads (pyarrow releases the GIL while decoding)


def bucket_of(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:BUCKET_DIGITS]


class TableFiles:
    """The files of one table: which to read, and how to replace them."""

    def __init__(self, directory: Path, spec: TableSpec) -> None:
        self.directory, self.spec = directory, spec

    @property
    def manifest(self) -> Path:
        return self.directory / PART_MANIFEST

    @property
    def single(self) -> Path:
        return self.directory / TABLE_FILE

    @property
    def partitioned(self) -> bool:
        """Whether the files on disk are partitions (a partitioned spec's table written
        before partitioning still is one file until its next write)."""
        return self.manifest.exists()

    def exists(self) -> bool:
        return self.manifest.exists() or self.single.exists()

    def paths(self, buckets: set[str] | None = None) -> list[Path]:
        """The files holding the table (only those of `buckets`, when partitioned)."""
        if self.partitioned:
            parts = self.parts()
            return [self.directory / name for bucket, name in sorted(parts.items())
                    if buckets is None or bucket in buckets]
        return [self.single] if self.single.exists() else []

    def read(self, buckets: set[str] | None = None) -> list[tuple[Path, pa.Table]]:
        """Each file of the table (of `buckets`) with its rows, as written."""
        paths = self.paths(buckets)
        if len(paths) <= 1:
            return [(path, _read_part(path)) for path in paths]
        with ThreadPoolExecutor(min(READERS, len(paths))) as pool:
            return list(zip(paths, pool.map(_read_part, paths)))

    def buckets(self, table: pa.Table) -> dict[str, pa.Table]:
        """`table`'s rows by bucket, in their order within each."""
        if table.num_rows == 0:
            return {}
        encoded = pc.dictionary_encode(table.column(self.spec.partition_by).combine_chunks())
        names = pa.array([bucket_of(v) for v in encoded.dictionary.to_pylist()] + [NULL_BUCKET])
        per_row = pc.take(names, pc.fill_null(encoded.indices, len(names) - 1))
        order = pc.sort_indices(per_row)  # stable: rows keep their order within a bucket
        split, start = {}, 0
        for entry in pc.value_counts(per_row.take(order)).to_pylist():
            # a take, not a slice: each bucket owns its buffers, so a cached one holds only itself
            split[entry["values"]] = table.take(order.slice(start, entry["counts"]))
            start += entry["counts"]
        return split

    def replace(self, table: pa.Table, buckets: set[str] | None = None) -> None:
        """Make `table` the table's content, or with `buckets` the content of just those
        buckets (its rows must all fall in them)."""
        if not self.spec.partition_by:
            atomic_write_bytes(self.single, _parquet_bytes(table))
            return
        parts = self.parts() if buckets is not None else {}
        for bucket in buckets or ():
            parts.pop(bucket, None)
        for bucket, rows in self.buckets(table).items():
            parts[bucket] = self._put_part(bucket, rows)
        if not parts:  # one empty part, so readers of the folder still find the schema
            parts[EMPTY] = self._put_part(EMPTY, table.schema.empty_table())
        elif len(parts) > 1:
            parts.pop(EMPTY, None)
        fsync_dir(self.directory)
        listing = {"partition_by": self.spec.partition_by, "parts": dict(sorted(parts.items()))}
        atomic_write_bytes(self.manifest, (json.dumps(listing, indent=1) + "\n").encode())
        for stale in [self.single, *self.directory.glob("part-*.parquet")]:
            if stale.name not in parts.values():
                stale.unlink(missing_ok=True)

    def _put_part(self, bucket: str, rows: pa.Table) -> str:
        data = _parquet_bytes(rows)
        name = f"part-{bucket}-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        if not (self.directory / name).exists():  # an unchanged bucket keeps its file
            atomic_write_bytes(self.directory / name, data, sync_dir=False)  # synced once, before the manifest
        _PARTS.put(self.directory / name, rows)
        return name

    def parts(self) -> dict[str, str]:
        """bucket -> its part file, named by the hash of its bytes."""
        return json.loads(self.manifest.read_text())["parts"]


class _PartCache:
    """Parts by path, newest used last, within PART_CACHE_BYTES."""

    def __init__(self) -> None:
        self._tables: OrderedDict[Path, tuple[pa.Table, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: Path) -> pa.Table | None:
        with self._lock:
            if path not in self._tables:
                return None
            self._tables.move_to_end(path)
            return self._tables[path][0]

    def put(self, path: Path, table: pa.Table) -> None:
        size = table.get_total_buffer_size()  # of the slice's buffers; nbytes walks every chunk's rows
        with self._lock:
            if path in self._tables:
                self._bytes -= self._tables.pop(path)[1]
            self._tables[path] = (table, size)
            self._bytes += size
            while self._bytes > PART_CACHE_BYTES and self._tables:
                self._bytes -= self._tables.popitem(last=False)[1][1]


_PARTS = _PartCache()


def _read_part(path: Path) -> pa.Table:
    if not path.name.startswith("part-"):  # a single file is replaced in place: never cached
        return pq.read_table(path)
    table = _PARTS.get(path)
    if table is None:
        table = pq.read_table(path, use_threads=False)
        _PARTS.put(path, table)
    return table


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
