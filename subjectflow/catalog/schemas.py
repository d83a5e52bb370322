"""Every catalog table's explicit pyarrow schema, each stamped with its schema version.

A table name is defined here once; paths, DVC stage outputs and readers all derive
from `TABLES`. Bump a table's version whenever its columns change meaning or type.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
VERSION_KEY = b"subjectflow.schema_version"
NAME_KEY = b"subjectflow.table"


@dataclass(frozen=True)
class TableSpec:
    name: str
    version: int
    key: tuple[str, ...]  # columns that identify a row; upserts replace on these
    fields: tuple[pa.Field, ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            list(self.fields),
            metadata={VERSION_KEY: str(self.version).encode(), NAME_KEY: self.name.encode()},
        )


SUBJECTS = TableSpec(
    "subjects",
    version=1,
    key=("subject_id",),
    fields=(
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ),
)

IMAGES = TableSpec(
    "images",
    version=1,
    key=("image_id",),
    fields=(
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the original bytes
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),  # after EXIF orientation
        pa.field("height", pa.int32(), nullable=False),
        pa.field("photo_file", pa.string(), nullable=False),  # original bytes, untouched
        pa.field("normalised_file", pa.string(), nullable=False),
        pa.field("mask_file", pa.string(), nullable=False),
        pa.field("thumbnail_file", pa.string(), nullable=False),
        pa.field("resolution", pa.int32(), nullable=False),
        pa.field("fit", pa.string(), nullable=False),
        # Region of the oriented original mapped onto the square training copy, as
        # (left, top, right, bottom) pixels; it reaches outside the photo when padded.
        pa.field("box", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("mask_method", pa.string(), nullable=False),
        pa.field("mask_coverage", pa.float32(), nullable=False),
        pa.field("ingested_at", TIMESTAMP, nullable=False),
    ),
)

QUARANTINE = TableSpec(
    "quarantine",
    version=1,
    key=("source_uri", "fingerprint"),
    fields=(
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=True),  # null when the bytes were unreadable
        pa.field("size_bytes", pa.int64(), nullable=True),
        pa.field("detected_at", TIMESTAMP, nullable=False),
    ),
)

# The ingest ledger: what became of every source file, so an unchanged source is
# recognised from its listing alone (size + mtime/ETag) without reading a byte.
SOURCE_FILES = TableSpec(
    "source_files",
    version=1,
    key=("source_uri",),
    fields=(
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("settings", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # ingested | duplicate | quarantined
        pa.field("detail", pa.string(), nullable=True),
        pa.field("sha256", pa.string(), nullable=True),
        pa.field("image_id", pa.string(), nullable=True),
        pa.field("seen_at", TIMESTAMP, nullable=False),
    ),
)

TABLES: dict[str, TableSpec] = {spec.name: spec for spec in (SUBJECTS, IMAGES, QUARANTINE, SOURCE_FILES)}
