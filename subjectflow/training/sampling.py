"""Sampling every method shares: prompts with `{subject}`, the family's pipeline, LoRA stacks,
and registering each image in the `samples` table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import torch
from diffusers import DiffusionPipeline

from ..catalog import Catalog
from ..catalog.schemas import SAMPLES
from ..catalog.store import utcnow
from ..config import Config
from ..ingest.photo import encode_png
from ..models.families import Prompt
from ..models.loading import ModelParts
from ..progress import progress
from .adapters import load_lora_file
from .subjects import Subject

SUBJECT_PLACEHOLDER = "{subject}"


def subject_prompt(prompt: str, subject: Subject | None, noun: str = "") -> str:
    """`{subject}` in a prompt becomes `noun` (a method's name for the subject: the
    identifier + class noun, or the class noun alone); nothing without a subject."""
    return prompt.replace(SUBJECT_PLACEHOLDER, noun if subject is not None else "")


def sampling_pipeline(parts: ModelParts) -> DiffusionPipeline:
    family = parts.family
    pipe = family.sampling_pipeline(parts, family.sampling_scheduler(parts.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_row(catalog: Catalog, data: bytes, **fields) -> dict:
    return {"sample_id": hashlib.sha256(data).hexdigest(), "file": catalog.put_blob("samples", data, ".png"),
            "created_at": utcnow(), "model_id": None, "params": None, **fields}


def record_samples(catalog: Catalog, rows: list[dict]) -> list[dict]:
    with catalog.writer():
        catalog.upsert(SAMPLES.name, pa.Table.from_pylist(rows, schema=SAMPLES.schema))
    return rows


def generate_with_loras(catalog: Catalog, config: Config, parts: ModelParts, base: str, text: str, n: int,
                        subject: Subject | None, loras: list[tuple[str, Path]], method: str,
                        adapter_id: str | None, embeds: Prompt | torch.Tensor | None = None,
                        params: str | None = None, model_id: str | None = None) -> list[dict]:
    """n images of `text` by plain CFG with the `loras` (name, file) stacked in order;
    `embeds` (batch 1), when given, are `text` as the method embeds it (learned tokens)."""
    cfg = config.generate
    pipe = sampling_pipeline(parts)
    names = [name for name, _ in loras]
    for name, path in loras:
        load_lora_file(parts.unet, path, name)
    if names:
        pipe.set_adapters(names)
    prompt = ({"prompt": text} if embeds is None
              else parts.family.pipeline_prompt(Prompt.of(embeds).to(parts.unet.dtype)))
    rows = []
    try:
        with progress(n, f"generate {method}", unit="image") as shown:
            for i in range(n):
                seed = cfg.seed + i
                image = pipe(**prompt, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution,
                             width=cfg.resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                rows.append(sample_row(catalog, encode_png(image), subject_id=subject.subject_id if subject else None,
                                       adapter_id=adapter_id, method=method, prompt=text, seed=seed, steps=cfg.steps,
                                       guidance=cfg.guidance, resolution=cfg.resolution, base_model=base,
                                       params=params, model_id=model_id))
                shown.update()
    finally:
        if names:
            parts.unet.delete_adapters(names)
    return record_samples(catalog, rows)


def identified(config: Config, subject: Subject | None) -> str:
    """How adapter methods name the subject in a prompt: the rare identifier + class noun."""
    return f"{config.sft.identifier} {subject.class_name}" if subject else ""


def sample_adapters(catalog: Catalog, config: Config, parts: ModelParts, base: str, subject: Subject | None,
                    rows: list[dict], prompt: str, n: int, method: str) -> list[dict]:
    """Plain CFG with a stack of LoRA adapter rows (base-most first), named per method."""
    loras = [(f"{row['method']}_{i}", catalog.blob_path(row["file"])) for i, row in enumerate(rows)]
    return generate_with_loras(catalog, config, parts, base,
                               subject_prompt(prompt, subject, identified(config, subject)), n, subject, loras,
                               method, rows[-1]["adapter_id"])
