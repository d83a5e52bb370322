"""Zero-shot SFO on the JeDi model: one SFO LoRA on the (LoRA) joint model from the CDNS
pairs of every subject, so it learns fidelity to references rather than to one subject."""

from __future__ import annotations

import json

import torch

from ...catalog import Catalog
from ...catalog.layout import WORK_DIR
from ...catalog.schemas import MODELS
from ...config import Config, stable_hash
from ...training.adapters import fused, load_lora_file, lora_file_bytes, trained_adapter
from ...training.artefacts import autocast_dtype, file_latents, record_trained
from ...training.loop import train
from ...training.subjects import TuningError, training_subjects
from ..base import Context
from ..sfo.objective import SfoObjective
from .attention import coupled
from .completion import SFO_ADAPTER, jedi_negative_plan, make_jedi_negatives, reference_caption
from .model import JEDI, embed_all

SFO_JOINT = "sfo-joint"


def sfo_joint_params(config: Config, base: str, parent: str) -> dict:
    return {"method": SFO_JOINT, "base": base, "parent": parent, "sfo": config.sfo.identity(),
            "negatives": config.negatives.identity(), "train": config.train.identity()}


def sfo_joint_id(catalog: Catalog, config: Config, base: str, joint_model_id: str) -> str:
    """Its params and the JeDi negatives it trains on: every subject's, planned (none is made)."""
    model = {"model_id": joint_model_id}
    negative_ids = [nid for subject in training_subjects(catalog, config)
                    for nid, _, _ in jedi_negative_plan(subject, config, base, model)]
    return stable_hash([sfo_joint_params(config, base, joint_model_id), sorted(negative_ids)])


def train_sfo_joint(ctx: Context, model: dict, stop_after: int | None = None) -> dict:
    """One SFO LoRA on the (LoRA) joint model from the CDNS pairs of every subject: each pair
    is scored as the unknown member of a set of two whose known member is another photo of
    the same subject, so the LoRA learns fidelity to references rather than to one subject."""
    catalog, config, parts, base = ctx.catalog, ctx.config, ctx.parts, ctx.base
    if model["weights"] != "lora":
        raise TuningError("zero-shot SFO needs a LoRA joint model (joint.weights: lora) as its frozen reference")
    positives, negatives, contexts, captions, negative_ids = [], [], [], [], []
    for subject in training_subjects(catalog, config):
        made = make_jedi_negatives(catalog, subject, config, parts, base, model)
        files = {r["image_id"]: r["normalised_file"] for r in subject.images}
        order = [r["image_id"] for r in subject.images]
        for negative in made:
            other = order[(order.index(negative["image_id"]) + 1) % len(order)]  # itself when the only photo
            positives.append(files[negative["image_id"]])
            negatives.append(negative["file"])
            contexts.append(files[other])
            captions.append(reference_caption(subject))
            negative_ids.append(negative["negative_id"])
        ctx.say(f"{subject.name}: {len(made)} CDNS pairs from the joint model")
    params = sfo_joint_params(config, base, model["model_id"])
    model_id = stable_hash([params, sorted(negative_ids)])
    resolution = config.train.resolution
    embeds = embed_all(parts, captions)
    load_lora_file(parts.unet, catalog.blob_path(model["file"]), JEDI)
    with fused(parts.unet, JEDI), trained_adapter(parts.unet, config.sfo.lora_rank, SFO_ADAPTER,
                                                  config.train.seed) as trainable:
        objective = SfoObjective(parts.unet, parts.noise_scheduler, file_latents(parts, catalog, positives, resolution),
                                 file_latents(parts, catalog, negatives, resolution),
                                 torch.stack([embeds[c] for c in captions]).to(parts.unet.device), trainable,
                                 config.sfo.beta, config.sfo.batch_size or config.train.batch_size, adapter_name=SFO_ADAPTER,
                                 context_latents=file_latents(parts, catalog, contexts, resolution))
        with coupled(parts.unet, 2):
            result = train(objective, config.train, catalog.root / WORK_DIR / "joint" / model_id, config.sfo.steps,
                           config.sfo.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after)
        if stop_after is not None and stop_after < config.sfo.steps:
            return {"model_id": model_id, "interrupted_at": stop_after}
        row = {"model_id": model_id, "method": SFO_JOINT, "weights": "lora", "base_model": base,
               "parent_model_id": model["model_id"], "params": json.dumps(params, sort_keys=True),
               "inputs_hash": stable_hash(sorted(negative_ids)), "steps": result.steps,
               "final_loss": result.final_loss}
        return record_trained(catalog, MODELS, "models", row, result.history, lora_file_bytes(parts.unet, SFO_ADAPTER))
