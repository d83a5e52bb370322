"""Joint-set pixels as sharded Parquet: the streaming format a trainer reads at scale.

A shard holds whole sets (a set is never split across shards), one row per member with
its PNG bytes, so a data loader can read one shard, decode it, and train on complete
sets without touching the rest of the catalog. Shards are content-addressed blobs,
versioned by DVC like every other blob.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..catalog import Catalog

SHARD_KIND = "jointsets"
SHARD_SCHEMA = pa.schema([
    pa.field("set_id", pa.string(), nullable=False),
    pa.field("member", pa.int32(), nullable=False),
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # PNG
])


@dataclass(frozen=True)
class JointSet:
    set_id: str
    subject_id: str
    images: tuple[Image.Image, ...]
    captions: tuple[str, ...]


def write_shards(catalog: Catalog, sets: Iterable[list[dict]], shard_rows: int) -> dict[str, str]:
    """Pack sets (each a list of shard rows, members in order) into shards of about
    `shard_rows` members; returns set_id -> shard blob path."""
    where: dict[str, str] = {}
    pending: list[dict] = []

    def flush() -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(pending, schema=SHARD_SCHEMA), buf, compression="zstd")
        path = catalog.put_blob(SHARD_KIND, buf.getvalue(), ".parquet")
        where.update({row["set_id"]: path for row in pending})
        pending.clear()

    for members in sets:
        if pending and len(pending) + len(members) > shard_rows:
            flush()
        pending.extend(members)
    if pending:
        flush()
    return where


def read_sets(catalog: Catalog, shards: Iterable[str], set_ids: set[str] | None = None) -> Iterator[JointSet]:
    """Stream sets shard by shard (only `set_ids` when given), members in order."""
    for shard in shards:
        table = pq.read_table(catalog.blob_path(shard)).sort_by([("set_id", "ascending"), ("member", "ascending")])
        grouped: dict[str, list[dict]] = {}
        for row in table.to_pylist():
            if set_ids is None or row["set_id"] in set_ids:
                grouped.setdefault(row["set_id"], []).append(row)
        for set_id, rows in grouped.items():
            yield JointSet(set_id, rows[0]["subject_id"],
                           tuple(Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows),
                           tuple(r["caption"] for r in rows))
