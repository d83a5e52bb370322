"""OneActor's auxiliary cluster: base-model samples of "a photo of {class}" with their
last-step UNet features, made once per (base, class, settings) and kept in the `clusters`
table, so every subject of a class shares one and a re-run makes none."""

from __future__ import annotations

import json

import pyarrow as pa
import safetensors.torch
import torch
from diffusers import DDIMScheduler

from ...catalog.schemas import CLUSTERS
from ...catalog.store import utcnow
from ...config import Config, stable_hash
from ...training.artefacts import find_row
from ...training.data import class_prompt
from ..base import Context
from .math import sample_with_features


def cluster_params(config: Config, base: str, class_name: str) -> dict:
    return {"base": base, "prompt": class_prompt(class_name), "images": config.oneactor.aux_images,
            "steps": config.oneactor.cluster_steps, "guidance": config.generate.guidance,
            "resolution": config.train.resolution, "seed": config.train.seed}


def cluster_id(config: Config, base: str, class_name: str) -> str:
    return stable_hash(cluster_params(config, base, class_name))


def sampling_scheduler(ctx: Context) -> DDIMScheduler:
    # The schedule the rest of subjectflow samples with (the paper's DPM-Solver is not used).
    return DDIMScheduler.from_config(ctx.parts.noise_scheduler.config)


def auxiliary_cluster(ctx: Context, class_name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(row, latents [N, C, h, w], features h [N, C', S, S]) of the class's cluster, on the
    UNet's device; sampled and recorded first when the catalog has none for these settings."""
    key = cluster_id(ctx.config, ctx.base, class_name)
    row = find_row(ctx.catalog, CLUSTERS, key)
    if row is None:
        row = _make_cluster(ctx, class_name, key)
        ctx.made.append(f"{class_name} cluster {key}")
    else:
        ctx.reused.append(f"{class_name} cluster {key}")
    tensors = safetensors.torch.load(ctx.catalog.blob_path(row["file"]).read_bytes())
    device = ctx.parts.unet.device
    return row, tensors["latents"].to(device), tensors["features"].to(device)


def _make_cluster(ctx: Context, class_name: str, key: str) -> dict:
    parts, params = ctx.parts, cluster_params(ctx.config, ctx.base, class_name)
    ctx.say(f"sampling OneActor's auxiliary cluster for {class_name!r}: {params['images']} base-model images")
    dtype = parts.unet.dtype
    class_embeds = parts.family.encode(parts, params["prompt"], params["resolution"]).to(dtype)
    uncond_embeds = parts.family.unconditional(parts, params["resolution"]).to(dtype)
    latents, features = sample_with_features(
        parts.unet, sampling_scheduler(ctx), parts.vae, class_embeds, uncond_embeds, params["images"],
        steps=params["steps"], guidance=params["guidance"],
        generator=torch.Generator("cpu").manual_seed(params["seed"]),
        height=params["resolution"], width=params["resolution"])
    data = safetensors.torch.save({"latents": latents.float().cpu().contiguous(),
                                   "features": features.float().cpu().contiguous()})
    row = {"cluster_id": key, "base_model": ctx.base, "class_name": class_name, "images": params["images"],
           "file": ctx.catalog.put_blob("clusters", data, ".safetensors"),
           "params": json.dumps(params, sort_keys=True), "created_at": utcnow()}
    with ctx.catalog.writer():
        ctx.catalog.upsert(CLUSTERS.name, pa.Table.from_pylist([row], schema=CLUSTERS.schema))
    return row
