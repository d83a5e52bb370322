"""CDNS negatives as catalog rows (METHODS.md section 1, our choice (b)): each is the SFT
adapter's img2img of the blurred reference under the generic prompt, made once and reused."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ...catalog import Catalog
from ...catalog.schemas import NEGATIVES
from ...catalog.store import utcnow
from ...config import Config, stable_hash
from ...ingest.photo import encode_png
from ...models.loading import ModelParts
from ...training.adapters import load_lora_file
from ...training.subjects import Subject
from .cdns import Degradation

GENERATOR = "sft-img2img"

Planned = list[tuple[str, dict, Degradation]]  # (negative_id, positive image row, degradation)


def negative_id(image_id: str, degradation: Degradation, generator: str, adapter: str | None, base: str) -> str:
    return stable_hash([image_id, degradation.as_record(), generator, adapter, base])


def planned_negatives(subject: Subject, config: Config, generator_id: str, base: str,
                      generator: str = GENERATOR) -> Planned:
    """Every negative the subject needs from the generator artefact `generator_id`."""
    cfg = config.negatives
    degradations = [Degradation.for_photo(subject.class_name, config.train.resolution, seed=cfg.seed + k,
                                          strength=cfg.strength, steps=cfg.steps, guidance=cfg.guidance,
                                          radius_at_512=cfg.radius_at_512) for k in range(cfg.per_photo)]
    return [(negative_id(image["image_id"], degradation, generator, generator_id, base), image, degradation)
            for image in subject.images for degradation in degradations]


def negative_row(catalog: Catalog, subject: Subject, planned: tuple[str, dict, Degradation], png: bytes,
                 generator: str, generator_id: str, base: str, resolution: int, strength: float) -> dict:
    nid, image, degradation = planned
    return {"negative_id": nid, "image_id": image["image_id"], "subject_id": subject.subject_id,
            "file": catalog.put_blob("negatives", png, ".png"), "generator": generator,
            "generator_adapter_id": generator_id, "base_model": base, "prompt": degradation.generic_prompt,
            "blur_radius": degradation.blur_radius, "strength": strength, "steps": degradation.steps,
            "guidance": degradation.guidance, "seed": degradation.seed, "resolution": resolution,
            "created_at": utcnow()}


def missing(catalog: Catalog, planned: Planned) -> tuple[dict[str, dict], Planned]:
    """(existing negatives by id, the planned ones not made yet)."""
    existing = {r["negative_id"]: r for r in catalog.read(NEGATIVES.name).to_pylist()}
    return existing, [p for p in planned if p[0] not in existing]


def record_negatives(catalog: Catalog, existing: dict[str, dict], rows: list[dict], planned: Planned) -> list[dict]:
    """Write the new rows in one locked upsert; the planned negatives' rows, in plan order."""
    if rows:
        with catalog.writer():
            catalog.upsert(NEGATIVES.name, pa.Table.from_pylist(rows, schema=NEGATIVES.schema))
        existing.update({r["negative_id"]: r for r in rows})
    return [existing[nid] for nid, _, _ in planned]


def negative_pipeline(parts: ModelParts) -> DiffusionPipeline:
    """The base model family's img2img pipeline on the model's own denoiser (the adapter is loaded into it)."""
    family = parts.family
    pipe = family.img2img_pipeline(parts, family.sampling_scheduler(parts.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_negative(pipe: DiffusionPipeline, reference_file: Path, degradation: Degradation,
                    resolution: int, options: dict | None = None) -> bytes:
    """One CDNS negative as PNG bytes: SDEdit from the blurred reference under the generic
    prompt. Everything it depends on is in `degradation` (recorded with the negative);
    `options` are what the family's pipeline needs besides (`Family.img2img_options`).
    On FLUX `degradation.guidance` is the distilled guidance, as the paper's 3.5."""
    reference = Image.open(reference_file).convert("RGB").resize((resolution,) * 2, Image.Resampling.BICUBIC)
    out = pipe(degradation.generic_prompt, image=degradation.degrade(reference), strength=degradation.strength,
               num_inference_steps=degradation.steps, guidance_scale=degradation.guidance,
               generator=torch.Generator("cpu").manual_seed(degradation.seed), **(options or {})).images[0]
    return encode_png(out)


def make_negatives(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
                   sft_adapter: dict) -> list[dict]:
    """The subject's negatives sampled by its SFT adapter; existing ones are reused."""
    planned = planned_negatives(subject, config, sft_adapter["adapter_id"], base)
    existing, todo = missing(catalog, planned)
    rows = []
    if todo:
        pipe = negative_pipeline(parts)
        load_lora_file(parts.unet, catalog.blob_path(sft_adapter["file"]), "sft")
        try:
            for item in todo:
                _, image, degradation = item
                png = render_negative(pipe, catalog.blob_path(image["normalised_file"]), degradation,
                                      config.train.resolution, parts.family.img2img_options(config.train.resolution))
                rows.append(negative_row(catalog, subject, item, png, GENERATOR, sft_adapter["adapter_id"], base,
                                         config.train.resolution, degradation.strength))
        finally:
            parts.unet.delete_adapters("sft")
    return record_negatives(catalog, existing, rows, planned)
