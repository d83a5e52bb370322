"""Joint-image training sets for JeDi: planned from photos (and synthetic collages),
augmented, captioned, stored as sharded Parquet and recorded in the `jointsets` table."""

from .build import JointSetsReport, build_jointsets, plan_photo_sets
from .shards import JointSet, read_sets

__all__ = ["JointSet", "JointSetsReport", "build_jointsets", "plan_photo_sets", "read_sets"]
