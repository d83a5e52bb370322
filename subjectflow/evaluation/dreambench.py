"""The DreamBench protocol: its prompt templates, and the per-method table papers report.

DreamBench (Ruiz et al., DreamBooth, CVPR 2023) ships `prompts_and_classes.txt`: a class
table (read by ingest) and 25 object prompts written as Python,
`'a {0} {1} in the jungle'.format(unique_token, class_token)`. They become this project's
templates, `a {subject} in the jungle`, so every method fills in its own subject words.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ..training.sampling import SUBJECT_PLACEHOLDER

_FORMAT_LINE = re.compile(r"""^\s*['"](?P<template>.*\{0\} \{1\}.*)['"]\.format\(unique_token, class_token\),?\s*$""")
# The paper's columns, in its order; MDINO is JeDi's masked DINO.
COLUMNS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("mdino", "MDINO"))


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """Templates from a DreamBench prompts file (object prompts, in order) or from a plain
    file with one `{subject}` template per line."""
    text = Path(path).read_text()
    if "Object Prompts" in text:
        objects = text.split("Object Prompts", 1)[1].split("Live Subject Prompts", 1)[0]
        templates = [m["template"].replace("{0} {1}", SUBJECT_PLACEHOLDER)
                     for m in map(_FORMAT_LINE.match, objects.splitlines()) if m]
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [t for t in templates if t.count(SUBJECT_PLACEHOLDER) != 1]
    if not templates or bad:
        raise ValueError(f"{path}: expected prompt templates holding {SUBJECT_PLACEHOLDER} once each"
                         + (f"; these do not: {bad[:3]}" if bad else "; found none"))
    return tuple(templates)


def method_table(metrics: list[dict]) -> str:
    """Mean over subjects per method, as the papers' tables print it; scores from a
    random-test or proxy scorer are flagged in the last column."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kinds: dict[str, set[str]] = defaultdict(set)
    for row in metrics:
        values[row["method"]][row["metric"]].append(row["value"])
        kinds[row["method"]].add(row["scorer_kind"])
    header = f"| {'method':<10} | " + " | ".join(f"{title:>6}" for _, title in COLUMNS) + " | subjects | scorer |"
    lines = [header, "|" + "|".join("-" * (len(cell) + 2) for cell in header.strip("|").split("|")[:-1]) + "|"]
    for method in sorted(values):
        cells = []
        for metric, _ in COLUMNS:
            scores = values[method].get(metric)
            cells.append(f"{sum(scores) / len(scores):>6.3f}" if scores else f"{'-':>6}")
        subjects = len({r["subject_id"] for r in metrics if r["method"] == method})
        flag = ", ".join(sorted(kinds[method] - {"pretrained"})) or "pretrained"
        lines.append(f"| {method:<10} | " + " | ".join(cells) + f" | {subjects:>8} | {flag} |")
    return "\n".join(lines)
