"""The versioned catalog: Parquet tables, content-addressed blobs, git + DVC versions."""

from .layout import BLOB_KINDS, STAGES
from .schemas import TABLES
from .store import Catalog, CatalogBusy, CatalogError, CatalogNotFound
from .versioning import CatalogVersion, init_catalog, list_versions, push_catalog, version_catalog

__all__ = [
    "BLOB_KINDS", "STAGES", "TABLES", "Catalog", "CatalogBusy", "CatalogError", "CatalogNotFound",
    "CatalogVersion", "init_catalog", "list_versions", "push_catalog", "version_catalog",
]
