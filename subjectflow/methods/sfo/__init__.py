"""SFO: Subject Fidelity Optimization on CDNS negatives (METHODS.md section 1).

Per subject: a rank-16 SFO LoRA on top of the frozen SFT adapter, trained on (photo, CDNS
negative) pairs. Its home: the loss (`loss.py`), the negatives' pure parts (`cdns.py`)
and catalog rows (`negatives.py`), the objective (`objective.py`), and the method here.
"""

from __future__ import annotations

import json

from ...catalog.schemas import ADAPTERS
from ...config import Config, stable_hash
from ...training.adapters import fused, load_lora_file, lora_file_bytes, trained_adapter
from ...training.artefacts import adapter_id, autocast_dtype, file_latents, prepare_unet, record_trained
from ...training.data import instance_prompt
from ...training.loop import train
from ...training.sampling import identified, sample_adapters
from ...training.subjects import Subject
from ..base import Artefacts, Context, Method
from .negatives import make_negatives, missing, planned_negatives
from .objective import SfoObjective

NAME = "sfo"


def sfo_params(config: Config, base: str, sft_adapter_id: str) -> dict:
    return {"method": NAME, "base": base, "train": config.train.identity(), "sfo": config.sfo.identity(),
            "negatives": config.negatives.identity(), "parent": sft_adapter_id}


def train_sfo(ctx: Context, subject: Subject, sft_adapter: dict, negatives: list[dict],
              stop_after: int | None = None) -> dict:
    config, parts, catalog = ctx.config, ctx.parts, ctx.catalog
    params = sfo_params(config, ctx.base, sft_adapter["adapter_id"])
    adapter = adapter_id(params, subject, [n["negative_id"] for n in negatives])
    files = {r["image_id"]: r["normalised_file"] for r in subject.images}
    resolution = config.train.resolution
    positives = file_latents(parts, catalog, [files[n["image_id"]] for n in negatives], resolution)
    negative_latents = file_latents(parts, catalog, [n["file"] for n in negatives], resolution)
    prompt = instance_prompt(config.sft.identifier, subject.class_name)
    embeds = parts.family.encode(parts, prompt, resolution)
    prepare_unet(parts, config.train)
    load_lora_file(parts.unet, catalog.blob_path(sft_adapter["file"]), "sft")
    with fused(parts.unet, "sft"), trained_adapter(parts.unet, config.sfo.lora_rank, NAME,
                                                   config.train.seed) as trainable:
        objective = SfoObjective(parts.unet, parts.noise_scheduler, positives, negative_latents, embeds, trainable,
                                 config.sfo.beta, config.sfo.batch_size or config.train.batch_size)
        result = train(objective, config.train, catalog.work_dir("tune", adapter), config.sfo.steps,
                       config.sfo.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after,
                       on_checkpoint=catalog.keep_work)
        if stop_after is not None and stop_after < config.sfo.steps:
            return {"adapter_id": adapter, "interrupted_at": stop_after}
        row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": NAME, "base_model": ctx.base,
               "parent_adapter_id": sft_adapter["adapter_id"], "params": json.dumps(params, sort_keys=True),
               "inputs_hash": stable_hash([subject.inputs_hash, sorted(n["negative_id"] for n in negatives)]),
               "steps": result.steps, "final_loss": result.final_loss}
        return record_trained(catalog, ADAPTERS, "adapters", row, result.history, lora_file_bytes(parts.unet, NAME))


class Sfo(Method):
    name = NAME
    summary = "a rank-16 LoRA on the frozen SFT adapter, pairwise on (photo, CDNS negative)"
    needs = ("sft",)
    sections = ("train", "sfo", "negatives")
    makes_negatives = True
    steps_setting = "sfo.steps"
    families = ("sd", "sdxl", "sd3", "flux")

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        negatives = [nid for nid, _, _ in planned_negatives(subject, ctx.config, needs["sft"], ctx.base)]
        return adapter_id(sfo_params(ctx.config, ctx.base, needs["sft"]), subject, negatives)

    def negatives(self, ctx: Context, subject: Subject, artefacts: Artefacts) -> list[dict]:
        planned = planned_negatives(subject, ctx.config, artefacts["sft"]["adapter_id"], ctx.base)
        todo = len(missing(ctx.catalog, planned)[1])
        if todo:
            ctx.say(f"{subject.name}: making {todo} of {len(planned)} CDNS negatives")
            ctx.made.append(f"{todo} negatives")
        if len(planned) > todo:
            ctx.reused.append(f"{len(planned) - todo} negatives")
        return make_negatives(ctx.catalog, subject, ctx.config, ctx.parts, ctx.base, artefacts["sft"])

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_sfo(ctx, subject, needs["sft"], self.negatives(ctx, subject, needs), stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        stack = [artefacts["sft"], artefacts[NAME]]  # SFO's LoRA sits on the frozen SFT one
        return sample_adapters(ctx.catalog, ctx.config, ctx.parts, ctx.base, subject, stack, prompt, n, NAME)

    def lora_policy(self, ctx: Context, subject: Subject | None, artefacts: Artefacts) -> tuple[str, list[dict]]:
        return identified(ctx.config, subject), [artefacts["sft"], artefacts[NAME]]

    def weights(self, artefacts: Artefacts) -> list[tuple[str, dict]]:
        return [("sft.safetensors", artefacts["sft"]), ("sfo.safetensors", artefacts[NAME])]


METHOD = Sfo()
