"""The dashboard: a static, offline HTML view of a catalog (`subjectflow dashboard`)."""

from .site import DashboardError, DashboardSite, build_dashboard

__all__ = ["DashboardError", "DashboardSite", "build_dashboard"]
