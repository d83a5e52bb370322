"""SFO: Subject Fidelity Optimization (METHODS.md section 1).

Shin et al., "Negative-Guided Subject Fidelity Optimization for Zero-Shot Subject-Driven
Generation", arXiv 2506.03621. Both forms share one pairwise loss (the structure of
Diffusion-DPO, Wallace et al. 2023), and differ in how a pair is noised:

    flow matching (FLUX, the paper's own form): t = sigmoid(n), n ~ N(0, 1), drawn directly
        (not through the scheduler's shifted sigmas); x_t^± = (1-t)·x0^± + t·eps, target eps - x0^±
    DDPM (SD family, our choice): t -> round(t·(T-1)); x_t^± = sqrt(abar_t)·x0^± + sqrt(1-abar_t)·eps,
        target by the scheduler's prediction type
    D     = ||f(x_t+) - target+||² - ||f(x_t-) - target-||²   (per-sample mean; same eps and t in a pair)
    L_SFO = -log sigmoid(-beta·(D_model - D_ref))

The policy is the SFT model plus the SFO adapter; the reference is the frozen SFT model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...training.diffusion import Metrics, denoising_target, flow_matching, noised, per_sample_error



def logit_normal(
    n: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.FloatTensor:
    """Continuous timesteps t = sigmoid(z), z ~ N(mean, std), in [0, 1]; t = 1 is pure noise.

    METHODS.md section 1, "Timestep sampling"; the paper found N(0, 1) clearly better than
    uniform t, N(-2, 1) or N(2, 1).
    """
    if n < 0:
        raise ValueError(f"logit_normal: sample count must be >= 0, got {n}")
    if not std > 0:
        raise ValueError(f"logit_normal: std must be > 0, got {std}")
    if device is None and generator is not None:
        device = generator.device  # torch.randn refuses a generator on another device
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(z * std + mean)


def logit_normal_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.LongTensor:
    """Discrete DDPM indices round(t·(T-1)) for logit-normal t (METHODS.md section 1)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    t = logit_normal(batch_size, generator, mean, std, device)
    # t is in [0, 1] even after float rounding, so the index stays in [0, T-1] without a clamp.
    return torch.round(t * (num_train_timesteps - 1)).long()


@dataclass(frozen=True)
class PairBatch:
    """Noised (positive, negative) latents that share their noise and timestep per pair."""

    noisy_pos: torch.Tensor
    noisy_neg: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor  # [B] DDPM indices, or flow-matching times in [0, 1]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positives then negatives as one batch, so one denoiser call scores both halves."""
        return torch.cat([self.noisy_pos, self.noisy_neg]), torch.cat([self.timesteps, self.timesteps])


def _num_train_timesteps(noise_scheduler: Any) -> int:
    if not hasattr(noise_scheduler, "add_noise"):
        raise ValueError(
            f"{type(noise_scheduler).__name__} has no add_noise(); SFO needs a DDPM-style scheduler "
            "(e.g. diffusers DDPMScheduler) or flow matching's FlowMatchEulerDiscreteScheduler"
        )
    return int(noise_scheduler.config.num_train_timesteps)


def noised_pair(
    latents_pos: torch.Tensor,
    latents_neg: torch.Tensor,
    noise_scheduler: Any,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
) -> PairBatch:
    """Noise both images of each pair with the SAME eps and t (METHODS.md section 1).

    Sharing them is what makes D_model a comparison of the two images rather than of two
    noise draws. t is logit-normal: the flow-matching time itself, or mapped onto a DDPM
    scheduler's discrete train timesteps.
    """
    if latents_pos.shape != latents_neg.shape:
        raise ValueError(
            f"positive and negative latents must have the same shape, got "
            f"{tuple(latents_pos.shape)} and {tuple(latents_neg.shape)}"
        )
    if latents_pos.ndim < 1 or latents_pos.shape[0] < 1:
        raise ValueError(f"latents need a batch dimension of size >= 1, got {tuple(latents_pos.shape)}")
    sample_device = generator.device if generator is not None else latents_pos.device
    noise = torch.randn(latents_pos.shape, generator=generator, device=sample_device, dtype=torch.float32)
    noise = noise.to(latents_pos.device, latents_pos.dtype)
    n = latents_pos.shape[0]
    if flow_matching(noise_scheduler):
        timesteps = logit_normal(n, generator, mean, std, device=sample_device)
    else:
        timesteps = logit_normal_timesteps(n, _num_train_timesteps(noise_scheduler), generator, mean, std,
                                           device=sample_device)
    timesteps = timesteps.to(latents_pos.device)
    return PairBatch(
        noisy_pos=noised(noise_scheduler, latents_pos, noise, timesteps),
        noisy_neg=noised(noise_scheduler, latents_neg, noise, timesteps),
        noise=noise,
        timesteps=timesteps,
    )


def targets(
    pair: PairBatch,
    latents_pos: torch.Tensor,
    latents_neg: torch.Tensor,
    noise_scheduler: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets (target_pos, target_neg) of a pair: same noise, same t."""
    return (
        denoising_target(noise_scheduler, latents_pos, pair.noise, pair.timesteps),
        denoising_target(noise_scheduler, latents_neg, pair.noise, pair.timesteps),
    )


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()):
        raise ValueError(f"SFO inputs must all have the same shape, got {shapes}")
    if len(first) < 1 or first[0] < 1:
        raise ValueError(f"SFO inputs need a batch dimension of size >= 1, got shape {first}")


def sfo_loss(
    policy_pos: torch.Tensor,
    policy_neg: torch.Tensor,
    ref_pos: torch.Tensor,
    ref_neg: torch.Tensor,
    target_pos: torch.Tensor,
    target_neg: torch.Tensor,
    beta: float = 1000.0,
) -> tuple[torch.Tensor, Metrics]:
    """SFO pairwise loss, METHODS.md section 1; Shin et al. arXiv 2506.03621, the L_SFO equation.

    L = mean_i -log sigmoid(-beta·(D_model_i - D_ref_i)),
    D_i = err(pred_pos_i, target_pos_i) - err(pred_neg_i, target_neg_i), err = mean squared error
    over non-batch dims. Beta convention: the paper's plain beta (1000 for FLUX, no 1/2
    factor; = the official Diffusion-DPO code at 2000 and diffusers' DPO script at 1000), in
    both forms. Diffusion-DPO's beta·T·w(lambda_t) scaling is not applied, so SD runs may
    want beta in the thousands.
    The reference is detached: only the policy learns. Equals log 2 when policy == reference.
    """
    _check_same_shape(
        policy_pos=policy_pos, policy_neg=policy_neg, ref_pos=ref_pos, ref_neg=ref_neg,
        target_pos=target_pos, target_neg=target_neg,
    )
    if not beta > 0:
        raise ValueError(f"SFO beta must be > 0, got {beta}")
    policy_err_pos = per_sample_error(policy_pos, target_pos)
    policy_err_neg = per_sample_error(policy_neg, target_neg)
    ref_err_pos = per_sample_error(ref_pos.detach(), target_pos)
    ref_err_neg = per_sample_error(ref_neg.detach(), target_neg)

    # Negative when the policy, more than the reference, fits the positive better than the negative.
    diff = (policy_err_pos - policy_err_neg) - (ref_err_pos - ref_err_neg)
    loss = -F.logsigmoid(-beta * diff).mean()

    values = torch.stack([
        loss, (-diff).mean(), (diff < 0).float().mean(),
        policy_err_pos.mean(), policy_err_neg.mean(), ref_err_pos.mean(), ref_err_neg.mean(),
    ]).detach().tolist()  # one device sync instead of seven
    names = ("loss", "reward_margin", "accuracy",
             "policy_error_pos", "policy_error_neg", "ref_error_pos", "ref_error_neg")
    return loss, dict(zip(names, values))
