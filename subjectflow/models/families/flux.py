"""FLUX.1: a flow-matching transformer over 2x2 patches of the latent, conditioned on T5
token states and CLIP's pooled embedding, with guidance distilled into an input (dev)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import FlowMatchingFamily, Prompt

if TYPE_CHECKING:
    import torch


MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's and diffusers' train_dreambooth_lora_flux.py's default
# The distilled guidance the transformer is told in training: train_dreambooth_lora_flux.py's
# default (--guidance_scale 3.5); sampling takes `generate.guidance` / `negatives.guidance`.
TRAINING_GUIDANCE = 3.5


class FluxPrompt(Prompt):
    """T5 states [1 or B, L, D] and CLIP's pooled embedding [1 or B, P]; the latents are
    packed into tokens for the transformer and unpacked from its output."""

    def predict(self, denoiser: Any, dtype: torch.dtype, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`t` [B] is the flow-matching time in [0, 1] (1 = pure noise); the transformer
        scales it by 1000 itself, as FluxPipeline passes it."""
        import torch
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        # [B, C, h, w] -> [B, h/2 · w/2, 4C]: each 2x2 patch is one image token.
        tokens = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        guidance = (torch.full((b,), TRAINING_GUIDANCE, device=noisy.device, dtype=dtype)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(
            hidden_states=tokens.to(dtype), encoder_hidden_states=self._batch(self.states, noisy, dtype),
            pooled_projections=self._batch(self.pooled, noisy, dtype), timestep=t.to(noisy.device, dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype),
            txt_ids=torch.zeros(self.states.shape[1], 3, device=noisy.device, dtype=dtype),
            guidance=guidance, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).float()


class Flux(FlowMatchingFamily):
    name = "flux"
    label = "FLUX.1"
    pipelines = ("FluxPipeline",)
    img2img = "FluxImg2ImgPipeline"
    denoiser_class = "FluxTransformer2DModel"
    max_lengths = (None, MAX_SEQUENCE_LENGTH)

    def extra_text_encoders(self, path: str) -> list[tuple[Any, Any]]:
        from transformers import T5EncoderModel, T5TokenizerFast

        return [(T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"),
                 T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2"))]

    def combine(self, outputs: list[Any], resolution: int) -> Prompt:
        """As FluxPipeline.encode_prompt: CLIP's pooled output and T5's last hidden states."""
        clip, t5 = outputs
        return FluxPrompt(t5.last_hidden_state.float(), clip.pooler_output.float())


FLUX = Flux()
