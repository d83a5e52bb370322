"""Prefect tasks: thin wrappers that put the library's plain functions on the run graph.

Each task declares what Prefect adds (retries for I/O, caching keyed by content,
names for the UI) and delegates the work to `subjectflow`. Unit tests call the plain
functions, or a task's `.fn`, without a Prefect server.
"""
