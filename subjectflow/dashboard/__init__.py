"""The dashboard: a static, offline HTML view of a catalog (`subjectflow dashboard`)."""

from .site import (
    DashboardError, DashboardSite, build_dashboard, make_thumbnails, save_thumbnails, thumbnails_to_make,
)

__all__ = ["DashboardError", "DashboardSite", "build_dashboard", "make_thumbnails", "save_thumbnails",
           "thumbnails_to_make"]
