"""Build the catalog's joint-image sets (METHODS.md section 2: JeDi training data).

Per subject, `sets_per_subject` sets of `set_size` members are planned from its photos:
photos are drawn in shuffled rounds, so every photo is used equally often (counts differ
by at most one) and a set repeats a photo only when the subject has fewer photos than
the set has members; each member gets its own augmentation. Every subject gets the same
number of sets whatever its photo count, so subjects with many photos do not dominate
training. Plans are seeded by the subject's photos, so an unchanged subject plans the
same set ids and is skipped, and a new photo re-plans only its own subject.

Making sets (`make_jointsets`: planning, rendering, shards) is separate from recording
them (`record_jointsets`: one locked write), so an engine spreads batches of subjects
over its workers; a shard then packs only its own batch's sets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from ..catalog import Catalog
from ..catalog.schemas import JOINTSETS
from ..catalog.store import utcnow
from ..config import JointSetsConfig, stable_hash
from ..ingest.photo import encode_png
from ..training.subjects import Subject, load_subjects
from .augment import Augmentation, apply_augmentation, draw_augmentation
from .shards import write_shards


@dataclass(frozen=True)
class Member:
    origin: str  # photo | synthetic
    image_id: str | None
    augmentation: dict  # JSON-able record of how the pixels were made
    caption: str
    render: Callable[[], Image.Image] = field(compare=False, repr=False)


@dataclass(frozen=True)
class PlannedSet:
    set_id: str
    subject_id: str
    members: tuple[Member, ...]


@dataclass
class JointSetsReport:
    made: dict[str, int] = field(default_factory=dict)  # subject -> new sets
    reused: dict[str, int] = field(default_factory=dict)
    removed: int = 0  # stale sets dropped (their subject's photos or the settings changed)
    discarded: dict[str, int] = field(default_factory=dict)  # synthetic sets the filters rejected

    def summary(self) -> str:
        made, reused = sum(self.made.values()), sum(self.reused.values())
        line = f"joint sets: {made} made, {reused} reused, {self.removed} stale removed"
        if self.discarded:
            line += f", {sum(self.discarded.values())} synthetic sets rejected by the filters"
        return line


def builder_id(config: JointSetsConfig) -> str:
    """Everything that shapes a set's pixels (shard size and batching only change how they
    are packed)."""
    return stable_hash(config.model_dump(exclude={"shard_rows", "subjects_per_task"}))


def caption(class_name: str, augmentation: Augmentation) -> str:
    base = f"a photo of a {class_name}"
    return f"{base} on a plain background" if augmentation.replaced_background else base


def _balanced_draws(rng: random.Random, photos: list[dict], sets: int, set_size: int) -> list[list[dict]]:
    rounds: list[dict] = []
    plans = []
    for _ in range(sets):
        chosen: list[dict] = []
        for _ in range(set_size):
            if not rounds:
                rounds = rng.sample(photos, len(photos))
            fresh = next((p for p in rounds if p not in chosen), rounds[0])
            rounds.remove(fresh)
            chosen.append(fresh)
        plans.append(chosen)
    return plans


def plan_photo_sets(catalog: Catalog, subject: Subject, config: JointSetsConfig) -> list[PlannedSet]:
    rng = random.Random(stable_hash([config.seed, subject.subject_id, subject.inputs_hash]))
    builder = builder_id(config)
    planned = []
    for photos in _balanced_draws(rng, list(subject.images), config.sets_per_subject, config.set_size):
        members = []
        for photo in photos:
            augmentation = draw_augmentation(rng, config.augment)
            members.append(Member("photo", photo["image_id"], augmentation.as_record(),
                                  caption(subject.class_name, augmentation),
                                  _photo_renderer(catalog, photo, augmentation, config.resolution)))
        set_id = stable_hash([builder, subject.subject_id, [(m.image_id, m.augmentation) for m in members]])
        planned.append(PlannedSet(set_id, subject.subject_id, tuple(members)))
    return planned


def _photo_renderer(catalog: Catalog, photo: dict, augmentation: Augmentation, resolution: int):
    def render() -> Image.Image:
        with Image.open(catalog.blob_path(photo["normalised_file"])) as image, \
                Image.open(catalog.blob_path(photo["mask_file"])) as mask:
            return apply_augmentation(image, mask, augmentation, resolution)
    return render


Planner = Callable[[Catalog, Subject, JointSetsConfig], tuple[list[PlannedSet], int]]


@dataclass
class JointSetsBatch:
    """Some subjects' new sets, made on any worker: their shards are blobs already, their
    rows wait for `record_jointsets` (workers never write tables)."""

    report: JointSetsReport
    wanted: dict[str, list[str]]  # subject_id -> the set ids of its current plan
    rows: list[dict]  # the new sets' member rows


def make_jointsets(catalog: Catalog, config: JointSetsConfig, subjects: list[str] | None = None,
                   extra: Planner | None = None, say: Callable[[str], None] = print) -> JointSetsBatch:
    """Plan the subjects' sets and make the shards of those that do not exist yet.

    `extra` plans more sets per subject (synthetic ones; see `synthetic.py`) and returns
    them with how many candidates it rejected.
    """
    report = JointSetsReport()
    have = set(catalog.read(JOINTSETS.name).column("set_id").to_pylist())
    planned: dict[str, list[PlannedSet]] = {}
    for subject in load_subjects(catalog, subjects or None):
        sets = plan_photo_sets(catalog, subject, config)
        if extra is not None:
            more, rejected = extra(catalog, subject, config)
            sets += more
            if rejected:
                report.discarded[subject.name] = rejected
        planned[subject.subject_id] = sets
        new = sum(s.set_id not in have for s in sets)
        report.made[subject.name], report.reused[subject.name] = new, len(sets) - new
        if new:
            say(f"{subject.name}: building {new} of {len(sets)} joint sets")

    todo = [s for sets in planned.values() for s in sets if s.set_id not in have]
    now = utcnow()
    # A generator, so members are rendered shard by shard, never all held in memory.
    shard_of = write_shards(catalog, ([{"set_id": s.set_id, "member": i, "subject_id": s.subject_id,
                                        "caption": m.caption, "image": encode_png(m.render())}
                                       for i, m in enumerate(s.members)] for s in todo), config.shard_rows)
    rows = [{"set_id": s.set_id, "member": i, "set_size": len(s.members), "subject_id": s.subject_id,
             "origin": m.origin, "image_id": m.image_id, "augmentation": json.dumps(m.augmentation, sort_keys=True),
             "caption": m.caption, "shard": shard_of[s.set_id], "builder": builder_id(config), "created_at": now}
            for s in todo for i, m in enumerate(s.members)]
    return JointSetsBatch(report, {subject: [s.set_id for s in sets] for subject, sets in planned.items()}, rows)


def record_jointsets(catalog: Catalog, batches: list[JointSetsBatch]) -> JointSetsReport:
    """The batches' new rows, and their subjects' stale sets dropped, in one locked write."""
    report = JointSetsReport()
    wanted: dict[str, set[str]] = {}
    for batch in batches:
        report.made |= batch.report.made
        report.reused |= batch.report.reused
        report.discarded |= batch.report.discarded
        wanted |= {subject: set(ids) for subject, ids in batch.wanted.items()}
    rows = [row for batch in batches for row in batch.rows]
    with catalog.writer():
        current = catalog.read(JOINTSETS.name).to_pylist()
        # Rebuilt subjects keep only their current plan; subjects not asked about are untouched.
        keep = [r for r in current if r["subject_id"] not in wanted or r["set_id"] in wanted[r["subject_id"]]]
        report.removed = len({r["set_id"] for r in current} - {r["set_id"] for r in keep})
        if rows or report.removed:
            catalog.write(JOINTSETS.name, pa.Table.from_pylist(keep + rows, schema=JOINTSETS.schema))
    return report


def build_jointsets(catalog: Catalog, config: JointSetsConfig, subjects: list[str] | None = None,
                    extra: Planner | None = None, say: Callable[[str], None] = print) -> JointSetsReport:
    """Make the planned sets that do not exist yet and drop the stale ones, in this process."""
    return record_jointsets(catalog, [make_jointsets(catalog, config, subjects, extra, say)])
