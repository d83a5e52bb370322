"""Synthetic joint sets drawn by the base model (JeDi's data recipe, METHODS.md section 2).

The model is asked for one wide collage of several views of the subject's class; the
collage is split into `set_size` panels and kept only if every panel shows an object
(its mask covers at least `min_coverage`) whose colours resemble the subject's real
photos (masked colour-histogram similarity at least `min_similarity`). Without a
subject-specific model these sets teach "same object across views" in general, which is
what the joint model needs; the filters keep off-subject collages out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from ..catalog import Catalog
from ..catalog.schemas import JOINTSETS
from ..config import Config, JointSetsConfig, stable_hash
from ..ingest.masks import subject_mask
from ..models.loading import ModelParts
from ..tuning.generate import sampling_pipeline
from ..tuning.runs import Subject
from .build import Member, PlannedSet, Planner, builder_id

BINS = 8  # per channel: coarse enough to ignore lighting noise, fine enough to tell red from orange


def colour_histogram(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
    """Normalised joint RGB histogram of the (masked) pixels, BINS**3 values."""
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    if mask is not None:
        keep = np.asarray(mask.convert("L").resize(image.size)).reshape(-1) > 127
        pixels = pixels[keep] if keep.any() else pixels
    index = (pixels // (256 // BINS)).astype(np.int64) @ np.array([BINS * BINS, BINS, 1])
    counts = np.bincount(index, minlength=BINS ** 3).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def histogram_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two histograms, in [0, 1]."""
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


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
                similarity = max(histogram_similarity(colour_histogram(panel, mask), ref) for ref in references)
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
