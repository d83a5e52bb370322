"""Denoising maths every method shares: noising and regression targets for both schedules
(DDPM; flow matching, SD3 and FLUX), per-sample errors, the plain denoising loss, and one
denoiser call in the model's dtype.

The SFO pairwise loss lives with SFO; this is what SFT, JeDi, OneActor and SFO's own
reference all regress with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

from ..models.families import Prompt

Metrics = dict[str, float]

# Prediction types of diffusers schedulers whose regression target we know how to build.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def flow_matching(noise_scheduler: Any) -> bool:
    """Whether the denoiser was trained by flow matching (SD3, FLUX): x_t = (1 - t)·x0 + t·eps with
    t in [0, 1] (1 = pure noise), regressing the velocity eps - x0."""
    return isinstance(noise_scheduler, FlowMatchEulerDiscreteScheduler)


def noised(noise_scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x0` [B, ...] noised with `noise` at timesteps `t` [B]: DDPM indices, or flow-matching times."""
    if flow_matching(noise_scheduler):
        t = t.to(x0).view(-1, *[1] * (x0.ndim - 1))
        return (1 - t) * x0 + t * noise
    return noise_scheduler.add_noise(x0, noise, t)


def set_sampling_timesteps(scheduler: Any, steps: int, latents: torch.Tensor) -> None:
    """`scheduler.set_timesteps` for a sampling loop over `latents` [B, C, h, w]. A scheduler
    that shifts its sigmas by the image's size (FLUX's `use_dynamic_shifting`) gets the
    shift FluxPipeline computes, from the h/2 · w/2 tokens its transformer sees."""
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps, device=latents.device)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=latents.device, mu=mu)


def model_time(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """A sampling scheduler's timestep as the denoiser call takes it: DDPM indices as they
    are; flow-matching timesteps (sigma x 1000) as the time in [0, 1] (`Prompt.predict`)."""
    return t / scheduler.config.num_train_timesteps if flow_matching(scheduler) else t


def scaled_input(scheduler: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's input scaling where it has one (Euler, DPM); flow matching has none."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def denoising_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser regresses for one noised batch: flow matching's velocity, or by the
    DDPM scheduler's `prediction_type`."""
    if flow_matching(noise_scheduler):
        return noise - latents
    prediction_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"scheduler prediction_type {prediction_type!r} is not supported; "
        f"use one of {', '.join(PREDICTION_TYPES)}"
    )


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # fp32 so bf16/fp16 predictions do not round away the small D_model - D_ref differences.
    squared = (pred.float() - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 1 or pred.shape[0] < 1:
        raise ValueError(f"SFT inputs need a batch dimension of size >= 1, got {tuple(pred.shape)}")
    per_sample = per_sample_error(pred, target)
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights must have shape ({pred.shape[0]},), got {tuple(weights.shape)}")
    return (per_sample * weights.to(per_sample)).mean()


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    prior_pred: torch.Tensor | None = None,
    prior_target: torch.Tensor | None = None,
    prior_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Supervised (DreamBooth) denoising loss: the SFT starting point of METHODS.md section 1.

    loss = mse(pred, target) + prior_weight·mse(prior_pred, prior_target)
    (Ruiz et al. 2023, DreamBooth eq. 2, prior preservation; Shin et al. arXiv 2506.03621
    start SFO from this model). `weights` are optional per-sample weights (e.g. min-SNR) on
    the instance term only, as in the diffusers DreamBooth script.
    """
    if (prior_pred is None) != (prior_target is None):
        raise ValueError("denoising_loss: pass both prior_pred and prior_target, or neither")
    instance_loss = _mse(pred, target, weights)
    if prior_pred is None:
        value = instance_loss.item()
        return instance_loss, {"loss": value, "instance_loss": value}
    prior_loss = _mse(prior_pred, prior_target)
    loss = instance_loss + prior_weight * prior_loss
    values = torch.stack([loss, instance_loss, prior_loss]).detach().tolist()
    return loss, dict(zip(("loss", "instance_loss", "prior_loss"), values))


def pick(latents: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` rows of `latents` drawn with replacement by the step's generator."""
    index = torch.randint(0, latents.shape[0], (batch_size,), generator=generator, device=generator.device)
    return latents[index.to(latents.device)]


def unet_eps(unet: UNet2DConditionModel, dtype: torch.dtype, noisy: torch.Tensor, timesteps: torch.Tensor,
             embeds: Prompt | torch.Tensor) -> torch.Tensor:
    """One denoiser call; inputs in its dtype, the prediction back in fp32 for the loss.

    `embeds` is an encoded `Prompt` (any family: it knows how its denoiser is called), or an
    SD prompt's token states [1 or B, L, D]. `dtype` is passed in because `unet.dtype` walks
    every parameter (ms per call on SD 1.5).
    """
    return Prompt.of(embeds).predict(unet, dtype, noisy, timesteps)


TIMESTEP_DENSITIES = ("uniform", "logit_normal")


def training_timesteps(noise_scheduler: Any, n: int, generator: torch.Generator,
                       density: str = "uniform") -> torch.Tensor:
    """DreamBooth's timesteps [n], on the generator's device: uniform DDPM indices, or for flow
    matching a pick of the scheduler's training sigmas (shifted as the model was trained), as
    diffusers' DreamBooth-LoRA scripts draw them: by `density` (their --weighting_scheme: FLUX's
    "none" is uniform, SD3's default logit_normal(0, 1)), and the loss unweighted."""
    if density not in TIMESTEP_DENSITIES:
        raise ValueError(f"timestep density {density!r} is not one of {', '.join(TIMESTEP_DENSITIES)}")
    steps = int(noise_scheduler.config.num_train_timesteps)
    if density == "logit_normal":
        if not flow_matching(noise_scheduler):
            raise ValueError("logit-normal SFT timesteps are for flow-matching models (SD3)")
        u = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
        index = (u * steps).long().clamp(max=steps - 1)
    else:
        index = torch.randint(0, steps, (n,), generator=generator, device=generator.device)
    if flow_matching(noise_scheduler):
        return noise_scheduler.sigmas[index.cpu()].to(generator.device, torch.float32)
    return index


def noised_prediction(unet: UNet2DConditionModel, dtype: torch.dtype, scheduler: Any, x0: torch.Tensor,
                      embeds: Prompt | torch.Tensor, generator: torch.Generator,
                      density: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """DreamBooth's step: noise `x0` [B, C, h, w] at timesteps drawn by `generator` from
    `density` and return (the denoiser's prediction under `embeds`, its regression target)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    t = training_timesteps(scheduler, x0.shape[0], generator, density).to(x0.device)
    return unet_eps(unet, dtype, noised(scheduler, x0, noise, t), t, embeds), denoising_target(scheduler, x0, noise, t)
