"""A subject as training sees it: its catalog row and its ingested photos."""

from __future__ import annotations

from dataclasses import dataclass

from ..catalog import Catalog
from ..catalog.schemas import IMAGES, SUBJECTS
from ..catalog.store import CatalogError
from ..config import Config, stable_hash


class TuningError(CatalogError):
    """A tuning request the catalog cannot satisfy yet; the message says what to run."""


@dataclass(frozen=True)
class Subject:
    subject_id: str
    name: str
    class_name: str
    images: tuple[dict, ...]  # `images` rows, ordered by image_id

    @property
    def inputs_hash(self) -> str:
        return stable_hash([r["image_id"] for r in self.images] + [r["normalised_file"] for r in self.images])


def load_subject(catalog: Catalog, name: str) -> Subject:
    subjects = {r["subject_id"]: r for r in catalog.read(SUBJECTS.name).to_pylist()}
    row = subjects.get(name) or next((r for r in subjects.values() if r["name"] == name), None)
    if row is None:
        known = ", ".join(sorted(subjects)) or "none yet"
        raise TuningError(f"no subject {name!r} in catalog {catalog.root} (subjects: {known}); "
                          f"ingest its photos with `subjectflow ingest SOURCE --catalog {catalog.root}`")
    images = sorted((r for r in catalog.read(IMAGES.name).to_pylist() if r["subject_id"] == row["subject_id"]),
                    key=lambda r: r["image_id"])
    if not images:
        raise TuningError(f"subject {row['name']!r} has no ingested photos; ingest some first")
    return Subject(row["subject_id"], row["name"], row["class_name"], tuple(images))


def load_subjects(catalog: Catalog, names: list[str] | None = None) -> list[Subject]:
    """Every subject (or those named, by id or name) that has ingested photos, reading each
    table once: what planners use, so planning stays linear in the number of subjects."""
    images: dict[str, list[dict]] = {}
    for row in catalog.read(IMAGES.name).to_pylist():
        images.setdefault(row["subject_id"], []).append(row)
    subjects = []
    for row in sorted(catalog.read(SUBJECTS.name).to_pylist(), key=lambda r: r["subject_id"]):
        if names is not None and row["subject_id"] not in names and row["name"] not in names:
            continue
        photos = sorted(images.get(row["subject_id"], []), key=lambda r: r["image_id"])
        if photos:  # a subject whose photos were all quarantined has nothing to train on
            subjects.append(Subject(row["subject_id"], row["name"], row["class_name"], tuple(photos)))
    return subjects


TRAIN, HELDOUT, IN_CATALOG = "train", "heldout", "in-catalog"


def scored_as(row: dict) -> str:
    """The name a `metrics` row is reported under: a shared model's scores on subjects it
    trained on are never shown as its zero-shot scores, nor a variant's as the plain method's."""
    name = f"{row['method']} [{row['variant']}]" if row.get("variant") else row["method"]
    return f"{name} (in-catalog)" if row.get("split") == IN_CATALOG else name


def is_heldout(subject: Subject, holdout: tuple[str, ...] | float, seed: int) -> bool:
    """Whether a model shared across subjects must not train on `subject` (`joint.holdout`):
    listed by name or id, or drawn with probability `holdout` from a hash of (seed, id), so a
    subject's split never changes when others are added."""
    if isinstance(holdout, float):
        draw = int(stable_hash(["holdout", seed, subject.subject_id]), 16) / 16 ** 16
        return draw < holdout
    return subject.name in holdout or subject.subject_id in holdout


def training_subjects(catalog: Catalog, config: Config) -> list[Subject]:
    """The subjects shared models train on: every subject with photos but the held-out ones."""
    return [s for s in load_subjects(catalog) if not is_heldout(s, config.joint.holdout, config.jointsets.seed)]
