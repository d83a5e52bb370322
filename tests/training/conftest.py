import hashlib

import pytest

from subjectflow.catalog import init_catalog
from subjectflow.config import load_config
from subjectflow.methods.base import Context
from tests.ingest.helpers import ingest
from tests.photos import photo_set

# The tiny model at 32 px (16x16 latents): each step is milliseconds on a CPU.
TINY = {
    "ingest": {"workers": 1, "resolution": 64, "thumbnail_size": 32, "mask": {"size": 32}},
    "train": {"steps": 6, "resolution": 32, "checkpoint_every": 2, "learning_rate": 1e-3},
    "sfo": {"steps": 4},
    "negatives": {"steps": 4, "strength": 0.5},
    "generate": {"steps": 2, "resolution": 32},
}


def tiny_config(**sections):
    overrides = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(overrides=overrides)


def ingested_catalog(root, subjects=("red_mug", "blue_box"), per_subject=3):
    catalog = init_catalog(root / "catalog", tiny_config())
    ingest(photo_set(root / "src", subjects=subjects, per_subject=per_subject), catalog, tiny_config().ingest)
    return catalog


@pytest.fixture
def two_subjects(tmp_path):
    return ingested_catalog(tmp_path)


def context(catalog, config, say=print):
    """A method context whose model is loaded now (tests time the work, not the lazy load)."""
    ctx = Context.open(catalog, config, say)
    ctx.parts  # noqa: B018 - loaded here, on purpose
    return ctx


def adapter_files(catalog) -> dict[str, tuple[str, str]]:
    """Each subject's adapter id and the sha256 of its weights file: what two runs that
    should train the same thing are compared by."""
    def digest(row: dict) -> str:
        return hashlib.sha256(catalog.blob_path(row["file"]).read_bytes()).hexdigest()

    return {row["subject_id"]: (row["adapter_id"], digest(row)) for row in catalog.read("adapters").to_pylist()}
