"""Sampling with a subject's adapters, every image registered in the `samples` table."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ..catalog import Catalog
from ..catalog.schemas import ADAPTERS, SAMPLES
from ..catalog.store import utcnow
from ..config import Config
from ..ingest.photo import encode_png
from ..models.loading import ModelParts
from .adapters import load_lora_file
from .joint import SFO_ADAPTER, Completion, complete, install_joint_model, reference_caption
from .runs import Subject, TuningError, target_adapter_id

SUBJECT_PLACEHOLDER = "{subject}"


def subject_prompt(prompt: str, subject: Subject | None, config: Config, identifier: bool = True) -> str:
    """`{subject}` in a prompt becomes the subject's identifier + class noun; JeDi learns
    the subject from its reference photos, so its prompts name the class noun alone."""
    if subject is None:
        return prompt.replace(SUBJECT_PLACEHOLDER, "")
    noun = f"{config.sft.identifier} {subject.class_name}" if identifier else subject.class_name
    return prompt.replace(SUBJECT_PLACEHOLDER, noun)


def adapter_chain(catalog: Catalog, adapter_id: str) -> list[dict]:
    """The adapter and its parents, base-most first (SFO sits on its SFT adapter)."""
    rows = {r["adapter_id"]: r for r in catalog.read(ADAPTERS.name).to_pylist()}
    chain = []
    current = rows.get(adapter_id)
    if current is None:
        raise TuningError(f"no adapter {adapter_id!r} in catalog {catalog.root}")
    while current is not None:
        chain.insert(0, current)
        current = rows.get(current["parent_adapter_id"]) if current["parent_adapter_id"] else None
    return chain


def current_adapter(catalog: Catalog, subject: Subject, method: str, config: Config, base: str) -> str:
    wanted = target_adapter_id(subject, method, config, base)
    if wanted not in set(catalog.read(ADAPTERS.name).column("adapter_id").to_pylist()):
        raise TuningError(f"subject {subject.name!r} has no current {method.upper()} adapter; run "
                          f"`subjectflow tune --method {method} --subject {subject.name} --catalog {catalog.root}`")
    return wanted


def sampling_pipeline(parts: ModelParts) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        # DDIM samples well in tens of steps; the training scheduler (DDPM) needs hundreds.
        scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample_row(catalog: Catalog, data: bytes, **fields) -> dict:
    return {"sample_id": hashlib.sha256(data).hexdigest(), "file": catalog.put_blob("samples", data, ".png"),
            "created_at": utcnow(), "model_id": None, "params": None, **fields}


def _record_samples(catalog: Catalog, rows: list[dict]) -> list[dict]:
    with catalog.writer():
        catalog.upsert(SAMPLES.name, pa.Table.from_pylist(rows, schema=SAMPLES.schema))
    return rows


def generate_samples(catalog: Catalog, config: Config, parts: ModelParts, base: str, prompt: str, n: int,
                     subject: Subject | None = None, adapter_id: str | None = None, method: str = "base") -> list[dict]:
    cfg = config.generate
    pipe = sampling_pipeline(parts)
    chain = adapter_chain(catalog, adapter_id) if adapter_id else []
    names = [f"{row['method']}_{i}" for i, row in enumerate(chain)]
    for row, name in zip(chain, names):
        load_lora_file(parts.unet, catalog.blob_path(row["file"]), name)
    if names:
        pipe.set_adapters(names)
    text = subject_prompt(prompt, subject, config)
    rows = []
    try:
        for i in range(n):
            seed = cfg.seed + i
            image = pipe(text, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution,
                         width=cfg.resolution, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            rows.append(_sample_row(catalog, encode_png(image), subject_id=subject.subject_id if subject else None,
                                    adapter_id=adapter_id, method=method, prompt=text, seed=seed, steps=cfg.steps,
                                    guidance=cfg.guidance, resolution=cfg.resolution, base_model=base))
    finally:
        if names:
            parts.unet.delete_adapters(names)
    return _record_samples(catalog, rows)


def generate_jedi_samples(catalog: Catalog, config: Config, parts: ModelParts, base: str, prompt: str, n: int,
                          subject: Subject, model: dict, references: int | None = None,
                          sfo_model: dict | None = None) -> list[dict]:
    """JeDi personalisation: each image completes a set whose known members are the
    subject's first `references` photos (1..joint.max_references); no per-subject training.
    With `sfo_model` the zero-shot SFO LoRA is applied on top of the joint model."""
    cfg, joint = config.generate, config.joint
    count = min(references or joint.max_references, joint.max_references, len(subject.images))
    if count < 1:
        raise TuningError(f"JeDi needs at least one reference photo; subject {subject.name!r} has none")
    photos = subject.images[:count]
    names = install_joint_model(catalog, parts, model)
    if sfo_model is not None:
        load_lora_file(parts.unet, catalog.blob_path(sfo_model["file"]), SFO_ADAPTER)
        names.append(SFO_ADAPTER)
    if names:
        parts.unet.set_adapters(names)
    text = subject_prompt(prompt, subject, config, identifier=False)
    method = "jedi-sfo" if sfo_model is not None else "jedi"
    reference_images = []
    for photo in photos:
        with Image.open(catalog.blob_path(photo["normalised_file"])) as image:
            reference_images.append(image.convert("RGB"))
    rows = []
    try:
        for i in range(n):
            completion = Completion(tuple(p["image_id"] for p in photos), joint.references, joint.image_guidance,
                                    joint.text_guidance, cfg.steps, cfg.seed + i)
            image = complete(parts, reference_images, reference_caption(subject), text, completion, cfg.resolution)
            rows.append(_sample_row(catalog, encode_png(image), subject_id=subject.subject_id, adapter_id=None,
                                    method=method, prompt=text, seed=completion.seed, steps=cfg.steps,
                                    guidance=joint.text_guidance, resolution=cfg.resolution, base_model=base,
                                    model_id=(sfo_model or model)["model_id"],
                                    params=json.dumps(completion.as_record(), sort_keys=True)))
    finally:
        if names:
            parts.unet.delete_adapters(names)
    return _record_samples(catalog, rows)
