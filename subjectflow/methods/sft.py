"""SFT: DreamBooth-LoRA per subject, SFO's starting point (METHODS.md section 1).

Noise a subject photo's latent at a uniform timestep and regress the noise under the
instance prompt "a photo of sks <class>", optionally with prior preservation on the base
model's own class images (Ruiz et al. 2023, eq. 2; cached in the catalog, see
training/class_images.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from ..catalog.schemas import ADAPTERS
from ..config import Config
from ..models.families import Prompt
from ..training.adapters import adapter_state, load_adapter_state, lora_file_bytes, trained_adapter
from ..training.artefacts import adapter_id, autocast_dtype, file_latents, prepare_unet, record_trained
from ..training.class_images import class_image_latents, planned_class_images
from ..training.data import class_prompt, instance_prompt
from ..training.diffusion import Metrics, denoising_loss, noised_prediction, pick
from ..training.loop import train
from ..training.sampling import identified, sample_adapters
from ..training.subjects import Subject
from .base import Artefacts, Context, Method

NAME = "sft"


@dataclass
class SftObjective:
    unet: UNet2DConditionModel
    scheduler: object
    instance_latents: torch.Tensor  # [N, C, h, w] of the subject's photos
    instance_embeds: Prompt  # "a photo of sks <class>", as the base model's family encodes it
    trainable: list[torch.nn.Parameter]
    batch_size: int = 1
    adapter_name: str = NAME
    class_latents: torch.Tensor | None = None  # prior preservation: base-model class images
    class_embeds: Prompt | None = None
    prior_weight: float = 1.0
    timesteps: str = "uniform"  # the family's SFT timestep density (Family.sft_timesteps)
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self._dtype = self.unet.dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        pred, target = noised_prediction(self.unet, self._dtype, self.scheduler,
                                         pick(self.instance_latents, self.batch_size, generator), self.instance_embeds,
                                         generator, self.timesteps)
        if self.class_latents is None:
            return denoising_loss(pred, target)
        prior_pred, prior_target = noised_prediction(self.unet, self._dtype, self.scheduler,
                                                     pick(self.class_latents, self.batch_size, generator),
                                                     self.class_embeds, generator, self.timesteps)
        return denoising_loss(pred, target, prior_pred, prior_target, self.prior_weight)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.unet, self.adapter_name)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.unet, state, self.adapter_name)


def sft_params(config: Config, base: str) -> dict:
    return {"method": NAME, "base": base, "train": config.train.identity(), "sft": config.sft.identity()}


def sft_id(config: Config, base: str, subject: Subject) -> str:
    """Its params, the subject, and with prior preservation the class images it trains on."""
    priors = ([key for key, _ in planned_class_images(config, base, subject.class_name)]
              if config.sft.prior_preservation else [])
    return adapter_id(sft_params(config, base), subject, priors)


def train_sft(ctx: Context, subject: Subject, stop_after: int | None = None) -> dict:
    config, parts, catalog = ctx.config, ctx.parts, ctx.catalog
    params = sft_params(config, ctx.base)
    adapter = sft_id(config, ctx.base, subject)
    latents = file_latents(parts, catalog, [r["normalised_file"] for r in subject.images], config.train.resolution)
    prompt = instance_prompt(config.sft.identifier, subject.class_name)
    embeds = parts.family.encode(parts, prompt, config.train.resolution)
    class_latents = class_embeds = None
    if config.sft.prior_preservation:
        class_latents = class_image_latents(ctx, subject.class_name)
        class_embeds = parts.family.encode(parts, class_prompt(subject.class_name), config.train.resolution)
    prepare_unet(parts, config.train)
    with trained_adapter(parts.unet, config.train.lora_rank, NAME, config.train.seed) as trainable:
        objective = SftObjective(parts.unet, parts.noise_scheduler, latents, embeds, trainable,
                                 config.train.batch_size, NAME, class_latents, class_embeds, config.sft.prior_weight,
                                 parts.family.sft_timesteps)
        result = train(objective, config.train, catalog.work_dir("tune", adapter), config.train.steps,
                       config.train.learning_rate, autocast_dtype(parts), parts.unet.device, stop_after,
                       on_checkpoint=catalog.keep_work)
        if stop_after is not None and stop_after < config.train.steps:
            return {"adapter_id": adapter, "interrupted_at": stop_after}
        row = {"adapter_id": adapter, "subject_id": subject.subject_id, "method": NAME, "base_model": ctx.base,
               "parent_adapter_id": None, "params": json.dumps(params, sort_keys=True),
               "inputs_hash": subject.inputs_hash, "steps": result.steps, "final_loss": result.final_loss}
        return record_trained(catalog, ADAPTERS, "adapters", row, result.history, lora_file_bytes(parts.unet, NAME))


class Sft(Method):
    name = NAME
    summary = "DreamBooth-LoRA per subject on its photos (SFO's starting point)"
    sections = ("train", "sft")
    families = ("sd", "sdxl", "sd3", "flux")

    def artefact_id(self, ctx: Context, subject: Subject | None, needs: dict[str, str]) -> str:
        return sft_id(ctx.config, ctx.base, subject)

    def train(self, ctx: Context, subject: Subject | None, needs: Artefacts, stop_after: int | None = None) -> dict:
        return train_sft(ctx, subject, stop_after)

    def sample(self, ctx: Context, subject: Subject | None, artefacts: Artefacts, prompt: str, n: int,
               references: int | None = None) -> list[dict]:
        return sample_adapters(ctx.catalog, ctx.config, ctx.parts, ctx.base, subject, [artefacts[NAME]], prompt, n,
                               NAME)

    def lora_policy(self, ctx: Context, subject: Subject | None, artefacts: Artefacts) -> tuple[str, list[dict]]:
        return identified(ctx.config, subject), [artefacts[NAME]]


METHOD = Sft()
