"""Scoring a concept set's compositions: for every non-empty subset of its concepts, the
prompt "a photo of <c1> and <c2>" sampled `evaluate.images_per_prompt` times, then

- CLIP-T against the prompt with each token read as the words its row started from
  ("a photo of mug and background": CLIP's text encoder knows those, not our tokens);
- per concept in the prompt, masked DINO of the generated image's matching region (the
  segmenter's subject, or everything but it for a background concept) against the
  concept's own source region: each source photo cut to the concept's final EM mask.

One row per (prompt, metric, concept) in `concept_scores`, with the scorer's kind, so
random-weight test scorers are never read as quality.
"""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
from PIL import Image, ImageOps

from ...catalog.layout import MODELS_DIR
from ...catalog.schemas import CONCEPT_MASKS, CONCEPT_SCORES
from ...catalog.store import utcnow
from ...config import stable_hash
from ...evaluation.metrics import Masker, clip_t, fidelity, subject_crop
from ...evaluation.scorers import Scorers, scorer_names
from .. import SETS_COMMAND
from ..base import Context
from .model import ConceptWeights, composed_prompt

WHOLE_PROMPT = ""  # the `concept` of a metric about the whole prompt (CLIP-T)


def compositions(tokens: list[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of the tokens, singles first, in the set's order."""
    return [combo for size in range(1, len(tokens) + 1) for combo in itertools.combinations(tokens, size)]


def evaluation_id(ctx: Context, row: dict) -> str:
    config = ctx.config
    return stable_hash([row["model_id"], config.evaluate.seed, config.evaluate.images_per_prompt,
                        config.generate.identity(exclude={"seed", "keep_pose", "keep_background"}),
                        scorer_names(config.evaluate, ctx.catalog.root / MODELS_DIR), config.evaluate.masker])


def _source_regions(ctx: Context, row: dict) -> tuple[dict[str, list[Image.Image]], dict[str, str]]:
    """Per concept, its source photos cut to its last E-step's mask, and its region kind."""
    masks = [r for r in ctx.catalog.read(CONCEPT_MASKS.name).to_pylist() if r["model_id"] == row["model_id"]]
    photos = {r["image_id"]: r for r in ctx.catalog.read("images").to_pylist()}
    regions: dict[str, list[Image.Image]] = {}
    for token in {r["concept"] for r in masks}:
        mine = [r for r in masks if r["concept"] == token]
        last = max(r["iteration"] for r in mine)
        for r in (r for r in mine if r["iteration"] == last):
            photo = Image.open(ctx.catalog.blob_path(photos[r["image_id"]]["normalised_file"])).convert("RGB")
            mask = Image.open(ctx.catalog.blob_path(r["file"])).convert("L").resize(photo.size)
            crop = subject_crop(photo, mask)
            if crop is not None:
                regions.setdefault(token, []).append(crop)
    return regions, {r["concept"]: r["region"] for r in masks}


def score_set(ctx: Context, row: dict, scorers: Scorers, masker: Masker, sample) -> list[dict]:
    """Sample every composition with `sample(prompt, n)` (-> `samples` rows), score, record."""
    params = json.loads(row["params"])
    words = ConceptWeights.read(ctx.catalog.blob_path(row["file"])).initialisers
    regions, region_of = _source_regions(ctx, row)
    key, now, n = evaluation_id(ctx, row), utcnow(), ctx.config.evaluate.images_per_prompt
    scored = []

    def add(metric: str, prompt: str, concept: str, value: float, count: int, scorer) -> None:
        scored.append({"evaluation_id": key, "model_id": row["model_id"], "set_name": params["set"],
                       "metric": metric, "prompt": prompt, "concept": concept, "value": value, "n_images": count,
                       "scorer": scorer.name, "scorer_kind": scorer.kind, "evaluated_at": now})

    for combo in compositions(params["tokens"]):
        prompt = composed_prompt(list(combo))
        images = [Image.open(ctx.catalog.blob_path(r["file"])).convert("RGB") for r in sample(prompt, n)]
        if scorers.clip is not None:
            text = prompt
            for token in combo:
                text = text.replace(token, words[token])
            add("clip_t", prompt, WHOLE_PROMPT, clip_t(scorers.clip, images, text), len(images), scorers.clip)
        if scorers.dino is None:
            continue
        subject_masks = [masker.fn(image) for image in images]
        for token in combo:
            cut = [subject_crop(image, mask if region_of[token] == "subject" else ImageOps.invert(mask))
                   for image, mask in zip(images, subject_masks)]
            cut = [c for c in cut if c is not None]
            if cut and regions.get(token):
                add("mdino", prompt, token, fidelity(scorers.dino, cut, regions[token]), len(cut), scorers.dino)
    with ctx.catalog.writer():
        ctx.catalog.upsert(CONCEPT_SCORES.name, pa.Table.from_pylist(scored, schema=CONCEPT_SCORES.schema))
    return scored


def score_lines(rows: list[dict]) -> list[str]:
    """The newest evaluation's scores as report lines, random-weight scorers flagged."""
    if not rows:
        return [f"  compositions: not evaluated yet (`subjectflow {SETS_COMMAND} evaluate NAME`)"]
    newest = max(rows, key=lambda r: r["evaluated_at"])["evaluation_id"]
    rows = [r for r in rows if r["evaluation_id"] == newest]
    flagged = sorted({r["scorer_kind"] for r in rows} - {"pretrained"})
    lines = ["  compositions" + (f" [{', '.join(flagged)} scorer: not a quality measure]" if flagged else "") + ":"]
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        mine = [r for r in rows if r["prompt"] == prompt]
        lines.append(f"    {prompt:<48} " + ", ".join(
            f"{r['metric']}{'(' + r['concept'] + ')' if r['concept'] else ''} {r['value']:.3f}" for r in mine))
    return lines

