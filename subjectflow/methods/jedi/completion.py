"""JeDi personalisation by set completion: a new image completes a set whose known
members are the subject's photos (METHODS.md section 2), for samples and for CDNS negatives."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from PIL import Image

from ...catalog import Catalog
from ...config import Config
from ...ingest.photo import encode_png
from ...models.loading import ModelParts
from ...progress import progress
from ...training.adapters import load_lora_file
from ...training.data import decode_image, encode_latents, image_tensor
from ...training.sampling import record_samples, sample_row, subject_prompt
from ...training.subjects import Subject, TuningError
from ..sfo.negatives import Planned, missing, negative_row, planned_negatives, record_negatives
from .attention import complete_set
from .model import install_joint_model
from .set_latents import NULL_CAPTION

GENERATOR = "jedi"
# Not "sfo": diffusers filters its missing-key warnings by substring, and "sfo" is in "transformer".
SFO_ADAPTER = "sfo_joint"


@dataclass(frozen=True)
class Completion:
    """How a JeDi image was made: recorded with every sample and negative."""

    references: tuple[str, ...]  # image ids (or files) of the known members
    reference_mode: str
    image_guidance: float
    text_guidance: float
    steps: int
    seed: int

    def as_record(self) -> dict:
        return {"references": list(self.references), "reference_mode": self.reference_mode,
                "image_guidance": self.image_guidance, "text_guidance": self.text_guidance,
                "steps": self.steps, "seed": self.seed}


def complete(parts: ModelParts, reference_images: list[Image.Image], reference_caption: str, prompt: str,
             completion: Completion, resolution: int) -> Image.Image:
    """One new image of the set whose known members are `reference_images`."""
    device = parts.unet.device
    pixels = torch.stack([image_tensor(im, resolution) for im in reference_images])
    references = encode_latents(parts.vae, pixels).to(device)
    family = parts.family
    caption = family.encode(parts, reference_caption, resolution)
    latents = complete_set(
        parts.unet, family.sampling_scheduler(parts.noise_scheduler), references,
        caption.expand(len(reference_images)), family.encode(parts, prompt, resolution),
        family.encode(parts, NULL_CAPTION, resolution), 1, completion.steps, completion.image_guidance,
        completion.text_guidance, completion.reference_mode, torch.Generator("cpu").manual_seed(completion.seed))
    return decode_image(parts.vae, latents)


def reference_caption(subject: Subject) -> str:
    return f"a photo of a {subject.class_name}"


def jedi_negative_plan(subject: Subject, config: Config, base: str, model: dict) -> Planned:
    return planned_negatives(subject, config, model["model_id"], base, generator=GENERATOR)


def make_jedi_negatives(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
                        model: dict) -> list[dict]:
    """METHODS.md section 1 with JeDi as the generator: each negative completes a set whose
    one known member is the blurred photo, under the generic prompt. Existing ones are reused."""
    planned = jedi_negative_plan(subject, config, base, model)
    existing, todo = missing(catalog, planned)
    rows = []
    if todo:
        names = install_joint_model(catalog, parts, model)
        try:
            for item in todo:
                _, image, degradation = item
                with Image.open(catalog.blob_path(image["normalised_file"])) as photo:
                    blurred = degradation.degrade(photo.convert("RGB"))
                completion = Completion((image["image_id"],), config.joint.references, config.joint.image_guidance,
                                        degradation.guidance, degradation.steps, degradation.seed)
                out = complete(parts, [blurred], reference_caption(subject), degradation.generic_prompt,
                               completion, config.train.resolution)
                # Set completion starts from pure noise: strength 1 in img2img terms.
                rows.append(negative_row(catalog, subject, item, encode_png(out), GENERATOR, model["model_id"], base,
                                         config.train.resolution, 1.0))
        finally:
            if names:
                parts.unet.delete_adapters(names)
    return record_negatives(catalog, existing, rows, planned)


def sample_by_completion(catalog: Catalog, config: Config, parts: ModelParts, base: str, prompt: str, n: int,
                         subject: Subject, model: dict, method: str, references: int | None = None,
                         sfo_model: dict | None = None) -> list[dict]:
    """Each image completes a set whose known members are the subject's first `references`
    photos (1..joint.max_references); no per-subject training. With `sfo_model` the
    zero-shot SFO LoRA is applied on top of the joint model."""
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
    # JeDi learns the subject from its reference photos, so its prompts name the class noun alone.
    text = subject_prompt(prompt, subject, subject.class_name)
    reference_images = []
    for photo in photos:
        with Image.open(catalog.blob_path(photo["normalised_file"])) as image:
            reference_images.append(image.convert("RGB"))
    rows = []
    try:
        with progress(n, f"generate {method}", unit="image") as shown:
            for i in range(n):
                completion = Completion(tuple(p["image_id"] for p in photos), joint.references, joint.image_guidance,
                                        joint.text_guidance, cfg.steps, cfg.seed + i)
                image = complete(parts, reference_images, reference_caption(subject), text, completion, cfg.resolution)
                rows.append(sample_row(catalog, encode_png(image), subject_id=subject.subject_id, adapter_id=None,
                                       method=method, prompt=text, seed=completion.seed, steps=cfg.steps,
                                       guidance=joint.text_guidance, resolution=cfg.resolution, base_model=base,
                                       model_id=(sfo_model or model)["model_id"],
                                       params=json.dumps(completion.as_record(), sort_keys=True)))
                shown.update()
    finally:
        if names:
            parts.unet.delete_adapters(names)
    return record_samples(catalog, rows)
