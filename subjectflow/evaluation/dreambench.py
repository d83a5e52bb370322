"""The DreamBench protocol (Ruiz et al., DreamBooth, CVPR 2023; METHODS.md, Evaluation):
25 prompts per subject, 4 images per prompt; object subjects get the object prompt list and
live subjects (its cats and dogs) the live-subject list; JeDi's row uses 1 reference; CLIP-T
reads the prompt with the class noun.

`prompts_and_classes.txt` holds a class table (read by ingest) and both lists, written as
Python, `'a {0} {1} in the jungle'.format(unique_token, class_token)`. They become this
project's templates, `a {subject} in the jungle`, so every method fills in its own words.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..training.sampling import SUBJECT_PLACEHOLDER
from ..training.subjects import scored_as

_FORMAT_LINE = re.compile(r"""^\s*['"](?P<template>.*\{0\} \{1\}.*)['"]\.format\(unique_token, class_token\),?\s*$""")
OBJECT, LIVE, ALL = "object", "live", "all"
# DreamBench's 9 live subjects are exactly its cats and dogs; the file does not mark them.
LIVE_CLASSES = frozenset({"cat", "dog"})
# For a DreamBench-layout folder without prompts_and_classes.txt: its object list.
BUILTIN_OBJECT_PROMPTS = "dreambench-object-prompts"
_S = SUBJECT_PLACEHOLDER
OBJECT_PROMPTS = tuple(f"a {_S} {where}" for where in (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest",
    "with a wheat field in the background", "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
    "on top of green grass with sunflowers around it", "on top of a mirror",
    "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug",
)) + tuple(f"a {change} {_S}" for change in ("red", "purple", "shiny", "wet", "cube shaped"))
# The paper's columns, in its order; MDINO is JeDi's masked DINO.
COLUMNS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("mdino", "MDINO"))


@dataclass(frozen=True)
class Protocol:
    """What `subjectflow benchmark dreambench` pins, whatever params.yaml says."""

    prompts: int = 25
    images_per_prompt: int = 4
    references: int = 1  # JeDi's DreamBench row

    @property
    def name(self) -> str:
        return "DreamBench" if (self.prompts, self.images_per_prompt) == (25, 4) else "DreamBench-subset"

    def describe(self) -> str:
        if self.name == "DreamBench":
            return "DreamBench: 25 prompts x 4 images per subject, JeDi with 1 reference"
        return (f"DreamBench-subset: {self.prompts} of 25 prompts x {self.images_per_prompt} of 4 images per "
                f"subject; not the paper's protocol, do not compare with its tables")


QUICK = Protocol(prompts=5, images_per_prompt=1)


@dataclass(frozen=True)
class PromptLists:
    """Templates by kind: DreamBench's `object` and `live` lists, or one `all` list."""

    lists: dict[str, tuple[str, ...]]

    def for_class(self, class_name: str) -> tuple[str, tuple[str, ...]]:
        """(kind, templates) a subject of `class_name` is scored on."""
        if LIVE in self.lists and class_name in LIVE_CLASSES:
            return LIVE, self.lists[LIVE]
        kind = OBJECT if OBJECT in self.lists else ALL
        return kind, self.lists[kind]


def _dreambench_list(text: str, heading: str, path: Path) -> tuple[str, ...]:
    section = text.split(heading, 1)[1]
    section = section.split("Live Subject Prompts", 1)[0] if heading == "Object Prompts" else section
    templates = tuple(m["template"].replace("{0} {1}", SUBJECT_PLACEHOLDER)
                      for m in map(_FORMAT_LINE.match, section.splitlines()) if m)
    if not templates:
        raise ValueError(f"{path}: the {heading!r} section holds no `'...{{0}} {{1}}...'.format(...)` lines")
    return templates


def read_prompt_file(path: Path | str) -> PromptLists:
    """DreamBench's two lists from its prompts file, or the one list of a plain file with a
    `{subject}` template per line; `BUILTIN_OBJECT_PROMPTS` names DreamBench's object list."""
    if str(path) == BUILTIN_OBJECT_PROMPTS:
        return PromptLists({OBJECT: OBJECT_PROMPTS})
    path = Path(path)
    text = path.read_text()
    if "Object Prompts" in text:
        lists = {OBJECT: _dreambench_list(text, "Object Prompts", path)}
        if "Live Subject Prompts" in text:
            lists[LIVE] = _dreambench_list(text, "Live Subject Prompts", path)
    else:
        lists = {ALL: tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))}
    for kind, templates in lists.items():
        bad = [t for t in templates if t.count(SUBJECT_PLACEHOLDER) != 1]
        if not templates or bad:
            raise ValueError(f"{path}: expected prompt templates holding {SUBJECT_PLACEHOLDER} once each"
                             + (f"; these do not: {bad[:3]}" if bad else "; found none"))
    return PromptLists(lists)


def method_table(metrics: list[dict]) -> str:
    """Per method, the mean over every scored image of all its subjects (each subject's value
    weighted by the images it scored, which for masked metrics excludes empty masks), as the
    papers' tables print it, with the share of generated images whose mask came out empty
    beside MDINO, which is titled with its masker. One base model, and one scorer and masker
    per metric: rows that mix are refused.
    Scores from a random-test or proxy scorer are flagged in the last column, and a shared
    model's scores on subjects it trained on get their own `(in-catalog)` row."""
    for what, key in (("base models", "base_model"), ("scorers", "scorer"), ("maskers", "masker")):
        by_metric: dict[str, set[str]] = defaultdict(set)
        for row in metrics:
            if row.get(key):
                by_metric[row["metric"] if key == "scorer" else ""].add(row[key])
        mixed = {metric: sorted(values) for metric, values in by_metric.items() if len(values) > 1}
        if mixed:
            raise ValueError(f"these scores mix {what} ({mixed}); a table holds one of each, so "
                             f"evaluate again with one setting, or query the metrics table per {key}")
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    kinds: dict[str, set[str]] = defaultdict(set)
    subjects: dict[str, set[str]] = defaultdict(set)
    for row in metrics:
        label = scored_as(row)
        total = sums[label][row["metric"]]
        total[0] += row["value"] * row["n_images"]
        total[1] += row["n_images"]
        kinds[label].add(row["scorer_kind"])
        subjects[label].add(row["subject_id"])
    masker = next((r["masker"] for r in metrics if r.get("masker")), None)
    titles = [f"{title} ({masker})" if m == "mdino" and masker else title for m, title in COLUMNS]
    widths = [max(6, len(title)) for title in titles]
    name = max([10, *map(len, sums)])
    header = (f"| {'method':<{name}} | " + " | ".join(f"{t:>{w}}" for t, w in zip(titles, widths))
              + " | empty masks | subjects | scorer |")
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.strip("|").split("|")) + "|"]
    for method in sorted(sums):
        values = sums[method]
        cells = [f"{values[m][0] / values[m][1]:>{w}.3f}" if values.get(m, [0, 0])[1] else f"{'-':>{w}}"
                 for (m, _), w in zip(COLUMNS, widths)]
        generated, masked = values.get("dino", [0, 0])[1], values.get("mdino", [0, 0])[1]
        empty = f"{1 - masked / generated:>11.0%}" if generated else f"{'-':>11}"
        flag = ", ".join(sorted(kinds[method] - {"pretrained"})) or "pretrained"
        lines.append(f"| {method:<{name}} | " + " | ".join(cells) + f" | {empty} | {len(subjects[method]):>8} | {flag} |")
    return "\n".join(lines)
