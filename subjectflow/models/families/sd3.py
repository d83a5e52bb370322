"""Stable Diffusion 3/3.5: a flow-matching MMDiT over patches of the latent, conditioned on
two CLIP encoders and T5 (token states joined on the sequence) and both CLIPs' pooled outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import FlowMatchingFamily, Prompt

if TYPE_CHECKING:
    import torch


MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default, so training sees what sampling does


class SD3Prompt(Prompt):
    """CLIP-L and CLIP-G penultimate states side by side, padded to T5's width and followed by
    T5's states [1 or B, 77 + L, D]; both CLIPs' pooled embeddings side by side [1 or B, P]."""

    def predict(self, denoiser: Any, dtype: torch.dtype, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`t` [B] is the flow-matching time in [0, 1]; SD3's transformer takes it x 1000, as
        StableDiffusion3Pipeline passes the scheduler's timesteps. It patchifies the latents itself."""
        return denoiser(hidden_states=noisy.to(dtype), encoder_hidden_states=self._batch(self.states, noisy, dtype),
                        pooled_projections=self._batch(self.pooled, noisy, dtype),
                        timestep=(t * 1000).to(noisy.device, dtype), return_dict=False)[0].float()


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    label = "Stable Diffusion 3"
    pipelines = ("StableDiffusion3Pipeline",)
    img2img = "StableDiffusion3Img2ImgPipeline"
    denoiser_class = "SD3Transformer2DModel"
    # diffusers' train_dreambooth_lora_sd3.py default: --weighting_scheme logit_normal (0, 1).
    sft_timesteps = "logit_normal"
    max_lengths = (None, None, MAX_SEQUENCE_LENGTH)

    def extra_text_encoders(self, path: str) -> list[tuple[Any, Any]]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return [(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                 CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")),
                (T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"),
                 T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3"))]

    def first_text_encoder(self, path: str) -> Any:
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder")

    def combine(self, outputs: list[Any], resolution: int) -> Prompt:
        """As StableDiffusion3Pipeline.encode_prompt (no clip skip)."""
        import torch
        import torch.nn.functional as F

        clip_l, clip_g, t5 = outputs
        t5 = t5.last_hidden_state
        clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)  # [1, 77, D_L + D_G]
        states = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)  # [1, 77 + L, D_T5]
        return SD3Prompt(states.float(), torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1).float())


SD3 = StableDiffusion3()
