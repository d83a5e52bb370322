"""Where a concept comes from: a subject's whole photo set, or one region of one photo.

`subjectflow concepts learn NAME --from subject:teapot --from image:PHOTO:background=beach`
names up to three concepts; each becomes one new token and, per photo it appears in, one
mask, initialised from that photo's ingest mask (the subject) or its complement (the
background).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...catalog import Catalog
from ...catalog.schemas import IMAGES
from ...training.subjects import TuningError, load_subject, load_subjects
from ...training.tokens import token_for

MAX_CONCEPTS = 3  # the paper composes up to three
Region = Literal["subject", "background"]
REGIONS: tuple[Region, ...] = ("subject", "background")
SYNTAX = "subject:NAME[=TOKEN] or image:PHOTO[:subject|background][=TOKEN]"


@dataclass(frozen=True)
class Source:
    kind: Literal["subject", "image"]
    ref: str  # a subject's name or id; a photo's id (prefix), file name or SUBJECT/FILE
    region: Region
    name: str = ""  # the token's name as given ("beach" -> "<beach>"); "" = derived

    @property
    def spec(self) -> str:
        region = f":{self.region}" if self.kind == "image" else ""
        return f"{self.kind}:{self.ref}{region}" + (f"={self.name}" if self.name else "")


def parse_source(spec: str) -> Source:
    """`subject:NAME[=TOKEN]` or `image:PHOTO[:subject|background][=TOKEN]`."""
    body, _, name = spec.partition("=")
    kind, _, rest = body.partition(":")
    if kind == "subject" and rest:
        return Source("subject", rest, "subject", name)
    if kind == "image" and rest:
        ref, _, region = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in REGIONS else (rest, "", "subject")
        return Source("image", ref, region, name)
    raise TuningError(f"concept source {spec!r}: write {SYNTAX}")


@dataclass(frozen=True)
class Concept:
    """One concept as training sees it: its token, the words its row starts from, and
    the photos it appears in with the region it covers in each."""

    token: str
    initialiser: str
    photos: tuple[tuple[dict, Region], ...]  # (`images` row, region)
    source: str


def resolve(catalog: Catalog, sources: list[Source]) -> list[Concept]:
    """The concepts the sources name, each checked against the catalog."""
    if not 1 <= len(sources) <= MAX_CONCEPTS:
        raise TuningError(f"give 1 to {MAX_CONCEPTS} concepts with --from ({SYNTAX}); got {len(sources)}")
    concepts = [_concept(catalog, source) for source in sources]
    tokens = [c.token for c in concepts]
    if len(set(tokens)) < len(tokens):
        raise TuningError(f"two concepts share a token ({', '.join(tokens)}); name one with =TOKEN, "
                          f"as in image:PHOTO:background=beach")
    return concepts


def _concept(catalog: Catalog, source: Source) -> Concept:
    if source.kind == "subject":
        subject = load_subject(catalog, source.ref)
        return Concept(token_for(source.name or subject.name), subject.class_name,
                       tuple((row, "subject") for row in subject.images), source.spec)
    row = find_photo(catalog, source.ref)
    subject = next(s for s in load_subjects(catalog, [row["subject_id"]]))
    default = f"{subject.name}_{source.region}"
    words = subject.class_name if source.region == "subject" else "background"
    return Concept(token_for(source.name or default), words, ((row, source.region),), source.spec)


def find_photo(catalog: Catalog, ref: str) -> dict:
    """The `images` row `ref` names: an image id or a prefix of 8+ characters, a source file
    name when only one subject has it, or SUBJECT/FILE."""
    names = {s.subject_id: s.name for s in load_subjects(catalog)}

    def labelled(row: dict) -> str:
        return f"{names.get(row['subject_id'], row['subject_id'])}/{Path(row['source_uri']).name}"

    rows = catalog.read(IMAGES.name).to_pylist()
    found = [r for r in rows if (len(ref) >= 8 and r["image_id"].startswith(ref))
             or ref in (Path(r["source_uri"]).name, labelled(r))]
    if len(found) == 1:
        return found[0]
    if not found:
        some = ", ".join(labelled(r) for r in rows[:3])
        raise TuningError(f"no ingested photo {ref!r} in {catalog.root}; give an image id (8+ characters), "
                          f"a file name or SUBJECT/FILE (such as {some})")
    shown = ", ".join(labelled(r) for r in found[:5])
    raise TuningError(f"photo {ref!r} is ambiguous ({shown}); write SUBJECT/FILE or an image id")
