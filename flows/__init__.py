"""Prefect flows: short functions that only compose tasks, plus the `subjectflow` CLI."""
