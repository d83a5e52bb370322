"""Zero-shot SFO on the JeDi model: one SFO LoRA on the (LoRA) joint model from the CDNS
pairs of every training subject with two photos or more, so it learns fidelity to
references rather than to one subject."""

from __future__ import annotations

import json

from ...catalog import Catalog
from ...catalog.schemas import MODELS
from ...config import Config, stable_hash
from ...models.families import Prompt
from ...training.adapters import fused, load_lora_file, lora_file_bytes, trained_adapter
from ...training.artefacts import autocast_dtype, file_latents, record_trained
from ...training.loop import train
from ...training.subjects import Subject, TuningError, training_subjects
from ..base import Context
from ..sfo.objective import SfoObjective
from .attention import coupled
from .completion import SFO_ADAPTER, jedi_negative_plan, make_jedi_negatives
from .model import JEDI
from .set_latents import embed_all

SFO_JOINT = "sfo-joint"
# The pair's condition, one per pair by its negative's id: a rich caption, as the SFO paper
# conditions its pairs (it writes them with a captioner; these are our templates).
CAPTIONS = ("a photo of a {c}", "a close-up photo of a {c}", "a product photo of a {c} on a plain background",
            "a {c} on a wooden table", "a studio photo of a {c}, soft light", "a {c} seen from the side",
            "a {c} in a bright room", "a detailed photo of a {c}")
# How a pair is made (part of the id): the negative completes a set whose known member is the
# blurred context photo, under the generic prompt; the positive is another photo of the subject.
PAIRING = "negative-from-blurred-context@v2"


def pair_caption(class_name: str, negative_id: str) -> str:
    return CAPTIONS[int(stable_hash(negative_id), 16) % len(CAPTIONS)].format(c=class_name)


def sfo_joint_params(config: Config, base: str, parent: str) -> dict:
    return {"method": SFO_JOINT, "base": base, "parent": parent, "sfo": config.sfo.identity(),
            "negatives": config.negatives.identity(), "train": config.train.identity(), "pairing": PAIRING,
            "captions": list(CAPTIONS)}


def pair_subjects(catalog: Catalog, config: Config) -> list[Subject]:
    """Training subjects with a context photo besides the positive: two photos or more."""
    return [s for s in training_subjects(catalog, config) if len(s.images) >= 2]


def sfo_joint_id(catalog: Catalog, config: Config, base: str, joint_model_id: str) -> str:
    """Its params and the JeDi negatives it trains on: every pair subject's, planned (none is made)."""
    model = {"model_id": joint_model_id}
    negative_ids = [nid for subject in pair_subjects(catalog, config)
                    for nid, _, _ in jedi_negative_plan(subject, config, base, model)]
    return stable_hash([sfo_joint_params(config, base, joint_model_id), sorted(negative_ids)])


def train_sfo_joint(ctx: Context, model: dict, stop_after: int | None = None) -> dict:
    """One SFO LoRA on the (LoRA) joint model from the CDNS pairs of every subject, as CDNS
    makes them for a reference-conditioned model: a context photo C is the known member of a
    set of two; the negative completes the set from blurred C under the generic prompt, the
    positive is another photo of the subject, and the pair's condition is a rich caption. So
    the LoRA learns fidelity to references rather than to one subject."""
    catalog, config, parts, base = ctx.catalog, ctx.config, ctx.parts, ctx.base
    if model["weights"] != "lora":
        raise TuningError("zero-shot SFO needs a LoRA joint model (joint.weights: lora) as its frozen reference")
    positives, negatives, contexts, captions, negative_ids, pairs = [], [], [], [], [], []
    usable = {s.subject_id for s in pair_subjects(catalog, config)}
    for subject in training_subjects(catalog, config):
        if subject.subject_id not in usable:
            ctx.say(f"{subject.name}: skipped for zero-shot SFO: one photo, and a pair needs a context photo "
                    f"besides its positive")
            continue
        made = make_jedi_negatives(catalog, subject, config, parts, base, model)
        files = {r["image_id"]: r["normalised_file"] for r in subject.images}
        order = [r["image_id"] for r in subject.images]
        for negative in made:  # a JeDi negative is made from its blurred image_id: the context
            positive = order[(order.index(negative["image_id"]) + 1) % len(order)]
            positives.append(files[positive])
            negatives.append(negative["file"])
            contexts.append(files[negative["image_id"]])
            captions.append(pair_caption(subject.class_name, negative["negative_id"]))
            negative_ids.append(negative["negative_id"])
            pairs.append({"negative_id": negative["negative_id"], "positive": positive,
                          "context": negative["image_id"], "negative_source": f"blurred {negative['image_id']}",
                          "caption": captions[-1]})
        ctx.say(f"{subject.name}: {len(made)} CDNS pairs from the joint model")
    params = sfo_joint_params(config, base, model["model_id"])
    model_id = stable_hash([params, sorted(negative_ids)])
    resolution = config.train.resolution
    embeds = embed_all(parts, captions, resolution)
    load_lora_file(parts.unet, catalog.blob_path(model["file"]), JEDI)
    with fused(parts.unet, JEDI), trained_adapter(parts.unet, config.sfo.lora_rank, SFO_ADAPTER,
                                                  config.train.seed) as trainable:
        objective = SfoObjective(parts.unet, parts.noise_scheduler, file_latents(parts, catalog, positives, resolution),
                                 file_latents(parts, catalog, negatives, resolution),
                                 Prompt.cat([embeds[c] for c in captions]).to(parts.unet.device), trainable,
                                 config.sfo.beta, config.sfo.batch_size or config.train.batch_size, adapter_name=SFO_ADAPTER,
                                 context_latents=file_latents(parts, catalog, contexts, resolution))
        with coupled(parts.unet, 2):
            result = train(objective, config.train, catalog.work_dir("joint", model_id), config.sfo.steps,
                           config.sfo.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after,
                           on_checkpoint=catalog.keep_work)
        if stop_after is not None and stop_after < config.sfo.steps:
            return {"model_id": model_id, "interrupted_at": stop_after}
        row = {"model_id": model_id, "method": SFO_JOINT, "weights": "lora", "base_model": base,
               "parent_model_id": model["model_id"], "params": json.dumps({**params, "pairs": pairs}, sort_keys=True),
               "inputs_hash": stable_hash(sorted(negative_ids)), "steps": result.steps,
               "final_loss": result.final_loss}
        return record_trained(catalog, MODELS, "models", row, result.history, lora_file_bytes(parts.unet, SFO_ADAPTER))
