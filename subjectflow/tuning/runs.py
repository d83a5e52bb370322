"""One subject's tuning steps as plain functions: SFT adapter, CDNS negatives, SFO adapter.

Each function reads its inputs from the catalog, does the work, and records every
artefact (blob + table row) before returning. Each artefact's id is a hash of all it
depends on, so asking again with the same inputs finds it, and changing any parameter
makes a new one. `plan_subject` says what is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from ..catalog import Catalog, list_versions
from ..catalog.layout import MODELS_DIR, WORK_DIR
from ..catalog.schemas import ADAPTERS, IMAGES, NEGATIVES, SUBJECTS, TRAIN_LOG, TableSpec
from ..catalog.store import CatalogError, utcnow
from ..config import Config, stable_hash
from ..ingest.photo import encode_png
from ..methods.cdns import Degradation
from ..models.loading import ModelParts, load_components, resolve_device, resolve_model_path
from .adapters import add_lora, load_lora_file, lora_file_bytes
from .data import encode_latents, encode_prompt, instance_prompt, load_images
from .loop import train
from .objectives import SfoObjective, SftObjective

METHODS = ("sft", "sfo")


class TuningError(CatalogError):
    """A tuning request the catalog cannot satisfy yet; the message says what to run."""


@dataclass(frozen=True)
class Subject:
    subject_id: str
    name: str
    class_name: str
    images: tuple[dict, ...]  # `images` rows, ordered by image_id

    @property
    def inputs_hash(self) -> str:
        return stable_hash([r["image_id"] for r in self.images] + [r["normalised_file"] for r in self.images])


def load_subject(catalog: Catalog, name: str) -> Subject:
    subjects = {r["subject_id"]: r for r in catalog.read(SUBJECTS.name).to_pylist()}
    row = subjects.get(name) or next((r for r in subjects.values() if r["name"] == name), None)
    if row is None:
        known = ", ".join(sorted(subjects)) or "none yet"
        raise TuningError(f"no subject {name!r} in catalog {catalog.root} (subjects: {known}); "
                          f"ingest its photos with `subjectflow ingest SOURCE --catalog {catalog.root}`")
    images = sorted((r for r in catalog.read(IMAGES.name).to_pylist() if r["subject_id"] == row["subject_id"]),
                    key=lambda r: r["image_id"])
    if not images:
        raise TuningError(f"subject {row['name']!r} has no ingested photos; ingest some first")
    return Subject(row["subject_id"], row["name"], row["class_name"], tuple(images))


def load_subjects(catalog: Catalog, names: list[str] | None = None) -> list[Subject]:
    """Every subject (or those named, by id or name) that has ingested photos, reading each
    table once: what planners use, so planning stays linear in the number of subjects."""
    images: dict[str, list[dict]] = {}
    for row in catalog.read(IMAGES.name).to_pylist():
        images.setdefault(row["subject_id"], []).append(row)
    subjects = []
    for row in sorted(catalog.read(SUBJECTS.name).to_pylist(), key=lambda r: r["subject_id"]):
        if names is not None and row["subject_id"] not in names and row["name"] not in names:
            continue
        photos = sorted(images.get(row["subject_id"], []), key=lambda r: r["image_id"])
        if photos:  # a subject whose photos were all quarantined has nothing to train on
            subjects.append(Subject(row["subject_id"], row["name"], row["class_name"], tuple(photos)))
    return subjects


def model_version(path: str) -> str:
    """Base model name plus a hash of its configs and weight sizes (cheap, changes with it)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes() if file.suffix == ".json" else str(file.stat().st_size).encode())
    return digest.hexdigest()[:12]


def base_model_id(catalog: Catalog, config: Config) -> str:
    """How artefacts name their base model: config name @ content version."""
    return f"{config.model.base}@{model_version(resolve_model_path(config.model.base, catalog.root / MODELS_DIR))}"


def open_model(catalog: Catalog, config: Config) -> tuple[ModelParts, str]:
    device, dtype = resolve_device(config.model.device, config.model.precision)
    parts = load_components(config.model.base, catalog.root / MODELS_DIR, device, dtype)
    return parts, base_model_id(catalog, config)


# -- identities ---------------------------------------------------------------------

def sft_params(config: Config, base: str) -> dict:
    return {"method": "sft", "base": base, "train": config.train.model_dump(), "sft": config.sft.model_dump()}


def sfo_params(config: Config, base: str, sft_adapter_id: str) -> dict:
    return {"method": "sfo", "base": base, "train": config.train.model_dump(), "sfo": config.sfo.model_dump(),
            "negatives": config.negatives.model_dump(), "parent": sft_adapter_id}


def adapter_id(params: dict, subject: Subject, extra_inputs: list[str] = ()) -> str:
    return stable_hash([params, subject.subject_id, subject.inputs_hash, sorted(extra_inputs)])


def find_adapter(catalog: Catalog, adapter: str) -> dict | None:
    return next((r for r in catalog.read(ADAPTERS.name).to_pylist() if r["adapter_id"] == adapter), None)


# -- SFT ------------------------------------------------------------------------------

def file_latents(parts: ModelParts, catalog: Catalog, files: list[str], resolution: int) -> torch.Tensor:
    """[N, C, h, w] latents of catalog image files, on the UNet's device."""
    return encode_latents(parts.vae, load_images([catalog.blob_path(f) for f in files], resolution)).to(parts.unet.device)


def _class_images(parts: ModelParts, subject: Subject, config: Config) -> torch.Tensor:
    """Prior-preservation images: the base model's own samples of the class prompt."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(config.train.seed)
    images = pipe(f"a photo of {subject.class_name}", num_images_per_prompt=config.sft.class_images,
                  height=config.train.resolution, width=config.train.resolution, num_inference_steps=20,
                  generator=generator, output_type="pt").images
    return encode_latents(parts.vae, images * 2 - 1).to(parts.unet.device)


def record_trained(catalog: Catalog, table: TableSpec, blob_kind: str, row: dict, history: list[dict],
                   file_bytes: bytes) -> dict:
    """Store a trained artefact's weights, its `table` row (adapters or models) and its
    per-step metrics in `train_log`, in one locked write."""
    versions = list_versions(catalog)
    row = {**row, "file": catalog.put_blob(blob_kind, file_bytes, ".safetensors"), "created_at": utcnow(),
           "trained_on_version": versions[0].number if versions else None}
    log = [{"adapter_id": row[table.key[0]], "step": int(h["step"]), "metric": k, "value": float(v)}
           for h in history for k, v in h.items() if k != "step"]
    with catalog.writer():
        catalog.upsert(TRAIN_LOG.name, pa.Table.from_pylist(log, schema=TRAIN_LOG.schema))
        catalog.upsert(table.name, pa.Table.from_pylist([row], schema=table.schema))
    return row


def _prepare_unet(parts: ModelParts, config: Config) -> None:
    if config.train.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        parts.unet.train()


def train_sft(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
              stop_after: int | None = None) -> dict:
    params = sft_params(config, base)
    adapter = adapter_id(params, subject)
    latents = file_latents(parts, catalog, [r["normalised_file"] for r in subject.images], config.train.resolution)
    embeds = encode_prompt(parts.tokenizer, parts.text_encoder, instance_prompt(config.sft.identifier, subject.class_name))
    class_latents = class_embeds = None
    if config.sft.prior_preservation:
        class_latents = _class_images(parts, subject, config)
        class_embeds = encode_prompt(parts.tokenizer, parts.text_encoder, f"a photo of {subject.class_name}")
    _prepare_unet(parts, config)
    trainable = add_lora(parts.unet, config.train.lora_rank, "sft", config.train.seed)
    try:
        objective = SftObjective(parts.unet, parts.noise_scheduler, latents, embeds, trainable,
                                 config.train.batch_size, "sft", class_latents, class_embeds, config.sft.prior_weight)
        result = train(objective, config.train, catalog.root / WORK_DIR / "tune" / adapter, config.train.steps,
                       config.train.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after)
        if stop_after is not None and stop_after < config.train.steps:
            return {"adapter_id": adapter, "interrupted_at": stop_after}
        row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": "sft", "base_model": base,
               "parent_adapter_id": None, "params": json.dumps(params, sort_keys=True),
               "inputs_hash": subject.inputs_hash, "steps": result.steps, "final_loss": result.final_loss}
        return record_trained(catalog, ADAPTERS, "adapters", row, result.history, lora_file_bytes(parts.unet, "sft"))
    finally:
        parts.unet.delete_adapters("sft")


def autocast_dtype(parts: ModelParts) -> torch.dtype | None:
    return parts.unet.dtype if parts.unet.dtype != torch.float32 else None


# -- CDNS negatives -------------------------------------------------------------------

NEGATIVE_GENERATOR = "sft-img2img"


def negative_id(image_id: str, degradation: Degradation, generator: str, adapter: str | None, base: str) -> str:
    return stable_hash([image_id, degradation.as_record(), generator, adapter, base])


def planned_negatives(subject: Subject, config: Config, sft_adapter_id: str, base: str) -> list[tuple[str, dict, Degradation]]:
    """(negative_id, positive image row, degradation) for every negative the subject needs."""
    cfg = config.negatives
    planned = []
    for image in subject.images:
        for k in range(cfg.per_photo):
            degradation = Degradation.for_photo(subject.class_name, config.train.resolution, seed=cfg.seed + k,
                                                strength=cfg.strength, steps=cfg.steps, guidance=cfg.guidance,
                                                radius_at_512=cfg.radius_at_512)
            planned.append((negative_id(image["image_id"], degradation, NEGATIVE_GENERATOR, sft_adapter_id, base),
                            image, degradation))
    return planned


def negative_pipeline(parts: ModelParts) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                          unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_negative(pipe: StableDiffusionImg2ImgPipeline, reference_file: Path, degradation: Degradation,
                    resolution: int) -> bytes:
    """One CDNS negative as PNG bytes: SDEdit from the blurred reference under the generic
    prompt. Everything it depends on is in `degradation` (recorded with the negative)."""
    reference = Image.open(reference_file).convert("RGB").resize((resolution,) * 2, Image.Resampling.BICUBIC)
    out = pipe(degradation.generic_prompt, image=degradation.degrade(reference), strength=degradation.strength,
               num_inference_steps=degradation.steps, guidance_scale=degradation.guidance,
               generator=torch.Generator("cpu").manual_seed(degradation.seed)).images[0]
    return encode_png(out)


def make_negatives(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
                   sft_adapter: dict) -> list[dict]:
    """METHODS.md section 1, our choice (b): the subject's SFT adapter samples the generic
    prompt by img2img from the blurred reference. Existing negatives are reused."""
    existing = {r["negative_id"]: r for r in catalog.read(NEGATIVES.name).to_pylist()}
    planned = planned_negatives(subject, config, sft_adapter["adapter_id"], base)
    todo = [p for p in planned if p[0] not in existing]
    if todo:
        pipe = negative_pipeline(parts)
        load_lora_file(parts.unet, catalog.blob_path(sft_adapter["file"]), "sft")
        rows = []
        try:
            for nid, image, degradation in todo:
                data = render_negative(pipe, catalog.blob_path(image["normalised_file"]), degradation,
                                       config.train.resolution)
                rows.append({"negative_id": nid, "image_id": image["image_id"], "subject_id": subject.subject_id,
                             "file": catalog.put_blob("negatives", data, ".png"), "generator": NEGATIVE_GENERATOR,
                             "generator_adapter_id": sft_adapter["adapter_id"], "base_model": base,
                             "prompt": degradation.generic_prompt, "blur_radius": degradation.blur_radius,
                             "strength": degradation.strength, "steps": degradation.steps,
                             "guidance": degradation.guidance, "seed": degradation.seed,
                             "resolution": config.train.resolution, "created_at": utcnow()})
        finally:
            parts.unet.delete_adapters("sft")
        with catalog.writer():
            catalog.upsert(NEGATIVES.name, pa.Table.from_pylist(rows, schema=NEGATIVES.schema))
        existing.update({r["negative_id"]: r for r in rows})
    return [existing[nid] for nid, _, _ in planned]


# -- SFO ------------------------------------------------------------------------------

def train_sfo(catalog: Catalog, subject: Subject, config: Config, parts: ModelParts, base: str,
              sft_adapter: dict, negatives: list[dict], stop_after: int | None = None) -> dict:
    params = sfo_params(config, base, sft_adapter["adapter_id"])
    adapter = adapter_id(params, subject, [n["negative_id"] for n in negatives])
    files = {r["image_id"]: r["normalised_file"] for r in subject.images}
    resolution = config.train.resolution
    positives = file_latents(parts, catalog, [files[n["image_id"]] for n in negatives], resolution)
    negative_latents = file_latents(parts, catalog, [n["file"] for n in negatives], resolution)
    embeds = encode_prompt(parts.tokenizer, parts.text_encoder, instance_prompt(config.sft.identifier, subject.class_name))
    _prepare_unet(parts, config)
    load_lora_file(parts.unet, catalog.blob_path(sft_adapter["file"]), "sft")
    trainable = add_lora(parts.unet, config.sfo.lora_rank, "sfo", config.train.seed)
    try:
        objective = SfoObjective(parts.unet, parts.noise_scheduler, positives, negative_latents, embeds, trainable,
                                 config.sfo.beta, config.train.batch_size)
        result = train(objective, config.train, catalog.root / WORK_DIR / "tune" / adapter, config.sfo.steps,
                       config.sfo.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after)
        if stop_after is not None and stop_after < config.sfo.steps:
            return {"adapter_id": adapter, "interrupted_at": stop_after}
        row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": "sfo", "base_model": base,
               "parent_adapter_id": sft_adapter["adapter_id"], "params": json.dumps(params, sort_keys=True),
               "inputs_hash": stable_hash([subject.inputs_hash, sorted(n["negative_id"] for n in negatives)]),
               "steps": result.steps, "final_loss": result.final_loss}
        return record_trained(catalog, ADAPTERS, "adapters", row, result.history, lora_file_bytes(parts.unet, "sfo"))
    finally:
        parts.unet.delete_adapters(["sfo", "sft"])


# -- what is needed ---------------------------------------------------------------------

def target_adapter_id(subject: Subject, method: str, config: Config, base: str) -> str:
    """The id the subject's adapter would have if made now (nothing is run)."""
    sft = adapter_id(sft_params(config, base), subject)
    if method == "sft":
        return sft
    negatives = [nid for nid, _, _ in planned_negatives(subject, config, sft, base)]
    return adapter_id(sfo_params(config, base, sft), subject, negatives)


def needs_tuning(catalog: Catalog, method: str, config: Config, base: str) -> list[str]:
    """Subjects whose current adapter for `method` does not exist yet (new photos, new
    parameters, new base model: all change the id)."""
    have = set(catalog.read(ADAPTERS.name).column("adapter_id").to_pylist())
    return [subject.subject_id for subject in load_subjects(catalog)
            if target_adapter_id(subject, method, config, base) not in have]


def _sft_for(catalog, subject, config, parts, base, made, reused, say, needed_by: str) -> dict:
    sft = find_adapter(catalog, adapter_id(sft_params(config, base), subject))
    if sft is not None:
        reused.append(f"sft adapter {sft['adapter_id']}")
        return sft
    if needed_by != "sft":
        say(f"{subject.name}: {needed_by} starts from an SFT adapter for these photos and settings; training that first")
    sft = train_sft(catalog, subject, config, parts, base)
    made.append(f"sft adapter {sft['adapter_id']}")
    return sft


def _negatives_for(catalog, subject, config, parts, base, sft, made, reused, say) -> list[dict]:
    planned = planned_negatives(subject, config, sft["adapter_id"], base)
    have = set(catalog.read(NEGATIVES.name).column("negative_id").to_pylist())
    missing = sum(nid not in have for nid, _, _ in planned)
    if missing:
        say(f"{subject.name}: making {missing} of {len(planned)} CDNS negatives")
        made.append(f"{missing} negatives")
    if len(planned) > missing:
        reused.append(f"{len(planned) - missing} negatives")
    return make_negatives(catalog, subject, config, parts, base, sft)


def negatives_for_subject(catalog: Catalog, name: str, config: Config, parts: ModelParts, base: str,
                          say=print) -> "TuneOutcome":
    """The subject's CDNS negatives, training the SFT adapter they are sampled with if needed."""
    subject = load_subject(catalog, name)
    made, reused = [], []
    sft = _sft_for(catalog, subject, config, parts, base, made, reused, say, needed_by="negatives")
    negatives = _negatives_for(catalog, subject, config, parts, base, sft, made, reused, say)
    return TuneOutcome(subject.name, "negatives", sft, made, reused, negatives)


@dataclass
class TuneOutcome:
    subject: str
    method: str
    adapter: dict
    made: list[str]
    reused: list[str]
    negatives: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        made = "; made " + ", ".join(self.made) if self.made else ""
        reused = "; reused " + ", ".join(self.reused) if self.reused else ""
        return f"{self.subject} ({self.method}){made}{reused}"


def tune_subject(catalog: Catalog, name: str, method: str, config: Config, parts: ModelParts, base: str,
                 say=print) -> TuneOutcome:
    """Make `method`'s adapter for a subject, first making whatever it needs."""
    if method not in METHODS:
        raise TuningError(f"unknown method {method!r}; methods are {', '.join(METHODS)}")
    subject = load_subject(catalog, name)
    made, reused = [], []
    sft = _sft_for(catalog, subject, config, parts, base, made, reused, say, needed_by=method)
    if method == "sft":
        return TuneOutcome(subject.name, method, sft, made, reused)
    negatives = _negatives_for(catalog, subject, config, parts, base, sft, made, reused, say)
    sfo = find_adapter(catalog, target_adapter_id(subject, "sfo", config, base))
    if sfo is None:
        sfo = train_sfo(catalog, subject, config, parts, base, sft, negatives)
        made.append(f"sfo adapter {sfo['adapter_id']}")
    else:
        reused.append(f"sfo adapter {sfo['adapter_id']}")
    return TuneOutcome(subject.name, method, sfo, made, reused)
