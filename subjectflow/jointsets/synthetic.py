"""Synthetic joint sets drawn by the base model (JeDi's data recipe, METHODS.md section 2).

The model is asked for one wide collage of several views of the subject's class; the
collage is split into `set_size` panels and kept only if every panel shows an object
(its mask covers at least `min_coverage`) whose colours resemble the subject's real
photos (intersection of masked colour histograms, the evaluation proxy's, at least
`min_similarity`). Without a subject-specific model these sets teach "same object across
views" in general, which is what the joint model needs; the filters keep off-subject
collages out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from ..catalog import Catalog
from ..catalog.schemas import JOINTSETS
from ..config import Config, JointSetsConfig, stable_hash
from ..evaluation.metrics import colour_histogram, histogram_intersection
from ..ingest.masks import subject_mask
from ..models.loading import ModelParts
from ..training.sampling import sampling_pipeline
from ..training.subjects import Subject
from .build import Member, PlannedSet, Planner, builder_id

def collage_prompt(class_name: str, views: int) -> str:
    return f"a photo collage of {views} views of the same {class_name}, side by side, plain background"


def split_panels(collage: Image.Image, panels: int) -> Iterator[Image.Image]:
    width = collage.width // panels
    for i in range(panels):
        yield collage.crop((i * width, 0, (i + 1) * width, collage.height))


def synthetic_planner(parts: ModelParts, base: str, config: Config) -> Planner:
    """A `build_jointsets` planner that adds up to `synthetic.per_subject` filtered collages."""
    pipe = sampling_pipeline(parts)

    def plan(catalog: Catalog, subject: Subject, sets: JointSetsConfig) -> tuple[list[PlannedSet], int]:
        cfg, size = sets.synthetic, sets.set_size
        have = set(catalog.read(JOINTSETS.name).column("set_id").to_pylist())
        prompt = collage_prompt(subject.class_name, size)
        references = [_photo_histogram(catalog, photo) for photo in subject.images]
        planned, rejected = [], 0
        for k in range(cfg.per_subject):
            seed = sets.seed * 1_000_003 + k
            set_id = stable_hash([builder_id(sets), subject.subject_id, base, prompt, seed])
            if set_id in have:  # built on an earlier run: nothing to draw
                planned.append(PlannedSet(set_id, subject.subject_id, ()))
                continue
            image = pipe(prompt, height=sets.resolution, width=sets.resolution * size, num_inference_steps=cfg.steps,
                         guidance_scale=cfg.guidance, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            members = []
            for panel_index, panel in enumerate(split_panels(image, size)):
                panel = panel.resize((sets.resolution, sets.resolution), Image.Resampling.BICUBIC)
                mask, coverage = subject_mask(panel, config.ingest.mask)
                similarity = max(histogram_intersection(colour_histogram(panel, mask), ref) for ref in references)
                if coverage < cfg.min_coverage or similarity < cfg.min_similarity:
                    break
                record = {"prompt": prompt, "seed": seed, "panel": panel_index, "base_model": base,
                          "coverage": round(coverage, 4), "similarity": round(similarity, 4)}
                members.append(Member("synthetic", None, record, f"a photo of a {subject.class_name}",
                                      lambda panel=panel: panel))
            if len(members) == size:
                planned.append(PlannedSet(set_id, subject.subject_id, tuple(members)))
            else:
                rejected += 1
        return planned, rejected

    return plan


def _photo_histogram(catalog: Catalog, photo: dict) -> np.ndarray:
    with Image.open(catalog.blob_path(photo["normalised_file"])) as image, \
            Image.open(catalog.blob_path(photo["mask_file"])) as mask:
        return colour_histogram(image, mask)
