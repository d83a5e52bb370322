"""Joint-image training sets for JeDi: planned from photos (and synthetic collages),
augmented, captioned, stored as sharded Parquet and recorded in the `jointsets` table."""

from .build import JointSetsBatch, JointSetsReport, build_jointsets, make_jointsets, plan_photo_sets, record_jointsets
from .shards import JointSet, read_sets

__all__ = ["JointSet", "JointSetsBatch", "JointSetsReport", "build_jointsets", "make_jointsets", "plan_photo_sets",
           "read_sets", "record_jointsets"]
