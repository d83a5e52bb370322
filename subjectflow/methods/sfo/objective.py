"""SFO's batch and loss for the shared loop (METHODS.md section 1).

A positive (a real photo) and its CDNS negative are noised with the same eps and
logit-normal t (the flow-matching form on FLUX, the DDPM form on SD and SDXL); the policy
(reference + SFO LoRA) is pushed to denoise the positive better than the negative,
relative to the frozen reference (the SFT adapter, or the JeDi model).
The reference is fused into the UNet's weights (`training.adapters.fused`), so the
reference pass is the UNet with its adapters disabled and the policy pass the UNet with
the SFO LoRA: no adapter switching, and no reference LoRA computed in either pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

from ...models.families import Prompt
from ...training.adapters import adapter_state, load_adapter_state
from ...training.diffusion import Metrics, noised, unet_eps
from .loss import noised_pair, sfo_loss, targets


@dataclass
class SfoObjective:
    unet: UNet2DConditionModel  # the reference fused into its weights, and the trainable "sfo" LoRA
    scheduler: object
    positive_latents: torch.Tensor  # [N, C, h, w]
    negative_latents: torch.Tensor  # [N, C, h, w]; row i is a CDNS negative of positive i
    embeds: Prompt  # the shared condition c of every pair (batch 1), or one per pair (batch N)
    trainable: list[torch.nn.Parameter]
    beta: float = 1000.0
    batch_size: int = 1
    adapter_name: str = "sfo"
    # Zero-shot SFO on the JeDi model: row i is a known member shown beside pair i in a set
    # of two, noised with its own draw at the pair's t; the UNet must be coupled (set size 2).
    context_latents: torch.Tensor | None = None
    _dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        if self.positive_latents.shape != self.negative_latents.shape:
            raise ValueError("every positive needs exactly one negative in the same row")
        if self.context_latents is not None and self.context_latents.shape != self.positive_latents.shape:
            raise ValueError("every pair needs exactly one context member in the same row")
        if list(self.unet.peft_config) != [self.adapter_name]:
            raise ValueError(f"SFO trains {self.adapter_name!r} on a UNet with the reference fused in "
                             f"(training.adapters.fused); it also holds {sorted(self.unet.peft_config)}")
        self.unet.set_adapters([self.adapter_name])
        self._dtype = self.unet.dtype

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable

    def _predict(self, noisy: torch.Tensor, t: torch.Tensor, embeds: Prompt,
                 context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            return unet_eps(self.unet, self._dtype, noisy, t, embeds)
        # Sets [context_i, member_i], laid out consecutively; only the members are scored.
        sets = torch.stack([context, noisy], dim=1).flatten(0, 1)
        eps = unet_eps(self.unet, self._dtype, sets, t.repeat_interleave(2), embeds.repeat_interleave(2))
        return eps.unflatten(0, (noisy.shape[0], 2))[:, 1]

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Metrics]:
        index = torch.randint(0, self.positive_latents.shape[0], (self.batch_size,), generator=generator,
                              device=generator.device).to(self.positive_latents.device)
        pos, neg = self.positive_latents[index], self.negative_latents[index]
        pair = noised_pair(pos, neg, self.scheduler, generator)
        noisy, t = pair.stacked()  # one UNet call scores both halves
        embeds = self.embeds.at(index).repeat(2)  # the pair's condition for both halves
        context = None
        if self.context_latents is not None:
            known = self.context_latents[index]
            noise = torch.randn(known.shape, generator=generator, device=generator.device).to(known.device)
            context = noised(self.scheduler, known, noise, pair.timesteps).repeat(2, 1, 1, 1)
        self.unet.disable_adapters()  # the reference: the fused weights alone
        try:
            with torch.no_grad():
                ref_pos, ref_neg = self._predict(noisy, t, embeds, context).chunk(2)
        finally:
            self.unet.enable_adapters()
        policy_pos, policy_neg = self._predict(noisy, t, embeds, context).chunk(2)
        target_pos, target_neg = targets(pair, pos, neg, self.scheduler)
        return sfo_loss(policy_pos, policy_neg, ref_pos, ref_neg, target_pos, target_neg, self.beta)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.unet, self.adapter_name)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.unet, state, self.adapter_name)
