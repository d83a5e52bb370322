"""Ingest product photo sets: list a source, validate and normalise photos, mask subjects."""

from .pipeline import (
    IngestPlan, IngestReport, PhotoResult, plan_ingest, process_photos, record_ingest, with_blobs_present,
)
from .source import Listing, SourceError, SourceFile, list_source

__all__ = [
    "IngestPlan", "IngestReport", "Listing", "PhotoResult", "SourceError", "SourceFile",
    "list_source", "plan_ingest", "process_photos", "record_ingest", "with_blobs_present",
]
