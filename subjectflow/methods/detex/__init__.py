"""DETEX: decoupled textual embeddings (METHODS.md section 4; Cai et al., AAAI 2024).

Per subject: one learned subject token, a LoRA on the cross-attention keys and values
(Custom Diffusion's layers, start-of-text K/V detached as diffusers does), and two mapper
MLPs that turn each training photo's features into its pose and background embeddings,
trained jointly on a loss restricted to the ingest mask. Sampling uses the subject token
alone, or with one training photo's pose and/or background kept (`generate.keep_pose`,
`generate.keep_background`); only then are the mappers run. Its home: the parts in
`model.py`, training, sampling and export here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save

from ...catalog.layout import MODELS_DIR
from ...catalog.schemas import ADAPTERS
from ...config import Config
from ...evaluation.scorers import dino_identity, load_dino
from ...training.adapters import WEIGHT_NAME, trained_adapter
from ...training.artefacts import adapter_id, autocast_dtype, prepare_unet, record_trained
from ...training.class_images import class_image_latents, planned_class_images
from ...training.data import class_prompt, encode_latents, load_images, load_masks
from ...training.loop import train
from ...training.sampling import generate_with_loras, subject_prompt
from ...training.subjects import Subject, TuningError
from ...training.tokens import (KV_TARGETS, cross_attention, family_tokens, textual_inversion_files,
                               textual_inversion_usage, token_for)
from ..base import Artefacts, Context, Method
from .model import (ATTRIBUTES, BACKGROUND, ENCODED, FEATURES, POSE, PROMPT, AttributeMapper, DetexObjective, DetexWeights,
                    keeping, photo_features, training_prompt)

NAME = "detex"
ENCODER_SETTING = "detex.image_encoder"
EMBEDDINGS_STEM = "learned_embeds"  # one token: learned_embeds.safetensors (SDXL: and learned_embeds_2)


def detex_params(ctx: Context) -> dict:
    config, base = ctx.config, ctx.base
    train_cfg = config.train.identity(include={"resolution", "seed", "batch_size", "gradient_accumulation",
                                               "optimizer", "weight_decay", "max_grad_norm", "warmup_steps"})
    return {"method": NAME, "base": base, "train": train_cfg, "detex": config.detex.identity(),
            "features": _features(ctx), "prompt": PROMPT}


def _features(ctx: Context) -> str:
    """What the mappers read, by identity: a configured encoder's version counts, not its name."""
    encoder = ctx.config.detex.image_encoder
    if not encoder:
        return FEATURES
    return f"{dino_identity(encoder, ENCODER_SETTING, ctx.catalog.root / MODELS_DIR)}: {ENCODED}"


def detex_id(ctx: Context, subject: Subject) -> str:
    priors = ([key for key, _ in planned_class_images(ctx.config, ctx.base, subject.class_name)]
              if ctx.config.detex.prior_preservation else [])
    return adapter_id(detex_params(ctx), subject, priors)


@contextlib.contextmanager
def detex_objective(ctx: Context, subject: Subject) -> Iterator[DetexObjective]:
    """The subject's objective, its token, K/V LoRA and DETEX attention in place for the
    block; the model is given back as it was after."""
    config, parts, catalog, dx = ctx.config, ctx.parts, ctx.catalog, ctx.config.detex
    device, resolution = parts.unet.device, config.train.resolution
    pixels = load_images([catalog.blob_path(r["normalised_file"]) for r in subject.images], resolution)
    masks = load_masks([catalog.blob_path(r["mask_file"]) for r in subject.images], resolution)
    latents = encode_latents(parts.vae, pixels).to(device)
    encoder = (load_dino(dx.image_encoder, device=device, models_dir=catalog.root / MODELS_DIR, key=ENCODER_SETTING)
               if dx.image_encoder else None)
    pose_features, background_features = (f.to(device) for f in photo_features(parts.vae, pixels, masks,
                                                                               dx.feature_grid, encoder))
    class_latents = class_embeds = None
    if dx.prior_preservation:
        class_latents = class_image_latents(ctx, subject.class_name)
        class_embeds = parts.family.encode(parts, class_prompt(subject.class_name), resolution)
    token = token_for(subject.name)
    # A mapped vector feeds every text encoder (SDXL: both, side by side), each at its word scale.
    words = [encoder.get_input_embeddings().weight.detach().float() for encoder in parts.text_encoders()]
    width = sum(w.shape[1] for w in words)
    scale = torch.cat([torch.full((w.shape[1],), float(w.std())) for w in words])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # the mappers' init, reproducible
        mappers = torch.nn.ModuleDict({
            "pose": AttributeMapper(pose_features.shape[1], dx.mapper_hidden, width, scale),
            "background": AttributeMapper(background_features.shape[1], dx.mapper_hidden, width, scale),
        }).to(device)
    prepare_unet(parts, config.train)
    with (family_tokens(parts, {token: subject.class_name}, resolution, ATTRIBUTES) as concepts,
          trained_adapter(parts.unet, dx.kv_rank, NAME, config.train.seed, KV_TARGETS) as kv,
          cross_attention(parts.unet)):
        yield DetexObjective(parts.unet, parts.noise_scheduler, concepts,
                             training_prompt(token, subject.class_name), latents, masks.to(device), pose_features,
                             background_features, mappers, kv, dx.kv_learning_rate, config.train.batch_size,
                             dx.mask_loss, NAME, class_latents, class_embeds, dx.prior_weight)


def train_detex(ctx: Context, subject: Subject, stop_after: int | None = None) -> dict:
    config, dx = ctx.config, ctx.config.detex
    adapter = detex_id(ctx, subject)
    with detex_objective(ctx, subject) as objective:
        result = train(objective, config.train, ctx.catalog.work_dir("tune", adapter), dx.steps,
                       dx.learning_rate, autocast_dtype(ctx.parts), ctx.parts.unet.device, stop_after,
                       on_checkpoint=ctx.catalog.keep_work)
        if stop_after is not None and stop_after < dx.steps:
            return {"adapter_id": adapter, "interrupted_at": stop_after}
        params = {**detex_params(ctx), "token": objective.concepts.tokens[0]}
        row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": NAME, "base_model": ctx.base,
               "parent_adapter_id": None, "params": json.dumps(params, sort_keys=True),
               "inputs_hash": subject.inputs_hash, "steps": result.steps, "final_loss": result.final_loss}
        weights = objective.weights_bytes([r["image_id"] for r in subject.images])
        return record_trained(ctx.catalog, ADAPTERS, "adapters", row, result.history, weights)


def kept_photo(subject: Subject, weights: DetexWeights, choice: str, setting: str) -> int | None:
    """The index, in the adapter's photos, of the photo `choice` names (an image id or its
    prefix, a source file name, or a 1-based number); None for ""."""
    if not choice:
        return None
    photos = {r["image_id"]: r for r in subject.images}
    names = [Path(photos[i]["source_uri"]).name if i in photos else i[:12] for i in weights.photos]
    for index, (image_id, name) in enumerate(zip(weights.photos, names)):
        if choice in (name, str(index + 1)) or (len(choice) >= 8 and image_id.startswith(choice)):
            return index
    raise TuningError(f"{setting} {choice!r} is not one of {subject.name}'s training photos; give a file name, "
                      f"an image id or a number 1-{len(names)} ({', '.join(names)})")


@torch.no_grad()
def sample_detex(ctx: Context, subject: Subject, row: dict, prompt: str, n: int) -> list[dict]:
    """n images of `prompt` with the subject token, plus a kept photo's pose/background."""
    parts, cfg = ctx.parts, ctx.config.generate
    path = ctx.catalog.blob_path(row["file"])
    weights = DetexWeights.read(path)
    kept = {POSE: (kept_photo(subject, weights, cfg.keep_pose, "generate.keep_pose"), "pose"),
            BACKGROUND: (kept_photo(subject, weights, cfg.keep_background, "generate.keep_background"), "background")}
    text = keeping(subject_prompt(prompt, subject, f"{weights.token} {subject.class_name}"),
                   kept[POSE][0] is not None, kept[BACKGROUND][0] is not None)
    injected = {placeholder: weights.mapper(name)(weights.features(name)[index:index + 1])
                for placeholder, (index, name) in kept.items() if index is not None}
    with family_tokens(parts, {weights.token: subject.class_name}, cfg.resolution, ATTRIBUTES) as c:
        c.load_vectors({weights.token: weights.vector})
        embeds = c.embed([text], {k: v.to(parts.unet.device) for k, v in injected.items()})
    recorded = json.dumps({f"keep_{name}": None if index is None else weights.photos[index]
                           for index, name in kept.values()})
    return generate_with_loras(ctx.catalog, ctx.config, parts, ctx.base, text, n, subject, [(NAME, path)], NAME,
                               row["adapter_id"], embeds, recorded)


def export_files(weights: DetexWeights, out: Path) -> list[Path]:
    """What a plain diffusers user loads: the K/V LoRA and the token, each in diffusers' format
    (SDXL: the second text encoder's rows in a `_2` file, as textual_inversion_sdxl.py saves them)."""
    lora = out / WEIGHT_NAME
    lora.write_bytes(save(weights.lora, metadata={"format": "pt"}))
    files = [lora]
    for name, data in textual_inversion_files({weights.token: weights.vector}, weights.widths, EMBEDDINGS_STEM).items():
        files.append(out / name)
        files[-1].write_bytes(data)
    return files


class Detex(Method):
    name = NAME
    summary = "a subject token beside per-photo pose/background embeddings; K/V LoRA on a masked loss"
    sections = ("train", "detex")
    families = ("sd", "sdxl")  # the token goes into every CLIP text encoder
    steps_setting = "detex.steps"
    keeps_attributes = True

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        return detex_id(ctx, subject)

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_detex(ctx, subject, stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_detex(ctx, subject, artefacts[NAME], prompt, n)

    def variant(self, config: Config) -> str | None:
        kept = [f"{name} {value}" for name, value in (("pose", config.generate.keep_pose),
                                                       ("background", config.generate.keep_background)) if value]
        return f"keep {', '.join(kept)}" if kept else None

    def export(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, out: Path) -> list[Path]:
        files = super().export(ctx, subject, artefacts, out)
        weights = DetexWeights.read(ctx.catalog.blob_path(artefacts[NAME]["file"]))
        exported = export_files(weights, out)
        readme = out / "README.md"
        readme.write_text(_readme(ctx.base, weights, subject))
        return exported + [readme] + files


def _readme(base: str, weights: DetexWeights, subject: Subject) -> str:
    example = f"a photo of {weights.token} {subject.class_name} on a beach"
    pipeline, loads = textual_inversion_usage([weights.token], weights.widths, EMBEDDINGS_STEM)
    return f"""# DETEX: {subject.name} ({subject.class_name})

Base model: `{base}`. Trained by subjectflow's `detex` method: a learned token `{weights.token}`
and a LoRA on the cross-attention keys and values. Two stock diffusers calls load it:

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("<the base model>")
pipe.load_lora_weights(".", weight_name="{WEIGHT_NAME}")
{loads}
image = pipe("{example}").images[0]
```

`{NAME}.safetensors` also holds the pose and background mappers and the training photos'
features; keeping a training photo's pose or background needs subjectflow:
`subjectflow generate --method {NAME} --subject {subject.name} --keep-pose PHOTO --keep-background PHOTO`.
"""


METHOD = Detex()
