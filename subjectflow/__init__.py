"""subjectflow: a versioned data pipeline for subject-driven image generation.

This package is the plain library layer (catalog, config, ingest, models, method math).
It never imports Prefect or the CLI: `tasks/` wraps it as Prefect tasks and `flows/`
composes those.
"""

from .quiet import silence_library_noise

silence_library_noise()

__version__ = "0.1.0"
