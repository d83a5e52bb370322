"""OneActor: cluster-conditioned guidance (METHODS.md section 3; Wang et al. 2024).

Per subject a projector maps UNet features of the subject's photos (the target cluster)
to an offset on the class word's text embedding; the base model stays frozen. Sampling
steers towards the target's offset and away from the auxiliary cluster's mean offset on
the first steps. Its home: the maths (`math.py`), the shared auxiliary clusters
(`clusters.py`), and the method here.

The target cluster is the subject's real photos, which have no sampling trajectory: their
feature h comes from one UNet call on each photo's latent noised to the last step of the
cluster schedule under the class prompt (recorded in the adapter's params with its t).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import torch

from ...catalog.schemas import ADAPTERS
from ...config import Config
from ...ingest.photo import encode_png
from ...progress import progress
from ...training.adapters import frozen
from ...training.artefacts import adapter_id, autocast_dtype, file_latents, prepare_unet, record_trained
from ...training.data import class_prompt, decode_image
from ...training.loop import train
from ...training.sampling import record_samples, sample_row, subject_prompt
from ...training.subjects import Subject
from ..base import Artefacts, Context, Method
from .clusters import auxiliary_cluster, cluster_id, sampling_scheduler
from .math import (PRESETS, GuidanceSettings, OneActorObjective, Projector, class_token_positions, last_step_features,
                   last_timestep, load_projector, projector_bytes, template_embeddings)
from .math import sample as guided_sample

NAME = "oneactor"
TARGET_FEATURES = "photo latent noised to the last cluster step, class prompt"


def oneactor_params(config: Config, base: str, class_name: str) -> dict:
    """What shapes the projector; the guidance settings only shape samples (`sampling_settings`)."""
    tuning = config.oneactor.identity(exclude={"preset", "guided_steps", "batch_stats"})
    return {"method": NAME, "base": base, "resolution": config.train.resolution, "seed": config.train.seed,
            "gradient_accumulation": config.train.gradient_accumulation,
            **config.train.identity(include={"max_grad_norm", "warmup_steps"}), "oneactor": tuning,
            "cluster": cluster_id(config, base, class_name), "target_features": TARGET_FEATURES}


def guidance_settings(config: Config) -> GuidanceSettings:
    return replace(PRESETS[config.oneactor.preset], guided_steps=config.oneactor.guided_steps,
                   guidance=config.generate.guidance)


def train_oneactor(ctx: Context, subject: Subject, stop_after: int | None = None) -> dict:
    config, parts, catalog, oa = ctx.config, ctx.parts, ctx.catalog, ctx.config.oneactor
    params = oneactor_params(config, ctx.base, subject.class_name)
    adapter = adapter_id(params, subject)
    _, aux_latents, aux_h = auxiliary_cluster(ctx, subject.class_name)
    photos = [r["normalised_file"] for r in subject.images]
    target_latents = file_latents(parts, catalog, photos, config.train.resolution)
    resolution, family = config.train.resolution, parts.family
    class_embeds = family.encode(parts, class_prompt(subject.class_name), resolution)
    scheduler = sampling_scheduler(ctx)
    target_h = last_step_features(parts.unet, scheduler, target_latents, class_embeds, oa.cluster_steps,
                                  generator=torch.Generator("cpu").manual_seed(config.train.seed))
    embeds, positions = template_embeddings(lambda text: family.encode(parts, text, resolution), parts.tokenizer,
                                            subject.class_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)  # the projector's init, reproducible
        # The offset lives in the token states' width: SDXL's is both encoders' side by side (2,048).
        projector = Projector.for_unet(parts.unet, parts.unet.config.cross_attention_dim,
                                       sample_size=target_latents.shape[-1]).to(parts.unet.device)
    # The paper's optimiser whatever `train` says; the loop's other settings (checkpoints) hold.
    train_cfg = config.train.model_copy(update={"optimizer": "adamw", "weight_decay": oa.weight_decay})
    prepare_unet(parts, config.train)
    with frozen(parts.unet):
        objective = OneActorObjective(parts.unet, parts.noise_scheduler, projector, target_latents, target_h,
                                      aux_latents, aux_h, embeds, positions, oa.aux_per_step, oa.aux_weight,
                                      oa.average_weight)
        result = train(objective, train_cfg, catalog.work_dir("tune", adapter), oa.steps,
                       oa.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after,
                       on_checkpoint=catalog.keep_work)
    if stop_after is not None and stop_after < oa.steps:
        return {"adapter_id": adapter, "interrupted_at": stop_after}
    recorded = {**params, "target_timestep": last_timestep(scheduler, oa.cluster_steps)}
    row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": NAME, "base_model": ctx.base,
           "parent_adapter_id": None, "params": json.dumps(recorded, sort_keys=True),
           "inputs_hash": subject.inputs_hash, "steps": result.steps, "final_loss": result.final_loss}
    weights = projector_bytes(projector, {"target": target_h, "auxiliary": aux_h})
    return record_trained(catalog, ADAPTERS, "adapters", row, result.history, weights)


@torch.no_grad()
def sample_oneactor(ctx: Context, subject: Subject, row: dict, prompt: str, n: int) -> list[dict]:
    """n cluster-guided images of `prompt`, the subject named by its class noun alone: the
    offset on that word carries the identity."""
    config, parts, cfg = ctx.config, ctx.parts, ctx.config.generate
    settings = guidance_settings(config)
    unet = parts.unet
    projector, features = load_projector(ctx.catalog.blob_path(row["file"]).read_bytes(), unet.device)
    batch_stats = config.oneactor.batch_stats
    delta_target = projector.project(features["target"], batch_stats).mean(dim=0)
    delta_average = projector.project(features["auxiliary"], batch_stats).mean(dim=0)
    text = subject_prompt(prompt, subject, subject.class_name)
    positions = class_token_positions(parts.tokenizer, text, subject.class_name)
    cond = parts.family.encode(parts, text, cfg.resolution).to(unet.dtype)
    uncond = parts.family.unconditional(parts, cfg.resolution).to(unet.dtype)
    scheduler = sampling_scheduler(ctx)
    recorded = json.dumps({**asdict(settings), "batch_stats": batch_stats, "preset": config.oneactor.preset})
    rows = []
    with progress(n, f"generate {NAME}", unit="image") as shown:
        for i in range(n):
            seed = cfg.seed + i
            latents = guided_sample(unet, scheduler, parts.vae, cond, uncond, delta_target, delta_average, positions,
                                    settings, steps=cfg.steps, generator=torch.Generator("cpu").manual_seed(seed),
                                    height=cfg.resolution, width=cfg.resolution)
            image = encode_png(decode_image(parts.vae, latents))
            rows.append(sample_row(ctx.catalog, image, subject_id=subject.subject_id, adapter_id=row["adapter_id"],
                                   method=NAME, prompt=text, seed=seed, steps=cfg.steps, guidance=cfg.guidance,
                                   resolution=cfg.resolution, base_model=ctx.base, params=recorded))
            shown.update()
    return record_samples(ctx.catalog, rows)


class OneActor(Method):
    name = NAME
    summary = "a projector from the subject's UNet features to a class-word offset; cluster-guided sampling"
    sections = ("train", "oneactor")  # train: its resolution and seed
    families = ("sd", "sdxl")  # SDXL is the released code's only setting
    steps_setting = "oneactor.steps"

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        return adapter_id(oneactor_params(ctx.config, ctx.base, subject.class_name), subject)

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_oneactor(ctx, subject, stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_oneactor(ctx, subject, artefacts[NAME], prompt, n)

    def sampling_settings(self, config: Config) -> dict:
        oa = config.oneactor
        return {"preset": oa.preset, "guided_steps": oa.guided_steps, "batch_stats": oa.batch_stats}


METHOD = OneActor()
