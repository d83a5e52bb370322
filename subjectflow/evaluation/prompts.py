"""The project's evaluation prompts: DreamBench-style templates for product subjects.

Two kinds, as in DreamBench: recontextualisation (the subject, unchanged, somewhere
new) and property changes (the subject itself altered). `{subject}` is the generation
placeholder (subjectflow.training.sampling): generation fills in identifier + class noun,
CLIP-T scoring fills in the class noun alone, as DreamBench scores its prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import stable_hash
from ..training.sampling import SUBJECT_PLACEHOLDER

# Bump when the templates change meaning; the hash in the set name changes by itself.
TEMPLATES_NAME = "templates-v1"

_S = SUBJECT_PLACEHOLDER
RECONTEXTUALISATION: tuple[str, ...] = (
    f"a {_S} on the beach",
    f"a {_S} in the jungle",
    f"a {_S} on top of a wooden table",
    f"a {_S} in a city street at night",
    f"a {_S} in the snow",
    f"a {_S} on a kitchen counter",
    f"a {_S} with a mountain in the background",
    f"a {_S} floating on top of water",
    f"a {_S} on a white marble surface",
    f"a {_S} on a shelf in a cosy living room",
    f"a {_S} on top of green grass with sunflowers around it",
    f"a {_S} on a cobblestone street",
    f"a {_S} with the eiffel tower in the background",
    f"a {_S} on top of pink fabric",
    f"a {_S} on a desk next to a laptop",
    f"a {_S} in a shop window",
)
PROPERTY_CHANGES: tuple[str, ...] = (
    f"a red {_S}",
    f"a {_S} made of gold",
    f"a cube-shaped {_S}",
    f"a shiny {_S}",
    f"a purple {_S}",
    f"a wet {_S}",
    f"a {_S} made of glass",
    f"a {_S} made of wood",
    f"a polka-dot {_S}",
)


@dataclass(frozen=True)
class PromptSet:
    name: str  # e.g. "templates-v1@3f2a...": recorded as `prompt_set` in the metrics table
    prompts: tuple[str, ...]  # templates with the `{subject}` placeholder


def evaluation_prompts(n: int, recontextualisation: Sequence[str] = RECONTEXTUALISATION,
                       property_changes: Sequence[str] = PROPERTY_CHANGES) -> PromptSet:
    """The first `n` prompts, alternating the two kinds (recontextualisation first) until
    one runs out, so any `n` >= 2 tests both; the same `n` always gives the same set."""
    for template in (*recontextualisation, *property_changes):
        if template.count(SUBJECT_PLACEHOLDER) != 1:
            raise ValueError(f"prompt template {template!r} must hold {SUBJECT_PLACEHOLDER} exactly once")
    ordered: list[str] = []
    for i in range(max(len(recontextualisation), len(property_changes))):
        ordered += [kind[i] for kind in (recontextualisation, property_changes) if i < len(kind)]
    ordered = list(dict.fromkeys(ordered))  # a template listed twice counts once
    if not 1 <= n <= len(ordered):
        raise ValueError(f"evaluate.prompts is {n}, but there are {len(ordered)} prompt templates; "
                         f"use 1..{len(ordered)}")
    chosen = tuple(ordered[:n])
    return PromptSet(name=f"{TEMPLATES_NAME}@{stable_hash(list(chosen))}", prompts=chosen)


def class_prompt(template: str, class_name: str) -> str:
    """The text CLIP-T compares with: the placeholder becomes the class noun (DreamBench)."""
    return " ".join(template.replace(SUBJECT_PLACEHOLDER, class_name).split())
